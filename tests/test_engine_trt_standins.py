"""TensorRT dispatch, build arguments, plan reuse and the backend's buffer plumbing, against
small hand-written stand-ins shaped like the TensorRT 8.5 and 10.x Python APIs and pycuda.driver.

The stand-ins mimic API *surfaces* (which attributes exist in which version); their "engine"
runs the bundle's real ONNX graph with ONNX Runtime, so the buffer plumbing is checked against
real numbers. What needs real TensorRT is in test_engine_tensorrt_device.py (`-m tensorrt`).
"""
from __future__ import annotations

import json
import threading
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.bundle import Bundle, write_bundle_yaml, load_bundle
from engine.errors import BackendError, EngineBuildError, ImageError
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.plan_cache import PlanCache
from engine.preprocess import preprocess_batch
from engine.tensorrt_backend import (IO_BINDINGS, IO_TENSORS, TensorRTBackend, describe_io,
                                     open_tensorrt_backend_with, select_io_api)
from engine.trt_build import (CudaContext, DeviceInfo, build_plan_with, configure, network_flags)
from train.synthetic import make_good

ORIN = DeviceInfo(name="Orin", compute_capability="8.7", multiprocessors=16)
PLAN_MAGIC = b"FAKEPLAN"


# --- pycuda.driver stand-in: device memory is a dict of bytearrays ---------------------------------

class FakeAlloc:
    def __init__(self, cuda: "FakeCuda", ptr: int) -> None:
        self._cuda, self.ptr = cuda, ptr

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        del self._cuda.memory[self.ptr]
        self._cuda.freed.append(self.ptr)


class FakeContext:
    def __init__(self, log: List[str]) -> None:
        self.log = log

    def push(self) -> None:
        self.log.append("push")

    def pop(self) -> None:
        self.log.append("pop")


class FakeCuda:
    class Error(Exception):
        pass

    def __init__(self) -> None:
        self.memory: Dict[int, bytearray] = {}
        self.freed: List[int] = []
        self.context_log: List[str] = []
        self._next = 0x10000

    def init(self) -> None:
        pass

    def Device(self, index: int) -> Any:  # noqa: N802 - pycuda's name
        log = self.context_log
        return types.SimpleNamespace(retain_primary_context=lambda: FakeContext(log))

    def mem_alloc(self, nbytes: int) -> FakeAlloc:
        ptr, self._next = self._next, self._next + nbytes + 256
        self.memory[ptr] = bytearray(nbytes)
        return FakeAlloc(self, ptr)

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def Stream(self) -> Any:  # noqa: N802
        return types.SimpleNamespace(handle=7, synchronize=lambda: None)

    def memcpy_htod(self, alloc: FakeAlloc, array: np.ndarray) -> None:
        self.memory[int(alloc)][:] = np.ascontiguousarray(array).tobytes()

    def memcpy_htod_async(self, alloc: FakeAlloc, array: np.ndarray, stream: Any) -> None:
        self.memcpy_htod(alloc, array)

    def memcpy_dtoh_async(self, array: np.ndarray, alloc: FakeAlloc, stream: Any) -> None:
        array[...] = np.frombuffer(bytes(self.memory[int(alloc)]), dtype=array.dtype).reshape(array.shape)

    def read(self, ptr: int, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        return np.frombuffer(bytes(self.memory[ptr]), dtype=dtype).reshape(shape)

    def write(self, ptr: int, array: np.ndarray) -> None:
        self.memory[ptr][:] = np.ascontiguousarray(array, dtype=np.float32).tobytes()


# --- tensorrt stand-ins --------------------------------------------------------------------------

class Flags:
    EXPLICIT_BATCH = 0


class DataType:
    FLOAT = "DataType.FLOAT"
    HALF = "DataType.HALF"
    INT32 = "DataType.INT32"


class LayerType:
    CONSTANT = "CONSTANT"
    MATRIX_MULTIPLY = "MATRIX_MULTIPLY"
    TOPK = "TOPK"
    GATHER = "GATHER"
    OTHER = "OTHER"


# ONNX op -> the TensorRT layer its importer makes (ArgMax/ArgMin become TopK with k = 1)
LAYER_OF_OP = {"MatMul": LayerType.MATRIX_MULTIPLY, "TopK": LayerType.TOPK, "ArgMax": LayerType.TOPK,
               "ArgMin": LayerType.TOPK, "Gather": LayerType.GATHER}


class FakeLayer:
    """ILayer's surface: name, type, inputs/outputs, precision and output types (what the builder obeys)."""

    def __init__(self, name: str, type_: str, inputs: List[Any], outputs: List[Any], k: Optional[int] = None) -> None:
        self.name, self.type, self._inputs, self._outputs = name, type_, inputs, outputs
        self.precision: Any = None
        self.output_types: Dict[int, Any] = {}
        if k is not None:
            self.k = k

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_input(self, j: int) -> Any:
        return self._inputs[j]

    def get_output(self, j: int) -> Any:
        return self._outputs[j]

    def set_output_type(self, j: int, dtype: Any) -> None:
        self.output_types[j] = dtype


def network_layers(model: onnx.ModelProto) -> List[FakeLayer]:
    """The layers TensorRT's ONNX importer would make, by type: one constant per initializer used, one layer
    per node (TopK-like nodes with a float values output and an INT32 indices output)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tensors: Dict[str, Any] = {}

    def tensor(name: str, dtype: str = DataType.FLOAT) -> Any:
        return tensors.setdefault(name, types.SimpleNamespace(name=name, dtype=dtype))

    layers: List[FakeLayer] = []
    for name, value in inits.items():
        dtype = DataType.FLOAT if value.dtype.kind == "f" else DataType.INT32
        layers.append(FakeLayer(f"const_{name}", LayerType.CONSTANT, [], [tensor(name, dtype)]))
    for node in model.graph.node:
        type_ = LAYER_OF_OP.get(node.op_type, LayerType.OTHER)
        inputs = [tensor(i) for i in node.input if i]
        if node.op_type in ("ArgMax", "ArgMin"):
            outputs, k = [tensor(node.name + "_values"), tensor(node.output[0], DataType.INT32)], 1
        elif node.op_type == "TopK":
            outputs, k = [tensor(node.output[0]), tensor(node.output[1], DataType.INT32)], int(inits[node.input[1]][0])
        else:
            int_out = node.op_type == "Cast"
            outputs, k = [tensor(o, DataType.INT32 if int_out else DataType.FLOAT) for o in node.output], None
        layers.append(FakeLayer(node.name, type_, inputs, outputs, k))
    return layers


class TensorIOMode:
    INPUT = "TensorIOMode.INPUT"
    OUTPUT = "TensorIOMode.OUTPUT"


def _dims(vi: Any) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)


class FakeNetwork:
    def __init__(self) -> None:
        self.inputs: List[Any] = []
        self.outputs: List[Any] = []
        self.layers: List[FakeLayer] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> Any:
        return self.inputs[i]

    def get_output(self, i: int) -> Any:
        return self.outputs[i]


class FakeParser:
    """Reads the real ONNX file; refuses the op types in `trt.refused_ops`, one error per node."""

    def __init__(self, trt: Any, network: FakeNetwork, logger: Any) -> None:
        self.trt, self.network, self.errors = trt, network, []  # type: ignore[var-annotated]

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path)
        self.trt.parsed.append(path)
        self.errors = [f"In node {i} ({n.op_type}): UNSUPPORTED_NODE: No importer registered for op: {n.op_type}"
                       for i, n in enumerate(model.graph.node) if n.op_type in self.trt.refused_ops]
        if self.errors:
            return False
        inits = {t.name for t in model.graph.initializer}
        tensor = lambda vi: types.SimpleNamespace(name=vi.name, shape=_dims(vi), dtype=DataType.FLOAT)  # noqa: E731
        self.network.inputs = [tensor(vi) for vi in model.graph.input if vi.name not in inits]
        self.network.outputs = [tensor(vi) for vi in model.graph.output]
        self.network.layers = network_layers(model)
        self.network.path = path
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timing"


class FakeConfig:
    def __init__(self) -> None:
        self.flags: List[str] = []
        self.pool: Dict[str, int] = {}
        self.int8_calibrator: Any = None
        self.timing_loaded: Optional[bytes] = None
        self._timing: Optional[FakeTimingCache] = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool[pool] = size

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self._timing, self.timing_loaded = cache, cache.data
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        return self._timing  # type: ignore[return-value]


class FakeBuilder:
    def __init__(self, trt: Any, logger: Any) -> None:
        self.trt = trt
        self.platform_has_fast_fp16 = trt.fast_fp16
        self.platform_has_fast_int8 = True
        if trt.implicit_batch_api:
            self.max_batch_size = 1  # TensorRT 8.x still has implicit batch; gone in 10

    def create_network(self, flags: int) -> FakeNetwork:
        self.trt.network_flags.append(flags)
        return FakeNetwork()

    def create_builder_config(self) -> FakeConfig:
        config = FakeConfig()
        self.trt.configs.append(config)
        return config

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> Optional[bytes]:
        self.trt.builds += 1
        self.trt.networks.append(network)
        if self.trt.build_returns_none:
            return None
        calibrator = config.int8_calibrator
        if calibrator is not None:  # what TensorRT does: cache, else batches until None, then write the cache
            if calibrator.read_calibration_cache() is None:
                while calibrator.get_batch(["image"]) is not None:
                    self.trt.calibration_batches += 1
                calibrator.write_calibration_cache(b"TRT-8502-EntropyCalibration2 fake scales")
        plan = {"onnx": network.path, "flags": config.flags,
                "io": [[t.name, list(t.shape), True] for t in network.inputs]
                + [[t.name, list(t.shape), False] for t in network.outputs]}
        return PLAN_MAGIC + json.dumps(plan).encode()


class FakeExecutionContext:
    def __init__(self, engine: "FakeEngine") -> None:
        self.engine = engine
        self.addresses: Dict[str, int] = {}
        self.session = ort.InferenceSession(engine.plan["onnx"], providers=["CPUExecutionProvider"])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _run(self) -> bool:
        cuda, io = self.engine.trt.cuda, self.engine.plan["io"]
        feeds = {n: cuda.read(self.addresses[n], s) for n, s, is_in in io if is_in}
        outs = self.session.run([n for n, _, is_in in io if not is_in], feeds)
        for (n, _, _), value in zip([t for t in io if not t[2]], outs):
            cuda.write(self.addresses[n], value)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        return self._run()

    def execute_async_v2(self, bindings: List[int], stream_handle: int) -> bool:
        self.addresses = {t[0]: ptr for t, ptr in zip(self.engine.plan["io"], bindings)}
        return self._run()


class FakeEngine:
    def __init__(self, trt: Any, plan: Dict[str, Any]) -> None:
        self.trt, self.plan = trt, plan

    def create_execution_context(self) -> FakeExecutionContext:
        return FakeExecutionContext(self)


class TensorsAPI:  # 8.5+: the name-based I/O API
    @property
    def num_io_tensors(self) -> int:
        return len(self.plan["io"])

    def get_tensor_name(self, i: int) -> str:
        return self.plan["io"][i][0]

    def _io(self, name: str) -> list:
        return next(t for t in self.plan["io"] if t[0] == name)

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if self._io(name)[2] else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(self._io(name)[1])

    def get_tensor_dtype(self, name: str) -> str:
        return DataType.FLOAT


class BindingsAPI:  # <= 8.6: the binding-index API
    @property
    def num_bindings(self) -> int:
        return len(self.plan["io"])

    def get_binding_name(self, i: int) -> str:
        return self.plan["io"][i][0]

    def binding_is_input(self, i: int) -> bool:
        return self.plan["io"][i][2]

    def get_binding_shape(self, i: int) -> tuple:
        return tuple(self.plan["io"][i][1])

    def get_binding_dtype(self, i: int) -> str:
        return DataType.FLOAT


class Engine85(TensorsAPI, BindingsAPI, FakeEngine):
    """TensorRT 8.5/8.6: both I/O APIs."""


class Engine10(TensorsAPI, FakeEngine):
    """TensorRT 10.x: name-based only."""


class Engine84(BindingsAPI, FakeEngine):
    """TensorRT <= 8.4: bindings only."""


class FakeRuntime:
    def __init__(self, trt: Any) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> Optional[FakeEngine]:
        if not data.startswith(PLAN_MAGIC):
            return None  # what TensorRT does for a plan of another version/GPU
        return self.trt.engine_class(self.trt, json.loads(data[len(PLAN_MAGIC):]))


def make_trt(flavour: str, cuda: Optional[FakeCuda] = None) -> Any:
    """A `tensorrt` module stand-in: '8.5' (JetPack 5), '10' (JetPack 6.1), '11' (no FP16/INT8 flags)."""
    trt = types.SimpleNamespace()
    trt.__version__ = {"8.5": "8.5.2.2", "10": "10.3.0.30", "11": "11.0.0"}[flavour]
    trt.cuda = cuda or FakeCuda()
    trt.implicit_batch_api = flavour == "8.5"
    trt.engine_class = {"8.5": Engine85, "10": Engine10, "11": Engine10}[flavour]
    trt.fast_fp16 = True
    trt.refused_ops: List[str] = []
    trt.build_returns_none = False
    trt.network_flags: List[int] = []
    trt.configs: List[FakeConfig] = []
    trt.parsed: List[str] = []
    trt.builds = 0
    trt.networks: List[FakeNetwork] = []
    trt.LayerType = LayerType
    trt.calibration_batches = 0
    trt.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda self, severity: None})
    trt.NetworkDefinitionCreationFlag = Flags
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace() if flavour == "11" else types.SimpleNamespace(
        FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS")
    if flavour != "11":
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})
    trt.DataType = DataType
    trt.TensorIOMode = TensorIOMode
    trt.nptype = lambda dt: {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[dt]
    trt.Builder = lambda logger: FakeBuilder(trt, logger)
    trt.OnnxParser = lambda network, logger: FakeParser(trt, network, logger)
    trt.Runtime = lambda logger: FakeRuntime(trt)
    return trt


def reference(bundle: Bundle, batch: np.ndarray, size: int) -> Any:
    with OnnxRuntimeBackend(bundle, batch=size) as ort_backend:
        return ort_backend.infer(batch)


def frames(bundle: Bundle, n: int, offset: int = 0) -> np.ndarray:
    return preprocess_batch([make_good(1, offset + i, 96) for i in range(n)], bundle.preprocess)


# --- select_io_api and describe_io ---------------------------------------------------------------

@pytest.mark.parametrize("engine_class, expected", [
    (Engine85, IO_TENSORS),  # 8.5/8.6 have both APIs: the name-based one is preferred
    (Engine10, IO_TENSORS),  # 10.x: num_bindings/execute_async_v2 are gone
    (Engine84, IO_BINDINGS),  # older engines: bindings only
])
def test_select_io_api(engine_class: type, expected: str) -> None:
    assert select_io_api(engine_class(None, {"io": []})) == expected


def test_select_io_api_refuses_unknown_engine() -> None:
    with pytest.raises(BackendError, match="neither the tensor-name I/O API nor the binding API"):
        select_io_api(object())


@pytest.mark.parametrize("api", [IO_TENSORS, IO_BINDINGS])
def test_describe_io_same_through_both_apis(api: str) -> None:
    plan = {"io": [["image", [1, 1, 64, 64], True], ["anomaly_map", [1, 1, 64, 64], False], ["score", [1], False]]}
    infos = describe_io(make_trt("8.5"), Engine85(None, plan), api)
    assert [(t.name, t.is_input, t.shape, t.dtype) for t in infos] == [
        ("image", True, (1, 1, 64, 64), np.float32), ("anomaly_map", False, (1, 1, 64, 64), np.float32),
        ("score", False, (1,), np.float32)]


# --- build arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("flavour, flags", [
    ("8.5", 1 << Flags.EXPLICIT_BATCH),  # 8.x networks are implicit-batch unless asked
    ("10", 0),  # 10.x: explicit batch always, the flag is deprecated
])
def test_network_flags(flavour: str, flags: int) -> None:
    trt = make_trt(flavour)
    assert network_flags(trt, trt.Builder(None)) == flags


def test_configure_sets_workspace_and_fp16() -> None:
    trt = make_trt("10")
    config = FakeConfig()
    configure(trt, trt.Builder(None), config, "fp16", workspace_mb=512)
    assert config.pool == {"MemoryPoolType.WORKSPACE": 512 << 20}
    assert config.flags == ["FP16"]


def test_fp16_refused_without_fast_fp16_never_falls_back() -> None:
    trt = make_trt("8.5")
    trt.fast_fp16 = False
    config = FakeConfig()
    with pytest.raises(EngineBuildError, match="platform_has_fast_fp16 is False.*--precision fp32"):
        configure(trt, trt.Builder(None), config, "fp16", workspace_mb=256)
    assert config.flags == []


@pytest.mark.parametrize("precision, message", [
    ("fp16", "no FP16 builder flag"),  # TensorRT 11: strongly typed only
    ("int8", "no calibrated INT8"),
])
def test_trt11_precisions_refused(precision: str, message: str) -> None:
    trt = make_trt("11")
    with pytest.raises(EngineBuildError, match=message):
        configure(trt, trt.Builder(None), FakeConfig(), precision, workspace_mb=256)


def test_int8_needs_calibrator() -> None:
    trt = make_trt("10")
    with pytest.raises(EngineBuildError, match="calibrator"):
        configure(trt, trt.Builder(None), FakeConfig(), "int8", workspace_mb=256)


def test_configure_refuses_tensorrt_without_memory_pools() -> None:
    trt = make_trt("8.5")
    config = types.SimpleNamespace()  # TensorRT < 8.4: max_workspace_size only
    with pytest.raises(EngineBuildError, match="needs TensorRT 8.5 or later"):
        configure(trt, trt.Builder(None), config, "fp32", workspace_mb=256)


# --- build_plan_with ------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["8.5", "10"])
def test_build_then_reuse_plan_and_timing_cache(flavour: str, template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt(flavour)
    cache = PlanCache(tmp_path / "cache")
    path = build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp16", cache, workspace_mb=256)
    assert path.read_bytes().startswith(PLAN_MAGIC)  # the plan is TensorRT's bytes, no header of ours
    assert trt.builds == 1 and trt.configs[0].flags == ["FP16"]
    assert trt.configs[0].timing_loaded == b""  # no timing cache yet: a new one
    sidecar = json.loads((path.parent / "key.json").read_text())
    assert sidecar["key"]["trt_version"] == trt.__version__ and sidecar["key"]["gpu_name"] == "Orin (16 SMs)"
    timing = cache.timing_cache_path(trt.__version__, ORIN.gpu_name, "8.7")
    assert timing.read_bytes() == b"+timing"

    assert build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp16", cache, if_missing=True) == path
    assert trt.builds == 1  # --if-missing: found, not rebuilt

    build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp16", cache)  # forced rebuild reuses timings
    assert trt.builds == 2 and trt.configs[1].timing_loaded == b"+timing"


def test_plan_of_other_tensorrt_version_is_rebuilt(template_bundle: Bundle, tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    old = make_trt("8.5")
    old_path = build_plan_with(old, old.cuda, ORIN, template_bundle, "fp32", cache)
    new = make_trt("10")
    new_path = build_plan_with(new, new.cuda, ORIN, template_bundle, "fp32", cache, if_missing=True)
    assert new.builds == 1 and new_path != old_path


def test_every_parser_error_is_in_the_build_error(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("8.5")
    trt.refused_ops = ["Abs", "AveragePool"]
    with pytest.raises(EngineBuildError) as info:
        build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp32", PlanCache(tmp_path))
    message = str(info.value)
    assert "model.onnx" in message and "2 error(s)" in message
    assert "op: Abs" in message and "op: AveragePool" in message
    assert trt.builds == 0


def test_build_returning_none_is_a_clear_error(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    trt.build_returns_none = True
    with pytest.raises(EngineBuildError, match="build_serialized_network returned None.*--workspace-mb"):
        build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp32", PlanCache(tmp_path))
    assert not list(tmp_path.rglob("model.plan"))


def test_network_io_must_match_bundle_yaml(template_bundle: Bundle, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "renamed"
    shutil.copytree(template_bundle.root, root)
    meta = dict(template_bundle.metadata, input={"name": "frame", "dtype": "float32", "layout": "NCHW"})
    write_bundle_yaml(root, meta)
    trt = make_trt("10")
    with pytest.raises(EngineBuildError, match=r"inputs are \['image'\], bundle.yaml expects \['frame'\]"):
        # verify=False: load_bundle itself refuses this bundle now; this checks the builder's own guard
        build_plan_with(trt, trt.cuda, ORIN, load_bundle(root, verify=False), "fp32", PlanCache(tmp_path / "cache"))


def _write_calib_images(folder: Path, n: int) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), make_good(2, i, 96))
    return folder


def test_int8_calibration_feeds_batches_and_reuses_cache(template_bundle: Bundle, tmp_path: Path) -> None:
    images = _write_calib_images(tmp_path / "calib", 10)
    trt = make_trt("8.5")
    cache = PlanCache(tmp_path / "cache")
    build_plan_with(trt, trt.cuda, ORIN, template_bundle, "int8", cache, calib_images=images, batch=4)
    assert trt.calibration_batches == 3  # 10 images in batches of 4: the last one padded
    assert trt.configs[0].flags == ["INT8"]
    assert trt.cuda.memory == {}  # the calibrator's device buffer was freed
    assert len(list((tmp_path / "cache" / "calibration").glob("*.cache"))) == 1

    build_plan_with(trt, trt.cuda, ORIN, template_bundle, "int8", cache, calib_images=images, batch=4)
    assert trt.builds == 2 and trt.calibration_batches == 3  # second build read the calibration cache


def test_int8_needs_calibration_images(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    with pytest.raises(EngineBuildError, match="--calib-images DIR"):
        build_plan_with(trt, trt.cuda, ORIN, template_bundle, "int8", PlanCache(tmp_path))


def test_unreadable_calibration_image_is_reported_after_build(template_bundle: Bundle, tmp_path: Path) -> None:
    images = _write_calib_images(tmp_path / "calib", 3)
    (images / "002.png").write_bytes(b"not a png")
    trt = make_trt("10")
    with pytest.raises(ImageError, match="002.png"):
        build_plan_with(trt, trt.cuda, ORIN, template_bundle, "int8", PlanCache(tmp_path / "c"), calib_images=images)
    assert trt.cuda.memory == {}


# --- the backend's plumbing ----------------------------------------------------------------------

@pytest.mark.parametrize("flavour, engine_class, api", [
    ("8.5", Engine85, IO_TENSORS),
    ("10", Engine10, IO_TENSORS),
    ("8.5", Engine84, IO_BINDINGS),
])
@pytest.mark.parametrize("batch", [1, 4])
def test_backend_matches_onnxruntime(flavour: str, engine_class: type, api: str, batch: int,
                                     template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt(flavour)
    trt.engine_class = engine_class
    with open_tensorrt_backend_with(trt, trt.cuda, template_bundle, batch=batch, plan_cache=tmp_path,
                                    device=ORIN) as backend:
        assert isinstance(backend, TensorRTBackend) and backend.io_api == api
        x = frames(template_bundle, batch)
        got, want = backend.infer(x), reference(template_bundle, x, batch)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-6)
        np.testing.assert_allclose(got.score, want.score, rtol=1e-6)
        assert got.score.shape == (batch,)
        allocated = dict(trt.cuda.memory)
        backend.infer(frames(template_bundle, batch, offset=50))
        assert trt.cuda.memory.keys() == allocated.keys()  # no allocation per frame
    assert trt.cuda.memory == {}  # close() freed every device buffer


def test_backend_refuses_wrong_input_and_other_threads(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    backend = open_tensorrt_backend_with(trt, trt.cuda, template_bundle, plan_cache=tmp_path, device=ORIN)
    try:
        with pytest.raises(BackendError, match=r"input shape must be \(1, 1, 64, 64\)"):
            backend.infer(np.zeros((1, 3, 64, 64), np.float32))
        with pytest.raises(BackendError, match="dtype must be float32"):
            backend.infer(np.zeros((1, 1, 64, 64), np.float64))
        errors: List[Exception] = []
        worker = threading.Thread(target=lambda: errors.append(pytest.raises(BackendError, backend.infer,
                                                                             frames(template_bundle, 1)).value))
        worker.start()
        worker.join()
        assert "another thread" in str(errors[0])
    finally:
        backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(frames(template_bundle, 1))


def test_missing_plan_without_build_names_the_command(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    with pytest.raises(BackendError, match="no TensorRT plan .*`daad-engine build"):
        open_tensorrt_backend_with(trt, trt.cuda, template_bundle, plan_cache=tmp_path, build_if_missing=False,
                                   device=ORIN)
    assert trt.builds == 0


def test_undeserializable_plan_is_rebuilt_not_a_crash(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    cache = PlanCache(tmp_path)
    path = build_plan_with(trt, trt.cuda, ORIN, template_bundle, "fp32", cache)
    from engine.trt_build import plan_key

    key = plan_key(template_bundle, 1, "fp32", trt.__version__, ORIN)
    cache.store_plan(key, b"plan from another TensorRT")  # matching sidecar, but TensorRT refuses it
    with pytest.raises(BackendError, match="cannot load this plan.*daad-engine build"):
        open_tensorrt_backend_with(trt, trt.cuda, template_bundle, plan_cache=tmp_path, build_if_missing=False,
                                   device=ORIN)
    with open_tensorrt_backend_with(trt, trt.cuda, template_bundle, plan_cache=tmp_path, device=ORIN) as backend:
        assert backend.plan_path == path and path.read_bytes().startswith(PLAN_MAGIC)
    assert trt.builds == 2


def test_engine_io_must_match_bundle(template_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    bad = {"onnx": "x", "io": [["image", [1, 1, 32, 32], True], ["anomaly_map", [1, 1, 32, 32], False]]}
    with pytest.raises(BackendError, match=r"'image' has shape \(1, 1, 32, 32\), expected \(1, 1, 64, 64\).*'score'"):
        TensorRTBackend(template_bundle, Engine10(trt, bad), trt, trt.cuda)
    assert trt.cuda.memory == {}


def test_cuda_context_is_pushed_and_popped_once() -> None:
    cuda = FakeCuda()
    context = CudaContext(cuda)
    context.close()
    context.close()
    assert cuda.context_log == ["push", "pop"]


# --- the product-like graph: a memory search (MatMul on a constant, ArgMax/ArgMin, Gather), MaxPool, TopK --

@pytest.fixture(scope="module")
def product_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from tests.bundle_factory import make_product_bundle

    return make_product_bundle(tmp_path_factory.mktemp("product_bundle"), batches=(1, 4))


MEMORY_SEARCH = {"similarity", "sim_x2", "dist_part", "nearest_by_distance", "most_similar", "gather_nearest",
                 "gather_similar", "const_memory_t", "const_two", "const_memory_sq", "const_memory"}


def _pinned(network: FakeNetwork) -> Dict[str, Any]:
    return {layer.name: layer.precision for layer in network.layers if layer.precision is not None}


@pytest.mark.parametrize("flavour", ["8.5", "10"])
def test_int8_keeps_the_memory_search_in_fp16(flavour: str, product_bundle: Bundle, tmp_path: Path) -> None:
    images = _write_calib_images(tmp_path / "calib", 4)
    trt = make_trt(flavour)
    build_plan_with(trt, trt.cuda, ORIN, product_bundle, "int8", PlanCache(tmp_path / "c"), calib_images=images)
    assert trt.configs[0].flags == ["INT8", "OBEY_PRECISION_CONSTRAINTS", "FP16"]
    network = trt.networks[0]
    pinned = _pinned(network)
    assert set(pinned) == MEMORY_SEARCH and set(pinned.values()) == {DataType.HALF}
    # the backbone before the search and the pooling/top-k after it are left to INT8 calibration
    assert not {"patch_features", "residual_nearest", "closing", "upsample", "top_pixels"} & set(pinned)
    argmin = next(layer for layer in network.layers if layer.name == "nearest_by_distance")
    assert argmin.output_types == {0: DataType.HALF}  # values pinned; the INT32 indices untouched


def test_int8_without_fast_fp16_keeps_the_search_in_fp32(product_bundle: Bundle, tmp_path: Path) -> None:
    images = _write_calib_images(tmp_path / "calib", 4)
    trt = make_trt("10")
    trt.fast_fp16 = False
    build_plan_with(trt, trt.cuda, ORIN, product_bundle, "int8", PlanCache(tmp_path / "c"), calib_images=images)
    assert trt.configs[0].flags == ["INT8", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = _pinned(trt.networks[0])
    assert set(pinned) == MEMORY_SEARCH and set(pinned.values()) == {DataType.FLOAT}


def test_int8_without_precision_constraints_is_refused(product_bundle: Bundle, tmp_path: Path) -> None:
    images = _write_calib_images(tmp_path / "calib", 4)
    trt = make_trt("10")
    del trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS
    with pytest.raises(EngineBuildError, match="memory search would be quantised; build with --precision fp16"):
        build_plan_with(trt, trt.cuda, ORIN, product_bundle, "int8", PlanCache(tmp_path / "c"), calib_images=images)


def test_fp16_build_pins_nothing(product_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt("10")
    build_plan_with(trt, trt.cuda, ORIN, product_bundle, "fp16", PlanCache(tmp_path / "c"))
    assert trt.configs[0].flags == ["FP16"] and _pinned(trt.networks[0]) == {}


@pytest.mark.parametrize("flavour, engine_class", [("8.5", Engine85), ("10", Engine10)])
@pytest.mark.parametrize("batch", [1, 4])
def test_backend_on_the_product_graph_matches_onnxruntime(flavour: str, engine_class: type, batch: int,
                                                          product_bundle: Bundle, tmp_path: Path) -> None:
    trt = make_trt(flavour)
    trt.engine_class = engine_class
    with open_tensorrt_backend_with(trt, trt.cuda, product_bundle, batch=batch, plan_cache=tmp_path,
                                    device=ORIN) as backend:
        x = frames(product_bundle, batch)
        got, want = backend.infer(x), reference(product_bundle, x, batch)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-6)
        np.testing.assert_allclose(got.score, want.score, rtol=1e-6)
        assert got.anomaly_map.shape == (batch, 1, 32, 32) and got.score.shape == (batch,)
    assert trt.cuda.memory == {}
