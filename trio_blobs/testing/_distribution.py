"""The distribution registry (Debian's ``docker-registry``) run on a loopback port, for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

__all__ = [
    "DistributionBasicAuth",
    "DistributionTokenAuth",
    "RegistryStartError",
    "distribution_registry",
]

STOP_TIMEOUT = 5.0  # seconds between asking the registry to stop and SIGKILL
_LOG_TAIL = 4000  # characters of the registry's output quoted when it does not come up
_PORT_ATTEMPTS = 3  # someone else may bind the free port before the registry does

# Becomes the registry ("$@"), in a process group of its own, beside a watcher that stops the
# group once standard input, a pipe from the host process, reaches its end: the host closed it,
# or died, even by SIGKILL. SIGTERM first, SIGKILL if the registry is still there after a few
# seconds. Signals go to that group only, whose ID no other process can take while either of
# the two lives.
_WATCHDOG = f"""
exec 3<&0 </dev/null
{{
    trap '' TERM
    read -r _ <&3
    kill -TERM 0
    for _ in $(seq {round(STOP_TIMEOUT * 10)}); do kill -0 $$ || exit; sleep 0.1; done
    kill -KILL 0
}} 2>/dev/null &
exec "$@" 3<&-
"""


class RegistryStartError(RuntimeError):
    """The distribution registry could not be started: a program is missing, the configuration
    was refused, or it did not answer in time. The message says which, and quotes the
    registry's output."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DistributionTokenAuth:
    """``auth: token``: the registry accepts JWTs from ``issuer`` for ``service``, signed by a
    key whose certificate is in ``rootcertbundle`` (PEM), and sends clients to ``realm``."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: str | os.PathLike[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistributionBasicAuth:
    """``auth: htpasswd``: Basic auth for ``users`` (name -> password), hashed with bcrypt by
    the ``htpasswd`` program (Debian package ``apache2-utils``)."""

    users: Mapping[str, str]
    realm: str = "trio-blobs-test"


@asynccontextmanager
async def distribution_registry(
    *,
    storage: str | os.PathLike[str] | None = None,
    auth: DistributionTokenAuth | DistributionBasicAuth | None = None,
    redirect_to: str | None = None,
    startup_timeout: float = 10.0,
) -> AsyncIterator[str]:
    """Run ``docker-registry serve`` on a free 127.0.0.1 port; yield its base URL.

    Blobs are stored on the filesystem under ``storage`` (kept), or in a temporary directory
    (removed on exit); deletes are enabled and the access log is off. ``auth`` turns on token or
    Basic auth. ``redirect_to`` enables the ``redirect`` storage middleware: blob ``GET`` and
    ``HEAD`` answer 307 to ``redirect_to``'s origin with the blob's storage path, such as
    ``/docker/registry/v2/blobs/sha256/ab/<hex>/data`` (the URL's own path is dropped), so a
    server that serves ``storage`` at its root can answer them.

    Returns once ``GET /v2/`` answers; on exit the registry gets SIGTERM, and SIGKILL after
    :data:`STOP_TIMEOUT` seconds, as it does when the process that started it dies without
    cleaning up (killed by SIGKILL, say): no registry is left running. Raises
    :class:`RegistryStartError`, with the install command when ``docker-registry`` is not on
    ``PATH``, and with the registry's output when it exits or does not answer within
    ``startup_timeout`` seconds.
    """
    executable = _find("docker-registry", "docker-registry")
    with tempfile.TemporaryDirectory(prefix="trio-blobs-distribution-") as tmp:
        work = Path(tmp)
        entries = []
        if isinstance(auth, DistributionBasicAuth):
            entries = [await _htpasswd_entry(user, pw) for user, pw in auth.users.items()]
        root, auth_config = _prepare(work, storage, auth, entries)

        def write_config(port: int) -> str:
            return _write(work, "config.yml", [_config(root, port, auth_config, redirect_to)])

        log = work / "registry.log"
        process, base_url = await _start(executable, log, write_config, startup_timeout)
        try:
            yield base_url
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)


def _find(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RegistryStartError(
            f"{program} is not on PATH: install it with `apt-get install {package}` "
            "(Debian, Ubuntu)"
        )
    return path


def _prepare(
    work: Path,
    storage: str | os.PathLike[str] | None,
    auth: DistributionTokenAuth | DistributionBasicAuth | None,
    htpasswd: list[str],
) -> tuple[Path, dict[str, object]]:
    """Create the storage directory; return it and the ``auth`` configuration."""
    root = Path(storage if storage is not None else work / "storage").absolute()
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(auth, DistributionTokenAuth):
        bundle = os.fspath(Path(auth.rootcertbundle).absolute())
        token = {"realm": auth.realm, "service": auth.service, "issuer": auth.issuer}
        return root, {"token": {**token, "rootcertbundle": bundle}}
    if isinstance(auth, DistributionBasicAuth):
        return root, {"htpasswd": {"realm": auth.realm, "path": _write(work, "htpasswd", htpasswd)}}
    return root, {}


async def _htpasswd_entry(user: str, password: str) -> str:
    """``user:<bcrypt hash>``; the password goes through stdin, not the command line."""
    done = await trio.run_process(
        [_find("htpasswd", "apache2-utils"), "-niB", user],
        stdin=password.encode(),
        capture_stdout=True,
    )
    return done.stdout.decode().strip()


def _write(directory: Path, name: str, lines: list[str]) -> str:
    path = directory / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return os.fspath(path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _config(root: Path, port: int, auth: dict[str, object], redirect_to: str | None) -> str:
    """The registry's configuration as JSON, which is YAML with every value quoted safely."""
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": os.fspath(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if auth:
        config["auth"] = auth
    if redirect_to is not None:
        config["middleware"] = {
            "storage": [{"name": "redirect", "options": {"baseurl": redirect_to}}]
        }
    return json.dumps(config, indent=2)


async def _start(
    executable: str, log: Path, write_config: Callable[[int], str], startup_timeout: float
) -> tuple[trio.Process, str]:
    """Start the registry on a free port with the configuration ``write_config(port)`` wrote;
    return it once it answers, with its base URL. Its output goes to ``log``."""
    # The registry takes REGISTRY_* variables as overrides of its configuration.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    attempt = 0
    while True:
        attempt += 1
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = ["/bin/sh", "-c", _WATCHDOG, "sh", executable, "serve", write_config(port)]
        with log.open("wb") as output:  # each attempt starts a fresh log
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                env=env,
                start_new_session=True,  # its own group, which SIGKILL can stop as a whole
            )
        try:
            with trio.move_on_after(startup_timeout):
                if await _wait_ready(process, base_url):
                    return process, base_url
                if attempt < _PORT_ATTEMPTS and "address already in use" in _tail(log):
                    continue
                raise RegistryStartError(
                    f"the registry exited with status {process.returncode}:\n{_tail(log)}"
                )
            raise RegistryStartError(
                f"the registry did not answer {base_url}/v2/ within {startup_timeout} s:\n"
                + _tail(log)
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await _stop(process)
            raise


async def _stop(process: trio.Process) -> None:
    """Close the watchdog's pipe (the registry gets SIGTERM); SIGKILL its process group if it
    is still there after :data:`STOP_TIMEOUT` s."""
    assert process.stdin is not None
    await process.stdin.aclose()
    with trio.move_on_after(STOP_TIMEOUT):
        await process.wait()
        return
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def _wait_ready(process: trio.Process, base_url: str) -> bool:
    """Poll ``GET /v2/`` until it answers 200 or 401 (True) or the process exits (False)."""
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while process.returncode is None:
            try:
                response = await client.get(f"{base_url}/v2/")
            except httpx.TransportError:
                pass
            else:
                if response.status_code in (200, 401):
                    return True
            await trio.sleep(0.01)
    return False


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-_LOG_TAIL:]
