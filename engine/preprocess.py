"""The one preprocessing function: every caller (training, evaluation, export parity,
calibration, the agent) turns a decoded frame into model input here, so a frame is
scored the same way everywhere.

Input scale is never guessed from the data: uint8 is divided by 255, uint16 by 65535,
anything else is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Type, Union

import numpy as np

from .errors import DaadError, ImageError, require_module

RESIZE_MODES = ("stretch",)
CHANNEL_ORDERS = ("gray", "rgb")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded frame becomes a model input tensor (stored in bundle.yaml)."""

    height: int
    width: int
    channel_order: str = "gray"  # "gray" (1 channel) or "rgb" (3 channels)
    mean: Tuple[float, ...] = (0.5,)
    std: Tuple[float, ...] = (0.5,)
    resize: str = "stretch"  # whole frame resized to (height, width), aspect not kept

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values for channel_order {self.channel_order!r}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"input size must be at least 8x8, got {self.height}x{self.width}")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "gray" else 3

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PreprocessSpec":
        return cls(
            height=int(d["height"]),
            width=int(d["width"]),
            channel_order=str(d.get("channel_order", "gray")),
            mean=tuple(float(v) for v in d.get("mean", (0.5,))),
            std=tuple(float(v) for v in d.get("std", (0.5,))),
            resize=str(d.get("resize", "stretch")),
        )


def _cv2() -> Any:
    # JetPack's system OpenCV on a Jetson, opencv-python-headless elsewhere
    return require_module("cv2", ImageError, "OpenCV is not importable: install the `cv` extra (pip install "
                          "'daad-inspect[cv]') or, on a Jetson, use a venv with --system-site-packages to see JetPack's OpenCV")


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 image -> float32 in [0, 1]; the scale comes from the dtype, never the values."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    raise ImageError(f"frames must be uint8 or uint16 (as decoded by OpenCV), got dtype {image.dtype}")


def _convert_channels(image: np.ndarray, channel_order: str) -> np.ndarray:
    """BGR / BGRA / gray (OpenCV's decoded layouts) -> HxW (gray) or HxWx3 (RGB)."""
    cv2 = _cv2()
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image if channel_order == "gray" else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"expected a HxW, HxWx3 or HxWx4 frame, got shape {tuple(image.shape)}")
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channel_order == "gray":
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded frame (OpenCV layout: HxW gray or HxWx3 BGR, uint8/uint16) -> (C, H, W) float32."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError("empty frame: nothing to preprocess")
    cv2 = _cv2()
    converted = _convert_channels(image, spec.channel_order)
    if converted.shape[:2] != (spec.height, spec.width):
        # INTER_AREA averages when shrinking (no aliasing of fine texture), bilinear-like when growing.
        converted = cv2.resize(converted, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    unit = to_unit_float(converted)
    if unit.ndim == 2:
        unit = unit[None, :, :]
    else:
        unit = np.transpose(unit, (2, 0, 1))
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((unit - mean) / std, dtype=np.float32)


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Several frames -> (N, C, H, W) float32."""
    return np.stack([preprocess(im, spec) for im in images], axis=0)


def denormalize(tensor: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(C, H, W) model input -> HxW or HxWx3 float in [0, 1] (for plots and overlays)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    unit = np.clip(tensor * std + mean, 0.0, 1.0)
    return unit[0] if unit.shape[0] == 1 else np.transpose(unit, (1, 2, 0))


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Decode an image file as OpenCV does (gray stays gray, colour is BGR); ImageError if unreadable."""
    cv2 = _cv2()
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    data = np.fromfile(str(p), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{p}: not a readable image (corrupt or truncated file?)")
    return image


def list_images(folder: Union[str, Path]) -> list:
    """Image files directly inside a folder, sorted by name."""
    p = Path(folder)
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def images_in(folder: Union[str, Path], error: Type[DaadError], what: str, fix: str = "") -> List[Path]:
    """list_images of a folder that must hold some, else `error` naming the folder: `{folder}: {what} folder not
    found{fix}`, `not a folder{fix}` or `no images (...) in the {what} folder{fix}`."""
    p = Path(folder)
    if not p.exists():
        raise error(f"{p}: {what} folder not found{fix}")
    if not p.is_dir():
        raise error(f"{p}: not a folder{fix}")
    images = list_images(p)
    if not images:
        raise error(f"{p}: no images (.png, .jpg, .bmp, .tif) in the {what} folder{fix}")
    return images
