"""INT8 calibration: good frames from the station, preprocessed exactly as in service.

`CalibrationBatches` and `CalibrationFeed` hold all the logic and need neither TensorRT nor CUDA;
`make_entropy_calibrator` wraps them in the `trt.IInt8EntropyCalibrator2` subclass TensorRT calls
during an INT8 build (deprecated in TensorRT 10.1, absent in 11: feature-detected).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from .bundle import atomic_write_bytes
from .errors import DaadError, EngineBuildError
from .preprocess import PreprocessSpec, list_images, preprocess, read_image

logger = logging.getLogger(__name__)

MIN_RECOMMENDED_IMAGES = 100  # fewer gives noisy activation histograms (NVIDIA suggests ~500)


def calibration_images(folder: Union[str, Path]) -> List[Path]:
    """Image files directly inside `folder`, sorted; EngineBuildError when there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise EngineBuildError(f"{root}: calibration image directory not found; pass --calib-images DIR with good frames")
    paths = list_images(root)
    if not paths:
        raise EngineBuildError(f"{root}: no images (.png/.jpg/.bmp/.tif) for INT8 calibration; capture good frames first")
    if len(paths) < MIN_RECOMMENDED_IMAGES:
        logger.warning("INT8 calibration with %d images from %s; %d or more give steadier scales",
                       len(paths), root, MIN_RECOMMENDED_IMAGES)
    return paths


def images_digest(paths: Sequence[Path]) -> str:
    """SHA-256 over names and contents: a calibration cache is reused only for the same image set."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode("utf-8") + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class CalibrationBatches:
    """Preprocessed float32 batches (batch, C, H, W) from image files, in name order.

    The last, partial batch is filled by repeating its own images (TensorRT expects full batches;
    zeros would add a mid-grey frame the station never sees); iteration then stops. Each full pass
    reads the files again, so memory stays at one batch.
    """

    def __init__(self, paths: Sequence[Union[str, Path]], spec: PreprocessSpec, batch: int) -> None:
        if batch < 1:
            raise EngineBuildError(f"calibration batch must be >= 1, got {batch}")
        if not paths:
            raise EngineBuildError("no calibration images given")
        self.paths = [Path(p) for p in paths]
        self.spec = spec
        self.batch = int(batch)

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch)

    @property
    def padded(self) -> int:
        """How many repeated images fill the last batch."""
        return len(self) * self.batch - len(self.paths)

    @property
    def shape(self) -> tuple:
        return (self.batch,) + self.spec.input_shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(np.float32).itemsize

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.paths), self.batch):
            chunk = [preprocess(read_image(p), self.spec) for p in self.paths[start:start + self.batch]]
            fill = [chunk[i % len(chunk)] for i in range(self.batch - len(chunk))]
            yield np.ascontiguousarray(np.stack(chunk + fill, axis=0), dtype=np.float32)


class CalibrationFeed:
    """What a TensorRT calibrator does, minus TensorRT: next batch pointer or None, cache read/write.

    TensorRT calls these from C++; an exception there cannot be reported well, so an error while
    reading images is kept in `error`, calibration is ended (None), and the builder raises it after.
    """

    def __init__(self, batches: CalibrationBatches, cache_path: Optional[Path],
                 upload: Callable[[np.ndarray], int]) -> None:
        self.batches = batches
        self.cache_path = cache_path
        self._upload = upload
        self._iter: Optional[Iterator[np.ndarray]] = None
        self.served = 0
        self.error: Optional[DaadError] = None

    def next_pointer(self) -> Optional[int]:
        if self.error is not None:
            return None
        if self._iter is None:
            self._iter = iter(self.batches)
        try:
            batch = next(self._iter)
        except StopIteration:
            return None
        except DaadError as exc:
            self.error = exc
            return None
        try:
            pointer = int(self._upload(batch))
        except DaadError as exc:
            self.error = exc
            return None
        self.served += 1
        logger.info("INT8 calibration batch %d/%d", self.served, len(self.batches))
        return pointer

    def read_cache(self) -> Optional[bytes]:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        logger.info("INT8 calibration: reusing %s", self.cache_path)
        return self.cache_path.read_bytes()

    def write_cache(self, data: bytes) -> None:
        if self.cache_path is None:
            return
        try:
            atomic_write_bytes(self.cache_path, bytes(data))
            logger.info("INT8 calibration cache written to %s", self.cache_path)
        except OSError as exc:
            logger.warning("cannot write INT8 calibration cache %s (%s)", self.cache_path, exc)


def make_entropy_calibrator(trt: Any, cuda: Any, batches: CalibrationBatches, cache_path: Optional[Path]) -> Any:
    """A `trt.IInt8EntropyCalibrator2` fed by `batches` through one device buffer (pycuda.driver API).

    Call `close()` after the build to free the device buffer; raise `feed.error` if it is set.
    """
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise EngineBuildError(
            "this TensorRT has no IInt8EntropyCalibrator2 (TensorRT 11 dropped calibrated INT8); "
            "build with --precision fp16, or export an explicitly quantized (Q/DQ) graph"
        )
    base = trt.IInt8EntropyCalibrator2

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            try:
                self._device = cuda.mem_alloc(batches.nbytes)
            except getattr(cuda, "Error", RuntimeError) as exc:  # out of device memory
                raise EngineBuildError(f"cannot allocate {batches.nbytes} bytes of device memory for INT8 calibration ({exc})") from exc
            self.feed = CalibrationFeed(batches, cache_path, self._upload)

        def _upload(self, batch: np.ndarray) -> int:
            try:
                cuda.memcpy_htod(self._device, batch)
            except getattr(cuda, "Error", RuntimeError) as exc:  # pycuda raises on a failed CUDA call
                raise EngineBuildError(f"CUDA copy of an INT8 calibration batch failed ({exc})") from exc
            return int(self._device)

        def get_batch_size(self) -> int:
            return batches.batch

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            ptr = self.feed.next_pointer()
            return None if ptr is None else [ptr]

        def read_calibration_cache(self) -> Optional[bytes]:
            return self.feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.feed.write_cache(bytes(memoryview(cache)))

        def close(self) -> None:
            if self._device is not None:
                self._device.free()
                self._device = None

    return EntropyCalibrator()
