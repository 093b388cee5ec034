"""The anomaly map after a model's raw terms: Gaussian smoothing, the image score, and the optional closing and
edge-side row fill, all static ops in the exported graph (`MapScoring`, shared by every model here)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .memory import NORM_EPS


class AnomalyOutput(NamedTuple):
    """Eval-mode output; the field names are the ONNX output names."""

    anomaly_map: torch.Tensor  # (B, 1, H, W)
    score: torch.Tensor  # (B,)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(2r+1,) normalised 1-D Gaussian, r = ceil(3 sigma); the 2-D smoothing applies it along each axis."""
    radius = max(1, int(math.ceil(3 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-(xs ** 2) / (2 * sigma ** 2))
    return k1 / k1.sum()


def separable_blur(m: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) convolved with the outer product of `kernel` with itself, zero padding: two 1-D
    convolutions, equal to the 2-D one at 2/(2r+1) of its cost (25x25 -> 2x25 taps at sigma 4)."""
    r = kernel.numel() // 2
    m = F.conv2d(m, kernel.reshape(1, 1, -1, 1), padding=(r, 0))
    return F.conv2d(m, kernel.reshape(1, 1, 1, -1), padding=(0, r))


def grey_closing(m: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """(B, 1, H, W) closed with a size x size square, or a (height, width) rectangle: a max filter, then a min
    filter, each as a row and a column pass (a rectangle's max is the max of its rows' maxima). A region no
    wider than the filter whose border scores high is raised to its border's level; an isolated peak keeps its
    width. The frame's edge pads nothing (MaxPool ignores padding), so a strip between a high line and the
    edge, narrower than half the filter across the line, is filled as well."""
    height, width = (size, size) if isinstance(size, int) else size

    def max_filter(x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, (1, width), stride=1, padding=(0, width // 2))
        return F.max_pool2d(x, (height, 1), stride=1, padding=(height // 2, 0))

    return -max_filter(-max_filter(m))


# padding for the row fill's max filters: below any map value, and finite in FP16 (TensorRT)
FILL_PAD = -1e4


def edge_side_fill(m: torch.Tensor, height: Optional[int] = None) -> torch.Tensor:
    """(B, 1, H, 1) from a (B, 1, H, W) map: each row's mean raised to the highest row mean between it and the
    frame's middle row, less the map's median row mean. A step across the part (a row that scores high along the
    whole width) lifts the strip between it and the nearer edge, the smaller side, where an uneven region lies;
    highs scattered over a good part lift no row much. Max filters over padded halves (MaxPool) and a TopK for
    the median, so the graph stays static; added to a map it broadcasts along each row. `height` is H (>= 2) as
    a constant for the exporter, which traces a map's shape as a value (the model passes its input height)."""
    rows = m.mean(dim=3, keepdim=True)
    height = height or m.shape[2]
    upper, lower = height // 2, height - height // 2

    def low(n: int) -> torch.Tensor:  # (B, 1, n, 1) of FILL_PAD: F.pad with a value loses the exported shapes
        return rows[:, :, :n] * 0.0 + FILL_PAD

    # each upper row: the max over it and the rows below it down to the middle; each lower row: up to the middle
    top = F.max_pool2d(torch.cat([rows[:, :, :upper], low(upper - 1)], dim=2), (upper, 1), stride=1)
    bottom = F.max_pool2d(torch.cat([low(lower - 1), rows[:, :, upper:]], dim=2), (lower, 1), stride=1)
    median = torch.topk(rows, height - (height - 1) // 2, dim=2).values[:, :, -1:]  # torch.median's (lower) one
    return torch.cat([top, bottom], dim=2) - median


class MapScoring(nn.Module):
    """What every model here does around its raw anomaly terms: the input's illumination normalisation, maps
    brought to image size, Gaussian smoothing, the image score (top-k of the smoothed map) and the map the
    model outputs (optionally closed and row-filled). Subclasses make the raw terms."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, w = cfg.image_size
        if cfg.smoothing_sigma > 0:
            kernel = gaussian_kernel(cfg.smoothing_sigma)
            # zero padding darkens borders; dividing by the smoothed ones-image undoes that exactly
            norm = separable_blur(torch.ones(1, 1, h, w), kernel)
        else:
            kernel, norm = torch.ones(1), torch.ones(1, 1, h, w)
        # derived from the config, so not saved: checkpoints stay valid when the smoothing's form changes
        self.register_buffer("smooth_kernel", kernel, persistent=False)
        self.register_buffer("smooth_norm", norm, persistent=False)
        self.topk = max(1, int(round(cfg.score_topk * h * w))) if cfg.score_topk > 0 else 1

    @property
    def name(self) -> str:
        return self.cfg.name

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image zero mean and std `illumination_std` when `illumination_norm` (a brighter or darker part is
        not a defect)."""
        if not self.cfg.illumination_norm:
            return x
        centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
        scale = self.cfg.illumination_std / torch.sqrt((centred * centred).mean(dim=(1, 2, 3), keepdim=True) + NORM_EPS)
        return centred * scale

    def to_image_size(self, m: torch.Tensor) -> torch.Tensor:
        # a constant scale factor keeps Shape/Slice/Concat out of the exported graph
        scale = self.cfg.image_size[0] // m.shape[-2]
        return m if scale == 1 else F.interpolate(m, scale_factor=float(scale), mode="bilinear", align_corners=False)

    def smooth(self, m: torch.Tensor) -> torch.Tensor:
        if self.cfg.smoothing_sigma <= 0:
            return m
        return separable_blur(m, self.smooth_kernel) / self.smooth_norm

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        flat = amap.reshape(amap.shape[0], -1)
        if self.cfg.score_topk >= 1.0:
            return flat.mean(dim=1)  # the whole map: for defects that change a part's overall texture
        peak = flat.max(dim=1).values if self.topk == 1 else torch.topk(flat, self.topk, dim=1).values.mean(dim=1)
        return peak - flat.mean(dim=1) if self.cfg.score_minus_mean else peak

    def pixel_map(self, amap: torch.Tensor) -> torch.Tensor:
        """The map the model outputs, from the scored one: closed with `map_closing` where set, plus
        `edge_fill_weight` times its edge-side row fill."""
        out = grey_closing(amap, self.cfg.map_closing) if self.cfg.map_closing else amap
        if not self.cfg.edge_fill_weight:
            return out
        return out + self.cfg.edge_fill_weight * edge_side_fill(amap, self.cfg.image_size[0])
