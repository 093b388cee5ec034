"""Model and training configuration: dataclasses whose fields say why they have their value.

The paper's table columns are presets of the same code (`PRESETS`): AE, AE+Skip, DAAD, DAAD+.
Unknown keys and wrong types are rejected when a config is read back (checkpoint, YAML override): a pydantic model
made from the dataclass (from_dict), each problem one line `file: model.key: got X, expected Y`.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

from pydantic import (BaseModel, BeforeValidator, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, create_model)
from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from engine.errors import ConfigError
from engine.validation import StrictModel, format_errors, read_yaml, show, validate

# Block size (r_h, r_w, r_c) per memory scale, from fine (1/2) to the 1/16 bottleneck. r_c = 0 means
# "all channels". Each block covers 1/8 of its map's side at 128 px; the ablation is still to be run (README).
DEFAULT_BLOCKS: Tuple[Tuple[int, int, int], ...] = ((8, 8, 0), (4, 4, 0), (2, 2, 0), (1, 1, 0))


@dataclass
class ModelConfig:
    in_channels: int = 1  # gray parts by default (MVTec textures, magnetic tile); 3 for colour
    # the paper's encoder-decoder, trained by back-propagation (the paper's columns, DAAD+ options); false = DAAD's
    # block-wise memories on frozen backbone features only (train.memory_model): fit extracts features and builds
    # the memories, nothing is trained (`inspect`)
    generator: bool = True
    # side, in 1/8 feature cells, of the blocks the feature memory divides the map into (generator false): 4 = 32 px
    # at 256 px. Chosen on both datasets' val halves over 1, 2, 4 and 8 (docs/research/block_size.md)
    memory_block: int = 4
    # items kept in each feature memory by greedy k-centre selection (train.coreset): a fraction of the training
    # blocks in (0, 1], or a count above 1; 0 = every block. `memory_items` caps the block memory either way
    memory_budget: float = 0.0
    image_size: Tuple[int, int] = (128, 128)  # (H, W) at the model input; multiple of 16 (four 2x downsamplings)
    channels: Tuple[int, ...] = (32, 64, 128, 256, 256)  # full res, 1/2, 1/4, 1/8, 1/16 widths
    skips: bool = True  # UNet skip connections at 1/2, 1/4 and 1/8 (AE has none)
    memory: bool = True  # block-wise memory on every skip and on the bottleneck (DAAD)
    memory_items: int = 100  # N per memory; MemAE used 100-500
    blocks: Tuple[Tuple[int, int, int], ...] = DEFAULT_BLOCKS  # (r_h, r_w, r_c) at 1/2, 1/4, 1/8, 1/16
    # (r_h, r_w, r_c) of a memory on a skip from the generator's input straight to its last layer;
    # (0, 0, 0) = none. The paper's pixel model has none; on a backbone's 1/8 feature map this is the
    # resolution the defects live at, and the memory (not a copy) is what the decoder receives.
    full_skip_block: Tuple[int, int, int] = (0, 0, 0)
    # N of that memory; 0 = memory_items. Normal feature patches are many: give it more. With memory_init
    # "data" an upper bound: fit() keeps one item per training block when there are fewer
    full_skip_items: int = 0
    memory_init: str = "random"  # "random" (MemAE) or "data": items start as blocks drawn from training inputs/encodings
    # "soft" (the paper, MemAE: a softmax-weighted blend of items) or "hard" (the nearest item by cosine;
    # with memory_init "data" a large memory then behaves like a bank of normal blocks)
    memory_readout: str = "soft"
    # beta: weight of the full-resolution memory's rebuild error M in the anomaly map (needs full_skip_block);
    # A = (1-beta)(gamma R + (1-gamma) L) + beta M. 0 = the paper's map; 1 = M alone
    memory_score_weight: float = 0.0
    # delta: weight of a coarse memory's rebuild error C in the anomaly map, A = (1-delta) A' + delta C (A' as
    # above); its items are the backbone's 1/32 feature vectors (320 channels, each seeing most of the part) of
    # the training images, read out hard. DAAD's memories at several scales, on features: a region whose
    # every 32 px block is normal but which is wrong as a whole (uneven surface) lights up. Needs a backbone
    coarse_memory_weight: float = 0.0
    # N of that memory: an upper bound, fit() keeps each training vector once when there are fewer
    coarse_memory_items: int = 50000
    # the 1/32 features projected onto their top principal components (0 = all 320): 64 score as well on val
    # in a memory 5x smaller (11 MB for magnetic_tile's 686 training images)
    coarse_feature_dims: int = 0
    temperature: float = 0.1  # softmax(cos/T): at T=1 cosine in [-1,1] gives near-uniform addressing
    shrink_threshold: float = 0.0  # MemAE hard shrinkage lambda (0 = off, paper's equations have none)
    adversarial: bool = False  # discriminator + adversarial and alignment losses (DAAD+)
    disc_channels: Tuple[int, ...] = (32, 64, 128, 128)  # discriminator feature extractor widths
    # spectral normalisation of the discriminator's convolutions (SN-GAN): bounds its Lipschitz constant, the
    # usual cure for an adversarial game that swings without settling (README, "Training length")
    disc_spectral_norm: bool = False
    gamma: float = 0.5  # A = gamma*R + (1-gamma)*L when adversarial; 1.0 otherwise
    # L compares the discriminator's features of the input with those of the "reconstruction" (the paper)
    # or of the full-resolution memory's "readout" (the assembled blocks: the decoder rebuilds defects too)
    latent_against: str = "reconstruction"
    latent_layer: int = 0  # features after this strided layer of the discriminator (0 = its last)
    smoothing_sigma: float = 2.0  # Gaussian smoothing of the pixel map (pixels at model resolution)
    score_topk: float = 0.01  # image score = mean of the top fraction of map pixels (0 = plain max, 1 = whole-map mean)
    # the image score less the map's own mean: a part's peak against its own level. On unseen parts a whole map is
    # lifted (a good tile the memory never saw scores above those it did, everywhere), so the plain top-k ranks
    # lifted good tiles with defects; on in `inspect` (README, "The image score against the map's own level")
    score_minus_mean: bool = False
    # a grey-level closing of the pixel map after smoothing (square, this many pixels, odd; 0 = none): raises a
    # region whose border scores high (an uneven region inside the step that bounds it, a strip between a step
    # and the frame's edge narrower than half the filter) to its border's level. The map tells where; the image
    # score is taken before the closing, so whether a part is defective does not change with it
    map_closing: int = 0
    # weight of the edge-side row fill added to the pixel map (train.model.edge_side_fill; 0 = none): a step across
    # the part, a row scoring high along its whole width, lifts the strip between it and the nearer frame edge,
    # where an uneven region lies beyond the closing's reach. Rows, so the part's orientation on the frame matters;
    # the image score is taken before it, like the closing's
    edge_fill_weight: float = 0.0
    # per-image zero mean and std `illumination_std` before the generator (lighting varies per crop). Off in
    # `inspect`'s config: alone it cost image AUROC on magnetic_tile's unseen tiles; `daad-train fit` fits
    # `inspect` with and without it (train/views.py) and scores the mean map: 2-3 pixel AUROC points (README)
    illumination_norm: bool = False
    # the std the normalised image is given: 1 for pixel models; the pretrained backbone was trained on images in
    # [-1, 1], whose per-image std is about 0.25 on magnetic_tile, and a unit-std image lies outside that range
    illumination_std: float = 1.0
    backbone: str = ""  # "" = pixel-space DAAD (the paper); "efficientnet_lite0" = memories on frozen ImageNet features
    # backbone features projected onto their top principal components on the training images (0 = all
    # 176 channels): 64 keep 89 % of the variance and the same val AUROC, in a memory 2.75x smaller
    feature_dims: int = 0
    # score the image and its mirror image (left-right) and average their maps, the mirror's mirrored back,
    # for twice the inference (the graph runs the model twice). Off: on magnetic_tile's grouped val half it
    # gained 2 image AUROC points, on the test half it lost 0.2-1.4 (README, "Scoring the mirror image too")
    score_hflip: bool = False

    @property
    def name(self) -> str:
        if not self.generator:
            return f"DAAD-memory@{self.backbone}"
        if not self.skips:
            base = "AE"
        elif not self.memory:
            base = "AE+Skip"
        else:
            base = "DAAD+" if self.adversarial else "DAAD"
        return f"{base}@{self.backbone}" if self.backbone else base

    @property
    def target_channels(self) -> int:
        """Channels of what the generator rebuilds: the image's, or the backbone features'."""
        if not self.backbone:
            return self.in_channels
        return self.feature_dims or BACKBONE_CHANNELS

    @property
    def target_size(self) -> Tuple[int, int]:
        """(H, W) of what the generator rebuilds: the image, or the 1/8 backbone feature map."""
        h, w = self.image_size
        return (h // 8, w // 8) if self.backbone else (h, w)


@dataclass
class LossWeights:
    rec: float = 1.0  # lambda_rec: L2 reconstruction
    adv: float = 0.01  # lambda_adv: small so reconstruction dominates (not tuned yet)
    ali: float = 0.1  # lambda_ali: discriminator-feature alignment (the "semantic latent")


@dataclass
class TrainConfig:
    data: str = ""  # dataset root (MVTec layout) or a folder of good images
    out: str = "runs/daad"  # checkpoints, logs
    steps: int = 2000  # optimiser steps (a budget comparable across configs, unlike epochs)
    batch_size: int = 16
    lr: float = 2e-4  # Adam with DCGAN's betas; short CPU runs use 1e-3 (benchmarks, demo)
    # the discriminator's own learning rate (0 = lr): its adversarial loss swings without settling at 1e-3
    # (README, "Training length"); a slower discriminator is the usual steadier game
    disc_lr: float = 0.0
    betas: Tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    loss: LossWeights = field(default_factory=LossWeights)
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: bool = True  # mixed precision on CUDA only (ignored on CPU)
    workers: int = 0  # data are preprocessed into memory once; workers rarely help
    checkpoint_every: int = 500  # steps
    log_every: int = 50
    hflip: bool = True  # augmentations that respect the part: flips and small shifts only
    vflip: bool = True
    max_shift: float = 0.03  # fraction of the size
    val_fraction: float = 0.0  # good images held back from training (for model selection)
    groups: str = ""  # CSV `image,group` (train.groups): train on the grouped protocol's images only


BACKBONES = ("", "efficientnet_lite0")
BACKBONE_CHANNELS = 176  # = train.backbone.FEATURE_CHANNELS (a test checks it; no torch import here)
COARSE_CHANNELS = 320  # = train.backbone.COARSE_CHANNELS (likewise)
MEMORY_INITS = ("random", "data")
MEMORY_READOUTS = ("soft", "hard")
LATENT_AGAINST = ("reconstruction", "readout")
# the closing runs as 1-D max filters (MaxPool 1xk, kx1); TensorRT 8.4 fails on pooling windows of 317 and more
MAX_MAP_CLOSING = 255

PRESETS: Dict[str, Dict[str, Any]] = {
    "ae": {"skips": False, "memory": False, "adversarial": False, "gamma": 1.0},
    "ae_skip": {"skips": True, "memory": False, "adversarial": False, "gamma": 1.0},
    "daad": {"skips": True, "memory": True, "adversarial": False, "gamma": 1.0},
    "daad_plus": {"skips": True, "memory": True, "adversarial": True, "gamma": 0.5},
}


# The configuration chosen for inspection (issue 34; docs/research/product_model.md): DAAD's block-wise memory on
# frozen EfficientNet-Lite0 features, nothing trained. The 1/8 features (64 principal components) are divided into
# 4x4 blocks (32x32 pixels); each block is rebuilt as its nearest normal block of a memory cut to 10 % of the
# training blocks by greedy k-centre selection; the map is that rebuild's squared error, smoothed (sigma 4), the
# image score its top 1 %. Chosen on the val halves of magnetic_tile (grouped) and ball_screw together, beside a
# PatchCore peer on the same features (benchmarks/bench_peer.py). The trained generator, the discriminator term,
# the closing, the row fill and the illumination view are options (`--model inspect_daad_plus`, `model:` keys).
INSPECT: Dict[str, Any] = {
    "generator": False, "backbone": "efficientnet_lite0", "image_size": (256, 256), "feature_dims": 64,
    "memory_block": 4, "memory_budget": 0.1, "memory_items": 8000,
    "coarse_memory_weight": 0.5, "coarse_memory_items": 20000, "coarse_feature_dims": 64,
    "score_topk": 0.01, "smoothing_sigma": 4.0,
}
# The trained default of issue 9 (DAAD+ on features: a generator whose memory of 4x4-feature blocks scores, the
# discriminator's layer-1 feature distance, a coarse memory, closing and row fill; README of stop 32): an option
INSPECT_DAAD_PLUS: Dict[str, Any] = {
    **PRESETS["daad_plus"], "backbone": "efficientnet_lite0", "image_size": (256, 256), "feature_dims": 64,
    "blocks": ((1, 1, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0)), "memory_items": 500,
    "full_skip_block": (4, 4, 0), "full_skip_items": 50000, "memory_init": "data", "memory_readout": "hard",
    "memory_score_weight": 0.5, "gamma": 0.0, "latent_against": "readout", "latent_layer": 1,
    "coarse_memory_weight": 0.25, "coarse_memory_items": 50000, "coarse_feature_dims": 64,
    "score_topk": 0.01, "score_minus_mean": True, "smoothing_sigma": 4.0, "map_closing": 63,
    "edge_fill_weight": 0.5,
}
INSPECT_NAME = "inspect"
INSPECT_DAAD_PLUS_NAME = "inspect_daad_plus"
# the configurations for real parts, by the name `daad-train fit --model` takes
MODEL_PRESETS: Dict[str, Dict[str, Any]] = {INSPECT_NAME: INSPECT, INSPECT_DAAD_PLUS_NAME: INSPECT_DAAD_PLUS}
# the schedule every trained `inspect_daad_plus` figure was measured with (300 steps x batch 16, lr 1e-3: ~10 min on
# 2 CPU cores at 256 px); the paper columns keep TrainConfig's 2000 steps at 2e-4; `inspect` trains nothing
SCHEDULES: Dict[str, Dict[str, Any]] = {INSPECT_DAAD_PLUS_NAME: {"steps": 300, "lr": 1e-3}}


def schedule(model: str) -> Dict[str, Any]:
    """Default steps and lr of `daad-train fit --model MODEL` (flags override them)."""
    return {"steps": TrainConfig.steps, "lr": TrainConfig.lr, **SCHEDULES.get(model, {})}


# -- reading a config back (YAML `model:` section, checkpoint): pydantic, the style of every file the product reads
# (engine/validation.py). The schema is made from the dataclass's own fields, so a field is declared once: types
# are strict (no true for a number, no text for a flag), unknown keys are errors; the rules between fields stay
# in validate_model_config.
def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # 100.0 read back as 100


_STRICT: Dict[Any, Any] = {int: Annotated[StrictInt, BeforeValidator(_whole)], float: StrictFloat, bool: StrictBool,
                           str: StrictStr}


def _strict_type(hint: Any) -> Any:
    if hint in _STRICT:
        return _STRICT[hint]
    if dataclasses.is_dataclass(hint):
        return _schema(hint)
    if typing.get_origin(hint) is tuple:
        return Tuple[tuple(a if a is Ellipsis else _strict_type(a) for a in typing.get_args(hint))]  # type: ignore
    return hint


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> Type[BaseModel]:
    """The pydantic model of a config dataclass: its fields, strict types, extra=forbid. Every field is
    optional here: from_dict passes only the keys given, and the dataclass fills in its defaults."""
    hints = typing.get_type_hints(cls)
    fields_: Dict[str, Any] = {f.name: (_strict_type(hints[f.name]), None) for f in fields(cls)}
    return create_model(f"{cls.__name__}File", __config__=ConfigDict(extra="forbid"), **fields_)


def _build(cls: type, parsed: BaseModel, keys: Any) -> Any:
    kwargs = {}
    for key in keys:
        value = getattr(parsed, key)
        if isinstance(value, BaseModel):  # a nested config (TrainConfig.loss)
            value = _build(type(getattr(cls(), key)), value, value.model_fields_set)
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(cls: Any, data: Optional[Dict[str, Any]], path: str = "config") -> Any:
    """Build a config dataclass from a mapping; unknown keys and wrong types are ConfigError, one line each:
    `PATH.key: got X, expected Y` (PATH e.g. `train.yaml: model`)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: got {show(data)}, expected a mapping")
    schema = _schema(cls)
    try:
        parsed = schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path}.{line}" for line in format_errors(exc, data, schema))) from None
    return _build(cls, parsed, data.keys())


class _ConfigFile(StrictModel):
    """The file `daad-train fit --config` reads."""

    model: Optional[Dict[str, Any]] = None  # ModelConfig keys over the --model preset


def model_config_file(path: Path, base: ModelConfig) -> Tuple[ModelConfig, Dict[str, Any]]:
    """`base` with the `model:` section of the YAML file at `path` over it, and that section."""
    loaded = read_yaml(path, ConfigError, "fix the syntax")
    section = validate(_ConfigFile, loaded or {}, str(path), ConfigError).model or {}
    return from_dict(ModelConfig, {**to_dict(base), **section}, f"{path}: model"), section


def to_dict(config: Any) -> Dict[str, Any]:
    """Plain dict of lists/numbers (YAML/JSON/checkpoint friendly)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A paper column (`ae`, `ae_skip`, `daad`, `daad_plus`) or a configuration for real parts (`inspect`, the
    default; `inspect_daad_plus`, the trained one before it)."""
    chosen = {**PRESETS, **MODEL_PRESETS}
    if name not in chosen:
        raise ConfigError(f"--model: got {name!r}, expected one of {preset_names()}")
    return dataclasses.replace(ModelConfig(), **{**chosen[name], **overrides})


def preset_names() -> List[str]:
    return sorted(PRESETS) + sorted(MODEL_PRESETS)


def validate_model_config(cfg: ModelConfig) -> List[str]:
    """Cross-field rules; returns a list of problems (empty when valid)."""
    problems = []
    if not cfg.generator:
        return validate_memory_config(cfg)
    if cfg.backbone not in BACKBONES:
        problems.append(f"model.backbone: got {cfg.backbone!r}, expected one of {BACKBONES}")
    h, w = cfg.target_size
    if h % 16 or w % 16:
        unit = 128 if cfg.backbone else 16
        problems.append(f"model.image_size: got {list(cfg.image_size)}, expected multiples of {unit} (four 2x downsamplings"
                        + (" of the 1/8 feature map)" if cfg.backbone else ")"))
    if len(cfg.channels) != 5:
        problems.append(f"model.channels: got {len(cfg.channels)} widths, expected 5 (full, 1/2, 1/4, 1/8, 1/16)")
    if len(cfg.blocks) != 4:
        problems.append(f"model.blocks: got {len(cfg.blocks)} block sizes, expected 4 (1/2, 1/4, 1/8, 1/16)")
    else:
        for level, (block, ch) in enumerate(zip(cfg.blocks, cfg.channels[1:])):
            bh, bw, bc = block
            fh, fw = h // 2 ** (level + 1), w // 2 ** (level + 1)
            if bh < 1 or bw < 1 or fh % bh or fw % bw:
                problems.append(f"model.blocks[{level}]: block {bh}x{bw} does not tile the {fh}x{fw} feature map")
            if bc < 0 or (bc and ch % bc):
                problems.append(f"model.blocks[{level}]: r_c={bc} does not divide {ch} channels (0 = all)")
    fbh, fbw, fbc = cfg.full_skip_block
    target_channels = cfg.target_channels
    if (fbh, fbw) != (0, 0) and (fbh < 1 or fbw < 1 or h % fbh or w % fbw or fbc < 0 or (fbc and target_channels % fbc)):
        problems.append(f"model.full_skip_block: block {fbh}x{fbw}x{fbc} does not tile the {h}x{w}x{target_channels} "
                        "generator input ((0, 0, 0) = no full-resolution skip)")
    if cfg.full_skip_items < 0 or cfg.memory_items < 1:
        problems.append(f"model.memory_items / full_skip_items: got {cfg.memory_items} / {cfg.full_skip_items}, expected >= 1 / >= 0")
    if cfg.memory_init not in MEMORY_INITS:
        problems.append(f"model.memory_init: got {cfg.memory_init!r}, expected one of {MEMORY_INITS}")
    if not 0.0 <= cfg.memory_score_weight <= 1.0:
        problems.append(f"model.memory_score_weight: got {cfg.memory_score_weight}, expected within [0, 1]")
    elif cfg.memory_score_weight > 0 and not (cfg.memory and cfg.skips and fbh > 0):
        problems.append("model.memory_score_weight: scores the full-resolution memory, which this model has not; "
                        "set full_skip_block (e.g. [1, 1, 0]) on a model with memory and skips, or set it to 0")
    if not 0.0 <= cfg.coarse_memory_weight <= 1.0:
        problems.append(f"model.coarse_memory_weight: got {cfg.coarse_memory_weight}, expected within [0, 1]")
    elif cfg.coarse_memory_weight > 0 and not cfg.backbone:
        problems.append("model.coarse_memory_weight: scores a memory of the backbone's 1/32 features, and this model has "
                        "no backbone; set backbone: efficientnet_lite0 or set it to 0")
    if cfg.coarse_memory_items < 1:
        problems.append(f"model.coarse_memory_items: got {cfg.coarse_memory_items}, expected >= 1")
    if not 0 <= cfg.coarse_feature_dims <= COARSE_CHANNELS:
        problems.append(f"model.coarse_feature_dims: got {cfg.coarse_feature_dims}, expected 0 (all) to "
                        f"{COARSE_CHANNELS} principal components")
    if cfg.memory_readout not in MEMORY_READOUTS:
        problems.append(f"model.memory_readout: got {cfg.memory_readout!r}, expected one of {MEMORY_READOUTS}")
    if cfg.temperature <= 0:
        problems.append(f"model.temperature: got {cfg.temperature}, expected > 0")
    if not 0.0 <= cfg.gamma <= 1.0:
        problems.append(f"model.gamma: got {cfg.gamma}, expected within [0, 1]")
    if cfg.latent_against not in LATENT_AGAINST:
        problems.append(f"model.latent_against: got {cfg.latent_against!r}, expected one of {LATENT_AGAINST}")
    elif cfg.latent_against == "readout" and not (cfg.memory and cfg.skips and fbh > 0):
        problems.append("model.latent_against: 'readout' compares with the full-resolution memory's read-out, which "
                        "this model has not; set full_skip_block or use 'reconstruction'")
    if not 0 <= cfg.latent_layer <= len(cfg.disc_channels):
        problems.append(f"model.latent_layer: got {cfg.latent_layer}, expected 0 (the last) to "
                        f"{len(cfg.disc_channels)} (the discriminator's strided layers)")
    if cfg.disc_spectral_norm and not cfg.adversarial:
        problems.append("model.disc_spectral_norm: normalises the discriminator, and this model has none; "
                        "set adversarial: true or drop the key")
    if cfg.illumination_std <= 0:
        problems.append(f"model.illumination_std: got {cfg.illumination_std}, expected > 0 (1 = unit std)")
    elif cfg.illumination_std != 1.0 and not cfg.illumination_norm:
        problems.append("model.illumination_std: the spread of the illumination-normalised image, and this model "
                        "does not normalise it; set illumination_norm: true or drop the key")
    if not 0.0 <= cfg.score_topk <= 1.0:
        problems.append(f"model.score_topk: got {cfg.score_topk}, expected within [0, 1] (1 = whole-map mean)")
    elif cfg.score_minus_mean and cfg.score_topk >= 1.0:
        problems.append("model.score_minus_mean: the whole-map mean (score_topk 1) less itself is 0 for every image; "
                        "set score_topk below 1 (e.g. 0.01) or drop score_minus_mean")
    if cfg.map_closing and (cfg.map_closing < 3 or cfg.map_closing % 2 == 0 or cfg.map_closing > MAX_MAP_CLOSING):
        problems.append(f"model.map_closing: got {cfg.map_closing}, expected 0 (none) or an odd filter size from 3 "
                        f"to {MAX_MAP_CLOSING} pixels")
    if cfg.edge_fill_weight < 0:
        problems.append(f"model.edge_fill_weight: got {cfg.edge_fill_weight}, expected >= 0 (0 = no row fill)")
    if not 0 <= cfg.feature_dims <= BACKBONE_CHANNELS:
        problems.append(f"model.feature_dims: got {cfg.feature_dims}, expected 0 (all) to {BACKBONE_CHANNELS} principal components")
    elif cfg.feature_dims and not cfg.backbone:
        problems.append("model.feature_dims: projects backbone features, and this model has no backbone; "
                        "set backbone: efficientnet_lite0 or feature_dims: 0")
    if cfg.in_channels not in (1, 3):
        problems.append(f"model.in_channels: got {cfg.in_channels}, expected 1 or 3")
    return problems


# what a generator-free model (generator: false) has no use for: set away from their defaults, they are refused
GENERATOR_ONLY = ("adversarial", "score_hflip", "memory_score_weight", "latent_against", "disc_spectral_norm")


def validate_memory_config(cfg: ModelConfig) -> List[str]:
    """Rules for `generator: false` (train.memory_model)."""
    problems = []
    if not cfg.backbone:
        problems.append("model.generator: false scores memories of backbone features, and this model has no backbone; "
                        "set backbone: efficientnet_lite0 or generator: true")
    elif cfg.backbone not in BACKBONES:
        problems.append(f"model.backbone: got {cfg.backbone!r}, expected one of {BACKBONES}")
    default = ModelConfig()
    for key in GENERATOR_ONLY:
        if getattr(cfg, key) != getattr(default, key):
            problems.append(f"model.{key}: a part of the trained generator, and this model has none (generator: false); "
                            "drop the key or set generator: true")
    h, w = cfg.image_size
    if h % 32 or w % 32:
        problems.append(f"model.image_size: got {list(cfg.image_size)}, expected multiples of 32 (the backbone's 1/32 features)")
    fh, fw = h // 8, w // 8
    if cfg.memory_block < 1 or fh % cfg.memory_block or fw % cfg.memory_block:
        problems.append(f"model.memory_block: block {cfg.memory_block} does not tile the {fh}x{fw} feature map "
                        "(1, 2, 4 or 8 at 256 px)")
    if cfg.memory_budget < 0:
        problems.append(f"model.memory_budget: got {cfg.memory_budget}, expected 0 (all), a fraction in (0, 1] or a count > 1")
    if cfg.memory_items < 1 or cfg.coarse_memory_items < 1:
        problems.append(f"model.memory_items / coarse_memory_items: got {cfg.memory_items} / {cfg.coarse_memory_items}, "
                        "expected >= 1")
    if not 0.0 <= cfg.coarse_memory_weight < 1.0:
        problems.append(f"model.coarse_memory_weight: got {cfg.coarse_memory_weight}, expected within [0, 1)")
    if not 0 <= cfg.feature_dims <= BACKBONE_CHANNELS or not 0 <= cfg.coarse_feature_dims <= COARSE_CHANNELS:
        problems.append(f"model.feature_dims / coarse_feature_dims: got {cfg.feature_dims} / {cfg.coarse_feature_dims}, "
                        f"expected 0 (all) to {BACKBONE_CHANNELS} / {COARSE_CHANNELS} principal components")
    if cfg.illumination_std <= 0 or (cfg.illumination_std != 1.0 and not cfg.illumination_norm):
        problems.append(f"model.illumination_std: got {cfg.illumination_std}, expected > 0 and only with illumination_norm")
    if not 0.0 <= cfg.score_topk <= 1.0 or (cfg.score_minus_mean and cfg.score_topk >= 1.0):
        problems.append(f"model.score_topk: got {cfg.score_topk}, expected within [0, 1] (below 1 with score_minus_mean)")
    if cfg.map_closing and (cfg.map_closing < 3 or cfg.map_closing % 2 == 0 or cfg.map_closing > MAX_MAP_CLOSING):
        problems.append(f"model.map_closing: got {cfg.map_closing}, expected 0 (none) or an odd filter size from 3 "
                        f"to {MAX_MAP_CLOSING} pixels")
    if cfg.edge_fill_weight < 0:
        problems.append(f"model.edge_fill_weight: got {cfg.edge_fill_weight}, expected >= 0 (0 = no row fill)")
    if cfg.in_channels not in (1, 3):
        problems.append(f"model.in_channels: got {cfg.in_channels}, expected 1 or 3")
    return problems
