"""Upload benchmark: N blobs of size S pushed to a registry, timed.

By default it runs the in-process registry (``trio_blobs.testing``) in a child process; ``--url``
points it at any registry instead. Each workload is pushed once to warm up and ``--runs`` times
into a fresh repository, and the median run is reported.

    python benchmarks/upload.py                        # 1000 x 64 KiB and 4 x 128 MiB
    python benchmarks/upload.py -w 200x1MiB --runs 5
    python benchmarks/upload.py --url http://127.0.0.1:5000
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from _common import Case, run_benchmark

import trio_blobs


async def _nothing(case: Case) -> None:
    """Nothing to set up: every run pushes into a repository of its own."""


async def _push(case: Case, fresh: Path, client: httpx.AsyncClient) -> None:
    await trio_blobs.upload(
        case.blobs,
        base_url=case.url,
        src_dir=case.src,
        repository=f"bench/upload-{uuid.uuid4().hex[:12]}",  # empty, even on a reused registry
        client=client,
        concurrency=case.concurrency,
    )


if __name__ == "__main__":
    run_benchmark(__doc__, action="upload to", default_concurrency=32, prepare=_nothing, once=_push)
