"""The paper's trained networks: the UNet-like generator whose skips pass through block-wise memories, and the
discriminator of DAAD+ (a feature extractor and a classifier)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .config import ModelConfig
from .memory import BlockMemory, divide


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(conv_bn_relu(cin, cout, stride=2), conv_bn_relu(cout, cout))


class Up(nn.Module):
    """2x upsampling (transposed conv), optional concatenation of a skip, then Conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fuse = conv_bn_relu(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.fuse(x)


class Generator(nn.Module):
    """Encoder-decoder; skips at 1/2, 1/4, 1/8 and the 1/16 bottleneck pass through memories.

    `full_skip_block` adds a memory-gated skip at the input resolution (off for pixels, as in the paper).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.stem = conv_bn_relu(cfg.target_channels, c[0])
        self.downs = nn.ModuleList([Down(c[i], c[i + 1]) for i in range(4)])  # -> 1/2, 1/4, 1/8, 1/16
        if cfg.memory:
            self.memories = nn.ModuleList(
                [BlockMemory(c[i + 1], cfg.blocks[i], cfg.memory_items, cfg.temperature, cfg.shrink_threshold,
                             cfg.memory_readout) for i in range(4)]
            )
        else:
            self.memories = nn.ModuleList()
        self.full_skip = cfg.skips and cfg.full_skip_block[0] > 0
        in_ch = cfg.target_channels
        self.full_memory = (BlockMemory(in_ch, cfg.full_skip_block, cfg.full_skip_items or cfg.memory_items, cfg.temperature,
                                        cfg.shrink_threshold, cfg.memory_readout) if self.full_skip and cfg.memory else None)
        skip_ch = [c[3], c[2], c[1]] if cfg.skips else [0, 0, 0]
        # decoder: 1/16 -> 1/8 -> 1/4 -> 1/2 -> 1
        self.ups = nn.ModuleList([
            Up(c[4], skip_ch[0], c[3]), Up(c[3], skip_ch[1], c[2]), Up(c[2], skip_ch[2], c[1]),
            Up(c[1], in_ch if self.full_skip else 0, c[0]),
        ])
        self.out_channels = cfg.target_channels
        self.head = nn.Conv2d(c[0], self.out_channels, 3, 1, 1)

    @torch.no_grad()
    def init_memories_from_data(self, x: torch.Tensor, rng: torch.Generator, full_x: Optional[torch.Tensor] = None) -> None:
        """Set every memory's items to blocks drawn at random from `x` (training inputs) and their encodings.

        The full-resolution memory draws from `full_x` when given (all training inputs: a large memory
        of normal blocks covers more of them when drawn from every image).

        Items still learn by back-propagation; they start on the data instead of in empty space, so a
        large memory is used from the first step (with random items most are never addressed).
        """
        was_training = self.training
        self.eval()  # batch-norm in eval mode: the draw must not move the running statistics
        def draw(memory: BlockMemory, fmap: torch.Tensor) -> None:
            blocks = divide(fmap, memory.bh, memory.bw, memory.bc)
            n = memory.items.shape[0]
            rows = torch.randint(0, blocks.shape[0], (n,), generator=rng) if blocks.shape[0] < n else \
                torch.randperm(blocks.shape[0], generator=rng)[:n]
            memory.items.copy_(blocks[rows].to(memory.items))
        if self.full_memory is not None:
            draw(self.full_memory, x if full_x is None else full_x)
        h = self.stem(x)
        for level, down in enumerate(self.downs):
            h = down(h)
            if self.cfg.memory:
                draw(self.memories[level], h)
        self.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rebuild(x)[0]

    def rebuild(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (reconstruction, the full-resolution memory's read-out of `x` or None)."""
        feats: List[torch.Tensor] = []
        full: Optional[torch.Tensor] = None
        if self.full_skip:
            full = self.full_memory(x) if self.full_memory is not None else x
        h = self.stem(x)
        for down in self.downs:
            h = down(h)
            feats.append(h)  # 1/2, 1/4, 1/8, 1/16
        if self.cfg.memory:
            feats = [memory(f) for memory, f in zip(self.memories, feats)]  # the decoder sees only memory outputs
        h = feats[3]
        skips: List[Optional[torch.Tensor]] = [feats[2], feats[1], feats[0], full] if self.cfg.skips else [None] * 4
        for up, skip in zip(self.ups, skips):
            h = up(h, skip)
        out = self.head(h)
        # pixels are normalised to [-1, 1] (mean 0.5, std 0.5); standardised images and features are unbounded
        out = out if (self.cfg.backbone or self.cfg.illumination_norm) else torch.tanh(out)
        return out, (full if self.full_memory is not None else None)


class Discriminator(nn.Module):
    """Feature extractor f_D followed by a classifier (real image vs reconstruction)."""

    def __init__(self, in_channels: int, widths: Tuple[int, ...], spectral_norm: bool = False) -> None:
        super().__init__()
        # in eval mode a spectrally normalised weight is W / sigma with the stored power-iteration vectors:
        # a constant of the graph, folded at export
        norm: Callable[[nn.Module], nn.Module] = (nn.utils.parametrizations.spectral_norm if spectral_norm
                                                  else (lambda m: m))
        self.in_channels, self.widths, self.spectral_norm = in_channels, widths, spectral_norm
        layers: List[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(widths):
            layers.append(norm(nn.Conv2d(cin, cout, 4, 2, 1, bias=i == 0)))
            if i > 0:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = norm(nn.Conv2d(cin, 1, 3, 1, 1))

    def with_plain_weights(self) -> "Discriminator":
        """An unnormalised twin holding this one's current (eval-mode) weights: W / sigma as plain tensors, which
        the ONNX exporter can trace (it cannot trace the parametrisation's power-iteration read-out)."""
        if not self.spectral_norm:
            return self
        twin = Discriminator(self.in_channels, self.widths)
        state = {k: v for k, v in self.state_dict().items() if ".parametrizations." not in k}
        with torch.no_grad():
            for name, module in self.named_modules():
                if nn.utils.parametrize.is_parametrized(module):
                    state[f"{name}.weight"] = module.weight.detach().clone()
        twin.load_state_dict(state)
        return twin.train(self.training)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (logit (B,), features (B, C, h, w))."""
        f = self.features(x)
        return self.classifier(f).mean(dim=(1, 2, 3)), f

    def layer_features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Features after the `layer`-th strided layer (its activation); 0 = the last, as `forward`."""
        if layer == 0:
            return self.features(x)
        seen = 0
        for module in self.features:
            x = module(x)
            if isinstance(module, nn.LeakyReLU):
                seen += 1
                if seen == layer:
                    break
        return x
