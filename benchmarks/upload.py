"""Upload benchmark: N blobs of size S pushed to a registry, timed.

By default it runs the in-process registry (``trio_blobs.testing``) in a child process; ``--url``
points it at any registry instead. Each workload is pushed once to warm up and ``--runs`` times
into a fresh repository, and the median run is reported.

    python benchmarks/upload.py                        # 1000 x 64 KiB and 4 x 128 MiB
    python benchmarks/upload.py -w 200x1MiB --runs 5
    python benchmarks/upload.py --url http://127.0.0.1:5000
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import trio
from _common import Run, measure, parser, print_header, print_row, registry_url, workloads

import trio_blobs


def main() -> None:
    args = parser(__doc__).parse_args()
    concurrency = args.concurrency or 32
    with (
        tempfile.TemporaryDirectory(prefix="trio-blobs-bench-") as tmp,
        registry_url(args.url, args.registry) as url,
    ):
        root = Path(tmp)

        async def run() -> None:
            print_header(f"upload to {url}, concurrency {concurrency}")
            for index, workload in enumerate(workloads(args)):
                src = root / f"src{index}"
                src.mkdir()
                blobs = workload.write(src, seed=index)
                results: list[Run] = []
                for _ in range(args.runs + 1):
                    push = functools.partial(
                        trio_blobs.upload,
                        blobs,
                        base_url=url,
                        src_dir=src,
                        repository=f"bench/upload-{uuid.uuid4().hex[:12]}",
                        concurrency=concurrency,
                    )
                    results.append(
                        await measure(concurrency, lambda client, p=push: p(client=client))
                    )
                shutil.rmtree(src)
                print_row(workload, results[1:])

        trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
