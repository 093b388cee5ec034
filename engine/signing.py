"""Optional bundle signatures: the installer's Ed25519 key signs a bundle's manifest; the agent verifies.

The manifest (engine.bundle) detects any changed byte, but anyone who can write the bundle can also
recompute it. A signature cannot be recomputed without the private key, which stays with whoever releases
bundles; the Jetson holds only the public key (agent.yaml `model.public_key`). The signature covers the
manifest, and the manifest covers bundle.yaml and every graph, so it covers the whole bundle.

    openssl genpkey -algorithm ed25519 -out release.key        # once, kept off the Jetsons
    openssl pkey -in release.key -pubout -out release.pub       # to /etc/daad-inspect/ on each Jetson
    daad-engine sign BUNDLE --key release.key                   # writes BUNDLE/bundle.sig

Needs the cryptography package (the `signing` extra), only where signing or a public key is used.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any, Dict, Union

import yaml

from .bundle import EXPORT_FIX, Bundle, atomic_write_text
from .errors import BundleError, ConfigError, DaadError
from .validation import read_yaml

SIGNATURE_FILE = "bundle.sig"
SIGNATURE_FORMAT_VERSION = 1
ALGORITHM = "ed25519"
SIGNED_PREFIX = b"daad-bundle-signature/1\n"  # what is signed: this, then the manifest's hex digest
SIGN_FIX = "sign it with the release key: daad-engine sign BUNDLE --key KEY"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise DaadError("bundle signatures need the cryptography package, which is not installed here: "
                        "pip install 'cryptography>=3.4' (or daad-inspect with the `signing` extra)") from exc
    return serialization, ed25519


def _raw_public(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """Names a key in messages and in bundle.sig: the first 16 hex digits of its raw bytes' SHA-256."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _message(manifest: str) -> bytes:
    return SIGNED_PREFIX + manifest.encode("ascii")


MAKE_PRIVATE = "make one with `openssl genpkey -algorithm ed25519 -out release.key`"
MAKE_PUBLIC = "make it from the release key with `openssl pkey -in release.key -pubout -out release.pub`"


def _load_pem_key(path: Union[str, Path], what: str, not_pem: str, load: Any, expected: Any, expected_name: str,
                  how: str) -> Any:
    """A PEM key of the expected Ed25519 class, or ConfigError in one line naming the file and how to make one."""
    path = Path(path)
    try:
        key = load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {not_pem} ({exc}); {how}") from None
    if not isinstance(key, expected):
        raise ConfigError(f"{path}: a {type(key).__name__}, expected an {expected_name}; {how}")
    return key


def load_private_key(path: Union[str, Path]) -> Any:
    serialization, ed25519 = _crypto()
    return _load_pem_key(path, "private key", "not an unencrypted PEM private key",
                         lambda data: serialization.load_pem_private_key(data, password=None),
                         ed25519.Ed25519PrivateKey, "Ed25519 key", MAKE_PRIVATE)


def load_public_key(path: Union[str, Path]) -> Any:
    serialization, ed25519 = _crypto()
    return _load_pem_key(path, "public key", "not a PEM public key", serialization.load_pem_public_key,
                         ed25519.Ed25519PublicKey, "Ed25519 public key", MAKE_PUBLIC)


def sign_bundle(bundle: Bundle, private_key_path: Union[str, Path]) -> Path:
    """Write BUNDLE/bundle.sig for the (verified) bundle's manifest; returns its path."""
    if not bundle.manifest_sha256:
        raise BundleError(f"{bundle.root / 'bundle.yaml'}: no field `manifest_sha256` to sign (exported before "
                          f"manifests); {EXPORT_FIX}, then sign it")
    key = load_private_key(private_key_path)
    signature = key.sign(_message(bundle.manifest_sha256))
    data: Dict[str, Any] = {
        "format_version": SIGNATURE_FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "manifest_sha256": bundle.manifest_sha256,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    path = bundle.root / SIGNATURE_FILE
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def verify_signature(bundle: Bundle, public_key_path: Union[str, Path]) -> str:
    """BundleError in one line unless BUNDLE/bundle.sig signs this bundle's manifest with the key at
    public_key_path; the key's id when it does."""
    key = load_public_key(public_key_path)  # says so, in one line, where cryptography is missing
    from cryptography.exceptions import InvalidSignature

    kid = key_id(key)
    path = bundle.root / SIGNATURE_FILE
    if not path.is_file():
        raise BundleError(f"{path}: not found, and a public key is configured ({public_key_path}): the bundle is "
                          f"unsigned; {SIGN_FIX}")
    data = read_yaml(path, BundleError, SIGN_FIX)
    if not isinstance(data, dict) or data.get("format_version") != SIGNATURE_FORMAT_VERSION \
            or data.get("algorithm") != ALGORITHM:
        raise BundleError(f"{path}: not a version-{SIGNATURE_FORMAT_VERSION} {ALGORITHM} signature file; {SIGN_FIX}")
    if not bundle.manifest_sha256:
        raise BundleError(f"{bundle.root / 'bundle.yaml'}: no field `manifest_sha256`, so the signature covers "
                          f"nothing; copy the bundle again or {EXPORT_FIX}, then sign it")
    if data.get("manifest_sha256") != bundle.manifest_sha256:
        raise BundleError(f"{path}: field `manifest_sha256` is {str(data.get('manifest_sha256'))[:12]}... but the "
                          f"bundle is {bundle.manifest_sha256[:12]}...: the signature is of another bundle; {SIGN_FIX}")
    try:
        signature = base64.b64decode(str(data.get("signature", "")), validate=True)
        key.verify(signature, _message(bundle.manifest_sha256))
    except (ValueError, InvalidSignature):
        raise BundleError(f"{path}: field `signature` does not verify with the public key {public_key_path} (key "
                          f"{kid}; signed with key {data.get('key_id')!s}): not signed by the release key, or edited; "
                          f"{SIGN_FIX}") from None
    return kid
