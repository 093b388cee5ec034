"""systemd/: the units as systemd itself reads them, the installer in a staging tree, and the units' own
command lines starting the real agent against a real Mosquitto.

- `systemd-analyze verify` on both units in a private root (the host's system units copied in, stub
  executables at the units' Exec paths), so the files are checked byte for byte as installed;
- `systemd-analyze security --offline=true`: the exposure score stays under a pinned bound;
- shellcheck on install.sh and uninstall.sh;
- install.sh --prefix (no root, no useradd/systemctl): the tree, idempotence, upgrade and rollback,
  refusals; uninstall.sh in the same tree; one slower run that builds the virtualenv offline;
- ExecStartPre/ExecStart parsed from each unit, venv paths replaced by this interpreter's, run with the
  unit's Environment=, a credentials directory and a real NOTIFY_SOCKET: READY=1, retained `online`,
  a defect event, SIGTERM -> exit 0 and retained `offline`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import yaml

from engine.thresholds import Thresholds, save_thresholds
from engine.bundle import Bundle
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.preprocess import preprocess
from tests.bundle_factory import make_template_bundle
from tests.mqtt_broker import MosquittoBroker
from train.synthetic import make_defective, make_good

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"
INSTALL = SYSTEMD / "install.sh"
UNINSTALL = SYSTEMD / "uninstall.sh"
UNITS = ("daad-agent.service", "daad-agent@.service")
INSTANCE = "line1"  # instance of the template in these tests, and the station id of every agent run
# Measured with systemd 252 (Debian 12): 1.9 for both units. A change that loosens the sandbox
# (e.g. dropping SystemCallFilter= costs 1.0+) fails here; tighten the bound when the score improves.
EXPOSURE_MAX = 2.0
# The installed layout the units name, and what stands in for it when the tests run them.
VENV_BIN = "/opt/daad-inspect/venv/bin"
HELPER = "/opt/daad-inspect/libexec/daad-build-plan"
ETC = "/etc/daad-inspect"
PART_SIZE = 128
WAIT_S = 15.0
TEGRA_RELEASE_36 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"


# -- unit files, read the way systemd reads them ------------------------------------------------------
def parse_unit(path: Path) -> Dict[str, List[Tuple[str, str]]]:
    """{section: [(key, value), ...]} with comments dropped and backslash continuations joined."""
    sections: Dict[str, List[Tuple[str, str]]] = {}
    current: Optional[str] = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path}: {raw!r} outside a section"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(path: Path, key: str, section: str = "Service") -> List[str]:
    return [v for k, v in parse_unit(path)[section] if k == key]


def one(path: Path, key: str, section: str = "Service") -> str:
    found = values(path, key, section)
    assert len(found) == 1, f"{path.name}: expected one {key}=, got {found}"
    return found[0]


def seconds(value: str) -> float:
    """systemd time span ('30s', '30min', '1h 5min', '15') -> seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


def expand_specifiers(text: str, instance: str, cache_root: Path) -> str:
    table = {"i": instance, "I": instance, "H": socket.gethostname(), "C": str(cache_root), "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def exec_argv(value: str) -> List[str]:
    """An Exec*= value -> argv (systemd's - @ : + ! prefixes dropped)."""
    return shlex.split(value.lstrip("-@:+!"))


# -- systemd-analyze ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for `systemd-analyze --root`: the host's system units (sysinit.target, network-online.target
    ...), our units in /etc/systemd/system, and a stub executable at every Exec path they name."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    root = tmp_path_factory.mktemp("unit_root")
    copied = set()
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        real = Path(d).resolve()
        if real.is_dir() and real not in copied:
            shutil.copytree(real, root / real.relative_to("/"), symlinks=True)
            copied.add(real)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, unit_dir / name)
        for key, value in parse_unit(SYSTEMD / name)["Service"]:
            if key.startswith("Exec"):
                exe = root / exec_argv(value)[0].lstrip("/")
                exe.parent.mkdir(parents=True, exist_ok=True)
                exe.write_text("#!/bin/sh\nexit 0\n")
                exe.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args[:1], f"--root={root}", *args[1:]], capture_output=True,
                          text=True, timeout=60)


def our_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "daad-agent" in line]


def test_units_pass_systemd_analyze_verify(unit_root):
    done = analyze(unit_root, "verify", "--man=no", "daad-agent.service", f"daad-agent@{INSTANCE}.service")
    assert done.returncode == 0, done.stdout + done.stderr
    # warnings do not change the exit status: any line about our units is a failure
    assert our_lines(done.stdout + done.stderr) == [], done.stdout + done.stderr


def test_verify_harness_reports_a_broken_unit(unit_root, tmp_path):
    """The check above is not vacuous: a typo and a missing executable in a copy are both reported."""
    broken = (SYSTEMD / "daad-agent.service").read_text()
    broken = broken.replace("NotifyAccess=main", "NotifyAcess=main")
    broken = broken.replace(f"ExecStart={VENV_BIN}/daad-agent", f"ExecStart={VENV_BIN}/daad-agnet")
    (unit_root / "etc/systemd/system/daad-agent-broken.service").write_text(broken)
    try:
        done = analyze(unit_root, "verify", "--man=no", "daad-agent-broken.service")
    finally:
        (unit_root / "etc/systemd/system/daad-agent-broken.service").unlink()
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "NotifyAcess" in out and "daad-agnet" in out, out


@pytest.mark.parametrize("unit", ["daad-agent.service", f"daad-agent@{INSTANCE}.service"])
def test_security_exposure_stays_low(unit_root, unit):
    done = analyze(unit_root, "security", "--offline=true", "--no-pager", unit)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) <= EXPOSURE_MAX, done.stdout


# -- what the units must say (docs/jetson.md) -------------------------------------------------------
@pytest.mark.parametrize("name", UNITS)
def test_unit_contract(name):
    unit = SYSTEMD / name
    s = dict((k, v) for k, v in parse_unit(unit)["Service"])  # last one wins, as for systemd's single-valued keys
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert 10 <= seconds(s["WatchdogSec"]) <= 120
    assert s["Restart"] == "on-failure" and seconds(s["RestartSec"]) >= 1
    assert seconds(one(unit, "StartLimitIntervalSec", "Unit")) > 0 and int(one(unit, "StartLimitBurst", "Unit")) > 1
    assert s["User"] == "daad" and set(s["SupplementaryGroups"].split()) == {"video", "render"}
    assert seconds(s["TimeoutStartSec"]) >= 20 * 60  # a first TensorRT build on the device
    assert s["KillSignal"] == "SIGTERM" and seconds(s["TimeoutStopSec"]) == 15
    assert "PYTHONUNBUFFERED=1" in values(unit, "Environment")
    assert "daad-inspect" in s["StateDirectory"].split() and s["CacheDirectory"] == "daad-inspect"
    assert s["ConfigurationDirectory"] == "daad-inspect"
    assert s["LoadCredential"] == "mqtt-password:/etc/daad-inspect/credentials/mqtt-password"
    assert s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes" and s["NoNewPrivileges"] == "yes"
    # the GPU and the camera stay reachable
    assert s["DevicePolicy"] == "closed" and "PrivateDevices" not in s
    assert {"char-video4linux rw", "/dev/nvmap rw"} <= set(values(unit, "DeviceAllow"))
    assert all("*" not in v.split()[0] for v in values(unit, "DeviceAllow") if v.startswith("/"))  # no path globs
    assert s.get("PrivateTmp", "no") == "no"  # /tmp/argus_socket
    after = " ".join(values(unit, "After", "Unit")).split()
    assert {"network-online.target", "nvargus-daemon.service"} <= set(after)
    assert "network-online.target" in one(unit, "Wants", "Unit").split()
    pre = exec_argv(s["ExecStartPre"])
    assert pre[:2] == [f"{VENV_BIN}/python", HELPER] and pre[2] == "--config"
    start = exec_argv(s["ExecStart"])
    assert start[0] == f"{VENV_BIN}/daad-agent" and start[1] == "--config" and start[2] == pre[3]


def test_template_mirrors_the_plain_unit():
    """Every setting of daad-agent.service is in daad-agent@.service too, except the per-station ones."""
    per_station = {"Description", "ExecStartPre", "ExecStart", "Environment", "EnvironmentFile", "StateDirectory"}
    plain, template = (parse_unit(SYSTEMD / name) for name in UNITS)
    for section in ("Unit", "Service", "Install"):
        a = sorted(kv for kv in plain[section] if kv[0] not in per_station)
        b = sorted(kv for kv in template[section] if kv[0] not in per_station)
        assert a == b, f"[{section}] differs"
    t = SYSTEMD / "daad-agent@.service"
    assert "DAAD_STATION=%i" in values(t, "Environment")
    assert one(t, "ExecStart").endswith(f"--config {ETC}/%i.yaml")
    assert one(t, "StateDirectory").split() == ["daad-inspect", "daad-inspect/%i"]


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (make system-deps)")
    done = subprocess.run(["shellcheck", str(INSTALL), str(UNINSTALL)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- install.sh / uninstall.sh in a staging tree ------------------------------------------------------
def run_script(script: Path, *args: str, env: Optional[Dict[str, str]] = None, stdin: Optional[str] = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    full.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full, input=stdin,
                          timeout=timeout)


def thresholds_for(bundle: Bundle, path: Path, image_threshold: float = 0.5) -> Path:
    return save_thresholds(path, Thresholds(image_threshold, 0.4, 4, bundle.sha256, strategy="manual",
                                            bundle_name=bundle.name))


@pytest.fixture()
def staged(tmp_path, template_bundle):
    """Arguments and paths of a first installation into tmp_path/root."""
    root = tmp_path / "root"
    password = tmp_path / "mqtt-password"
    password.write_text("s3cret\n")
    thresholds = thresholds_for(template_bundle, tmp_path / "thresholds.yaml")
    no_jetson = {"DAAD_TEGRA_RELEASE": str(tmp_path / "no-such-file"), "DAAD_DEV_DIR": str(tmp_path / "dev")}
    args = ["--prefix", str(root), "--not-jetson-ok", "--skip-venv", "--bundle", str(template_bundle.root),
            "--thresholds", str(thresholds), "--mqtt-password-file", str(password)]
    return root, args, no_jetson, thresholds


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_into_a_staging_tree_then_again_then_uninstall(staged, template_bundle):
    root, args, env, thresholds = staged
    done = run_script(INSTALL, *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not a Jetson" in done.stderr and "--not-jetson-ok" in done.stderr
    # nothing outside the tree: the system steps are printed
    for printed in ("would run: useradd --system", "would run: usermod --append --groups video\\,render daad",
                    "would run: chown daad:daad", "would run: systemctl daemon-reload",
                    "would run: systemctl enable daad-agent.service",
                    "would run: systemctl restart --no-block daad-agent.service"):
        assert printed in done.stdout, done.stdout
    units = root / "etc/systemd/system"
    for name in UNITS:
        assert (units / name).read_bytes() == (SYSTEMD / name).read_bytes()
        assert (units / f"{name}.d/10-devices.conf").read_text().count("[Service]") == 1
        assert not (units / f"{name}.d/20-credentials-compat.conf").exists()  # systemd here has LoadCredential=
    opt = root / "opt/daad-inspect"
    assert os.access(opt / "libexec/daad-build-plan", os.X_OK) and os.access(opt / "uninstall.sh", os.X_OK)
    assert not (opt / "venv").exists()  # --skip-venv
    etc = root / "etc/daad-inspect"
    assert (etc / "agent.yaml").read_bytes() == (REPO / "examples/agent.yaml").read_bytes()
    assert (etc / "thresholds.yaml").read_bytes() == thresholds.read_bytes()
    cred = etc / "credentials/mqtt-password"
    assert cred.read_text() == "s3cret\n" and mode(cred) == 0o600 and mode(cred.parent) == 0o700
    state = root / "var/lib/daad-inspect"
    sha12 = template_bundle.sha256[:12]
    current = state / "bundles/current"
    assert current.is_symlink() and os.readlink(current) == sha12
    assert sorted(p.name for p in (state / "bundles" / sha12).iterdir()) == sorted(
        p.name for p in Path(template_bundle.root).iterdir())
    # examples/agent.yaml's model.bundle, /var/lib/daad-inspect/bundle, reaches the same bundle
    assert (state / "bundle/bundle.yaml").read_bytes() == (Path(template_bundle.root) / "bundle.yaml").read_bytes()
    assert (state / "thresholds" / f"{sha12}.yaml").read_bytes() == thresholds.read_bytes()
    assert mode(state) == 0o750 and (root / "var/cache/daad-inspect").is_dir()

    # again (an upgrade): no error, the config edited on site is kept, so is the password
    (etc / "agent.yaml").write_text((etc / "agent.yaml").read_text() + "# edited on site\n")
    again = [a for a in args if a not in ("--mqtt-password-file",) and not a.endswith("mqtt-password")]
    done = run_script(INSTALL, *again, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keeping" in done.stdout and "already installed" in done.stdout
    assert (etc / "agent.yaml").read_text().endswith("# edited on site\n")
    assert cred.read_text() == "s3cret\n" and mode(cred) == 0o600
    # --force-config replaces it and keeps the old one
    done = run_script(INSTALL, *again, "--force-config", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (etc / "agent.yaml").read_bytes() == (REPO / "examples/agent.yaml").read_bytes()
    assert [p.read_text().endswith("# edited on site\n") for p in etc.glob("agent.yaml.bak.*")] == [True]

    # uninstall: units and /opt gone, config and data kept; --purge removes those too
    done = run_script(UNINSTALL, "--prefix", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would run: systemctl disable --now daad-agent.service" in done.stdout
    assert not (units / "daad-agent.service").exists() and not (units / "daad-agent@.service").exists()
    assert not (units / "daad-agent.service.d").exists() and not opt.exists()
    assert (etc / "agent.yaml").exists() and (state / "bundles" / sha12 / "model.onnx").exists()
    done = run_script(UNINSTALL, "--prefix", str(root), "--purge")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not etc.exists() and not state.exists() and "would run: userdel daad" in done.stdout


def test_upgrade_then_rollback_and_forward(staged, template_bundle, tmp_path):
    root, args, env, thresholds = staged
    assert run_script(INSTALL, *args, env=env).returncode == 0
    newer = make_template_bundle(tmp_path / "newer", size=64, seed=1)
    newer_thresholds = thresholds_for(newer, tmp_path / "newer-thresholds.yaml", image_threshold=0.7)
    base = ["--prefix", str(root), "--not-jetson-ok", "--skip-venv"]
    bundles = root / "var/lib/daad-inspect/bundles"
    active = root / "etc/daad-inspect/thresholds.yaml"

    # thresholds of the old bundle with the new one: refused before anything changes
    done = run_script(INSTALL, *base, "--bundle", str(newer.root), "--thresholds", str(thresholds), env=env)
    assert done.returncode == 1 and "made for bundle" in done.stderr and "daad-calibrate" in done.stderr
    assert os.readlink(bundles / "current") == template_bundle.sha256[:12]

    # a new bundle without thresholds: installed, but not started, and why
    done = run_script(INSTALL, *base, "--bundle", str(newer.root), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(bundles / "current") == newer.sha256[:12]
    assert os.readlink(bundles / "previous") == template_bundle.sha256[:12]
    assert "made for another bundle" in done.stderr and "not enabled or restarted" in done.stdout
    assert "systemctl restart" not in done.stdout
    done = run_script(INSTALL, *base, "--thresholds", str(newer_thresholds), env=env)
    assert done.returncode == 0 and "systemctl restart --no-block daad-agent.service" in done.stdout
    assert active.read_bytes() == newer_thresholds.read_bytes()

    # rollback: the old bundle and its thresholds; again: forward
    done = run_script(INSTALL, *base, "--rollback", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.readlink(bundles / "current") == template_bundle.sha256[:12]
    assert active.read_bytes() == thresholds.read_bytes()
    assert "systemctl restart --no-block daad-agent.service" in done.stdout
    done = run_script(INSTALL, *base, "--rollback", env=env)
    assert done.returncode == 0 and os.readlink(bundles / "current") == newer.sha256[:12]
    assert active.read_bytes() == newer_thresholds.read_bytes()
    assert sorted(p.name for p in bundles.iterdir()) == sorted(
        ["current", "previous", newer.sha256[:12], template_bundle.sha256[:12]])


def test_install_refuses_a_machine_that_is_not_a_jetson(staged, tmp_path):
    root, args, env, _ = staged
    done = run_script(INSTALL, *[a for a in args if a != "--not-jetson-ok"], env=env)
    assert done.returncode == 1
    assert "not a Jetson" in done.stderr and "--not-jetson-ok" in done.stderr
    assert not root.exists()  # refused before anything was made
    # a Jetson: the L4T release is printed; one older than JetPack 5 is refused
    release = tmp_path / "nv_tegra_release"
    release.write_text(TEGRA_RELEASE_36)
    done = run_script(INSTALL, *[a for a in args if a != "--not-jetson-ok"],
                      env={**env, "DAAD_TEGRA_RELEASE": str(release)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "L4T 36.4.3 (JetPack 6)" in done.stdout
    release.write_text("# R32 (release), REVISION: 7.4, GCID: 1, BOARD: t210ref, EABI: aarch64, DATE: x\n")
    done = run_script(INSTALL, "--prefix", str(tmp_path / "old"), "--skip-venv",
                      env={**env, "DAAD_TEGRA_RELEASE": str(release)})
    assert done.returncode == 1 and "L4T 32.7.4" in done.stdout and "JetPack 5" in done.stderr
    assert run_script(INSTALL, "--help").returncode == 0
    assert run_script(INSTALL, "--bogus").returncode == 2


def test_install_an_instance_and_old_systemd(staged, template_bundle, tmp_path):
    root, args, env, thresholds = staged
    inst = ["--prefix", str(root), "--not-jetson-ok", "--skip-venv", "--instance", INSTANCE, "--bundle",
            str(template_bundle.root), "--thresholds", str(thresholds)]
    done = run_script(INSTALL, *inst, env=env)
    assert done.returncode == 1 and "needs --config" in done.stderr
    config = tmp_path / "station.yaml"
    config.write_text("# a station's config\n")
    dev = Path(env["DAAD_DEV_DIR"])
    dev.mkdir()
    try:  # a char device to be found (needs CAP_MKNOD; the listing is checked where it can be made)
        os.mknod(dev / "nvhost-gpu", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        made_node = True
    except (PermissionError, OSError):
        made_node = False
    (dev / "nvsciipc").write_text("not a device: skipped")
    done = run_script(INSTALL, *inst, "--config", str(config), env={**env, "DAAD_SYSTEMD_VERSION": "245"})
    assert done.returncode == 0, done.stdout + done.stderr
    etc = root / "etc/daad-inspect"
    assert (etc / f"{INSTANCE}.yaml").read_text() == "# a station's config\n"
    assert (etc / f"{INSTANCE}.thresholds.yaml").read_bytes() == thresholds.read_bytes()
    state = root / "var/lib/daad-inspect"
    assert os.readlink(state / f"bundles/current@{INSTANCE}") == template_bundle.sha256[:12]
    assert not (state / "bundle").exists()  # the compatibility link is for daad-agent.service only
    assert f"would run: systemctl enable daad-agent@{INSTANCE}.service" in done.stdout
    # systemd 245 (JetPack 5) has no LoadCredential=: the agent reads the file through a drop-in
    dropins = root / "etc/systemd/system/daad-agent@.service.d"
    assert "Environment=CREDENTIALS_DIRECTORY=/etc/daad-inspect/credentials" in (
        dropins / "20-credentials-compat.conf").read_text()
    cred = etc / "credentials/mqtt-password"
    assert mode(cred) == 0o640 and mode(cred.parent) == 0o750 and cred.read_text() == ""
    assert "would run: chgrp daad" in done.stdout
    devices = (dropins / "10-devices.conf").read_text()
    assert "nvsciipc" not in devices
    if made_node:
        assert f"DeviceAllow={dev}/nvhost-gpu rw" in devices


def jetpack_site_packages(tmp_path: Path) -> Path:
    """A stand-in for JetPack's system site-packages (numpy, OpenCV, ...): the test venv's packages, linked,
    without daad-inspect itself. A venv made from this interpreter sees its *base* interpreter's
    site-packages, which on a fresh CI machine hold none of the runtime requirements."""
    site = Path(sysconfig.get_paths()["purelib"])
    stand_in = tmp_path / "jetpack-site-packages"
    stand_in.mkdir()
    for entry in site.iterdir():
        if entry.suffix == ".pth" or entry.name.startswith(("daad_inspect", "__editable__")):
            continue  # the project comes from the wheel alone
        (stand_in / entry.name).symlink_to(entry)
    return stand_in


@pytest.mark.slow
def test_install_builds_the_virtualenv_offline(tmp_path, template_bundle):
    """The venv step for real, offline: --system-site-packages, the project from a wheel (--no-deps), its
    runtime requirements already satisfied by the interpreter's site-packages, no OpenCV of pip's."""
    src = tmp_path / "src"  # build the wheel from a copy: a build in the checkout leaves build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("agent", "camera", "engine", "train", "calibration"):  # [tool.setuptools] packages
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, timeout=120)
    root = tmp_path / "root"
    system = {"DAAD_TEGRA_RELEASE": str(tmp_path / "none"), "PYTHONPATH": str(jetpack_site_packages(tmp_path))}
    done = run_script(INSTALL, "--prefix", str(root), "--not-jetson-ok", "--python", sys.executable,
                      "--wheelhouse", str(wheels), "--extras", "", "--bundle", str(template_bundle.root),
                      env=system, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    venv = root / "opt/daad-inspect/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    where = subprocess.run([str(venv / "bin/python"), "-c", "import agent.app, calibration.capture; print(agent.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path,
                           env={**os.environ, **system}).stdout
    assert where.startswith(str(venv))  # the venv's copy, not the checkout's editable install
    assert os.access(venv / "bin/daad-agent", os.X_OK) and os.access(venv / "bin/daad-engine", os.X_OK)
    assert not list(venv.glob("lib/python3*/site-packages/opencv*"))
    assert "runtime: ONNX Runtime" in done.stdout


# -- the units' own command lines run the real agent ------------------------------------------------------
class Subscriber:
    """A paho client on daad/<station>/#, recording (topic leaf, payload, retained)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: List[Tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"daad/{INSTANCE}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S), "subscriber could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append((msg.topic.rsplit("/", 1)[-1], msg.payload, bool(msg.retain)))
            self.cond.notify_all()

    def wait_for(self, leaf: str, payload: Optional[bytes] = None, retained: Optional[bool] = None) -> bool:
        def seen() -> bool:
            return any(t == leaf and (payload is None or p == payload) and (retained is None or r == retained)
                       for t, p, r in self.messages)

        deadline = time.monotonic() + WAIT_S
        with self.cond:
            while not seen():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def station_images(folder: Path) -> None:
    import cv2

    folder.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(folder / f"{2 * i:03d}.png"), make_good(0, 100 + i, PART_SIZE))
        cv2.imwrite(str(folder / f"{2 * i + 1:03d}.png"), make_defective(0, 5000 + i, PART_SIZE, kind="pit")[0])


def calibrated_thresholds(bundle: Bundle, path: Path) -> Path:
    """Just above the good parts, like a site calibration (the template model finds the pits)."""
    backend = OnnxRuntimeBackend(bundle)
    outs = [backend.infer(preprocess(make_good(0, i, PART_SIZE), bundle.preprocess)[None]) for i in range(100, 116)]
    scores = np.array([float(o.score[0]) for o in outs])
    pixels = np.concatenate([o.anomaly_map.ravel() for o in outs])
    return save_thresholds(path, Thresholds(
        image_threshold=float(scores.max() * 1.05), pixel_threshold=float(np.quantile(pixels, 0.999)),
        min_defect_area=4, bundle_sha256=bundle.sha256, strategy="manual", n_frames=len(outs),
        bundle_name=bundle.name))


def read_environment_file(path: Path) -> Dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


@pytest.mark.parametrize("unit_name", UNITS)
def test_unit_command_lines_start_the_agent(unit_name, tmp_path, template_bundle, mosquitto: MosquittoBroker):
    unit = SYSTEMD / unit_name
    instance = INSTANCE if "@" in unit_name else ""
    etc, cache, creds = tmp_path / "etc", tmp_path / "cache", tmp_path / "credentials"
    for d in (etc, cache / "daad-inspect", creds):
        d.mkdir(parents=True)
    (creds / "mqtt-password").write_text("s3cret\n")  # what LoadCredential= copies; mosquitto takes any
    station_images(tmp_path / "incoming")
    config_name = f"{instance}.yaml" if instance else "agent.yaml"
    (etc / config_name).write_text(yaml.safe_dump({
        "camera": {"name": "cam0", "mode": "every",
                   "source": {"kind": "folder", "path": str(tmp_path / "incoming"), "watch": True, "poll_s": 0.05}},
        "model": {"bundle": str(template_bundle.root), "backend": "auto", "precision": "fp16",
                  "plan_cache": str(cache / "daad-inspect/plans")},
        "thresholds": {"path": str(calibrated_thresholds(template_bundle, etc / "thresholds.yaml"))},
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "station": "${DAAD_STATION}", "username": "daad",
                 "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password", "status_interval_s": 0.5,
                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "keepalive_s": 5},
        "spool": {"path": str(tmp_path / "state/spool.db")},
    }, sort_keys=False))
    if not instance:  # daad-agent.service takes the station from agent.env (install.sh --station)
        (etc / "agent.env").write_text(f"# install.sh --station\nDAAD_STATION={INSTANCE}\n")

    agent = shutil.which("daad-agent")
    replace = {f"{VENV_BIN}/daad-agent": [agent] if agent else [sys.executable, "-m", "agent"],
               f"{VENV_BIN}/python": [sys.executable], HELPER: [str(SYSTEMD / "daad-build-plan")]}

    def command(key: str) -> List[str]:
        argv: List[str] = []
        for arg in exec_argv(expand_specifiers(one(unit, key), instance, cache)):
            argv += replace.get(arg, [arg.replace(ETC, str(etc))])
        assert not any(a.startswith(("/opt/", "/etc/")) for a in argv), f"unmapped installed path in {argv}"
        return argv

    env = dict(os.environ)
    for assignment in values(unit, "Environment"):
        for pair in shlex.split(expand_specifiers(assignment, instance, cache)):
            key, _, value = pair.partition("=")
            env[key] = value
    for env_file in values(unit, "EnvironmentFile"):  # read after Environment=, so they win
        path = Path(expand_specifiers(env_file.lstrip("-"), instance, cache).replace(ETC, str(etc)))
        if path.exists() or not env_file.startswith("-"):
            env.update(read_environment_file(path))
    assert env["DAAD_STATION"] == INSTANCE and env["PYTHONUNBUFFERED"] == "1"
    env.update(CREDENTIALS_DIRECTORY=str(creds), CACHE_DIRECTORY=str(cache / "daad-inspect"),
               STATE_DIRECTORY=str(tmp_path / "state"))

    # ExecStartPre: no TensorRT here, model.backend auto -> nothing built, exit 0
    pre = subprocess.run(command("ExecStartPre"), env=env, capture_output=True, text=True, timeout=120)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert "daad-engine build" in pre.stderr and "--precision fp16" in pre.stderr and "no plan built" in pre.stderr

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(WAIT_S)
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
               WATCHDOG_USEC=str(int(seconds(one(unit, "WatchdogSec")) * 1e6)))
    live = Subscriber(mosquitto.port)
    log_path = tmp_path / "agent.log"  # a file, not a pipe: a full pipe would stall the agent
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command("ExecStart"), env=env, stdout=log, stderr=subprocess.STDOUT)
    late: Optional[Subscriber] = None

    def agent_log() -> str:
        return f"\n--- agent log ---\n{log_path.read_text(errors='replace')}"

    try:
        received: List[str] = []
        while not any(m.startswith("READY=1") for m in received):
            try:
                received.append(notify.recv(4096).decode())
            except socket.timeout:
                pytest.fail(f"no READY=1 within {WAIT_S}s (got {received}){agent_log()}")
        assert live.wait_for("availability", b"online"), f"no `online` published{agent_log()}"
        assert live.wait_for("defects"), f"no defect event published{agent_log()}"
        late = Subscriber(mosquitto.port)  # connects later: sees the retained state
        assert late.wait_for("availability", b"online", retained=True)
        proc.send_signal(getattr(signal, one(unit, "KillSignal")))
        rc = proc.wait(timeout=seconds(one(unit, "TimeoutStopSec")))
        assert rc == 0, f"exit status {rc} after SIGTERM{agent_log()}"
        assert live.wait_for("availability", b"offline"), f"no `offline` published{agent_log()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        live.close()
        if late is not None:
            late.close()
        notify.close()
    last = Subscriber(mosquitto.port)
    try:
        assert last.wait_for("availability", b"offline", retained=True)
    finally:
        last.close()


def test_install_binds_thresholds_to_the_manifest_and_accepts_older_ones(staged, template_bundle, tmp_path):
    """Bundles are stored and thresholds checked by the manifest; thresholds bound to the graph alone (written
    before manifests) are accepted with a warning; thresholds of another bundle.yaml are refused."""
    root, args, env, _ = staged
    legacy = save_thresholds(tmp_path / "legacy.yaml", Thresholds(0.5, 0.4, 4, template_bundle.graph_sha256))
    done = run_script(INSTALL, *[a if a != str(staged[3]) else str(legacy) for a in args], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bound to the bundle's graph only" in done.stderr
    assert os.readlink(root / "var/lib/daad-inspect/bundles/current") == template_bundle.manifest_sha256[:12]
    other = save_thresholds(tmp_path / "other.yaml", Thresholds(0.5, 0.4, 4, "a" * 64))
    done = run_script(INSTALL, *[a if a != str(staged[3]) else str(other) for a in args], env=env)
    assert done.returncode == 1 and "made for bundle aaaaaaaaaaaa..." in done.stderr
