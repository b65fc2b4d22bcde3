"""Download benchmark: N blobs of size S pulled from a registry, timed.

By default it runs the in-process registry (``trio_blobs.testing``) in a child process; ``--url``
points it at any registry instead. The blobs are pushed first; then each workload is downloaded
once to warm up and ``--runs`` times into a fresh directory, and the median run is reported.

    python benchmarks/download.py                      # 1000 x 64 KiB and 4 x 128 MiB
    python benchmarks/download.py -w 200x1MiB --runs 5
    python benchmarks/download.py --url http://127.0.0.1:5000
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
from pathlib import Path

import trio
from _common import Run, measure, parser, print_header, print_row, registry_url, workloads

import trio_blobs


def main() -> None:
    args = parser(__doc__).parse_args()
    concurrency = args.concurrency or 64
    with (
        tempfile.TemporaryDirectory(prefix="trio-blobs-bench-") as tmp,
        registry_url(args.url, args.registry) as url,
    ):
        root = Path(tmp)

        async def run() -> None:
            print_header(f"download from {url}, concurrency {concurrency}")
            for index, workload in enumerate(workloads(args)):
                src = root / f"src{index}"
                src.mkdir()
                blobs = workload.write(src, seed=index)
                repository = f"bench/download-{index}"
                await trio_blobs.upload(blobs, base_url=url, src_dir=src, repository=repository)
                shutil.rmtree(src)
                results: list[Run] = []
                for attempt in range(args.runs + 1):
                    dest = root / f"dest{index}-{attempt}"
                    pull = functools.partial(
                        trio_blobs.download,
                        blobs,
                        base_url=url,
                        dest_dir=dest,
                        repository=repository,
                        concurrency=concurrency,
                    )
                    results.append(
                        await measure(concurrency, lambda client, p=pull: p(client=client))
                    )
                    shutil.rmtree(dest)
                print_row(workload, results[1:])

        trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
