"""The product model: DAAD's block-wise memory on frozen backbone features, nothing trained.

DAAD divides a feature map into blocks, rebuilds every block from a memory of normal blocks and assembles
them; the block size sets how much of a defect can be rebuilt. Here the memory is a bank of the training
images' own blocks (greedy k-centre coreset to a budget, train.coreset), a block's rebuild is its nearest
item (L2), and the anomaly map is the per-position squared error of that rebuild. A second memory of the
backbone's 1/32 features (each seeing most of the part) adds a coarser granularity where configured.

Shapes use (B, C, H, W). Every op is static (Conv, Reshape, Transpose, MatMul against a constant, ArgMin,
Gather, arithmetic, Resize by a constant factor), so the graph exports to opset 17 for TensorRT.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .anomaly_map import AnomalyOutput, MapScoring
from .backbone import COARSE_CHANNELS, FEATURE_CHANNELS, EfficientNetLite0Features
from .config import ModelConfig
from .memory import assemble, divide, principal_components

SEARCH_VALUES = 1 << 26  # distances per chunk in eager mode (256 MB of float32), whatever the memory's size


class NearestBlockMemory(nn.Module):
    """A bank of normal blocks of a (B, C, H, W) feature map, `block` x `block` positions by all channels.

    forward(x) -> (B, 1, H, W): every block of x replaced by its nearest item (L2), and the squared error of that
    rebuild at each position, averaged over channels. The items are buffers set by `set_items` (their count is
    the checkpoint's, see `_load_from_state_dict`): nothing here learns."""

    def __init__(self, channels: int, block: int) -> None:
        super().__init__()
        self.channels, self.block = channels, block
        dim = channels * block * block
        # (D, N): the graph's one copy of the items, read by the distance MatMul and the Gather alike
        self.register_buffer("items_t", torch.zeros(dim, 1))
        self.register_buffer("half_sq_norms", torch.zeros(1))  # |m|^2 / 2 per item: argmin |q-m|^2 = argmin |m|^2/2 - q.m

    @property
    def n_items(self) -> int:
        return int(self.items_t.shape[1])

    @torch.no_grad()
    def set_items(self, items: torch.Tensor) -> None:
        """(N, D) normal blocks (rows as `divide` makes them)."""
        self.items_t = items.t().contiguous().to(self.items_t)
        self.half_sq_norms = 0.5 * (items.to(self.items_t) ** 2).sum(dim=1)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("items_t", "half_sq_norms"):  # a fit's item count is its own: take the stored shape
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        return divide(x, self.block, self.block, self.channels)

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) -> (Q,) index of each query's nearest item."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return (self.half_sq_norms - queries @ self.items_t).argmin(dim=-1)  # MatMul, Sub, ArgMin
        with torch.no_grad():  # in chunks: (Q, N) distances of a large memory do not fit at once
            chunk = max(1, SEARCH_VALUES // max(1, self.n_items))
            return torch.cat([(self.half_sq_norms - q @ self.items_t).argmin(dim=-1) for q in queries.split(chunk)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.blocks(x)
        readout = self.items_t.index_select(1, self.nearest(queries)).t()  # Gather on axis 1 of the constant
        error = assemble((queries - readout) ** 2, tuple(x.shape), self.block, self.block, self.channels)  # type: ignore[arg-type]
        return error.mean(dim=1, keepdim=True)


class BlockMemoryModel(MapScoring):
    """Frozen EfficientNet-Lite0 features -> per-channel standardisation and principal components -> a memory of
    `memory_block` x `memory_block` feature blocks (M) and, with `coarse_memory_weight` > 0, a memory of the
    1/32 feature vectors (C) -> A = (1-delta) M/m_scale + delta C/c_scale at image size, Gaussian-smoothed, the
    image score its top `score_topk` (MapScoring). The scales are held-back good images' mean values."""

    discriminator = None  # no trained parts (export checks for a discriminator to unwrap)

    def __init__(self, cfg: ModelConfig, load_backbone: bool = True) -> None:
        super().__init__(cfg)
        self.has_coarse = cfg.coarse_memory_weight > 0
        self.backbone = EfficientNetLite0Features(cfg.image_size, load_weights=load_backbone, coarse=self.has_coarse)
        dims = cfg.feature_dims or FEATURE_CHANNELS
        self.register_buffer("feat_mean", torch.zeros(1, FEATURE_CHANNELS, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, FEATURE_CHANNELS, 1, 1))
        self.register_buffer("feat_proj", torch.eye(dims, FEATURE_CHANNELS))
        self.block_memory = NearestBlockMemory(dims, cfg.memory_block)
        self.register_buffer("m_scale", torch.ones(()))
        self.coarse_memory: Optional[NearestBlockMemory] = None
        if self.has_coarse:
            cdims = cfg.coarse_feature_dims or COARSE_CHANNELS
            self.register_buffer("coarse_mean", torch.zeros(1, COARSE_CHANNELS, 1, 1))
            self.register_buffer("coarse_std", torch.ones(1, COARSE_CHANNELS, 1, 1))
            self.register_buffer("coarse_proj", torch.eye(cdims, COARSE_CHANNELS))
            self.coarse_memory = NearestBlockMemory(cdims, 1)
            self.register_buffer("c_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw backbone features (B, 176, h, w) and, with a coarse memory, the raw 1/32 features (else None)."""
        return self.backbone.forward_with_coarse(self.normalise_input(x))

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw 1/8 features -> what the block memory holds: standardised, on their principal components (a 1x1 Conv)."""
        z = (raw - self.feat_mean) / self.feat_std
        return torch.nn.functional.conv2d(z, self.feat_proj[:, :, None, None])

    def project_coarse(self, raw: torch.Tensor) -> torch.Tensor:
        z = (raw - self.coarse_mean) / self.coarse_std
        return torch.nn.functional.conv2d(z, self.coarse_proj[:, :, None, None])

    def raw_maps(self, raw: torch.Tensor, raw_coarse: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(M, C or None) at image size, unscaled, from raw features."""
        m_map = self.to_image_size(self.block_memory(self.project(raw)))
        if self.coarse_memory is None or raw_coarse is None:
            return m_map, None
        return m_map, self.to_image_size(self.coarse_memory(self.project_coarse(raw_coarse)))

    def combine(self, m_map: torch.Tensor, c_map: Optional[torch.Tensor]) -> torch.Tensor:
        if c_map is None:
            return m_map / self.m_scale
        delta = self.cfg.coarse_memory_weight
        return (1.0 - delta) * m_map / self.m_scale + delta * c_map / self.c_scale

    def scored_map(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed map the image score is taken from (before any closing or row fill)."""
        return self.smooth(self.combine(*self.raw_maps(*self.features(x))))

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        amap = self.scored_map(x)
        return AnomalyOutput(anomaly_map=self.pixel_map(amap), score=self.image_score(amap))

    # ---- fitting (train.fit_memory): set from training features, nothing learned by gradient ----

    @torch.no_grad()
    def set_normalisation(self, raw: torch.Tensor, raw_coarse: Optional[torch.Tensor]) -> None:
        """Per-channel mean/std and principal components of the training images' raw features (B, C, h, w)."""
        dims = self.feat_proj.shape[0]
        self.feat_mean.copy_(raw.float().mean(dim=(0, 2, 3), keepdim=True))
        self.feat_std.copy_(_channel_std(raw, self.feat_mean).clamp(min=1e-3))
        self.feat_proj.copy_(principal_components(raw, self.feat_mean, self.feat_std, dims).to(self.feat_proj))
        if self.has_coarse and raw_coarse is not None:
            cdims = self.coarse_proj.shape[0]
            self.coarse_mean.copy_(raw_coarse.float().mean(dim=(0, 2, 3), keepdim=True))
            self.coarse_std.copy_(_channel_std(raw_coarse, self.coarse_mean).clamp(min=1e-3))
            self.coarse_proj.copy_(principal_components(raw_coarse, self.coarse_mean, self.coarse_std, cdims)
                                   .to(self.coarse_proj))

    @torch.no_grad()
    def memory_items(self, raw: torch.Tensor, coarse: bool = False) -> torch.Tensor:
        """Every block of raw training features (B, C, h, w) as memory rows, a chunk of images at a time."""
        project, memory = (self.project_coarse, self.coarse_memory) if coarse else (self.project, self.block_memory)
        assert memory is not None
        return torch.cat([memory.blocks(project(part.float())) for part in raw.split(64)])

    @torch.no_grad()
    def set_score_normalisation(self, m_mean: float, c_mean: float = 1.0) -> None:
        self.m_scale.fill_(max(m_mean, 1e-8))
        if self.has_coarse:
            self.c_scale.fill_(max(c_mean, 1e-8))

    def memory_sizes(self) -> Dict[str, int]:
        sizes = {"block_items": self.block_memory.n_items, "block_dims": int(self.block_memory.items_t.shape[0])}
        if self.coarse_memory is not None:
            sizes.update(coarse_items=self.coarse_memory.n_items, coarse_dims=int(self.coarse_memory.items_t.shape[0]))
        return sizes


def _channel_std(raw: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-channel std of (B, C, h, w) in chunks (raw features may be float16 and large)."""
    total = torch.zeros_like(mean)
    count = 0
    for part in raw.split(64):
        d = part.float() - mean
        total += (d * d).sum(dim=(0, 2, 3), keepdim=True)
        count += part.shape[0] * part.shape[2] * part.shape[3]
    return torch.sqrt(total / max(1, count - 1))

