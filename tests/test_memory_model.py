"""The product model (train.memory_model, train.fit_memory) and its coreset (train.coreset): real fits on a small
synthetic dataset, the exported graph on ONNX Runtime, and torchrun on two CPU processes."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine.check import check_bundle
from engine.errors import ConfigError
from train.checkpoint import load_model, read_checkpoint
from train.config import ModelConfig, TrainConfig, preset, validate_model_config
from train.coreset import coreset_size, kcenter_greedy
from train.evaluate import evaluate
from train.export import export_bundle
from train.fit import fit
from train.memory_model import BlockMemoryModel, NearestBlockMemory

REPO = Path(__file__).resolve().parents[1]


# ---- coreset ----

@pytest.mark.parametrize("n, budget, expected", [
    (1000, 0.1, 100),  # a fraction
    (1000, 1.0, 1000),  # all
    (1000, 250, 250),  # a count
    (10, 500, 10),  # a count above the items: all of them
    (7, 0.01, 1),  # never empty
])
def test_coreset_size_reads_a_fraction_or_a_count(n: int, budget: float, expected: int) -> None:
    assert coreset_size(n, budget) == expected


def test_kcenter_keeps_one_item_of_every_cluster_where_random_draws_miss_the_rare_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=gen) * 20
    sizes = [2000, 2000, 2000, 20, 10, 5]  # three rare kinds of normal block
    items = torch.cat([c + 0.1 * torch.randn(n, 32, generator=gen) for c, n in zip(centres, sizes)])
    label = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    chosen = kcenter_greedy(items, 6, seed=3)
    assert sorted(label[chosen].tolist()) == list(range(6))
    assert torch.equal(chosen, torch.sort(chosen).values) and len(set(chosen.tolist())) == 6


def test_kcenter_in_chunks_splits_the_budget_by_chunk_size_and_is_deterministic() -> None:
    items = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1))
    a = kcenter_greedy(items, 100, seed=5, chunk_items=300)
    b = kcenter_greedy(items, 100, seed=5, chunk_items=300)
    assert torch.equal(a, b) and len(set(a.tolist())) == 100
    per_chunk = np.histogram(a.numpy(), bins=[0, 250, 500, 750, 1000])[0]  # 4 chunks of 250 rows
    assert per_chunk.tolist() == [25, 25, 25, 25]
    assert torch.equal(kcenter_greedy(items, 2000), torch.arange(1000))  # a budget above the items keeps them all


def test_kcenter_covers_better_than_a_random_draw() -> None:
    items = torch.randn(4000, 8, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails: rare far items
    chosen = items[kcenter_greedy(items, 200, seed=0, projection_dims=64)]
    random = items[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:200]]
    radius = lambda kept: float(torch.cdist(items, kept).min(dim=1).values.max())  # noqa: E731
    assert radius(chosen) < 0.5 * radius(random)


# ---- the memory ----

def test_nearest_block_memory_rebuilds_each_block_as_its_nearest_item() -> None:
    gen = torch.Generator().manual_seed(0)
    memory = NearestBlockMemory(channels=3, block=2)
    items = torch.randn(50, 12, generator=gen)
    memory.set_items(items)
    x = torch.randn(2, 3, 4, 6, generator=gen)
    got = memory(x)
    blocks = memory.blocks(x)  # (2*2*3, 12)
    nearest = items[torch.cdist(blocks, items).argmin(dim=1)]
    expected = ((blocks - nearest) ** 2).reshape(2, 2, 3, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 4, 6)
    assert got.shape == (2, 1, 4, 6)
    assert torch.allclose(got, expected.mean(dim=1, keepdim=True), atol=1e-6)
    memory.set_items(torch.cat([blocks, items]))  # a block in the memory rebuilds itself exactly
    assert float(memory(x).abs().max()) < 1e-5


def test_a_checkpointed_memory_loads_with_its_own_item_count() -> None:
    memory = NearestBlockMemory(channels=4, block=1)
    memory.set_items(torch.randn(37, 4))
    other = NearestBlockMemory(channels=4, block=1)
    other.load_state_dict(memory.state_dict())
    assert other.n_items == 37 and torch.equal(other.items_t, memory.items_t)


@pytest.mark.parametrize("overrides, expected", [
    ({"backbone": ""}, "model.generator: false scores memories of backbone features"),
    ({"memory_block": 3}, "model.memory_block: block 3 does not tile the 32x32 feature map"),
    ({"adversarial": True}, "model.adversarial: a part of the trained generator"),
    ({"memory_budget": -0.1}, "model.memory_budget: got -0.1"),
    ({"image_size": (240, 240)}, "model.image_size: got [240, 240], expected multiples of 32"),
    ({"coarse_memory_weight": 1.0}, "model.coarse_memory_weight: got 1.0"),
])
def test_a_memory_config_that_cannot_work_is_refused(overrides: dict, expected: str) -> None:
    problems = validate_model_config(preset("inspect", **overrides))
    assert any(expected in p for p in problems), problems


def test_inspect_is_the_memory_model_and_trains_nothing() -> None:
    cfg = preset("inspect")
    assert not cfg.generator and validate_model_config(cfg) == []
    model = BlockMemoryModel(cfg, load_backbone=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert cfg.name == "DAAD-memory@efficientnet_lite0"


# ---- fit, evaluate, export ----

def small_inspect(**overrides: object) -> ModelConfig:
    return preset("inspect", image_size=(128, 128), **overrides)


@pytest.fixture(scope="module")
def memory_fit(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memory_fit")
    result = fit(small_inspect(), TrainConfig(data=str(dataset), out=str(out), seed=0), progress=False)
    return result.checkpoint


def test_fit_builds_the_memories_to_the_budget_and_separates_defects(memory_fit: Path, dataset: Path) -> None:
    state = read_checkpoint(memory_fit)
    memory = state["memory"]
    # 24 good images, 10 % held back for the statistics: 22 in the memory, 4x4 blocks of 16x16 features each
    assert memory["block_offered"] == 22 * 16 and memory["block_items"] == coreset_size(22 * 16, 0.1)
    assert memory["coarse_offered"] == 22 * 16 and memory["coarse_items"] == coreset_size(22 * 16, 0.1)
    assert state["step"] == 0 and state["optimizers"] == {}
    assert state["score_stats"]["n"] == 2 and state["training_data"]["score_stats_from"] == "2 held-back good images"
    model, _ = load_model(memory_fit)
    assert isinstance(model, BlockMemoryModel) and model.block_memory.n_items == memory["block_items"]
    metrics = evaluate(model, dataset, plot=False)
    assert metrics["image_auroc"] >= 0.9, metrics


def test_the_same_fit_twice_builds_the_same_memory(memory_fit: Path, dataset: Path, tmp_path: Path) -> None:
    again = fit(small_inspect(), TrainConfig(data=str(dataset), out=str(tmp_path), seed=0), progress=False)
    a, b = read_checkpoint(memory_fit)["model"], read_checkpoint(again.checkpoint)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_memory_cap_holds_whatever_the_budget(dataset: Path, tmp_path: Path) -> None:
    cfg = small_inspect(memory_budget=1.0, memory_items=40, coarse_memory_weight=0.0)
    state = read_checkpoint(fit(cfg, TrainConfig(data=str(dataset), out=str(tmp_path)), progress=False).checkpoint)
    assert state["memory"]["block_items"] == 40 and "coarse_items" not in state["memory"]


def test_export_is_one_static_opset_17_graph_with_the_search_as_matmul_and_argmin(memory_fit: Path, dataset: Path,
                                                                                  tmp_path: Path) -> None:
    images = sorted((dataset / "test").rglob("*.png"))[:4]
    bundle = export_bundle(memory_fit, tmp_path / "bundle", parity_images=images)
    parity = bundle.metadata["parity"]
    assert max(parity["max_abs_map"], parity["max_abs_score"]) < 1e-4, parity
    graph = onnx.load(str(bundle.onnx_path(1)))
    ops = {n.op_type for n in graph.graph.node}
    assert {"MatMul", "ArgMin", "Gather", "TopK"} <= ops and graph.opset_import[0].version == 17
    assert not ops & {"Loop", "If", "Scan", "NonZero", "Shape"}  # nothing data-dependent
    memory = read_checkpoint(memory_fit)["memory"]
    constants = {tuple(i.dims) for i in graph.graph.initializer}
    assert (memory["block_dims"], memory["block_items"]) in constants  # the items, once, as (D, N)
    assert check_bundle(bundle) == []


def test_fit_refuses_a_bad_memory_config_before_reading_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.memory_block"):
        fit(dataclasses.replace(small_inspect(), memory_block=5), TrainConfig(data=str(tmp_path / "none"),
                                                                          out=str(tmp_path / "run")))


def test_torchrun_shards_the_features_and_builds_the_one_process_memory(dataset: Path, memory_fit: Path,
                                                                       tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", "fit",
           "--data", str(dataset), "--size", "128", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == ["model.in_channels 1", "checkpoint", "features"]
    one, two = read_checkpoint(memory_fit), read_checkpoint(tmp_path / "run" / "last.pt")
    # the same items; the features are kept in float16, and batches of other sizes round them differently
    for key in ("block_memory.items_t", "coarse_memory.items_t"):
        assert torch.allclose(one["model"][key], two["model"][key], rtol=1e-2, atol=1e-2), key
    assert two["memory"] == one["memory"]
