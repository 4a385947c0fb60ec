"""G4 over TLS: a real redis-server serving TLS only, with a throwaway CA made by the ``openssl`` CLI."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.config import ConfigError, KvtierConfig
from kvtier.tiers import resp_direct
from kvtier.tiers.remote import RemoteTier, connect
from kvtier.testing.redis_server import RedisServer, TlsFiles, tls_available
from tests.tiers.helpers import NS, SIZES, payloads

pytestmark = pytest.mark.skipif(not tls_available(), reason="needs openssl and a redis-server built with TLS")
PASSWORD = "tls-test-pass"
PART = 1 << 20  # SIZES up to 1 MiB are one value (resp_direct, over many TLS records), the last multi-part


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("other-tls"), ca_name="some-other-ca")


@pytest.fixture
def tls_server(tls: TlsFiles) -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD, tls=tls) as server:
        yield server


def tls_config(server: RedisServer, ca: Path, password: str = PASSWORD, **fields: object) -> KvtierConfig:
    return KvtierConfig(remote_url=server.url, remote_password=password, remote_tls_ca_file=str(ca),
                        remote_part_bytes=PART, remote_timeout_s=2.0, **fields)


def round_trip(tier: RemoteTier, seed: int = 0) -> None:
    """One batch of one-value chunks (a batch holding a multi-part chunk goes through redis-py), then one
    of multi-part chunks."""
    for sizes in ([n for n in SIZES if n <= PART], [n for n in SIZES if n > PART]):
        data = payloads(sizes, seed)
        keys = list(range(seed * 100 + sizes[0], seed * 100 + sizes[0] + len(sizes)))
        assert tier.put(keys, data) == [True] * len(sizes)
        bufs = [bytearray(n) for n in sizes]
        assert tier.get(keys, bufs) == sizes
        assert all(bytes(b) == d.tobytes() for b, d in zip(bufs, data))


def test_round_trip_over_tls_with_an_acl_user(tls_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Password auth and an ACL user limited to the namespace's keys, over TLS; the zero-copy path runs on
    the TLS socket for one-value chunks (multi-part ones go through redis-py)."""
    with tls_server.client() as admin:
        admin.acl_setuser("kvtier", enabled=True, passwords=["+acl-pass"], keys=[f"{NS.prefix}/*"],
                          commands=["+@all"])
    sockets: list[type] = []
    real_send = resp_direct.send
    monkeypatch.setattr(resp_direct, "send", lambda sock, pieces: (sockets.append(type(sock)), real_send(sock, pieces)))
    with RemoteTier.from_config(tls_config(tls_server, tls_server.tls.ca), NS) as tier:
        assert tier.part_bytes == PART
        round_trip(tier)
    assert sockets and all(issubclass(t, ssl.SSLSocket) for t in sockets)
    acl = tls_config(tls_server, tls_server.tls.ca, password="acl-pass", remote_username="kvtier")
    with RemoteTier.from_config(acl, NS) as tier:
        round_trip(tier, seed=1)
        assert tier.stats().errors == 0
    with tls_server.client() as admin:
        assert admin.dbsize() > 0 and all(k.startswith(NS.prefix.encode()) for k in admin.keys("*"))


def test_a_server_signed_by_another_ca_is_misses_and_a_logged_error(
        tls_server: RedisServer, other_ca: TlsFiles, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers.remote"), \
            RemoteTier.from_config(tls_config(tls_server, other_ca.ca), NS) as tier:
        assert tier.put([1], [b"payload"]) == [False]
        assert tier.get([1], [bytearray(16)]) == [None]
        assert tier.contains([1]) == [False]
        assert tier.stats().errors >= 1
    assert "certificate verify failed" in caplog.text.lower()


def test_plain_connections_to_a_tls_port_are_misses(tls_server: RedisServer) -> None:
    client = connect(tls_server.url.replace("rediss://", "redis://"), password=PASSWORD, timeout_s=0.5)
    with RemoteTier(NS, client) as tier:
        assert tier.put([1], [b"x"]) == [False] and tier.get([1], [bytearray(1)]) == [None]


def test_mutual_tls_needs_the_client_certificate(tls: TlsFiles, caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(password=PASSWORD, tls=tls, require_client_cert=True) as server:
        with caplog.at_level(logging.WARNING, logger="kvtier.tiers.remote"), \
                RemoteTier.from_config(tls_config(server, tls.ca), NS) as tier:
            assert tier.put([1], [b"x"]) == [False] and tier.stats().errors >= 1
        assert "remote tier:" in caplog.text
        with RemoteTier.from_config(tls_config(server, tls.ca, remote_tls_cert_file=str(tls.client_cert),
                                               remote_tls_key_file=str(tls.client_key)), NS) as tier:
            round_trip(tier)


def test_tls_options_are_validated(tls: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rediss://"):
        connect("redis://127.0.0.1:1/0", tls_ca_file=str(tls.ca))
    with pytest.raises(ValueError, match="go together"):
        connect("rediss://127.0.0.1:1/0", tls_cert_file=str(tls.client_cert))
    with pytest.raises(ValueError, match="not a file"):
        connect("rediss://127.0.0.1:1/0", tls_ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match="rediss://"):
        KvtierConfig(remote_url="redis://127.0.0.1:1/0", remote_tls_ca_file=str(tls.ca))
    with pytest.raises(ConfigError, match="together"):
        KvtierConfig(remote_url="rediss://127.0.0.1:1/0", remote_tls_key_file=str(tls.client_key))
    assert KvtierConfig(remote_url="rediss+cluster://127.0.0.1:1", remote_tls_ca_file=str(tls.ca)).remote_tls_ca_file
