"""The `model` section of agent.yaml: which bundle, and how to run it.

Its fields are engine.backend.open_backend's arguments and engine.signing's release key; the agent and
calibration (`daad-calibrate capture --config`, which scores with the agent's backend) both read it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from .config_file import ConfigSection


class ModelSection(ConfigSection):
    bundle: Path = Field(description="bundle directory (bundle.yaml + model.onnx)")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto: TensorRT where available, else ONNX Runtime"
    )
    precision: Literal["fp32", "fp16"] = Field("fp32", description="TensorRT precision (recalibrate after changing)")
    plan_cache: Optional[Path] = Field(None, description="TensorRT plan cache directory; None: engine's default")
    public_key: Optional[Path] = Field(
        None, description="Ed25519 public key (PEM) of the release key: the bundle must carry a bundle.sig made "
                          "with it (`daad-engine sign`); None: signatures are not checked"
    )
