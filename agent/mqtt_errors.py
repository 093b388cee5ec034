"""Why a connection to the broker failed, in words an installer can act on (pure functions).

paho reports a failed attempt in three places: an exception while connecting (TCP refused, TLS
verification of the broker's certificate), a socket error read after the TLS handshake (TLS 1.3
tells the client that its certificate was missing or refused only then), and a refused CONNACK
(user name, password, client id). Each becomes a `ConnectProblem`: a stable short `reason` for the
status topic and metrics, and one sentence naming the cause, the config key and the fix.
"""
from __future__ import annotations

import socket
import ssl
from typing import Any, NamedTuple, Optional

CONFIG_KEY = "mqtt"

# OpenSSL's X509_V_ERR_* codes that ssl.SSLCertVerificationError.verify_code carries.
_UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 21})  # issuer not found, self-signed (leaf or chain), leaf unverifiable
_NOT_YET_VALID = 9
_EXPIRED = 10
_HOST_MISMATCH_CODES = frozenset({62, 64})  # host name, IP address

# Alerts the broker sends about our own certificate (OpenSSL reason names, in the SSL error text).
_CLIENT_CERT_MISSING = ("CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
_CLIENT_CERT_REFUSED = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_EXPIRED",
                        "ALERT_CERTIFICATE_UNKNOWN", "ALERT_CERTIFICATE_REVOKED", "ALERT_UNSUPPORTED_CERTIFICATE")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


class ConnectProblem(NamedTuple):
    reason: str  # stable and short, e.g. "tls-unknown-ca": status topic, metrics label, log dedup
    text: str  # one sentence: the cause, then the fix naming the config key


def _tls_key(name: str) -> str:
    return f"{CONFIG_KEY}.tls.{name}"


def from_exception(exc: Optional[BaseException], settings: Any) -> ConnectProblem:
    """An exception raised by paho's connect (TCP or the TLS handshake)."""
    host, port = settings.host, settings.port
    tls = getattr(settings, "tls", None)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification(exc, settings)
    if isinstance(exc, ssl.SSLError):
        return from_tls_text(str(exc), settings)
    if isinstance(exc, socket.gaierror):
        return ConnectProblem("dns", f"host name {host!r} not found ({exc.strerror or exc}); check {CONFIG_KEY}.host "
                                     "and this device's DNS")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectProblem("refused", f"nothing accepts connections on {host}:{port} (broker down, or wrong "
                                         f"{CONFIG_KEY}.host/{CONFIG_KEY}.port)")
    if isinstance(exc, ConnectionResetError) and tls is not None:
        return ConnectProblem("tls-reset", f"the broker reset the connection during the TLS handshake; is port {port} "
                                           f"a TLS listener? (remove {CONFIG_KEY}.tls for a plain one, usually 1883)")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return ConnectProblem("timeout", f"no answer from {host}:{port} (firewall, or wrong {CONFIG_KEY}.host)")
    if exc is None:
        return ConnectProblem("unreachable", f"{host}:{port} unreachable")
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return ConnectProblem("unreachable", f"{host}:{port} unreachable ({detail})")


def _verification(exc: ssl.SSLCertVerificationError, settings: Any) -> ConnectProblem:
    code = getattr(exc, "verify_code", None)
    why = getattr(exc, "verify_message", None) or str(exc)
    tls = settings.tls
    ca = f"{_tls_key('ca_file')} ({tls.ca_file})" if tls is not None and tls.ca_file is not None else "the system CA store"
    if code in _UNKNOWN_CA_CODES:
        return ConnectProblem("tls-unknown-ca", f"TLS: the broker's certificate is not signed by a CA in {ca} ({why}); "
                                                f"set {_tls_key('ca_file')} to the CA that signed the broker's certificate")
    if code == _EXPIRED:
        return ConnectProblem("tls-expired", f"TLS: the broker's certificate has expired ({why}); renew it on the "
                                             "broker, and check this device's clock (date -u)")
    if code == _NOT_YET_VALID:
        return ConnectProblem("tls-not-yet-valid", f"TLS: the broker's certificate is not valid yet ({why}); check this "
                                                   "device's clock (date -u, NTP)")
    if code in _HOST_MISMATCH_CODES:
        return ConnectProblem("tls-host-name", f"TLS: the broker's certificate is not valid for {settings.host!r} ({why}); "
                                               f"set {CONFIG_KEY}.host to a name in the certificate's subjectAltName")
    return ConnectProblem("tls-verify-failed", f"TLS: the broker's certificate was not accepted ({why}); check "
                                               f"{_tls_key('ca_file')} and the broker's certificate")


def from_tls_text(text: str, settings: Any) -> ConnectProblem:
    """An SSL error known only by its text: paho logs, but does not raise, errors read after the handshake."""
    upper = text.upper()
    tls = getattr(settings, "tls", None)
    has_cert = tls is not None and tls.cert_file is not None
    if any(name in upper for name in _CLIENT_CERT_MISSING) or ("HANDSHAKE_FAILURE" in upper and not has_cert):
        return ConnectProblem("tls-client-cert-required", f"TLS: the broker requires a client certificate ({text}); "
                                                          f"set {_tls_key('cert_file')} and {_tls_key('key_file')}")
    if any(name in upper for name in _CLIENT_CERT_REFUSED) and has_cert:
        return ConnectProblem("tls-client-cert-refused", f"TLS: the broker refused this device's certificate "
                                                         f"{tls.cert_file} ({text}); have it signed by a CA the broker "
                                                         f"trusts, or renew it ({_tls_key('cert_file')})")
    if "EOF" in upper:  # TLS 1.3: the broker may close before its alert (no certificate, or a refused one) is read
        fix = (f"if it requires client certificates, check that {tls.cert_file} is signed by a CA the broker trusts "
               f"and not expired ({_tls_key('cert_file')})" if has_cert else
               f"if it requires client certificates, set {_tls_key('cert_file')} and {_tls_key('key_file')}")
        return ConnectProblem("tls-closed", f"TLS: the broker closed the connection right after the handshake "
                                            f"({text}); {fix}")
    if any(name in upper for name in _NOT_TLS):
        return ConnectProblem("tls-not-tls", f"TLS: port {settings.port} does not speak TLS ({text}); use the broker's "
                                             f"TLS port (usually 8883) or remove {CONFIG_KEY}.tls")
    return ConnectProblem("tls-error", f"TLS: {text}; check {CONFIG_KEY}.tls and the broker's TLS listener")


def from_socket_error(text: Optional[str], settings: Any) -> ConnectProblem:
    """The connection closed before the broker's CONNACK; `text` is the socket error paho logged, if any."""
    port = settings.port
    if text and ("SSL" in text.upper() or "TLS" in text.upper()):
        return from_tls_text(text, settings)
    if getattr(settings, "tls", None) is None:
        return ConnectProblem("closed-before-connack", f"the broker closed the connection before accepting it "
                                                       f"({text or 'no reason given'}); if port {port} is a TLS "
                                                       f"listener (usually 8883), configure {CONFIG_KEY}.tls")
    return ConnectProblem("closed-before-connack", f"the broker closed the connection before accepting it "
                                                   f"({text or 'no reason given'}); check its log")


def from_connack(reason_code: Any, settings: Any) -> ConnectProblem:
    """A CONNACK that refused us (paho's ReasonCode; its str() is the MQTT reason's name)."""
    name = str(reason_code)
    lowered = name.lower()
    user = settings.username
    secret = f"{CONFIG_KEY}.password_file or {CONFIG_KEY}.password_env"
    if "user name or password" in lowered:
        return ConnectProblem("auth-bad-credentials", f"the broker refused the connection ({name}): wrong user name or "
                                                      f"password for {user!r}; check {CONFIG_KEY}.username and {secret}")
    if "not authori" in lowered:
        if user is None:
            return ConnectProblem("auth-not-authorised", f"the broker refused the connection ({name}): it does not "
                                                         f"accept anonymous clients; set {CONFIG_KEY}.username and "
                                                         f"{secret}")
        return ConnectProblem("auth-not-authorised", f"the broker refused the connection ({name}) for user {user!r}: "
                                                     f"wrong password, or the user may not connect; check "
                                                     f"{CONFIG_KEY}.username, {secret} and the broker's users")
    if "identifier" in lowered:
        return ConnectProblem("client-id-rejected", f"the broker refused the connection ({name}); set "
                                                    f"{CONFIG_KEY}.client_id to an id it accepts, unique per device")
    return ConnectProblem("connack-refused", f"the broker refused the connection ({name}); check its log, "
                                             f"{CONFIG_KEY}.username and {CONFIG_KEY}.client_id")
