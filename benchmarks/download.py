"""Download benchmark: N blobs of size S from a registry, timed, with a few numbers to compare.

By default it starts the in-process registry (``trio_blobs.testing``) in a child process, fills
it with random blobs and downloads them; ``--url`` points it at any registry instead (the blobs
are pushed there first). Each workload runs once to warm up, then ``--runs`` times into a fresh
directory; the median run is reported.

    python benchmarks/download.py                      # 1000 x 64 KiB and 4 x 128 MiB
    python benchmarks/download.py -w 200x1MiB --runs 5
    python benchmarks/download.py --url http://127.0.0.1:5000 --repository bench/w1
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import trio

import trio_blobs
from trio_blobs import Blob
from trio_blobs._transfer import default_client

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 10**6}


@dataclass(frozen=True)
class Workload:
    count: int
    size: int
    label: str

    @classmethod
    def parse(cls, text: str) -> Workload:
        """``1000x64KiB`` -> 1000 blobs of 65536 bytes."""
        match = re.fullmatch(r"(\d+)x(\d+)([a-zA-Z]*)", text.strip())
        if not match or match[3].lower() not in _UNITS:
            raise argparse.ArgumentTypeError(
                f"expected COUNTxSIZE such as 1000x64KiB, got {text!r}"
            )
        return cls(int(match[1]), int(match[2]) * _UNITS[match[3].lower()], text)


def _random_blobs(workload: Workload, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(workload.size) for _ in range(workload.count)]


def _serve(
    workloads: list[Workload], repository: str, conn: multiprocessing.connection.Connection
) -> None:
    """Child process: an in-process registry holding every workload's blobs."""
    from trio_blobs.testing import Registry

    registry = Registry()
    listing = [
        [registry.add_blob(data, repository) for data in _random_blobs(w, seed)]
        for seed, w in enumerate(workloads)
    ]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(registry.serve)
            conn.send((url, listing))

    trio.run(main)


async def _push(url: str, repository: str, blobs: list[bytes]) -> list[Blob]:
    """Put blobs into a registry with plain monolithic uploads (POST, then PUT)."""
    result = [Blob.from_bytes(data) for data in blobs]
    limiter = trio.CapacityLimiter(16)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def push(blob: Blob, data: bytes) -> None:
            async with limiter:
                if (await client.head(f"/v2/{repository}/blobs/{blob.digest}")).status_code == 200:
                    return
                started = await client.post(f"/v2/{repository}/blobs/uploads/")
                started.raise_for_status()
                location = httpx.URL(url).join(started.headers["location"])
                params = dict(location.params) | {"digest": blob.digest}
                done = await client.put(location.copy_with(params=params), content=data)
                done.raise_for_status()

        async with trio.open_nursery() as nursery:
            for blob, data in zip(result, blobs, strict=True):
                nursery.start_soon(push, blob, data)
    return result


async def _run_once(
    url: str, repository: str, blobs: list[Blob], concurrency: int
) -> tuple[float, float, int]:
    """One download into a fresh directory: (seconds, client CPU seconds, requests)."""
    dest = tempfile.mkdtemp(prefix="trio-blobs-bench-")
    requests = 0

    async def count(request: httpx.Request) -> None:
        nonlocal requests
        requests += 1

    try:
        async with default_client(concurrency) as client:
            client.event_hooks["request"].append(count)
            cpu, start = time.process_time(), time.perf_counter()
            await trio_blobs.download(
                blobs,
                base_url=url,
                dest_dir=dest,
                repository=repository,
                client=client,
                concurrency=concurrency,
            )
            return time.perf_counter() - start, time.process_time() - cpu, requests
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _bench(args: argparse.Namespace, url: str, listing: list[list[Blob]]) -> None:
    print(f"registry: {url}  repository: {args.repository}  concurrency: {args.concurrency}")
    header = ("workload", "MB/s", "blobs/s", "req/blob", "CPU ms/blob", "peak RSS MB")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (12, 9, 9, 9, 12, 12), strict=True)))
    for workload, blobs in zip(args.workload, listing, strict=True):
        runs = [
            await _run_once(url, args.repository, blobs, args.concurrency)
            for _ in range(args.runs + 1)
        ]
        seconds, cpu, requests = sorted(runs[1:])[len(runs[1:]) // 2]  # median by wall time
        total = workload.count * workload.size
        print(
            f"{workload.label:>12} {total / seconds / 1e6:9.1f} {workload.count / seconds:9.0f}"
            f" {requests / workload.count:9.2f} {cpu * 1000 / workload.count:12.3f}"
            f" {_peak_rss_mb():12.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-w",
        "--workload",
        type=Workload.parse,
        action="append",
        help="COUNTxSIZE, repeatable (default: 1000x64KiB and 4x128MiB)",
    )
    parser.add_argument("--url", help="registry base URL (default: start the in-process registry)")
    parser.add_argument("--repository", default="bench/download")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--runs", type=int, default=3, help="counted runs after one warm-up (default 3)"
    )
    args = parser.parse_args()
    args.workload = args.workload or [Workload.parse("1000x64KiB"), Workload.parse("4x128MiB")]

    if args.url:
        listing = [
            trio.run(_push, args.url, args.repository, _random_blobs(w, seed))
            for seed, w in enumerate(args.workload)
        ]
        trio.run(_bench, args, args.url, listing)
        return
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(args.workload, args.repository, child), daemon=True
    )
    server.start()
    try:
        url, listing = parent.recv()
        trio.run(_bench, args, url, listing)
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    sys.exit(main())
