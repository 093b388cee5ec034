"""Optional Ed25519 bundle signatures (engine.signing, `daad-engine sign`, agent.yaml model.public_key):
real keys, real bundles, the agent's --check-config in a subprocess."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Tuple

import pytest
import yaml

from engine.bundle import BUNDLE_YAML, Bundle, load_bundle, write_bundle_yaml
from engine.cli import main as engine_main
from engine.errors import BundleError, ConfigError
from tests.test_agent_preflight import EXIT_CONFIG, assert_refused, run_agent, setup

crypto = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")

from engine.signing import SIGNATURE_FILE, sign_bundle, verify_signature  # noqa: E402


def write_keys(folder: Path, name: str) -> Tuple[Path, Path]:
    key = crypto.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture()
def signed(template_bundle: Bundle, tmp_path: Path) -> Tuple[Bundle, Path, Path]:
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    private, public = write_keys(tmp_path, "release")
    assert engine_main(["sign", str(root), "--key", str(private)]) == 0
    return load_bundle(root), private, public


def test_signed_bundle_verifies_and_the_agent_accepts_it(signed, tmp_path: Path) -> None:
    bundle, _, public = signed
    assert (bundle.root / SIGNATURE_FILE).is_file()
    assert len(verify_signature(bundle, public)) == 16
    config = setup(tmp_path, bundle)
    data = yaml.safe_load(config.read_text())
    data["model"]["public_key"] = str(public)
    config.write_text(yaml.safe_dump(data))
    result = run_agent(config, "--check-config")
    assert result.returncode == 0, result.stderr
    assert "signature verified (key " in result.stdout


def test_resealed_bundle_yaml_fails_the_signature(signed, tmp_path: Path) -> None:
    """Whoever knows the manifest's recipe can reseal an edited bundle.yaml; only the key can re-sign it."""
    bundle, _, public = signed
    meta = yaml.safe_load((bundle.root / BUNDLE_YAML).read_text())
    meta["preprocess"]["mean"] = [0.2]
    write_bundle_yaml(bundle.root, meta)
    resealed = load_bundle(bundle.root)  # the manifest alone accepts it
    with pytest.raises(BundleError, match=r"bundle.sig: field `manifest_sha256` is .* the signature is of another "
                                          r"bundle; sign it with the release key"):
        verify_signature(resealed, public)
    config = setup(tmp_path, resealed)
    data = yaml.safe_load(config.read_text())
    data["model"]["public_key"] = str(public)
    config.write_text(yaml.safe_dump(data))
    assert_refused(run_agent(config, "--check-config"), "bundle.sig: field `manifest_sha256`")
    assert_refused(run_agent(config, "--max-frames", "1"), "bundle.sig: field `manifest_sha256`")


def test_signature_of_another_key_or_edited_is_refused(signed, tmp_path: Path) -> None:
    bundle, _, public = signed
    _, stranger = write_keys(tmp_path, "stranger")
    with pytest.raises(BundleError, match="field `signature` does not verify with the public key"):
        verify_signature(bundle, stranger)
    sig = bundle.root / SIGNATURE_FILE
    data = yaml.safe_load(sig.read_text())
    data["signature"] = data["signature"][:-4] + ("AAA=" if not data["signature"].endswith("AAA=") else "BBB=")
    sig.write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="field `signature` does not verify"):
        verify_signature(bundle, public)


def test_unsigned_bundle_with_a_public_key_is_refused(template_bundle: Bundle, tmp_path: Path) -> None:
    _, public = write_keys(tmp_path, "release")
    with pytest.raises(BundleError, match=r"bundle.sig: not found, and a public key is configured"):
        verify_signature(template_bundle, public)


def test_wrong_key_files_are_one_line(signed, tmp_path: Path) -> None:
    bundle, private, public = signed
    with pytest.raises(ConfigError, match="expected an Ed25519 public key|not a PEM public key"):
        verify_signature(bundle, private)  # the private half where the public one belongs
    (tmp_path / "junk.pem").write_text("not a key\n")
    with pytest.raises(ConfigError, match="junk.pem: not an unencrypted PEM private key"):
        sign_bundle(bundle, tmp_path / "junk.pem")
    config = setup(tmp_path, bundle)
    data = yaml.safe_load(config.read_text())
    data["model"]["public_key"] = str(tmp_path / "missing.pub")
    config.write_text(yaml.safe_dump(data))
    result = run_agent(config, "--check-config")
    assert result.returncode == EXIT_CONFIG and "model.public_key: got" in result.stderr and "Traceback" not in result.stderr
