"""A throwaway PKI made with the openssl CLI: a CA, server certificates (good, expired, for another
host name), a client certificate, and a second CA that signed nothing the broker uses."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List, NamedTuple, Optional

OPENSSL = shutil.which("openssl")
KEY_ARGS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
DAYS = "2"


class Pki(NamedTuple):
    ca: Path  # the CA the broker's certificates come from
    other_ca: Path  # a CA that signed nothing here ("unknown CA" for the agent)
    server_cert: Path  # names localhost and 127.0.0.1
    server_key: Path
    expired_cert: Path  # same names, notAfter in the past
    wrong_host_cert: Path  # names only broker.invalid
    client_cert: Path  # signed by ca
    client_key: Path
    foreign_client_cert: Path  # the same key, signed by other_ca: a broker trusting ca refuses it


def _run(args: List[str], cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=str(cwd), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _make_ca(folder: Path, name: str) -> None:
    _run(["req", "-x509", *KEY_ARGS, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
          "-days", DAYS, "-addext", "basicConstraints=critical,CA:TRUE"], folder)


def _sign(folder: Path, name: str, key: str, days: str, san: Optional[str], usage: str, ca: str = "ca") -> Path:
    """A certificate for `key`, signed by `ca`; days may be -1 (expired since yesterday)."""
    _run(["req", "-new", "-key", f"{key}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"], folder)
    ext = folder / f"{name}.ext"
    ext.write_text((f"subjectAltName={san}\n" if san else "") + f"extendedKeyUsage={usage}\n")
    _run(["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
          "-out", f"{name}.pem", "-days", days, "-extfile", ext.name], folder)
    return folder / f"{name}.pem"


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    for key in ("server", "client"):
        _run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{key}.key"], folder)
    here = "DNS:localhost,IP:127.0.0.1"
    pki = Pki(
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server_cert=_sign(folder, "server", "server", DAYS, here, "serverAuth"),
        server_key=folder / "server.key",
        expired_cert=_sign(folder, "expired", "server", "-1", here, "serverAuth"),
        wrong_host_cert=_sign(folder, "wronghost", "server", DAYS, "DNS:broker.invalid", "serverAuth"),
        client_cert=_sign(folder, "client", "client", DAYS, None, "clientAuth"),
        client_key=folder / "client.key",
        foreign_client_cert=_sign(folder, "foreign-client", "client", DAYS, None, "clientAuth", ca="other-ca"),
    )
    for path in folder.iterdir():
        path.chmod(0o644)  # mosquitto started as root drops to its own user, which must read them
    return pki
