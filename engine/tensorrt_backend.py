"""TensorRT backend (tensorrt + pycuda), for TensorRT 8.5/8.6 (JetPack 5, 6.0) and 10.x (JetPack 6.1+).

Threading: a pycuda context belongs to the thread that made it current. The thread that calls
`open_tensorrt_backend` owns the backend: it must be the one that calls `infer` and `close`
(the agent's inference thread). Other threads get a BackendError, not a CUDA crash.

Memory: page-locked host buffers and device buffers for every I/O tensor, one CUDA stream and one
execution context are made once, at open; a frame costs two async copies, one enqueue, one sync,
and the copies of the (small) outputs handed back. `close()` frees everything explicitly.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .backend import Backend, Inference
from .bundle import Bundle
from .errors import BackendError
from .plan_cache import PRECISIONS, PlanCache
from .trt_build import (DEFAULT_WORKSPACE_MB, CudaContext, DeviceInfo, build_plan_with, get_trt_logger, plan_key,
                        query_device_pycuda)

logger = logging.getLogger(__name__)

IO_TENSORS = "tensors"  # name-based API: TensorRT 8.5 through 11
IO_BINDINGS = "bindings"  # binding-index API: TensorRT <= 8.6, gone in 10


def select_io_api(engine: Any) -> str:
    """'tensors' where the engine has the name-based I/O API, else 'bindings' (feature detection)."""
    if hasattr(engine, "num_io_tensors") and hasattr(engine, "get_tensor_name"):
        return IO_TENSORS
    if hasattr(engine, "num_bindings") and hasattr(engine, "get_binding_name"):
        return IO_BINDINGS
    raise BackendError("this TensorRT engine has neither the tensor-name I/O API nor the binding API; "
                       "daad-inspect supports TensorRT 8.5 to 10.x")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    is_input: bool
    shape: Tuple[int, ...]
    dtype: np.dtype


def describe_io(trt: Any, engine: Any, api: str) -> List[TensorInfo]:
    """The engine's I/O tensors, in index order (binding order for the binding API)."""
    infos: List[TensorInfo] = []
    if api == IO_TENSORS:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            infos.append(TensorInfo(
                name=str(name),
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
            ))
    else:
        for i in range(engine.num_bindings):
            infos.append(TensorInfo(
                name=str(engine.get_binding_name(i)),
                is_input=bool(engine.binding_is_input(i)),
                shape=tuple(int(d) for d in engine.get_binding_shape(i)),
                dtype=np.dtype(trt.nptype(engine.get_binding_dtype(i))),
            ))
    return infos


def validate_io(infos: List[TensorInfo], bundle: Bundle, batch: int, source: Union[str, Path]) -> None:
    """BackendError naming the plan and every difference from bundle.yaml (names, shapes, float32)."""
    spec_h, spec_w = bundle.preprocess.height, bundle.preprocess.width
    expected = {
        bundle.input_name: (True, tuple(bundle.input_shape(batch))),
        bundle.map_output: (False, (batch, 1, spec_h, spec_w)),
        bundle.score_output: (False, (batch,)),
    }
    by_name = {t.name: t for t in infos}
    problems: List[str] = []
    for name, (is_input, shape) in expected.items():
        t = by_name.get(name)
        if t is None:
            problems.append(f"no {'input' if is_input else 'output'} {name!r} (engine has {sorted(by_name)})")
            continue
        if t.is_input != is_input:
            problems.append(f"{name!r} is an {'input' if t.is_input else 'output'}, expected an {'input' if is_input else 'output'}")
        # the score may come out as (N,) or (N, 1): same values
        if t.shape != shape and not (name == bundle.score_output and t.shape == (batch, 1)):
            problems.append(f"{name!r} has shape {t.shape}, expected {shape}")
        if t.dtype != np.float32:
            problems.append(f"{name!r} is {t.dtype}, expected float32")
    extra_inputs = [t.name for t in infos if t.is_input and t.name not in expected]
    if extra_inputs:
        problems.append(f"unexpected inputs {extra_inputs}")
    if problems:
        raise BackendError(f"{source}: TensorRT engine does not match {bundle.root / 'bundle.yaml'}: "
                           + "; ".join(problems) + "; rebuild it with `daad-engine build`")


class TensorRTBackend(Backend):
    """A deserialized engine with its buffers, stream and execution context (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, engine: Any, trt: Any, cuda: Any, batch: int = 1, precision: str = "fp32",
                 plan_path: Optional[Path] = None, cuda_context: Optional[CudaContext] = None,
                 runtime: Any = None) -> None:
        super().__init__(bundle, batch)
        self.precision = precision
        self.plan_path = plan_path
        self._trt, self._cuda = trt, cuda
        self._owner = threading.get_ident()
        self._cuda_context = cuda_context
        self._runtime, self._engine, self._context = runtime, engine, None
        self._host: Dict[str, np.ndarray] = {}
        self._device: Dict[str, Any] = {}
        self._stream: Any = None
        self._bindings: List[int] = []
        self._closed = False
        try:
            self.io_api = select_io_api(engine)
            self.io = describe_io(trt, engine, self.io_api)
            validate_io(self.io, bundle, batch, plan_path or "TensorRT engine")
            for t in self.io:
                self._host[t.name] = self._cuda_call("pagelocked_empty", cuda.pagelocked_empty, t.shape, t.dtype)
                self._device[t.name] = self._cuda_call("mem_alloc", cuda.mem_alloc, self._host[t.name].nbytes)
            self._stream = self._cuda_call("Stream", cuda.Stream)
            self._context = engine.create_execution_context()
            if self._context is None:
                raise BackendError("TensorRT could not create an execution context (out of device memory? "
                                   "see the TensorRT log above)")
            if self.io_api == IO_TENSORS:
                for t in self.io:
                    if self._context.set_tensor_address(t.name, int(self._device[t.name])) is False:
                        raise BackendError(f"TensorRT refused the device address of tensor {t.name!r}")
            else:
                self._bindings = [int(self._device[t.name]) for t in self.io]
        except BaseException:
            self.close()
            raise
        logger.info("TensorRT engine ready (%s I/O API, %s): %s", self.io_api, precision,
                    ", ".join(f"{t.name}{list(t.shape)}" for t in self.io))

    def _cuda_call(self, what: str, fn: Any, *args: Any) -> Any:
        """pycuda raises on every failed CUDA call; turn that into one clear BackendError."""
        try:
            return fn(*args)
        except getattr(self._cuda, "Error", RuntimeError) as exc:
            raise BackendError(f"CUDA {what} failed: {exc}") from exc

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise BackendError("TensorRTBackend used from another thread than the one that opened it; "
                               "its CUDA context belongs to that thread (open, infer and close in one thread)")

    def infer(self, batch: np.ndarray) -> Inference:
        if self._closed:
            raise BackendError("TensorRTBackend is closed")
        self._check_thread()
        batch = self.check_input(batch)
        cuda, stream = self._cuda, self._stream
        inp = self.bundle.input_name
        np.copyto(self._host[inp], batch)
        self._cuda_call("memcpy_htod_async", cuda.memcpy_htod_async, self._device[inp], self._host[inp], stream)
        if self.io_api == IO_TENSORS:
            ok = self._context.execute_async_v3(stream_handle=stream.handle)
        else:
            ok = self._context.execute_async_v2(bindings=self._bindings, stream_handle=stream.handle)
        for t in self.io:
            if not t.is_input:
                self._cuda_call("memcpy_dtoh_async", cuda.memcpy_dtoh_async, self._host[t.name], self._device[t.name], stream)
        self._cuda_call("stream synchronize", stream.synchronize)
        if not ok:
            raise BackendError("TensorRT execution failed (see the TensorRT log above)")
        return Inference(
            anomaly_map=self._host[self.bundle.map_output].copy(),
            score=self._host[self.bundle.score_output].reshape(-1).copy(),
        )

    def close(self) -> None:
        """Free device buffers, the execution context and engine, then release the CUDA context."""
        if self._closed:
            return
        self._check_thread()
        self._closed = True
        try:
            for dev in self._device.values():
                dev.free()
        finally:
            self._device.clear()
            self._host.clear()
            self._bindings = []
            self._context = None  # the execution context goes before its engine
            self._engine = None
            self._runtime = None
            self._stream = None
            if self._cuda_context is not None:
                self._cuda_context.close()
                self._cuda_context = None


def deserialize_plan(trt: Any, runtime: Any, path: Path) -> Any:
    """The engine, or None where TensorRT refuses the plan (other version or GPU, damaged file)."""
    try:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
    except Exception as exc:  # some TensorRT versions raise instead of returning None
        logger.warning("TensorRT could not deserialize %s (%s)", path, exc)
        return None
    if engine is None:
        logger.warning("TensorRT %s refused %s (built by another TensorRT version or GPU, or damaged)",
                       getattr(trt, "__version__", "?"), path)
    return engine


def open_tensorrt_backend_with(trt: Any, cuda: Any, bundle: Bundle, batch: int = 1, precision: str = "fp32",
                               plan_cache: Optional[Union[str, Path]] = None, build_if_missing: bool = True,
                               device: Optional[DeviceInfo] = None,
                               cuda_context: Optional[CudaContext] = None) -> TensorRTBackend:
    """open_tensorrt_backend with the runtime modules given; the CUDA context must be current."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = device or query_device_pycuda(cuda)
    cache = PlanCache(plan_cache)
    key = plan_key(bundle, batch, precision, str(getattr(trt, "__version__", "unknown")), device)
    path = cache.find_plan(key)
    if path is None:
        if not build_if_missing:
            raise BackendError(f"no TensorRT plan for {bundle.name} ({key.describe()}) in {cache.root}; build it "
                               f"with `daad-engine build {bundle.root} --precision {precision} --batch {batch}`")
        path = build_plan_with(trt, cuda, device, bundle, precision, cache, None, DEFAULT_WORKSPACE_MB, batch,
                               if_missing=True)
    runtime = trt.Runtime(get_trt_logger(trt))
    engine = deserialize_plan(trt, runtime, path)
    if engine is None:
        if not build_if_missing:
            raise BackendError(f"{path}: TensorRT {getattr(trt, '__version__', '?')} cannot load this plan; "
                               f"rebuild it with `daad-engine build {bundle.root} --precision {precision} --batch {batch}`")
        logger.warning("rebuilding the plan for %s", key.describe())
        cache.remove_plan(key)
        path = build_plan_with(trt, cuda, device, bundle, precision, cache, None, DEFAULT_WORKSPACE_MB, batch,
                               if_missing=False)
        engine = deserialize_plan(trt, runtime, path)
        if engine is None:
            raise BackendError(f"{path}: TensorRT cannot load the plan it has just built (see the TensorRT log above)")
    return TensorRTBackend(bundle, engine, trt, cuda, batch=batch, precision=precision, plan_path=path,
                           cuda_context=cuda_context, runtime=runtime)


def open_tensorrt_backend(bundle: Bundle, batch: int = 1, precision: str = "fp32",
                          plan_cache: Optional[Union[str, Path]] = None, build_if_missing: bool = True) -> TensorRTBackend:
    """Find (or build) the plan for this device and open it; the calling thread owns the backend.

    Raises ImportError when tensorrt or pycuda is missing (open_backend then falls back to ONNX
    Runtime), DaadError when TensorRT is there but the plan cannot be built or loaded.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError(f"tensorrt is not importable ({exc}); on a Jetson use JetPack's TensorRT through a venv "
                          "made with --system-site-packages") from exc
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise ImportError(f"pycuda is not importable ({exc}); pip install 'daad-inspect[jetson]'") from exc
    context = CudaContext(cuda)
    try:
        return open_tensorrt_backend_with(trt, cuda, bundle, batch, precision, plan_cache, build_if_missing,
                                          cuda_context=context)
    except BaseException:
        context.close()
        raise

