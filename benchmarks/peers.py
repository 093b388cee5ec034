"""The peer a user would pick instead: PatchCore (Roth et al., CVPR 2022) on the product's own frozen features.

Every training patch of the EfficientNet-Lite0 1/8 feature map (176 channels, each averaged with its 3x3
neighbours: PatchCore's local context) in a memory, optionally cut by greedy k-centre selection (the same
train.coreset the product uses); a test patch's score is the L2 distance to its nearest memory patch; the map
is upsampled, Gaussian-smoothed (sigma 4) and its maximum is the image score. Nothing trained, no
standardisation or projection: the plain baseline the product must beat on the same features.
It is a torch module with the product's output contract, so it exports to ONNX and is timed the same way.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Tuple

import torch

from engine.preprocess import PreprocessSpec
from train.backbone import FEATURE_CHANNELS, EfficientNetLite0Features
from train.config import ModelConfig
from train.coreset import coreset_size, kcenter_greedy
from train.data import Sample
from train.fit_memory import extract_features
from train.memory_model import NearestBlockMemory
from train.model import AnomalyOutput, MapScoring

PEER_SIGMA = 4.0  # PatchCore's Gaussian smoothing of the upsampled map


def peer_config(in_channels: int, image_size: Tuple[int, int] = (256, 256)) -> ModelConfig:
    """The input contract and scoring head of the peer: max of the smoothed map (score_topk 0)."""
    return dataclasses.replace(ModelConfig(), generator=False, backbone="efficientnet_lite0", in_channels=in_channels,
                               image_size=image_size, smoothing_sigma=PEER_SIGMA, score_topk=0.0, memory_block=1)


class PatchCore(MapScoring):
    discriminator = None  # for export's unwrapping, as the product's model
    has_coarse = False

    def __init__(self, cfg: ModelConfig, load_backbone: bool = True) -> None:
        super().__init__(cfg)
        self.backbone = EfficientNetLite0Features(cfg.image_size, load_weights=load_backbone)
        self.memory = NearestBlockMemory(FEATURE_CHANNELS, 1)

    @property
    def name(self) -> str:
        return "PatchCore@efficientnet_lite0"

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return self.backbone(x), None

    def scored_map(self, x: torch.Tensor) -> torch.Tensor:
        squared = self.memory(self.backbone(x)) * FEATURE_CHANNELS  # mean over channels -> the sum: |q - m|^2
        return self.smooth(self.to_image_size(torch.sqrt(squared)))

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        amap = self.scored_map(x)
        return AnomalyOutput(anomaly_map=amap, score=self.image_score(amap))


def fit_patchcore(cfg: ModelConfig, samples: List[Sample], spec: PreprocessSpec, budget: float,
                  seed: int = 0) -> Tuple[PatchCore, Dict[str, Any]]:
    """Every training patch, or `budget` (a fraction) of them by greedy k-centre; seconds and sizes."""
    t0 = time.perf_counter()
    model = PatchCore(cfg).eval()
    raw, _ = extract_features(model, samples, spec, torch.device("cpu"))  # type: ignore[arg-type]
    items = raw.float().permute(0, 2, 3, 1).reshape(-1, FEATURE_CHANNELS)
    offered = len(items)
    if budget < 1.0:
        items = items[kcenter_greedy(items, coreset_size(offered, budget), seed=seed)]
    model.memory.set_items(items)
    return model, {"fit_seconds": time.perf_counter() - t0, "items": len(items), "offered": offered}
