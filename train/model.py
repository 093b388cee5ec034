"""The DAAD network: UNet-like encoder-decoder whose skip connections pass through block-wise
memories, an optional discriminator (DAAD+), and the scoring head that makes the anomaly map and
image score inside the graph (so every backend scores identically).

Shapes use (B, C, H, W). Every reshape is static, so the model exports to ONNX with fixed shapes
(Reshape/Transpose/MatMul/Softmax only; no data-dependent ops).
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import COARSE_CHANNELS, FEATURE_CHANNELS, EfficientNetLite0Features
from .config import ModelConfig

NORM_EPS = 1e-4  # >= 1e-4 so half precision does not round it to zero (NaN in TensorRT FP16)
NEAREST_CHUNK = 2048  # queries per similarity chunk in hard read-out (2048 x 30 000 items = 240 MB)
PCA_CHUNK = 64  # images per chunk when accumulating the feature covariance


class RawMaps(NamedTuple):
    """Unsmoothed, unnormalised per-pixel terms of the anomaly map, each (B, 1, H, W) at image resolution."""

    rec: torch.Tensor  # R: squared reconstruction error, mean over channels
    latent: Optional[torch.Tensor]  # L: discriminator-feature distance (DAAD+ with gamma < 1)
    memory: Optional[torch.Tensor]  # M: squared distance of each input block to its full-resolution memory read-out
    coarse: Optional[torch.Tensor] = None  # C: squared distance of each 1/32 feature to the coarse memory's read-out


class AnomalyOutput(NamedTuple):
    """Eval-mode output; the field names are the ONNX output names."""

    anomaly_map: torch.Tensor  # (B, 1, H, W)
    score: torch.Tensor  # (B,)


def divide(x: torch.Tensor, bh: int, bw: int, bc: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*nC*nH*nW, bc*bh*bw): one row per block, in F.unfold's element order."""
    b, c, h, w = x.shape
    nc, nh, nw = c // bc, h // bh, w // bw
    x = x.reshape(b, nc, bc, nh, bh, nw, bw)
    x = x.permute(0, 1, 3, 5, 2, 4, 6)  # (B, nC, nH, nW, bc, bh, bw)
    return x.reshape(b * nc * nh * nw, bc * bh * bw)


def assemble(blocks: torch.Tensor, shape: Tuple[int, int, int, int], bh: int, bw: int, bc: int) -> torch.Tensor:
    """Inverse of `divide`: (B*nC*nH*nW, bc*bh*bw) -> (B, C, H, W)."""
    b, c, h, w = shape
    nc, nh, nw = c // bc, h // bh, w // bw
    x = blocks.reshape(b, nc, nh, nw, bc, bh, bw)
    x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (B, nC, bc, nH, bh, nW, bw)
    return x.reshape(b, c, h, w)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Division by a clamped norm: F.normalize adds Shape/Expand nodes to the exported graph.
    return x / torch.clamp(torch.sqrt((x * x).sum(dim=-1, keepdim=True)), min=NORM_EPS)


class BlockMemory(nn.Module):
    """Divide a feature map into r_h x r_w x r_c blocks, rebuild each from N learned items, assemble.

    Soft read-out: w_i = softmax_i(cos(q, m_i) / T), optionally hard-shrunk (MemAE), q_hat = sum_i w_i m_i.
    Hard read-out: q_hat = the item of highest cosine (a blend of items rebuilds an unseen block too well;
    the nearest normal item does not); in training, gradients reach the queries through the soft weights
    (straight-through), so the encoder still learns.
    """

    def __init__(self, channels: int, block: Tuple[int, int, int], items: int, temperature: float,
                 shrink_threshold: float = 0.0, readout: str = "soft") -> None:
        super().__init__()
        bh, bw, bc = block
        self.bh, self.bw, self.bc = bh, bw, bc or channels
        self.temperature = temperature
        self.shrink_threshold = shrink_threshold
        self.hard = readout == "hard"
        dim = self.bc * bh * bw
        self.items = nn.Parameter(torch.randn(items, dim) / math.sqrt(dim))  # learned by back-propagation

    def address(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries -> (Q, N) addressing weights, each row summing to one."""
        similarity = l2_normalize(queries) @ l2_normalize(self.items).t()
        weights = torch.softmax(similarity / self.temperature, dim=-1)
        if self.shrink_threshold > 0:
            shifted = weights - self.shrink_threshold
            weights = F.relu(shifted) * weights / (torch.abs(shifted) + NORM_EPS)
            weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=NORM_EPS)
        return weights

    def item_norms(self, items_t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.linalg.vector_norm(items_t, dim=0), min=NORM_EPS)  # ReduceL2: folded at export

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries -> (Q,) index of the item of highest cosine similarity, q/|q| . m / |m|: the
        items' norms divide the dot products (the graph's formula, see `nearest_items_in_graph`)."""
        with torch.no_grad():  # in chunks: (Q, N) similarities of a large memory do not fit at once
            items_t = self.items.t()
            norms = self.item_norms(items_t)
            return torch.cat([((l2_normalize(q) @ items_t) / norms).argmax(dim=-1) for q in queries.split(NEAREST_CHUNK)])

    def nearest_items_in_graph(self, queries: torch.Tensor) -> torch.Tensor:
        """Hard read-out as exported: the items enter the graph once, as one (D, N) constant that both the
        similarity MatMul and the Gather read (a normalised copy would double a memory of hundreds of MB)."""
        items_t = self.items.t()
        index = ((l2_normalize(queries) @ items_t) / self.item_norms(items_t)).argmax(dim=-1)  # ArgMax: TensorRT-parsable
        return items_t.index_select(1, index).t()  # Gather on axis 1, then a transpose of the (small) read-out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        queries = divide(x, self.bh, self.bw, self.bc)
        if not self.hard:
            readout = self.address(queries) @ self.items
        else:
            exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            readout = self.nearest_items_in_graph(queries) if exporting else self.items[self.nearest(queries)]
            if self.training and queries.requires_grad:
                soft = self.address(queries) @ self.items
                readout = soft + (readout - soft).detach()  # forward: the nearest item; backward: the soft weights
        return assemble(readout, shape, self.bh, self.bw, self.bc)  # type: ignore[arg-type]


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


def principal_components(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dims: int) -> torch.Tensor:
    """(dims, C): the top principal components of every standardised feature vector of (B, C, h, w)."""
    c = raw.shape[1]
    cov = torch.zeros(c, c, dtype=torch.float64)
    for chunk in raw.split(PCA_CHUNK):  # (C, C) accumulated: all vectors at once need GBs
        z = ((chunk - mean.to(chunk)) / std.to(chunk)).permute(0, 2, 3, 1).reshape(-1, c).double().cpu()
        cov += z.t() @ z
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues; the mean is zero after standardisation
    return vectors[:, -dims:].flip(1).t()  # largest variance first


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
