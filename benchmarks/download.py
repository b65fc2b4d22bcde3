"""Download benchmark: N blobs of size S pulled from a registry, timed.

By default it runs the in-process registry (``trio_blobs.testing``) in a child process; ``--url``
points it at any registry instead. The blobs are pushed first; then each workload is downloaded
once to warm up and ``--runs`` times into a fresh directory, and the median run is reported.

    python benchmarks/download.py                      # 1000 x 64 KiB and 4 x 128 MiB
    python benchmarks/download.py -w 200x1MiB --runs 5
    python benchmarks/download.py --url http://127.0.0.1:5000
"""

from __future__ import annotations

from pathlib import Path

import httpx
from _common import Case, run_benchmark

import trio_blobs


def _repository(case: Case) -> str:
    return f"bench/download-{case.index}"


async def _push(case: Case) -> None:
    await trio_blobs.upload(
        case.blobs, base_url=case.url, src_dir=case.src, repository=_repository(case)
    )


async def _pull(case: Case, fresh: Path, client: httpx.AsyncClient) -> None:
    await trio_blobs.download(
        case.blobs,
        base_url=case.url,
        dest_dir=fresh,
        repository=_repository(case),
        client=client,
        concurrency=case.concurrency,
    )


if __name__ == "__main__":
    run_benchmark(
        __doc__, action="download from", default_concurrency=64, prepare=_push, once=_pull
    )
