"""Shared fixtures: a real template bundle (ONNX, no training), a real Mosquitto broker, and a small synthetic
MVTec-layout dataset for short fits (modules may define their own `dataset`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from engine.bundle import Bundle
from tests.bundle_factory import make_template_bundle
from tests.mqtt_broker import MosquittoBroker
from train.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def template_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """64x64 gray template model (batch 1 and 4), real ONNX Runtime graph."""
    return make_template_bundle(tmp_path_factory.mktemp("template_bundle"), size=64, batches=(1, 4))


@pytest.fixture()
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 good training parts, 8 good and 3 per defect type in test/, 96 px: what the fit tests train on."""
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, n_train=24, n_test_good=8, n_test_per_defect=3, size=96)
    return root
