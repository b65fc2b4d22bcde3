"""One Python contender's transfer, run by ``compare.py`` in a process of its own.

    python benchmarks/_contender.py TOOL DIRECTION SPEC.json

TOOL is ``trio_blobs``, ``oras-py`` or ``python-dxf``; DIRECTION is ``download`` or ``upload``.
SPEC.json gives ``base_url``, ``host``, ``repository``, ``blobs`` (``[digest, size]`` pairs),
``src`` (where ``sha256-<hex>`` files are read), ``dest`` (where they are written) and
``concurrency`` (trio_blobs only; null for the library's default). Each tool is called through
its public API, with its own defaults. Downloads land in ``dest/sha256-<hex>``.

Imports happen before the clock starts: the last line on stdout is JSON with the transfer's
own wall ``seconds`` and ``cpu_seconds`` (all threads of this process), so that interpreter
start-up is not counted as transfer time. The parent measures the whole process as well.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

Transfer = Callable[[], object]


def _file(directory: str, digest: str) -> str:
    return str(Path(directory) / digest.replace(":", "-", 1))


def _trio_blobs(spec: dict[str, Any], direction: str) -> Transfer:
    import trio

    import trio_blobs

    blobs = [trio_blobs.Blob(digest, size) for digest, size in spec["blobs"]]
    options: dict[str, Any] = {"base_url": spec["base_url"], "repository": spec["repository"]}
    if spec["concurrency"]:
        options["concurrency"] = spec["concurrency"]

    async def download() -> None:
        await trio_blobs.download(blobs, dest_dir=spec["dest"], **options)

    async def upload() -> None:
        await trio_blobs.upload(blobs, src_dir=spec["src"], **options)

    return lambda: trio.run(download if direction == "download" else upload)


def _oras(spec: dict[str, Any], direction: str) -> Transfer:
    """oras-py, one blob after another as its API goes: ``download_blob`` (no digest check);
    ``NewLayer`` (hashes the file, as ``push`` does) then ``upload_blob`` (HEAD, POST, PUT of
    the whole file read into memory)."""
    import oras.oci
    import oras.provider

    def download() -> None:
        registry = oras.provider.Registry(hostname=spec["host"], insecure=True)
        container = registry.get_container(spec["repository"])
        for digest, _ in spec["blobs"]:
            registry.download_blob(container, digest, _file(spec["dest"], digest))

    def upload() -> None:
        registry = oras.provider.Registry(hostname=spec["host"], insecure=True)
        container = registry.get_container(spec["repository"])
        for digest, _ in spec["blobs"]:
            path = _file(spec["src"], digest)
            response = registry.upload_blob(path, container, oras.oci.NewLayer(path))
            if response.status_code not in (200, 201, 202):
                raise SystemExit(f"upload_blob {digest}: HTTP {response.status_code}")

    return download if direction == "download" else upload


def _dxf(spec: dict[str, Any], direction: str) -> Transfer:
    """python-dxf, one blob after another: ``pull_blob`` (checks the digest as it streams) and
    ``push_blob(filename)`` (hashes the file, HEAD, POST, PUT streamed from the file)."""
    from dxf import DXF

    def download() -> None:
        dxf = DXF(spec["host"], spec["repository"], insecure=True)
        for digest, _ in spec["blobs"]:
            with open(_file(spec["dest"], digest), "wb") as file:
                for chunk in cast("Iterable[bytes]", dxf.pull_blob(digest)):
                    file.write(chunk)

    def upload() -> None:
        dxf = DXF(spec["host"], spec["repository"], insecure=True)
        for digest, _ in spec["blobs"]:
            pushed = dxf.push_blob(filename=_file(spec["src"], digest))
            if pushed != digest:
                raise SystemExit(f"push_blob returned {pushed}, expected {digest}")

    return download if direction == "download" else upload


_TOOLS: dict[str, Callable[[dict[str, Any], str], Transfer]] = {
    "trio_blobs": _trio_blobs,
    "oras-py": _oras,
    "python-dxf": _dxf,
}


def main() -> None:
    tool, direction, spec_path = sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    if direction == "download":
        Path(spec["dest"]).mkdir(parents=True, exist_ok=True)
    transfer = _TOOLS[tool](spec, direction)
    cpu, start = time.process_time(), time.perf_counter()
    transfer()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


if __name__ == "__main__":
    main()
