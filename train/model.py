"""The DAAD network: UNet-like encoder-decoder whose skip connections pass through block-wise
memories, an optional discriminator (DAAD+), and the scoring head that makes the anomaly map and
image score inside the graph (so every backend scores identically).

Shapes use (B, C, H, W). Every reshape is static, so the model exports to ONNX with fixed shapes
(Reshape/Transpose/MatMul/Softmax only; no data-dependent ops).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .anomaly_map import (AnomalyOutput, MapScoring, edge_side_fill, gaussian_kernel, grey_closing,  # noqa: F401
                          separable_blur)
from .backbone import COARSE_CHANNELS, FEATURE_CHANNELS, EfficientNetLite0Features
from .config import ModelConfig
from .memory import (NEAREST_CHUNK, NORM_EPS, BlockMemory, assemble, divide, l2_normalize,  # noqa: F401
                     principal_components)
from .networks import Discriminator, Down, Generator, Up, conv_bn_relu  # noqa: F401

# what the modules split out of this one define, still importable from here
__all__ = ["AnomalyOutput", "MapScoring", "edge_side_fill", "gaussian_kernel", "grey_closing", "separable_blur",
           "NEAREST_CHUNK", "NORM_EPS", "BlockMemory", "assemble", "divide", "l2_normalize", "principal_components",
           "Discriminator", "Down", "Generator", "Up", "conv_bn_relu", "RawMaps", "DAAD", "count_parameters"]


class RawMaps(NamedTuple):
    """Unsmoothed, unnormalised per-pixel terms of the anomaly map, each (B, 1, H, W) at image resolution."""

    rec: torch.Tensor  # R: squared reconstruction error, mean over channels
    latent: Optional[torch.Tensor]  # L: discriminator-feature distance (DAAD+ with gamma < 1)
    memory: Optional[torch.Tensor]  # M: squared distance of each input block to its full-resolution memory read-out
    coarse: Optional[torch.Tensor] = None  # C: squared distance of each 1/32 feature to the coarse memory's read-out


class DAAD(MapScoring):
    """Generator (+ discriminator for DAAD+) and the in-graph scoring head.

    forward(x) -> AnomalyOutput: the per-pixel map
        A = (1-beta) * (gamma*R/r_scale + (1-gamma)*L/l_scale) + beta * M/m_scale
    and with a coarse memory, (1-delta) * A + delta * C/c_scale
    (R: squared reconstruction error averaged over channels; L: discriminator-feature distance,
    upsampled; M: the full-resolution memory's rebuild error, beta = `memory_score_weight`; C: the coarse
    memory's rebuild error of the backbone's 1/32 features, upsampled, delta = `coarse_memory_weight`),
    Gaussian-smoothed, and the image score = mean of its top `score_topk` pixels (less the map's mean with
    `score_minus_mean`); the map output is that map closed (`map_closing`) plus `edge_fill_weight` times its
    edge-side row fill (`pixel_map`), which the score does not see. With `score_hflip` the
    terms are the mean of the image's and of its mirror image's (mirrored back).
    The scales are the mean training-image values (set by `set_score_normalisation`) so that the
    weights mix terms of comparable size.
    """

    def __init__(self, cfg: ModelConfig, load_backbone: bool = True) -> None:
        super().__init__(cfg)
        has_coarse = bool(cfg.backbone) and cfg.coarse_memory_weight > 0
        self.backbone = (EfficientNetLite0Features(cfg.image_size, load_weights=load_backbone, coarse=has_coarse)
                         if cfg.backbone else None)
        raw_channels = FEATURE_CHANNELS if cfg.backbone else cfg.in_channels
        # per-channel standardisation of backbone features (set from training images before training)
        self.register_buffer("feat_mean", torch.zeros(1, raw_channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, raw_channels, 1, 1))
        self.projected = bool(cfg.backbone and cfg.feature_dims)
        if self.projected:  # (dims, 176): the top principal components of the standardised training features
            self.register_buffer("feat_proj", torch.eye(cfg.feature_dims, raw_channels))
        self.generator = Generator(cfg)
        self.coarse_memory: Optional[BlockMemory] = None
        if has_coarse:
            # a bank of the training images' 1/32 feature vectors (set by fit, not trained), per-channel standardised
            dims = cfg.coarse_feature_dims or COARSE_CHANNELS
            self.coarse_memory = BlockMemory(dims, (1, 1, 0), cfg.coarse_memory_items, cfg.temperature, readout="hard")
            self.coarse_memory.items.requires_grad_(False)
            self.register_buffer("coarse_mean", torch.zeros(1, COARSE_CHANNELS, 1, 1))
            self.register_buffer("coarse_std", torch.ones(1, COARSE_CHANNELS, 1, 1))
            if cfg.coarse_feature_dims:
                self.register_buffer("coarse_proj", torch.eye(dims, COARSE_CHANNELS))
            self.register_buffer("c_scale", torch.ones(()))
        self.discriminator = (Discriminator(cfg.target_channels, cfg.disc_channels, cfg.disc_spectral_norm)
                              if cfg.adversarial else None)
        w = cfg.image_size[1]
        self.register_buffer("r_scale", torch.ones(()))
        self.register_buffer("l_scale", torch.ones(()))
        self.register_buffer("m_scale", torch.ones(()))
        # a Gather with constant indices: TensorRT's parsers take it in every version, a negative-step Slice not
        self.register_buffer("mirror_columns", torch.arange(w - 1, -1, -1), persistent=False)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """What the generator must rebuild: the (normalised) image, or its standardised backbone features."""
        return self.encode(x)[0]

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (`targets(x)`, the standardised 1/32 features the coarse memory rebuilds, or None without one)."""
        x = self.normalise_input(x)
        if self.backbone is None:
            return x, None
        features, coarse = self.backbone.forward_with_coarse(x)
        return self.standardise(features), (self.standardise_coarse(coarse) if coarse is not None else None)

    def standardise_coarse(self, raw_coarse: torch.Tensor) -> torch.Tensor:
        """Raw 1/32 features (B, 320, h, w) -> what the coarse memory rebuilds (B, dims, h, w)."""
        z = (raw_coarse - self.coarse_mean.to(raw_coarse.device)) / self.coarse_std.to(raw_coarse.device)
        if not self.cfg.coarse_feature_dims:
            return z
        return F.conv2d(z, self.coarse_proj.to(z.device)[:, :, None, None])

    @torch.no_grad()
    def set_coarse_memory(self, raw_coarse: torch.Tensor, rng: torch.Generator) -> None:
        """Per-channel mean/std of the training images' raw 1/32 features (B, 320, h, w), with
        `coarse_feature_dims` their principal components, and the coarse memory's items: their standardised
        (projected) vectors, each once (drawn at random when there are more)."""
        assert self.coarse_memory is not None
        self.coarse_mean.copy_(raw_coarse.mean(dim=(0, 2, 3), keepdim=True))
        self.coarse_std.copy_(raw_coarse.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3))
        if self.cfg.coarse_feature_dims:
            self.coarse_proj.copy_(principal_components(raw_coarse, self.coarse_mean, self.coarse_std,
                                                        self.cfg.coarse_feature_dims).to(self.coarse_proj))
        vectors = divide(self.standardise_coarse(raw_coarse), 1, 1, self.coarse_memory.bc)
        n = self.coarse_memory.items.shape[0]
        if len(vectors) < n:
            raise ValueError(f"coarse memory of {n} items from {len(vectors)} vectors (fit caps coarse_memory_items)")
        rows = torch.randperm(len(vectors), generator=rng)[:n]
        self.coarse_memory.items.copy_(vectors[rows].to(self.coarse_memory.items))

    def coarse_map(self, coarse: torch.Tensor) -> torch.Tensor:
        """C: each standardised 1/32 feature's squared distance to its nearest coarse item, at image size."""
        assert self.coarse_memory is not None
        return self.to_image_size(((coarse - self.coarse_memory(coarse)) ** 2).mean(dim=1, keepdim=True))

    def standardise(self, raw_features: torch.Tensor) -> torch.Tensor:
        """Raw backbone features (B, 176, h, w) -> what the generator rebuilds (B, target_channels, h, w)."""
        z = (raw_features - self.feat_mean.to(raw_features.device)) / self.feat_std.to(raw_features.device)
        if not self.projected:
            return z
        return F.conv2d(z, self.feat_proj.to(z.device)[:, :, None, None])  # a 1x1 Conv in the graph

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `targets(x)`."""
        return self.generator(self.targets(x))

    @torch.no_grad()
    def set_feature_normalisation(self, raw_features: torch.Tensor) -> None:
        """Per-channel mean/std of backbone features of the training images (B, C, h, w), and with
        `feature_dims` their principal components (of every feature vector of every training image)."""
        self.feat_mean.copy_(raw_features.mean(dim=(0, 2, 3), keepdim=True))
        self.feat_std.copy_(raw_features.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3))
        if not self.projected:
            return
        self.feat_proj.copy_(principal_components(raw_features, self.feat_mean, self.feat_std,
                                                  self.cfg.feature_dims).to(self.feat_proj))

    def raw_maps(self, target: torch.Tensor, recon: torch.Tensor, readout: Optional[torch.Tensor] = None) -> RawMaps:
        """R, L (or None) and M (or None) for a target, its reconstruction and its full-resolution read-out."""
        r_map = self.to_image_size(((target - recon) ** 2).mean(dim=1, keepdim=True))
        m_map = None
        if readout is not None and self.cfg.memory_score_weight > 0:
            m_map = self.to_image_size(((target - readout) ** 2).mean(dim=1, keepdim=True))
        if self.discriminator is None or self.cfg.gamma >= 1.0:
            return RawMaps(r_map, None, m_map)
        other = readout if self.cfg.latent_against == "readout" and readout is not None else recon
        f_real = self.discriminator.layer_features(target, self.cfg.latent_layer)
        f_fake = self.discriminator.layer_features(other, self.cfg.latent_layer)
        l_map = self.to_image_size(((f_real - f_fake) ** 2).mean(dim=1, keepdim=True))
        return RawMaps(r_map, l_map, m_map)

    def maps(self, target: torch.Tensor, coarse: Optional[torch.Tensor] = None) -> RawMaps:
        """Run the generator on a target (and the coarse memory on `coarse`) and return the anomaly-map terms."""
        recon, readout = self.generator.rebuild(target)
        raw = self.raw_maps(target, recon, readout)
        if coarse is not None and self.coarse_memory is not None:
            raw = raw._replace(coarse=self.coarse_map(coarse))
        return raw

    def combine(self, maps: RawMaps) -> torch.Tensor:
        fine = self.combine_fine(maps)
        if maps.coarse is None:
            return fine
        delta = self.cfg.coarse_memory_weight
        return (1.0 - delta) * fine + delta * maps.coarse / self.c_scale

    def combine_fine(self, maps: RawMaps) -> torch.Tensor:
        """The map of the 1/8 terms: R, L and M."""
        g, beta = self.cfg.gamma, self.cfg.memory_score_weight
        # weights of 0 drop their term (not a product with 0): the decoder then leaves the exported graph
        if maps.latent is None or g >= 1.0:
            rebuilt = maps.rec / self.r_scale
        elif g <= 0.0:
            rebuilt = maps.latent / self.l_scale
        else:
            rebuilt = g * maps.rec / self.r_scale + (1.0 - g) * maps.latent / self.l_scale
        if maps.memory is None:
            return rebuilt
        if beta >= 1.0:
            return maps.memory / self.m_scale
        return (1.0 - beta) * rebuilt + beta * maps.memory / self.m_scale

    def mirror(self, t: torch.Tensor) -> torch.Tensor:
        """Left-right mirror of an image-sized (B, C, H, W) tensor."""
        return t.index_select(3, self.mirror_columns)

    def mirror_average(self, maps: RawMaps, mirrored: RawMaps) -> RawMaps:
        """The mean of an image's terms and its mirror image's terms, mirrored back (`score_hflip`)."""
        return RawMaps(*(0.5 * (a + self.mirror(b)) if a is not None else None for a, b in zip(maps, mirrored)))

    def image_maps(self, x: torch.Tensor) -> RawMaps:
        """The terms the map of images x is made of: with `score_hflip`, averaged with their mirror images'."""
        raw = self.maps(*self.encode(x))
        if not self.cfg.score_hflip:
            return raw
        return self.mirror_average(raw, self.maps(*self.encode(self.mirror(x))))

    def scored_map(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed map the image score is taken from (before `map_closing`)."""
        return self.smooth(self.combine(self.image_maps(x)))

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        amap = self.scored_map(x)
        return AnomalyOutput(anomaly_map=self.pixel_map(amap), score=self.image_score(amap))

    @torch.no_grad()
    def set_score_normalisation(self, r_mean: float, l_mean: float, m_mean: float = 1.0, c_mean: float = 1.0) -> None:
        self.r_scale.fill_(max(r_mean, 1e-8))
        self.l_scale.fill_(max(l_mean, 1e-8))
        self.m_scale.fill_(max(m_mean, 1e-8))
        if self.coarse_memory is not None:
            self.c_scale.fill_(max(c_mean, 1e-8))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
