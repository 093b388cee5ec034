"""engine.plan_cache: plans are loaded only for exactly the key they were built for; writes are atomic."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import engine.bundle
from engine.errors import EngineBuildError
from engine.plan_cache import KEY_FILE, PLAN_FILE, PlanCache, PlanKey, default_cache_dir

KEY = PlanKey(bundle_sha256="ab" * 32, trt_version="8.5.2.2", gpu_name="Orin (16 SMs)", compute_capability="8.7",
              precision="fp16", input_shape=(1, 64, 64), batch=1)
PLAN = b"\x00serialized engine bytes\xff" * 100


def test_store_then_find(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    path = cache.store_plan(KEY, PLAN, {"build_seconds": 1.0})
    assert path.name == PLAN_FILE and path.read_bytes() == PLAN  # no header: trtexec can load it
    assert cache.find_plan(KEY) == path
    assert cache.read_built_info(KEY) == {"build_seconds": 1.0}
    sidecar = json.loads((path.parent / KEY_FILE).read_text())
    assert sidecar["key"] == KEY.to_dict() and PlanKey.from_dict(sidecar["key"]) == KEY
    assert path.parent.name.startswith("abababababab-fp16-b1-1x64x64-trt8.5.2.2-sm87-")


@pytest.mark.parametrize("change", [
    {"trt_version": "10.3.0.30"},  # JetPack upgrade
    {"gpu_name": "Orin (8 SMs)"},  # same module name, other board
    {"compute_capability": "7.2"},  # Xavier
    {"precision": "fp32"},
    {"bundle_sha256": "cd" * 32},  # re-exported model
    {"input_shape": (3, 64, 64)},
    {"batch": 4},
])
def test_other_key_is_not_found(tmp_path: Path, change: dict) -> None:
    cache = PlanCache(tmp_path)
    cache.store_plan(KEY, PLAN)
    other = dataclasses.replace(KEY, **change)
    assert cache.find_plan(other) is None
    assert cache.plan_dir(other) != cache.plan_dir(KEY)


@pytest.mark.parametrize("field, value", [("trt_version", "8.6.2"), ("gpu_name", "Xavier"), ("precision", "int8"),
                                          ("bundle_sha256", "00" * 32)])
def test_sidecar_key_mismatch_is_never_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str,
                                             value: str) -> None:
    """A plan copied into the right directory but built for another key (its sidecar says so)."""
    cache = PlanCache(tmp_path)
    path = cache.store_plan(KEY, PLAN)
    sidecar = path.parent / KEY_FILE
    data = json.loads(sidecar.read_text())
    data["key"][field] = value
    sidecar.write_text(json.dumps(data))
    assert cache.find_plan(KEY) is None
    assert f"{field}: wanted" in caplog.text and "will not be loaded" in caplog.text


@pytest.mark.parametrize("damage", ["no_sidecar", "bad_json", "truncated_plan", "replaced_plan", "old_format"])
def test_damaged_entries_are_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = PlanCache(tmp_path)
    path = cache.store_plan(KEY, PLAN)
    sidecar = path.parent / KEY_FILE
    if damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "bad_json":
        sidecar.write_text("{not json")
    elif damage == "truncated_plan":
        path.write_bytes(PLAN[:100])
    elif damage == "replaced_plan":
        path.write_bytes(PLAN[::-1])  # same size, other bytes
    else:
        data = json.loads(sidecar.read_text())
        data["format"] = 0
        sidecar.write_text(json.dumps(data))
    assert cache.find_plan(KEY) is None


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PlanCache(tmp_path)
    cache.store_plan(KEY, PLAN)
    calls = {"n": 0}
    real_replace = os.replace

    def crash_on_rename(src: str, dst: str) -> None:  # the plan's rename fails (disk full, power cut...)
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.bundle.os, "replace", crash_on_rename)
    with pytest.raises(EngineBuildError, match="cannot write the plan.*--cache-dir"):
        cache.store_plan(KEY, b"new plan" * 10)
    monkeypatch.setattr(engine.bundle.os, "replace", real_replace)
    directory = cache.plan_dir(KEY)
    assert sorted(p.name for p in directory.iterdir()) == [PLAN_FILE]  # no .tmp left, sidecar removed first
    assert cache.find_plan(KEY) is None  # the old plan without its sidecar is not trusted
    assert calls["n"] == 1


def test_plans_for_lists_every_device(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    cache.store_plan(KEY, PLAN)
    cache.store_plan(dataclasses.replace(KEY, precision="fp32"), PLAN)
    cache.store_plan(dataclasses.replace(KEY, bundle_sha256="cd" * 32), PLAN)
    assert sorted(k.precision for k, _ in cache.plans_for(KEY.bundle_sha256)) == ["fp16", "fp32"]


def test_timing_and_calibration_cache_paths(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    timing = cache.timing_cache_path("8.5.2.2", "Orin (16 SMs)", "8.7")
    assert timing == tmp_path / "timing" / "trt8.5.2.2-orin-16-sms-sm87.cache"
    assert timing != cache.timing_cache_path("10.3.0", "Orin (16 SMs)", "8.7")
    calib = cache.calibration_cache_path("ab" * 32, "8.5.2.2", "12" * 32)
    assert calib.parent == tmp_path / "calibration" and calib != cache.calibration_cache_path("ab" * 32, "8.5.2.2", "34" * 32)
    cache.write_bytes(timing, b"t")
    assert cache.read_bytes(timing) == b"t" and cache.read_bytes(tmp_path / "absent") is None


def test_unknown_precision_refused() -> None:
    with pytest.raises(EngineBuildError, match="precision must be one of"):
        dataclasses.replace(KEY, precision="bf16")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DAAD_PLAN_CACHE", raising=False)
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "daad-inspect" / "plans"
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/daad-inspect:/var/cache/other")  # systemd CacheDirectory=
    assert default_cache_dir() == Path("/var/cache/daad-inspect/plans")
    monkeypatch.setenv("DAAD_PLAN_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert PlanCache().root == tmp_path / "explicit"
