"""The DAAD building blocks: division/assembly, addressing, memory read-out, presets, ONNX export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import PRESETS, preset, validate_model_config
from train.model import DAAD, BlockMemory, assemble, divide, edge_side_fill, grey_closing

SMALL = dict(image_size=(32, 32), channels=(8, 8, 16, 16, 16), disc_channels=(8, 8, 16, 16), memory_items=10,
             blocks=((4, 4, 0), (2, 2, 0), (2, 2, 0), (1, 1, 0)))


@pytest.mark.parametrize("bh,bw,bc", [
    (1, 1, 8),  # pixel-level memory
    (4, 4, 8),  # medium blocks, all channels
    (2, 4, 2),  # non-square blocks cutting across channels
    (8, 8, 8),  # the whole map is one block
])
def test_divide_then_assemble_is_exactly_the_identity(bh: int, bw: int, bc: int) -> None:
    x = torch.randn(3, 8, 8, 8)
    blocks = divide(x, bh, bw, bc)
    assert blocks.shape == (3 * (8 // bc) * (8 // bh) * (8 // bw), bc * bh * bw)
    assert torch.equal(assemble(blocks, tuple(x.shape), bh, bw, bc), x)


def test_division_matches_unfold_order_when_blocks_span_all_channels() -> None:
    x = torch.randn(2, 4, 8, 8)
    ours = divide(x, 2, 2, 4)  # (B*nH*nW, C*2*2)
    ref = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, 16)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shrink", [0.0, 0.02])
def test_addressing_weights_are_a_distribution(shrink: float) -> None:
    memory = BlockMemory(channels=8, block=(2, 2, 0), items=20, temperature=0.1, shrink_threshold=shrink)
    weights = memory.address(torch.randn(50, 32))
    assert weights.shape == (50, 20)
    assert torch.all(weights >= 0)
    assert torch.allclose(weights.sum(dim=1), torch.ones(50), atol=1e-5)


def test_reading_a_stored_item_returns_it() -> None:
    torch.manual_seed(0)
    memory = BlockMemory(channels=4, block=(2, 2, 0), items=16, temperature=0.01)
    item = memory.items.detach()[5]
    feature = item.reshape(1, 4, 2, 2)  # one block holding exactly memory item 5
    out = memory(feature)
    assert torch.allclose(out.reshape(-1), item, atol=1e-3)


def test_hard_readout_returns_the_nearest_item_by_cosine() -> None:
    torch.manual_seed(0)
    memory = BlockMemory(channels=4, block=(1, 1, 0), items=300, temperature=0.1, readout="hard").eval()
    x = torch.randn(2, 4, 8, 8)
    out = memory(x)
    queries = divide(x, 1, 1, 4)
    cosine = F.normalize(queries, dim=1) @ F.normalize(memory.items.detach(), dim=1).t()
    assert torch.equal(divide(out, 1, 1, 4), memory.items.detach()[cosine.argmax(dim=1)])  # exactly a stored item


def test_hard_readout_chunks_give_the_whole_answer(monkeypatch) -> None:
    import train.model as model_module

    torch.manual_seed(0)
    memory = BlockMemory(channels=8, block=(1, 1, 0), items=50, temperature=0.1, readout="hard")
    queries = torch.randn(37, 8)
    whole = memory.nearest(queries)
    monkeypatch.setattr(model_module, "NEAREST_CHUNK", 5)  # 37 queries in 8 chunks, the last one short
    assert torch.equal(memory.nearest(queries), whole)


def test_hard_readout_still_trains_the_encoder_and_the_chosen_items() -> None:
    torch.manual_seed(0)
    memory = BlockMemory(channels=4, block=(1, 1, 0), items=30, temperature=0.1, readout="hard").train()
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    memory(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through: the encoder is not cut off
    assert memory.items.grad is not None and memory.items.grad.abs().sum() > 0


def test_low_temperature_makes_addressing_selective() -> None:
    torch.manual_seed(0)
    queries = torch.randn(100, 64)
    flat = BlockMemory(16, (2, 2, 0), 50, temperature=1.0).address(queries)
    sharp = BlockMemory(16, (2, 2, 0), 50, temperature=0.05).address(queries)
    # T=1 on cosines in [-1, 1] is nearly uniform (max weight ~1/N); a low T concentrates it
    assert flat.max(dim=1).values.mean() < 0.1
    assert sharp.max(dim=1).values.mean() > 0.3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_paper_column_builds_and_scores(name: str) -> None:
    model = DAAD(preset(name, **SMALL)).eval()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.anomaly_map.shape == (2, 1, 32, 32)
    assert out.score.shape == (2,)
    assert torch.isfinite(out.score).all()
    assert (model.discriminator is not None) == (name == "daad_plus")
    assert (len(model.generator.memories) == 4) == name.startswith("daad")


def test_anomaly_map_is_larger_where_the_reconstruction_fails() -> None:
    model = DAAD(preset("ae_skip", **SMALL)).eval()
    x = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        recon = model.reconstruct(x)
        x_bad = x.clone()
        x_bad[..., 10:14, 10:14] = recon[..., 10:14, 10:14] + 5.0
        r_map = model.raw_maps(x_bad, recon).rec
    assert r_map[0, 0, 12, 12] > 10 * r_map[0, 0, 25, 25]


@pytest.mark.parametrize("change,problem", [
    ({"image_size": (40, 40)}, "multiples of 16"),  # four 2x downsamplings
    ({"blocks": ((3, 3, 0), (2, 2, 0), (2, 2, 0), (1, 1, 0))}, "does not tile"),
    ({"blocks": ((4, 4, 3), (2, 2, 0), (2, 2, 0), (1, 1, 0))}, "does not divide"),  # r_c must divide C
    ({"temperature": 0.0}, "temperature"),
    ({"full_skip_block": (3, 3, 0)}, "full_skip_block"),
    ({"score_topk": 1.5}, "score_topk"),
    ({"score_topk": 1.0, "score_minus_mean": True}, "score_minus_mean: the whole-map mean"),
    ({"memory_readout": "nearest"}, "memory_readout"),
    ({"memory_score_weight": 0.5}, "set full_skip_block"),  # M needs the full-resolution memory
    ({"memory_score_weight": 1.5, "full_skip_block": (1, 1, 0)}, "within [0, 1]"),
    ({"feature_dims": 16}, "has no backbone"),  # a projection of backbone features needs a backbone
    ({"latent_against": "memory"}, "latent_against: got 'memory'"),
    ({"latent_against": "readout"}, "set full_skip_block or use 'reconstruction'"),
    ({"latent_layer": 5}, "expected 0 (the last) to 4"),
    ({"feature_dims": 200, "backbone": "efficientnet_lite0", "image_size": (128, 128)}, "principal components"),
    ({"coarse_memory_weight": 0.25}, "no backbone"),  # the coarse memory reads the backbone's 1/32 features
    ({"coarse_memory_weight": 1.5, "backbone": "efficientnet_lite0", "image_size": (128, 128)}, "coarse_memory_weight: got 1.5"),
    ({"coarse_memory_items": 0}, "coarse_memory_items"),
    ({"disc_spectral_norm": True}, "disc_spectral_norm: normalises the discriminator, and this model has none"),
    ({"illumination_norm": True, "illumination_std": 0.0}, "illumination_std: got 0.0"),
    ({"illumination_std": 0.25}, "illumination_std: the spread of the illumination-normalised image"),
    ({"map_closing": 8}, "map_closing: got 8, expected 0 (none) or an odd filter size from 3 to 255"),
    ({"map_closing": 1}, "map_closing: got 1"),
    ({"map_closing": 317}, "map_closing: got 317"),
    ({"edge_fill_weight": -0.5}, "edge_fill_weight: got -0.5, expected >= 0"),
])
def test_invalid_model_configs_are_named(change: dict, problem: str) -> None:
    problems = validate_model_config(preset("daad", **{**SMALL, **change}))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("variant", [
    {},  # the paper's pixel model
    {"full_skip_block": (1, 1, 0), "score_topk": 1.0},  # the memory-gated full-resolution skip, whole-map score
    {"full_skip_block": (1, 1, 0), "memory_readout": "hard", "memory_score_weight": 0.5},  # ArgMax + Gather, M term
    {"full_skip_block": (1, 1, 0), "memory_readout": "hard", "memory_score_weight": 0.5, "gamma": 0.0,
     "latent_against": "readout", "latent_layer": 1},  # L of the discriminator's first layer against the read-out
    {"score_topk": 0.05, "score_minus_mean": True},  # the peak against the map's own level, in the graph
    {"score_topk": 0.05, "map_closing": 15},  # the closed map: MaxPool rows and columns, the score before it
    {"score_topk": 0.05, "map_closing": 15, "edge_fill_weight": 0.5},  # + the edge-side row fill: Pad, MaxPool, TopK
])
def test_export_is_static_opset17_and_matches_pytorch(tmp_path, variant: dict) -> None:
    import onnx
    import onnxruntime as ort

    from train.export import export_onnx

    torch.manual_seed(0)
    model = DAAD(preset("daad_plus", **{**SMALL, **variant})).eval()
    model.set_score_normalisation(0.5, 2.0)
    path = export_onnx(model, tmp_path / "m.onnx", batch=2)
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    dims = [d for v in list(graph.graph.input) + list(graph.graph.output) for d in v.type.tensor_type.shape.dim]
    assert all(d.HasField("dim_value") for d in dims)  # no symbolic (dynamic) dimension
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"NonZero", "Loop", "If", "Where", "Shape", "Expand"}  # no data-dependent ops
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    amap, score = session.run(["anomaly_map", "score"], {"image": x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    assert np.abs(amap - ref.anomaly_map.numpy()).max() < 1e-4
    assert np.abs(score - ref.score.numpy()).max() < 1e-4
    if variant.get("memory_readout") == "hard":  # a large memory enters the graph once, not twice
        shape = sorted(model.generator.full_memory.items.shape)
        copies = [i.name for i in graph.graph.initializer if sorted(i.dims) == shape]
        assert len(copies) == 1, copies


def test_latent_term_against_the_readout_at_a_chosen_layer() -> None:
    """A = (1-beta) L + beta M with gamma 0, L from the discriminator's layer-1 features of the input and of
    the full-resolution memory's read-out: the map is built from exactly those pieces."""
    torch.manual_seed(0)
    cfg = preset("daad_plus", **{**SMALL, "full_skip_block": (1, 1, 0), "memory_readout": "hard", "gamma": 0.0,
                                 "memory_score_weight": 0.5, "latent_against": "readout", "latent_layer": 1,
                                 "smoothing_sigma": 0.0})
    model = DAAD(cfg).eval()
    model.set_score_normalisation(1.0, 2.0, 4.0)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        target = model.targets(x)
        _, readout = model.generator.rebuild(target)
        disc = model.discriminator
        f_x, f_m = disc.layer_features(target, 1), disc.layer_features(readout, 1)
        assert f_x.shape == (2, SMALL["disc_channels"][0], 16, 16)  # after the first strided layer
        latent = model.to_image_size(((f_x - f_m) ** 2).mean(dim=1, keepdim=True))
        memory = model.to_image_size(((target - readout) ** 2).mean(dim=1, keepdim=True))
        expected = 0.5 * latent / 2.0 + 0.5 * memory / 4.0
        assert torch.allclose(model(x).anomaly_map, expected, atol=1e-6)
        assert torch.equal(disc.layer_features(target, len(cfg.disc_channels)), disc.layer_features(target, 0))


def test_illumination_norm_makes_the_score_independent_of_brightness() -> None:
    torch.manual_seed(0)
    model = DAAD(preset("daad", illumination_norm=True, **SMALL)).eval()
    x = torch.rand(1, 1, 32, 32) * 0.5 - 0.5
    with torch.no_grad():
        dark, bright = model(x).score, model(x * 1.5 + 0.4).score  # same part, other exposure
        plain = DAAD(preset("daad", **SMALL)).eval()
        assert not torch.allclose(plain(x).score, plain(x * 1.5 + 0.4).score, rtol=0.1)
    assert torch.allclose(dark, bright, rtol=1e-2)  # equal up to the variance epsilon (1e-4, FP16-safe)


def test_illumination_std_sets_the_normalised_images_spread() -> None:
    x = torch.rand(2, 1, 32, 32) - 0.6  # a variance of 1/12 >> the epsilon (1e-4) added to it
    for std in (1.0, 0.25):
        out = DAAD(preset("daad", illumination_norm=True, illumination_std=std, **SMALL)).normalise_input(x)
        assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
        assert torch.allclose(out.std(dim=(1, 2, 3), unbiased=False), torch.full((2,), std), rtol=2e-3)


def test_full_resolution_skip_passes_through_its_memory_only_when_memories_are_on() -> None:
    daad = DAAD(preset("daad", full_skip_block=(2, 2, 0), **SMALL)).generator
    ae_skip = DAAD(preset("ae_skip", full_skip_block=(2, 2, 0), **SMALL)).generator
    ae = DAAD(preset("ae", full_skip_block=(2, 2, 0), **SMALL)).generator
    assert daad.full_memory is not None and (daad.full_memory.bh, daad.full_memory.bw) == (2, 2)
    assert ae_skip.full_skip and ae_skip.full_memory is None  # a plain skip, as AE+Skip's others
    assert not ae.full_skip  # AE has no skips at all
    x = torch.randn(2, 1, 32, 32)
    for generator in (daad, ae_skip, ae):
        assert generator.eval()(x).shape == x.shape


def test_whole_map_score_is_the_mean_of_the_map() -> None:
    model = DAAD(preset("daad", score_topk=1.0, **SMALL))
    amap = torch.rand(3, 1, 32, 32)
    assert torch.allclose(model.image_score(amap), amap.mean(dim=(1, 2, 3)))


def test_score_minus_mean_is_the_peak_less_the_maps_own_level() -> None:
    plain = DAAD(preset("daad", score_topk=0.1, **SMALL))
    relative = DAAD(preset("daad", score_topk=0.1, score_minus_mean=True, **SMALL))
    amap = torch.rand(3, 1, 32, 32)
    expected = torch.topk(amap.flatten(1), round(0.1 * 32 * 32), dim=1).values.mean(dim=1) - amap.mean(dim=(1, 2, 3))
    assert torch.allclose(relative.image_score(amap), expected, atol=1e-6)
    # a map lifted as a whole scores as before; the plain top-k rises with it
    assert torch.allclose(relative.image_score(amap + 2.0), relative.image_score(amap), atol=1e-5)
    assert torch.allclose(plain.image_score(amap + 2.0), plain.image_score(amap) + 2.0, atol=1e-5)
    assert preset("inspect_daad_plus").score_minus_mean and not preset("daad_plus").score_minus_mean


def test_data_initialised_memory_items_are_blocks_of_the_training_inputs() -> None:
    model = DAAD(preset("daad", full_skip_block=(2, 2, 0), full_skip_items=16, memory_init="data", **SMALL))
    x = torch.randn(4, 1, 32, 32)
    bn_before = model.generator.stem[1].running_mean.clone()
    model.generator.init_memories_from_data(x, torch.Generator().manual_seed(0))
    blocks = divide(x, 2, 2, 1)  # (4 * 16 * 16, 4)
    items = model.generator.full_memory.items
    assert items.shape == (16, 4)
    assert all(((blocks - item).abs().sum(dim=1) == 0).any() for item in items)  # every item is one of the blocks
    assert len({tuple(item.tolist()) for item in items}) == 16  # drawn without replacement
    assert torch.equal(model.generator.stem[1].running_mean, bn_before)  # the draw does not train batch-norm
    assert model.training


def test_memory_score_is_the_rebuild_error_of_the_full_resolution_memory() -> None:
    torch.manual_seed(0)
    cfg = preset("daad_plus", full_skip_block=(2, 2, 0), full_skip_items=64, memory_init="data", memory_readout="hard",
                 memory_score_weight=1.0, smoothing_sigma=0.0, **SMALL)
    model = DAAD(cfg)
    normal = torch.randn(1, 1, 32, 32)
    model.generator.init_memories_from_data(normal, torch.Generator().manual_seed(0), full_x=normal)
    model.eval()
    with torch.no_grad():
        stored = model.generator.full_memory.items  # (64, 4): 2x2 blocks of the normal image
        blocks = stored[torch.arange(16 * 16) % 64].clone()  # an image made only of stored blocks ...
        blocks[37] = torch.tensor([3.0, -3.0, 3.0, -3.0])  # ... but one block, unlike any stored one
        x = assemble(blocks, (1, 1, 32, 32), 2, 2, 1)
        maps = model.maps(x)
        out = model(x)
    assert maps.memory is not None and maps.latent is not None
    per_block = divide(maps.memory, 2, 2, 1).mean(dim=1)
    assert per_block[37] > 1.0
    assert torch.all(per_block[torch.arange(256) != 37] == 0)  # a stored block is rebuilt exactly
    assert torch.allclose(out.anomaly_map, maps.memory / model.m_scale)  # beta = 1: the map is M alone


def test_memory_score_weight_mixes_the_terms() -> None:
    torch.manual_seed(0)
    cfg = preset("daad_plus", full_skip_block=(1, 1, 0), memory_score_weight=0.25, smoothing_sigma=0.0, **SMALL)
    model = DAAD(cfg).eval()
    model.set_score_normalisation(2.0, 3.0, 4.0)
    with torch.no_grad():
        x = torch.randn(2, 1, 32, 32)
        maps = model.maps(x)
        expected = 0.75 * (0.5 * maps.rec / 2.0 + 0.5 * maps.latent / 3.0) + 0.25 * maps.memory / 4.0
        assert torch.allclose(model(x).anomaly_map, expected, atol=1e-6)


def test_unknown_memory_init_is_named() -> None:
    problems = validate_model_config(preset("daad", memory_init="kmeans", **SMALL))
    assert any("model.memory_init" in p for p in problems), problems


def test_target_channels_match_the_backbone() -> None:
    from train.backbone import COARSE_CHANNELS, FEATURE_CHANNELS
    from train.config import BACKBONE_CHANNELS, COARSE_CHANNELS as CONFIG_COARSE

    assert BACKBONE_CHANNELS == FEATURE_CHANNELS and CONFIG_COARSE == COARSE_CHANNELS
    assert preset("daad", backbone="efficientnet_lite0").target_channels == FEATURE_CHANNELS
    assert preset("daad", backbone="efficientnet_lite0", feature_dims=64).target_channels == 64


def test_feature_projection_keeps_the_principal_components_of_the_training_features() -> None:
    cfg = preset("daad", backbone="efficientnet_lite0", image_size=(128, 128), feature_dims=8)
    model = DAAD(cfg, load_backbone=False)
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(176, 176, generator=gen) * torch.logspace(0, -3, 176)[None]  # a few strong directions
    raw = torch.einsum("dc,bdhw->bchw", mixing, torch.randn(150, 176, 16, 16, generator=gen)) + 3.0
    model.set_feature_normalisation(raw)
    proj = model.feat_proj
    assert torch.allclose(proj @ proj.t(), torch.eye(8), atol=1e-5)  # orthonormal rows
    z = ((raw - model.feat_mean) / model.feat_std).permute(0, 2, 3, 1).reshape(-1, 176).double()
    top = torch.linalg.svd(z, full_matrices=False).S[:8] ** 2 / len(z)
    kept = model.standardise(raw).permute(0, 2, 3, 1).reshape(-1, 8).double().var(dim=0, unbiased=False)
    assert torch.allclose(kept, top, rtol=1e-4)  # the variance of the top 8 components, largest first
    assert torch.all(kept[:-1] >= kept[1:])
    assert model.standardise(raw).shape == (150, 8, 16, 16) and model.generator.stem[0].in_channels == 8


def small_inspect_daad_plus(**overrides: object) -> DAAD:
    """`inspect_daad_plus` at 128 px with a small memory, its feature normalisation set from random features."""
    torch.manual_seed(0)
    model = DAAD(preset("inspect_daad_plus", image_size=(128, 128), full_skip_items=64, feature_dims=16, **overrides),
                 load_backbone=False)
    model.set_feature_normalisation(torch.randn(8, 176, 16, 16) * 2 + 1)
    return model


def assert_onnx_runtime_matches_pytorch(model: DAAD, path: Path) -> None:
    """The exported graph's map and score of a random 128 px image are the model's, to 1e-4 of their size."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 1, 128, 128)).astype(np.float32)
    amap, score = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["anomaly_map", "score"], {"image": x})
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    assert np.abs(amap - ref.anomaly_map.numpy()).max() < 1e-4 * max(1.0, float(ref.anomaly_map.abs().max()))
    assert np.abs(score - ref.score.numpy()).max() < 1e-4 * max(1.0, float(ref.score.abs().max()))


def test_inspect_model_projected_features_export_static_and_match_pytorch(tmp_path) -> None:
    from engine.check import check_graph
    from train.export import export_onnx

    model = small_inspect_daad_plus().eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch=1)
    assert check_graph(path) == []
    assert_onnx_runtime_matches_pytorch(model, path)


def test_example_training_configs_are_valid() -> None:
    import yaml

    from train.config import ModelConfig, from_dict, to_dict

    paths = sorted(Path(__file__).resolve().parents[1].glob("examples/train_*.yaml"))
    assert paths
    for path in paths:
        loaded = yaml.safe_load(path.read_text())["model"]
        base = preset("inspect" if loaded.get("generator") is False else "daad_plus")  # the `--model` it goes with
        cfg = from_dict(ModelConfig, {**to_dict(base), **loaded}, str(path))
        assert validate_model_config(cfg) == [], path


def test_inspect_is_the_cli_default_and_matches_its_example_file() -> None:
    import yaml

    from train.cli import _model_config, build_parser
    from train.config import ModelConfig, from_dict, to_dict

    args = build_parser().parse_args(["fit", "--data", "d"])
    cfg = _model_config(args)
    assert args.model == "inspect" and validate_model_config(cfg) == []
    assert not cfg.generator and cfg.memory_block == 4 and cfg.memory_budget == 0.1  # the memories alone, 10 % kept
    assert cfg.coarse_memory_weight == 0.5 and not cfg.map_closing and not cfg.edge_fill_weight  # no part's prior
    examples = Path(__file__).resolve().parents[1] / "examples"
    loaded = yaml.safe_load((examples / "train_features.yaml").read_text())["model"]
    assert from_dict(ModelConfig, {**to_dict(ModelConfig()), **loaded}) == cfg  # the file says what the default is
    trained = yaml.safe_load((examples / "train_daad_plus_features.yaml").read_text())["model"]
    option = from_dict(ModelConfig, {**to_dict(preset("daad_plus")), **trained})
    assert option == preset("inspect_daad_plus") and option.adversarial and option.coarse_memory_weight == 0.25


@pytest.mark.parametrize("dims", [0, 16])
def test_coarse_memory_mixes_its_rebuild_error_of_the_1_32_features_into_the_map(dims: int) -> None:
    """A = (1-delta) A' + delta C / c_scale, C the squared distance of each standardised (projected) 1/32
    backbone feature to its nearest coarse item (a vector of the training images), upsampled to the image."""
    from train.backbone import COARSE_CHANNELS, COARSE_TAP, TAPS

    torch.manual_seed(0)
    base = dict(image_size=(128, 128), full_skip_items=64, smoothing_sigma=0.0, map_closing=0, edge_fill_weight=0.0)
    plain = DAAD(preset("inspect_daad_plus", **base, coarse_memory_weight=0.0), load_backbone=False)
    assert plain.coarse_memory is None and len(plain.backbone._blocks) == max(TAPS) + 1  # nothing deeper is built
    model = DAAD(preset("inspect_daad_plus", **base, coarse_memory_weight=0.25, coarse_memory_items=40, coarse_feature_dims=dims),
                 load_backbone=False)
    assert len(model.backbone._blocks) == COARSE_TAP + 1
    model.set_feature_normalisation(torch.randn(4, 176, 16, 16))
    train_raw = torch.randn(4, COARSE_CHANNELS, 4, 4) * 3 + 2
    model.set_coarse_memory(train_raw, torch.Generator().manual_seed(0))
    assert torch.allclose(model.coarse_mean.flatten(), train_raw.mean(dim=(0, 2, 3)), atol=1e-5)
    items = model.coarse_memory.items.detach()
    width = dims or COARSE_CHANNELS
    vectors = model.standardise_coarse(train_raw).permute(0, 2, 3, 1).reshape(-1, width)
    assert items.shape == (40, width) and not model.coarse_memory.items.requires_grad
    if dims:  # the projection keeps the directions of largest variance of the standardised training vectors
        z = ((train_raw - model.coarse_mean) / model.coarse_std).permute(0, 2, 3, 1).reshape(-1, COARSE_CHANNELS)
        top = torch.linalg.eigvalsh(z.t().double() @ z.double() / len(z)).flip(0)[:dims]
        assert torch.allclose(vectors.double().pow(2).mean(dim=0), top, rtol=1e-3)
    assert all(bool(((vectors - item) ** 2).sum(dim=1).min() < 1e-8) for item in items)  # each a training vector
    model.set_score_normalisation(1.0, 2.0, 4.0, 8.0)
    model.eval()
    x = torch.rand(2, 1, 128, 128) * 2 - 1
    with torch.no_grad():
        target, coarse = model.encode(x)
        assert coarse.shape == (2, width, 4, 4) and torch.equal(target, model.targets(x))
        q = coarse.permute(0, 2, 3, 1).reshape(-1, width)
        nearest = items[(F.normalize(q, dim=1) @ F.normalize(items, dim=1).t()).argmax(dim=1)]
        c = ((q - nearest) ** 2).mean(dim=1).reshape(2, 1, 4, 4)
        c = F.interpolate(c, scale_factor=32.0, mode="bilinear", align_corners=False)
        expected = 0.75 * model.combine_fine(model.maps(target)) + 0.25 * c / 8.0
        assert torch.allclose(model(x).anomaly_map, expected, atol=1e-5)


@pytest.mark.parametrize("closing", [0, 127])
def test_the_inspect_model_exports_a_graph_tensorrt_can_take(tmp_path, closing: int) -> None:
    import onnx

    from engine.check import check_graph
    from train.export import export_onnx

    model = DAAD(preset("inspect_daad_plus", image_size=(128, 128), full_skip_items=64, map_closing=closing),
                 load_backbone=False).eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch=1)
    assert check_graph(path) == []  # static shapes everywhere (gray input repeated by Concat, ArgMax + Gather)
    pools = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MaxPool"]
    windows = [list(a.ints) for n in pools for a in n.attribute if a.name == "kernel_shape"]
    fill = [[64, 1], [64, 1]]  # inspect's edge-side row fill: a max over each half of the 128 rows
    assert windows == ([[1, closing], [closing, 1]] * 2 if closing else []) + fill  # 1-D, under TensorRT's limit



@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_separable_smoothing_equals_the_2d_gaussian(sigma: float) -> None:
    from train.model import gaussian_kernel, separable_blur

    k = gaussian_kernel(sigma)
    m = torch.rand(2, 1, 40, 56)
    dense = F.conv2d(m, (k[:, None] * k[None, :])[None, None], padding=k.numel() // 2)
    assert torch.allclose(separable_blur(m, k), dense, atol=1e-6)
    model = DAAD(preset("daad", **{**SMALL, "smoothing_sigma": sigma})).eval()
    flat = model.smooth(torch.ones(1, 1, 32, 32))
    assert torch.allclose(flat, torch.ones_like(flat), atol=1e-6)  # border-corrected: a flat map stays flat


def test_a_checkpoint_with_the_older_2d_smoothing_kernel_still_loads(tmp_path) -> None:
    from train.checkpoint import load_model, save_checkpoint
    from train.config import TrainConfig

    model = DAAD(preset("daad", **SMALL))
    path = save_checkpoint(tmp_path / "last.pt", model, TrainConfig(), 1, {}, {})
    state = torch.load(str(path), weights_only=True)
    assert "smooth_kernel" not in state["model"]  # derived from the config, not saved
    state["model"]["smooth_kernel"] = torch.ones(1, 1, 13, 13) / 169  # what earlier versions stored
    state["model"]["smooth_norm"] = torch.ones(1, 1, 32, 32)
    torch.save(state, str(path))
    loaded, _ = load_model(path)
    assert loaded.smooth_kernel.ndim == 1


def test_mirror_scoring_averages_the_map_of_the_image_and_of_its_mirror_image() -> None:
    """score_hflip: the map is the mean of the image's map and its mirror image's map mirrored back (the
    smoothing is symmetric, so averaging the terms first is the same); a mirrored part gets the mirrored map."""
    torch.manual_seed(0)
    cfg = dict(SMALL, full_skip_block=(1, 1, 0), memory_readout="hard", memory_score_weight=0.5, gamma=0.0,
               latent_against="readout", latent_layer=1)
    plain = DAAD(preset("daad_plus", **cfg)).eval()
    plain.set_score_normalisation(0.5, 2.0, 3.0)
    both = DAAD(preset("daad_plus", **cfg, score_hflip=True)).eval()
    both.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        one, mirrored = plain(x).anomaly_map, plain(x.flip(3)).anomaly_map.flip(3)
        got = both(x)
        assert not torch.allclose(one, mirrored, atol=1e-3)  # the two views disagree: the mean is not either
        assert torch.allclose(got.anomaly_map, 0.5 * (one + mirrored), atol=1e-5)
        assert torch.allclose(both(x.flip(3)).anomaly_map, got.anomaly_map.flip(3), atol=1e-5)
        assert torch.allclose(got.score, both.image_score(got.anomaly_map))


def test_the_mirror_scored_inspect_model_exports_and_matches_pytorch(tmp_path) -> None:
    import onnx

    from engine.check import check_graph
    from train.export import export_onnx

    model = small_inspect_daad_plus(score_hflip=True).eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch=1)
    assert check_graph(path) == []  # the mirror is a Gather of constant column indices
    graph = onnx.load(str(path))
    shape = sorted(model.generator.full_memory.items.shape)
    assert len([i for i in graph.graph.initializer if sorted(i.dims) == shape]) == 1  # both views share the memory
    assert_onnx_runtime_matches_pytorch(model, path)


def test_a_spectrally_normalised_discriminator_keeps_each_layer_near_unit_norm() -> None:
    """disc_spectral_norm: after some training-mode passes (power iteration) every convolution's largest singular
    value is ~1, where the plain discriminator's is not; eval mode reuses the stored vectors (no drift)."""
    torch.manual_seed(0)
    model = DAAD(preset("daad_plus", **SMALL, disc_spectral_norm=True))
    plain = DAAD(preset("daad_plus", **SMALL))
    disc = model.discriminator
    x = torch.randn(4, 1, 32, 32)
    for _ in range(30):
        disc(x)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(SMALL["disc_channels"]) + 1
    sigmas = [float(torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2)) for c in convs]
    assert all(abs(s - 1.0) < 0.05 for s in sigmas), sigmas
    plain_sigmas = [float(torch.linalg.matrix_norm(c.weight.detach().flatten(1), ord=2))
                    for c in plain.discriminator.modules() if isinstance(c, torch.nn.Conv2d)]
    assert not all(abs(s - 1.0) < 0.05 for s in plain_sigmas), plain_sigmas
    disc.eval()
    with torch.no_grad():
        first = disc.layer_features(x, 1)
        assert torch.equal(disc.layer_features(x, 1), first)


def test_the_inspect_model_with_a_spectrally_normalised_discriminator_exports_and_matches_pytorch(tmp_path) -> None:
    from engine.check import check_graph
    from train.export import export_onnx

    model = small_inspect_daad_plus(disc_spectral_norm=True)
    model.discriminator(torch.randn(2, 16, 16, 16))  # one power iteration: the stored vectors differ from their init
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch=1)
    assert check_graph(path) == []
    assert_onnx_runtime_matches_pytorch(model, path)



def test_map_closing_closes_the_output_map_and_scores_before_it() -> None:
    torch.manual_seed(0)
    open_model = DAAD(preset("daad_plus", **SMALL)).eval()
    closed_model = DAAD(preset("daad_plus", map_closing=9, **SMALL)).eval()
    closed_model.load_state_dict(open_model.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before, after = open_model(x), closed_model(x)
    assert torch.equal(after.anomaly_map, grey_closing(before.anomaly_map, 9))
    assert not torch.equal(after.anomaly_map, before.anomaly_map) and torch.all(after.anomaly_map >= before.anomaly_map)
    assert torch.equal(after.score, before.score)  # whether a part is defective does not move with the map
    filled_model = DAAD(preset("daad_plus", map_closing=9, edge_fill_weight=0.5, **SMALL)).eval()
    filled_model.load_state_dict(open_model.state_dict())
    with torch.no_grad():
        filled = filled_model(x)
    expected = grey_closing(before.anomaly_map, 9) + 0.5 * edge_side_fill(before.anomaly_map)
    assert torch.allclose(filled.anomaly_map, expected, atol=1e-6) and torch.equal(filled.score, before.score)
