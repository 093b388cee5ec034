"""Build a TensorRT plan from a bundle's ONNX graph, on the device that will run it.

TensorRT and pycuda are imported lazily (`import_tensorrt`, `import_pycuda`); everything else
here takes the `trt` and `cuda` modules as arguments, so the API dispatch (TensorRT 8.5/8.6 vs 10.x,
found by feature detection, never by version string) is exercised by tests without a GPU.

API facts relied on (docs/jetson.md): 8.x needs the EXPLICIT_BATCH network flag, 10.x ignores it;
`set_memory_pool_limit(WORKSPACE, n)` from 8.4; `build_serialized_network` returns None on failure;
FP16 only where `builder.platform_has_fast_fp16`; INT8 through `IInt8EntropyCalibrator2`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple, Union

from .bundle import Bundle, describe, load_bundle
from .calibrator import CalibrationBatches, calibration_images, images_digest, make_entropy_calibrator
from .errors import EngineBuildError
from .plan_cache import PRECISIONS, PlanCache, PlanKey

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 1024  # enough for DAAD-sized graphs; Jetson memory is shared with the CPU
DEVICE_INDEX = 0  # a Jetson has one integrated GPU
MB = 1 << 20


class TensorRTUnavailableError(EngineBuildError):
    """TensorRT (or the CUDA binding it needs) cannot be imported on this machine."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(
            f"TensorRT is not importable here ({exc}); plans are built on the Jetson that runs them, with JetPack's "
            "TensorRT (python3-libnvinfer) seen through a venv made with --system-site-packages. "
            "Without TensorRT, daad-agent scores with ONNX Runtime"
        ) from exc
    return trt


def import_pycuda() -> Any:
    """pycuda.driver, or None when pycuda is not installed."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    return cuda


# --- the CUDA device ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "Orin"
    compute_capability: str  # e.g. "8.7"
    multiprocessors: int = 0  # Orin Nano, NX and AGX all report "Orin": the SM count tells them apart

    @property
    def gpu_name(self) -> str:
        return f"{self.name} ({self.multiprocessors} SMs)" if self.multiprocessors else self.name


def query_device_pycuda(cuda: Any, index: int = DEVICE_INDEX) -> DeviceInfo:
    try:
        cuda.init()
        dev = cuda.Device(index)
        major, minor = dev.compute_capability()
        sms = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        return DeviceInfo(name=str(dev.name()), compute_capability=f"{major}.{minor}", multiprocessors=int(sms))
    except getattr(cuda, "Error", RuntimeError) as exc:
        raise EngineBuildError(f"CUDA device {index} cannot be queried ({exc}); is the GPU visible to this user "
                               "(groups video/render, DeviceAllow= in the unit)?") from exc


def query_device_cuda_python(index: int = DEVICE_INDEX) -> DeviceInfo:
    """The same through NVIDIA's cuda-python, whose every call returns (status, value...)."""
    try:
        from cuda.bindings import driver as cu  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as cu  # older layout; ImportError propagates when absent

    def check(result: Any, what: str) -> Any:
        status, rest = result[0], result[1:]
        if status != cu.CUresult.CUDA_SUCCESS:
            raise EngineBuildError(f"CUDA {what} failed with {status}; is the GPU visible to this user?")
        return rest[0] if len(rest) == 1 else rest

    check(cu.cuInit(0), "cuInit")
    dev = check(cu.cuDeviceGet(index), "cuDeviceGet")
    raw = check(cu.cuDeviceGetName(256, dev), "cuDeviceGetName")
    attr = cu.CUdevice_attribute
    major = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    sms = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute")
    name = raw.split(b"\0")[0].decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return DeviceInfo(name=name, compute_capability=f"{major}.{minor}", multiprocessors=int(sms))


def query_device(cuda: Any = None) -> DeviceInfo:
    """GPU name and compute capability via pycuda, else cuda-python."""
    if cuda is not None:
        return query_device_pycuda(cuda)
    try:
        return query_device_cuda_python()
    except ImportError as exc:
        raise TensorRTUnavailableError(
            "neither pycuda nor cuda-python is importable, so the GPU cannot be identified for the plan cache; "
            "pip install 'daad-inspect[jetson]' (pycuda)"
        ) from exc


class CudaContext:
    """The device's primary context made current in the calling thread (what pycuda.autoprimaryctx
    does, but per thread and released explicitly). TensorRT's runtime API uses the same primary
    context. pycuda contexts belong to the thread that pushed them: close() in that thread."""

    def __init__(self, cuda: Any, index: int = DEVICE_INDEX) -> None:
        self._cuda = cuda
        try:
            cuda.init()
            dev = cuda.Device(index)
            if hasattr(dev, "retain_primary_context"):
                self._ctx = dev.retain_primary_context()
                self._ctx.push()
                self._primary = True
            else:  # pycuda < 2021.1: a context of our own, made current by make_context
                self._ctx = dev.make_context()
                self._primary = False
        except getattr(cuda, "Error", RuntimeError) as exc:
            raise EngineBuildError(f"cannot make a CUDA context on device {index} ({exc}); is the GPU visible "
                                   "to this user (groups video/render)?") from exc

    def close(self) -> None:
        if self._ctx is None:
            return
        ctx, self._ctx = self._ctx, None
        ctx.pop()
        if not self._primary:
            ctx.detach()

    def __enter__(self) -> "CudaContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- TensorRT building blocks (each takes the trt module) ----------------------------------------

_TRT_LOGGERS: Dict[int, Any] = {}


def get_trt_logger(trt: Any) -> Any:
    """One trt.Logger per process (TensorRT warns when builder and runtime get different ones)."""
    if id(trt) not in _TRT_LOGGERS:
        verbose = logging.getLogger("engine").isEnabledFor(logging.DEBUG)
        _TRT_LOGGERS[id(trt)] = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    return _TRT_LOGGERS[id(trt)]


def network_flags(trt: Any, builder: Any) -> int:
    """EXPLICIT_BATCH where the builder still has implicit batch (8.x: `max_batch_size`), else 0 (10.x)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "EXPLICIT_BATCH", None)
    if flag is not None and hasattr(builder, "max_batch_size"):
        return 1 << int(flag)
    return 0


def parse_onnx(trt: Any, network: Any, trt_logger: Any, onnx_path: Path) -> None:
    """Parse into `network`; EngineBuildError listing every parser error."""
    parser = trt.OnnxParser(network, trt_logger)
    if hasattr(parser, "parse_from_file"):
        ok = parser.parse_from_file(str(onnx_path))
    else:
        ok = parser.parse(onnx_path.read_bytes())
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for err in errors:
        logger.error("ONNX parser: %s", err)
    if not ok:
        listed = "; ".join(errors) if errors else "no error reported"
        raise EngineBuildError(
            f"{onnx_path}: TensorRT's ONNX parser refused the graph ({len(errors)} error(s): {listed}); "
            "run `daad-engine check` on the bundle and re-export it"
        )


def network_io(network: Any) -> Tuple[List[Tuple[str, Tuple[int, ...], Any]], List[Tuple[str, Tuple[int, ...], Any]]]:
    """(name, shape, trt.DataType) of the network's inputs and outputs."""
    def info(t: Any) -> Tuple[str, Tuple[int, ...], Any]:
        return (str(t.name), tuple(int(d) for d in t.shape), t.dtype)

    inputs = [info(network.get_input(i)) for i in range(network.num_inputs)]
    outputs = [info(network.get_output(i)) for i in range(network.num_outputs)]
    return inputs, outputs


def check_network_io(trt: Any, network: Any, bundle: Bundle, batch: int, onnx_path: Path) -> None:
    """Log the network's I/O, and refuse one that does not match bundle.yaml."""
    inputs, outputs = network_io(network)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for name, shape, dtype in tensors:
            logger.info("network %s %s: shape %s, %s", kind, name, shape, dtype)
    expected = tuple(bundle.input_shape(batch))
    problems: List[str] = []
    if [n for n, _, _ in inputs] != [bundle.input_name]:
        problems.append(f"inputs are {[n for n, _, _ in inputs]}, bundle.yaml expects [{bundle.input_name!r}]")
    else:
        _, shape, dtype = inputs[0]
        if shape != expected:
            problems.append(f"input {bundle.input_name!r} has shape {shape}, bundle.yaml implies {expected}")
        if dtype != trt.DataType.FLOAT:
            problems.append(f"input {bundle.input_name!r} is {dtype}, expected {trt.DataType.FLOAT}")
    names = [n for n, _, _ in outputs]
    for field_name, name in (("anomaly_map", bundle.map_output), ("score", bundle.score_output)):
        if name not in names:
            problems.append(f"no output {name!r} (bundle.yaml outputs.{field_name}); outputs are {names}")
    if problems:
        raise EngineBuildError(f"{onnx_path}: the graph does not match {bundle.root / 'bundle.yaml'}: "
                               + "; ".join(problems) + "; re-export the bundle")


def configure(trt: Any, builder: Any, config: Any, precision: str, workspace_mb: int, calibrator: Any = None) -> None:
    """Workspace and precision flags; refuses a precision this GPU/TensorRT cannot do (no silent fallback)."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if workspace_mb < 1:
        raise EngineBuildError(f"--workspace-mb must be >= 1, got {workspace_mb}")
    if not hasattr(config, "set_memory_pool_limit"):
        raise EngineBuildError(f"TensorRT {getattr(trt, '__version__', '?')} has no set_memory_pool_limit; "
                               "daad-inspect needs TensorRT 8.5 or later (JetPack 5.1+)")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) * MB)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineBuildError("this TensorRT has no FP16 builder flag (strongly typed networks only); "
                                   "build with --precision fp32 or export an fp16 graph")
        fast = getattr(builder, "platform_has_fast_fp16", None)
        if fast is False:
            raise EngineBuildError("this GPU has no fast FP16 (builder.platform_has_fast_fp16 is False); "
                                   "build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        if not hasattr(trt.BuilderFlag, "INT8") or not hasattr(config, "int8_calibrator"):
            raise EngineBuildError("this TensorRT has no calibrated INT8 (TensorRT 11 dropped it); "
                                   "build with --precision fp16")
        if getattr(builder, "platform_has_fast_int8", None) is False:
            raise EngineBuildError("this GPU has no fast INT8 (builder.platform_has_fast_int8 is False); "
                                   "build with --precision fp16 or fp32")
        if calibrator is None:
            raise EngineBuildError("--precision int8 needs a calibrator fed with --calib-images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator


# --- INT8: the memory search stays in floating point -------------------------------------------------
# Calibrated INT8 lets TensorRT quantise any layer where that is faster; quantising the similarity search
# can change which memory item is nearest (docs/peers.md). So in INT8 builds the search - MatMul against a
# constant (the memory), ArgMax/ArgMin (TopK layers with k = 1), Gather, the constants feeding them and
# every layer between - is pinned to FP16 (FP32 where the GPU has no fast FP16), and TensorRT is told to
# obey per-layer precisions.

def _layer_type(trt: Any, name: str) -> Any:
    return getattr(getattr(trt, "LayerType", None), name, object())  # a sentinel no layer type equals


def _topk_k(trt: Any, layer: Any) -> Optional[int]:
    """k of a TopK layer; the Python API hands out ILayer, so cast to ITopKLayer (as Polygraphy does)."""
    cls = getattr(trt, "ITopKLayer", None)
    if cls is not None and not isinstance(layer, cls):
        try:
            layer.__class__ = cls
        except TypeError:
            pass
    k = getattr(layer, "k", None)
    return None if k is None else int(k)


def memory_search_layers(trt: Any, network: Any) -> List[int]:
    """Indices of the layers of the memory search (see above), in network order; [] when there is none."""
    n = int(getattr(network, "num_layers", 0))
    layers = [network.get_layer(i) for i in range(n)]
    producer: Dict[str, int] = {}
    consumers: Dict[str, List[int]] = {}
    for i, layer in enumerate(layers):
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = i
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:
                consumers.setdefault(tensor.name, []).append(i)

    def inputs_of(i: int) -> List[int]:
        ins = (layers[i].get_input(j) for j in range(layers[i].num_inputs))
        return [producer[t.name] for t in ins if t is not None and t.name in producer]

    constant, matmul = _layer_type(trt, "CONSTANT"), _layer_type(trt, "MATRIX_MULTIPLY")
    topk, gather = _layer_type(trt, "TOPK"), _layer_type(trt, "GATHER")
    seeds = {i for i, layer in enumerate(layers)
             if layer.type == matmul and any(layers[p].type == constant for p in inputs_of(i))}
    sinks = {i for i, layer in enumerate(layers)
             if layer.type == gather or (layer.type == topk and _topk_k(trt, layer) in (1, None))}
    if not seeds or not sinks:
        return []

    def reach(start: Set[int], step: Any) -> Set[int]:
        seen, todo = set(start), list(start)
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def outputs_of(i: int) -> List[int]:
        return [c for j in range(layers[i].num_outputs) for c in consumers.get(layers[i].get_output(j).name, [])]

    between = reach(seeds, outputs_of) & reach(sinks, inputs_of)
    feeding = {p for i in between for p in inputs_of(i) if layers[p].type == constant}  # the memory itself
    return sorted(between | feeding)


def constrain_memory_search(trt: Any, builder: Any, network: Any, config: Any) -> List[str]:
    """Pin the memory search to FP16 (FP32 without fast FP16) in an INT8 build; the pinned layers' names."""
    indices = memory_search_layers(trt, network)
    if not indices:
        logger.info("INT8: no memory search (MatMul on a constant, then ArgMax/ArgMin/Gather) in this graph")
        return []
    flags = trt.BuilderFlag
    obey = getattr(flags, "OBEY_PRECISION_CONSTRAINTS", None)
    if obey is None:
        raise EngineBuildError("this TensorRT cannot keep layers out of INT8 (no BuilderFlag.OBEY_PRECISION_"
                               "CONSTRAINTS), so the memory search would be quantised; build with --precision fp16")
    config.set_flag(obey)
    half = getattr(builder, "platform_has_fast_fp16", False) is True and hasattr(flags, "FP16")
    if half:
        config.set_flag(flags.FP16)  # FP16 must be allowed for layers to be pinned to it
    dtype = trt.DataType.HALF if half else trt.DataType.FLOAT
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    names = []
    for i in indices:
        layer = network.get_layer(i)
        if layer.get_output(0).dtype not in floats:
            continue  # index and shape arithmetic: integer, never quantised
        layer.precision = dtype
        for j in range(layer.num_outputs):  # the outputs too, or TensorRT may still hand on INT8 tensors
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, dtype)
        names.append(str(layer.name))
    logger.info("INT8: %d layer(s) of the memory search kept in %s: %s", len(names), "FP16" if half else "FP32",
                ", ".join(names))
    return names


def _to_bytes(buffer: Any) -> bytes:
    """IHostMemory (buffer protocol) or bytes -> bytes."""
    return bytes(memoryview(buffer))


def _set_timing_cache(config: Any, data: Optional[bytes]) -> bool:
    if not hasattr(config, "create_timing_cache"):
        return False
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # TensorRT raises its own error types for a corrupt cache
            logger.warning("timing cache unreadable (%s); starting a new one", exc)
    if cache is None:
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, True)  # ignore_mismatch: the file is already keyed by GPU and version
    return True


def build_serialized(trt: Any, bundle: Bundle, batch: int, precision: str, workspace_mb: int,
                     timing_cache: Optional[bytes] = None, calibrator: Any = None) -> Tuple[bytes, Optional[bytes]]:
    """Parse, check I/O, configure and build: (plan bytes, timing cache bytes or None)."""
    onnx_path = bundle.onnx_path(batch)
    trt_logger = get_trt_logger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(trt_logger, "")
    builder = trt.Builder(trt_logger)
    if builder is None:
        raise EngineBuildError("TensorRT could not create a builder (no usable GPU? see the TensorRT log above)")
    network = builder.create_network(network_flags(trt, builder))
    parse_onnx(trt, network, trt_logger, onnx_path)
    check_network_io(trt, network, bundle, batch, onnx_path)
    config = builder.create_builder_config()
    configure(trt, builder, config, precision, workspace_mb, calibrator)
    if precision == "int8":
        constrain_memory_search(trt, builder, network, config)
    has_timing = _set_timing_cache(config, timing_cache)
    logger.info("building %s TensorRT %s engine for %s (batch %d, workspace %d MB); this takes minutes",
                precision, getattr(trt, "__version__", "?"), onnx_path, batch, workspace_mb)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT could not build a {precision} engine (build_serialized_network returned None; "
            f"the TensorRT errors above say why); try a larger --workspace-mb (now {workspace_mb}) or --precision fp32"
        )
    timing = _to_bytes(config.get_timing_cache().serialize()) if has_timing else None
    return _to_bytes(plan), timing


def plan_key(bundle: Bundle, batch: int, precision: str, trt_version: str, device: DeviceInfo) -> PlanKey:
    return PlanKey(
        bundle_sha256=bundle.graph(batch).sha256,
        trt_version=trt_version,
        gpu_name=device.gpu_name,
        compute_capability=device.compute_capability,
        precision=precision,
        input_shape=bundle.preprocess.input_shape,
        batch=batch,
    )


def build_plan_with(trt: Any, cuda: Any, device: DeviceInfo, bundle: Bundle, precision: str, cache: PlanCache,
                    calib_images: Optional[Path] = None, workspace_mb: int = DEFAULT_WORKSPACE_MB, batch: int = 1,
                    if_missing: bool = False) -> Path:
    """build_plan with the runtime modules and device given (the CUDA context must be current)."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt_version = str(getattr(trt, "__version__", "unknown"))
    key = plan_key(bundle, batch, precision, trt_version, device)
    existing = cache.find_plan(key) if if_missing else None

    calib_paths: Optional[List[Path]] = None
    digest = ""
    if precision == "int8" and calib_images is not None:
        calib_paths = calibration_images(calib_images)
        digest = images_digest(calib_paths)
    elif calib_images is not None:
        logger.warning("--calib-images is used only with --precision int8; ignoring it for %s", precision)

    if existing is not None:
        recorded = cache.read_built_info(key).get("calibration", {}).get("images_sha256", "")
        if precision == "int8" and digest and recorded != digest:
            logger.info("plan %s was calibrated on other images; rebuilding", existing)
        else:
            logger.info("plan for %s already built: %s", key.describe(), existing)
            return existing
    if precision == "int8" and calib_paths is None:
        raise EngineBuildError("--precision int8 needs --calib-images DIR: 100-500 good frames from this station "
                               "(the same camera and lighting as in service)")

    calibrator = None
    if calib_paths is not None:
        if cuda is None:
            raise TensorRTUnavailableError("INT8 calibration needs pycuda for device buffers: pip install 'daad-inspect[jetson]'")
        batches = CalibrationBatches(calib_paths, bundle.preprocess, batch)
        calib_cache = cache.calibration_cache_path(key.bundle_sha256, trt_version, digest)
        calibrator = make_entropy_calibrator(trt, cuda, batches, calib_cache)
        logger.info("INT8 calibration on %d images from %s (%d batches of %d)", len(calib_paths), calib_images,
                    len(batches), batch)

    timing_path = cache.timing_cache_path(trt_version, device.gpu_name, device.compute_capability)
    started = time.monotonic()
    try:
        plan, timing = build_serialized(trt, bundle, batch, precision, workspace_mb, cache.read_bytes(timing_path), calibrator)
        if calibrator is not None and calibrator.feed.error is not None:
            raise calibrator.feed.error
    finally:
        if calibrator is not None:
            calibrator.close()
    seconds = time.monotonic() - started
    if timing:
        cache.write_bytes(timing_path, timing)
    built: Dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": bundle.name,
        "onnx_file": bundle.graph(batch).file,
        "workspace_mb": int(workspace_mb),
        "build_seconds": round(seconds, 1),
    }
    if calib_paths is not None:
        built["calibration"] = {"images": len(calib_paths), "images_sha256": digest, "source": str(calib_images)}
    path = cache.store_plan(key, plan, built)
    logger.info("plan written to %s (%.1f MB, built in %.0f s)", path, len(plan) / MB, seconds)
    return path


def build_plan(bundle: Union[Bundle, str, Path], precision: str = "fp16", cache_dir: Optional[Union[str, Path]] = None,
               calib_images: Optional[Path] = None, workspace_mb: int = DEFAULT_WORKSPACE_MB, batch: int = 1,
               if_missing: bool = False) -> Path:
    """Build (or, with if_missing, find) the plan for this bundle on this device; returns its path.

    Raises TensorRTUnavailableError where TensorRT cannot be imported, EngineBuildError when the
    build fails (with every parser error), BundleError for a bad bundle.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    bundle.graph(batch)  # BundleError for a batch size the bundle lacks, before touching the GPU
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    cuda = import_pycuda()
    context = CudaContext(cuda) if cuda is not None else None
    try:
        device = query_device(cuda)
        logger.info("device: %s, compute capability %s; TensorRT %s; bundle %s", device.gpu_name,
                    device.compute_capability, getattr(trt, "__version__", "?"), describe(bundle))
        return build_plan_with(trt, cuda, device, bundle, precision, PlanCache(cache_dir), calib_images,
                               workspace_mb, batch, if_missing)
    finally:
        if context is not None:
            context.close()

