"""Shared fixtures: a real template bundle (ONNX, no training) and a real Mosquitto broker."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from engine.bundle import Bundle
from tests.bundle_factory import make_template_bundle
from tests.mqtt_broker import MosquittoBroker


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
