"""Proxies, from the caller's httpx client or the environment: downloads through a real HTTP
proxy."""

import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from trio_blobs import download
from trio_blobs._session import TransferClient
from trio_blobs.testing import Registry

from ._helpers import add_blobs
from ._real import require


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[str]:
    """tinyproxy on a loopback port, in the foreground; its URL."""
    require("tinyproxy")
    port = _free_port()
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Error\n"
        'MaxClients 100\nViaProxyName "trio-blobs-test-proxy"\n'
    )
    process = await trio.lowlevel.open_process(
        [str(shutil.which("tinyproxy")), "-d", "-c", str(config)]
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                else:
                    await probe.aclose()
                    break
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def test_a_download_through_an_http_proxy(
    registry: Registry, tmp_path: Path, tinyproxy: str
) -> None:
    blobs = add_blobs(registry, 10, 300_000, 2_000_000)
    async with registry.serving() as url, httpx.AsyncClient(proxy=tinyproxy) as client:
        result = await download(blobs, base_url=url, dest_dir=tmp_path, client=client)
    assert set(result.downloaded) == {b.digest for b in blobs}
    for blob in blobs:
        assert (tmp_path / blob.file_name).read_bytes() == registry.blobs["library/_"][blob.digest]
    # every request reached the registry through the proxy
    assert all("trio-blobs-test-proxy" in r.headers.get("via", "") for r in registry.requests)


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment naming no proxy (nor exceptions), for the test to add its own."""
    for variable in ("HTTP", "HTTPS", "ALL", "NO", "FTP"):
        monkeypatch.delenv(f"{variable}_PROXY", raising=False)
        monkeypatch.delenv(f"{variable.lower()}_proxy", raising=False)
    return monkeypatch


async def test_without_a_client_a_proxy_named_by_the_environment_is_used(
    registry: Registry, tmp_path: Path, tinyproxy: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    no_proxy_env.setenv("HTTP_PROXY", tinyproxy)
    blobs = add_blobs(registry, 3, 1000, 100_000)
    async with registry.serving() as url:
        result = await download(blobs, base_url=url, dest_dir=tmp_path)
    assert set(result.downloaded) == {b.digest for b in blobs}
    assert registry.requests
    assert all("trio-blobs-test-proxy" in r.headers.get("via", "") for r in registry.requests)


@pytest.mark.parametrize(
    ("name", "direct"),
    [("HTTPS_PROXY", False), ("all_proxy", False), ("FTP_PROXY", True), ("NO_PROXY", True)],
)
async def test_only_proxies_httpx_would_use_turn_the_direct_transport_off(
    no_proxy_env: pytest.MonkeyPatch, name: str, direct: bool
) -> None:
    no_proxy_env.setenv(name, "http://127.0.0.1:3128")
    async with TransferClient(max_idle_connections=4) as client:
        assert (client.direct is not None) == direct
