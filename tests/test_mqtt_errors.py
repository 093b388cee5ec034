"""agent.mqtt_errors: each failed connection becomes one reason and one sentence naming the key to fix
(the TLS and password cases against a real Mosquitto are in test_mqtt_publisher.py)."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt import MqttSettings, TlsSettings
from agent.mqtt_errors import from_connack, from_exception, from_socket_error

PLAIN = MqttSettings(station="s", host="broker.local", port=1883, username="agent", password_env="PW")
TLS = MqttSettings(station="s", host="broker.local", port=8883, tls=TlsSettings(ca_file=Path("/etc/ca.pem")))


@pytest.mark.parametrize(
    "exc, settings, reason, words",
    [
        (socket.gaierror(-2, "Name or service not known"), PLAIN, "dns", "host name 'broker.local' not found"),
        (ConnectionRefusedError(111, "Connection refused"), PLAIN, "refused", "broker.local:1883"),
        (ConnectionResetError(104, "reset"), TLS, "tls-reset", "is port 8883 a TLS listener"),  # TLS to a plain port
        (TimeoutError("timed out"), PLAIN, "timeout", "no answer"),
        (OSError(113, "No route to host"), PLAIN, "unreachable", "No route to host"),
        (None, PLAIN, "unreachable", "broker.local:1883 unreachable"),
    ],
)
def test_connect_exceptions(exc: Any, settings: MqttSettings, reason: str, words: str) -> None:
    problem = from_exception(exc, settings)
    assert problem.reason == reason and words in problem.text


def test_socket_errors_before_connack() -> None:
    assert from_socket_error("[SSL: WRONG_VERSION_NUMBER] wrong version number", TLS).reason == "tls-not-tls"
    plain = from_socket_error("[Errno 104] Connection reset by peer", PLAIN)  # plain MQTT to a TLS port
    assert plain.reason == "closed-before-connack" and "configure mqtt.tls" in plain.text
    assert from_socket_error(None, TLS).reason == "closed-before-connack"
    eof = from_socket_error("EOF occurred in violation of protocol (_ssl.c:2427)", TLS)  # TLS 1.3, alert not read
    assert eof.reason == "tls-closed" and "set mqtt.tls.cert_file" in eof.text
    # with a certificate: the broker refused it, but closed before its alert was read (seen under load)
    with_cert = MqttSettings(station="s", host="broker.local", port=8883, tls=TlsSettings(
        ca_file=Path("/etc/ca.pem"), cert_file=Path("/etc/dev.pem"), key_file=Path("/etc/dev.key")))
    eof = from_socket_error("EOF occurred in violation of protocol (_ssl.c:2427)", with_cert)
    assert eof.reason == "tls-closed" and "check that /etc/dev.pem is signed by a CA the broker trusts" in eof.text


@pytest.mark.parametrize(
    "code, settings, reason, words",
    [
        (134, PLAIN, "auth-bad-credentials", "wrong user name or password for 'agent'"),  # MQTT 5 / v3 rc 4
        (135, PLAIN, "auth-not-authorised", "for user 'agent': wrong password"),  # Mosquitto's answer in v3.1.1
        (135, TLS, "auth-not-authorised", "does not accept anonymous clients"),  # no username configured
        (133, PLAIN, "client-id-rejected", "mqtt.client_id"),
        (136, PLAIN, "connack-refused", "Server unavailable"),
    ],
)
def test_refused_connack(code: int, settings: MqttSettings, reason: str, words: str) -> None:
    problem = from_connack(ReasonCode(PacketTypes.CONNACK, identifier=code), settings)
    assert problem.reason == reason and words in problem.text
