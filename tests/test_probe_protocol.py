"""The probes' shared reading of a checkpoint: the images fit trained on, the ones it held back, and a refusal
naming the fix when the data or groups file is not the one it was fit with."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from benchmarks.research.probe_protocol import checkpoint_data, checkpoint_data_or_exit

from engine.errors import DaadError
from train.checkpoint import load_model
from train.preprocessing import preprocess_spec

from tests.grouped_dataset import fit_daad, write_grouped_dataset


@pytest.fixture(scope="module")
def grouped_fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe_protocol")
    data = root / "data"
    write_grouped_dataset(data)
    # a memory of every training block: fit holds good parts back to normalise its terms on unseen ones
    config = root / "memory.yaml"
    config.write_text("model:\n  memory_init: data\n  full_skip_block: [4, 4, 0]\n")
    assert fit_daad(data, root / "run", "--config", str(config), "--steps", "2") == 0
    return root


def test_the_checkpoints_training_and_held_back_images_and_the_split(grouped_fit: Path) -> None:
    data, checkpoint = grouped_fit / "data", str(grouped_fit / "run" / "last.pt")
    model, state = load_model(checkpoint)
    got = checkpoint_data(checkpoint, state, data, str(data / "groups.csv"), preprocess_spec(model.cfg), "val")
    assert got.groups is not None and got.train and got.stats
    assert len(got.train) == state["training_data"]["n_images"]
    train_parts = {got.groups.group(s) for s in got.train}
    assert not train_parts & {got.groups.group(s) for s in got.stats}  # held back as whole parts
    assert not train_parts & set(got.parts())  # nothing scored was trained on
    assert len(got.parts()) == len(got.samples) == len(got.images) == len(got.labels)
    views = got.tensor_views(transplant=True)
    assert set(views) == {"test/", "pasted"} and torch.equal(views["test/"], torch.from_numpy(got.images))
    assert set(got.views(transplant=False)) == {"test/"}
    train, stats = got.training_tensors(preprocess_spec(model.cfg))
    assert train.shape == (len(got.train), 1, 32, 32) and stats.shape == (len(got.stats), 1, 32, 32)


def test_a_checkpoint_read_without_its_groups_file_is_refused_with_the_fix(grouped_fit: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    data, checkpoint = grouped_fit / "data", str(grouped_fit / "run" / "last.pt")
    model, state = load_model(checkpoint)
    with pytest.raises(DaadError, match="pass the --data and --groups it was fit with"):
        checkpoint_data(checkpoint, state, data, "", preprocess_spec(model.cfg), "val")
    # a probe's script says so in one line and exits 2
    args = argparse.Namespace(checkpoint=checkpoint, data=str(data), groups="", split="val")
    with pytest.raises(SystemExit) as exit_info:
        checkpoint_data_or_exit("probe_x", args, state, preprocess_spec(model.cfg))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("probe_x: error: ") and err.count("\n") == 1 and "--groups it was fit with" in err
