"""What the benchmarks share: workloads, a registry to run against, and the result table."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio

from trio_blobs import Blob, TransferError
from trio_blobs._session import TransferClient

_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_UNITS |= {"kb": 1000, "mb": 10**6, "gb": 10**9}
MIN_SIZE = 16  # bytes per blob: smaller random blobs would repeat
DEFAULT_WORKLOADS = ("1000x64KiB", "4x128MiB")
_PIECE = 1024 * 1024


def release(directory: Path) -> None:
    """Empty the files below ``directory`` (not following links) to free their space, but keep
    them: the whole benchmark's temporary directory goes at the end.

    Deleting a run's thousands of files would tax the runs after it. ext4 without a journal
    (this project's benchmark machine) does not reuse an inode for a minute after it is freed,
    five when its inode table block is still dirty, and skips each such inode one by one on
    every file it creates (``recently_deleted`` in fs/ext4/ialloc.c): a run that followed a
    few deletions of 1000 files paid 0.2-0.5 ms of system CPU per file created, against
    0.02-0.05 ms otherwise, whichever client it was.
    """
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.truncate(path, 0)


@dataclass(frozen=True)
class Workload:
    """``count`` random blobs of ``size`` bytes."""

    count: int
    size: int
    label: str

    @classmethod
    def parse(cls, text: str) -> Workload:
        """``1000x64KiB`` -> 1000 blobs of 65536 bytes (at least one blob of 16 bytes)."""
        match = re.fullmatch(r"0*([1-9]\d*)x0*([1-9]\d*)([a-zA-Z]*)", text.strip())
        size = (
            int(match[2]) * _UNITS[match[3].lower()] if match and match[3].lower() in _UNITS else 0
        )
        if not match or size < MIN_SIZE:
            raise argparse.ArgumentTypeError(
                f"expected COUNTxSIZE such as 1000x64KiB, at least 1 blob of {MIN_SIZE} bytes, "
                f"SIZE in b, kb, mb, gb, KiB, MiB or GiB; got {text!r}"
            )
        return cls(int(match[1]), size, text)

    def write(self, directory: Path, seed: int) -> list[Blob]:
        """Create the workload's blobs as ``sha256-<hex>`` files in ``directory``, a MiB at a
        time so that making them does not inflate the benchmark's peak memory."""
        rng = random.Random(seed)
        blobs = []
        for _ in range(self.count):
            hasher = hashlib.sha256()
            temporary = directory / "blob.partial"
            with temporary.open("wb") as file:
                for start in range(0, self.size, _PIECE):
                    piece = rng.randbytes(min(_PIECE, self.size - start))
                    hasher.update(piece)
                    file.write(piece)
            blob = Blob(f"sha256:{hasher.hexdigest()}", self.size)
            temporary.rename(directory / blob.file_name)
            blobs.append(blob)
        return blobs


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    if not re.fullmatch(r"\s*\+?0*[1-9]\d*\s*", text):
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return int(text)


def _base_url(text: str) -> str:
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT or https://..., got {text!r}")
    if url.port is not None and not 0 < url.port < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1-65535, got {text!r}")
    return text


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``, a cancelled CI job) stop a benchmark as Ctrl-C does,
    so that the registry it started stops and its temporary files go: the handler raises
    SIGINT, which Python (or trio, inside ``trio.run``) turns into ``KeyboardInterrupt``. SIGINT
    gets that default back first: a shell starts background jobs with it ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))


def parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-w",
        "--workload",
        type=Workload.parse,
        action="append",
        help=f"COUNTxSIZE, repeatable (default: {' and '.join(DEFAULT_WORKLOADS)})",
    )
    p.add_argument(
        "--url", type=_base_url, help="registry base URL (default: start one, see --registry)"
    )
    p.add_argument(
        "--registry",
        choices=("embedded", "distribution"),
        default="embedded",
        help="without --url, run the in-process registry (default) or the distribution "
        "registry (docker-registry on PATH)",
    )
    p.add_argument("--concurrency", type=at_least_one, help="default: the library's")
    p.add_argument(
        "--runs", type=at_least_one, default=3, help="counted runs after a warm-up (default 3)"
    )
    return p


def workloads(args: argparse.Namespace) -> list[Workload]:
    return args.workload or [Workload.parse(w) for w in DEFAULT_WORKLOADS]


def _serve(conn: multiprocessing.connection.Connection, registry: str) -> None:
    """Child process: an empty registry on a loopback port until SIGTERM, or until the parent's
    end of ``conn`` closes (the parent died: nothing else closes it first); then clean up."""
    from trio_blobs.testing import Registry, distribution_registry

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops this

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            serving = (
                distribution_registry() if registry == "distribution" else Registry().serving()
            )
            async with serving as url, trio.open_nursery() as nursery:
                conn.send(url)

                async def orphaned() -> None:
                    await trio.lowlevel.wait_readable(conn.fileno())  # end of stream
                    nursery.cancel_scope.cancel()

                nursery.start_soon(orphaned)
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    trio.run(main)


@contextlib.contextmanager
def registry_url(url: str | None, registry: str = "embedded") -> Iterator[str]:
    """``url``, or the address of a ``registry`` ("embedded": the in-process one, or
    "distribution") run meanwhile by a child process, so that it has a core of its own as a
    real registry would."""
    if url:
        yield url
        return
    parent, child = multiprocessing.Pipe()
    context = multiprocessing.get_context("spawn")
    server = context.Process(target=_serve, args=(child, registry), daemon=True)
    server.start()
    child.close()  # only the server keeps its end: if it dies before answering, recv() sees EOF
    try:
        try:
            address = parent.recv()
        except EOFError:
            raise SystemExit(f"the {registry} registry did not start (see above)") from None
        yield address
    finally:
        server.terminate()
        server.join()


@dataclass
class Case:
    """One workload of a benchmark: its blobs (as files in ``src``) and where to run."""

    url: str
    index: int
    workload: Workload
    src: Path
    blobs: list[Blob]
    concurrency: int


def run_benchmark(
    description: str | None,
    *,
    action: str,
    default_concurrency: int,
    prepare: Callable[[Case], Awaitable[object]],
    once: Callable[[Case, Path, httpx.AsyncClient], Awaitable[object]],
) -> None:
    """The whole benchmark: parse the options, run a registry (or use ``--url``), and for each
    workload write its blobs, ``prepare`` the registry, then time ``once(case, fresh, client)``
    once to warm up and ``--runs`` times more (``fresh`` is a new, absent path each time,
    emptied after: see :func:`release`), and print the median."""
    args = parser(description).parse_args()
    stop_on_sigterm()
    if args.url is None and args.registry == "distribution":
        require_distribution()
    concurrency = args.concurrency or default_concurrency
    try:
        with (
            tempfile.TemporaryDirectory(prefix="trio-blobs-bench-") as tmp,
            registry_url(args.url, args.registry) as url,
        ):
            root = Path(tmp)

            async def run() -> None:
                print_header(f"{action} {url}, concurrency {concurrency}", args.runs)
                for index, workload in enumerate(workloads(args)):
                    src = root / f"src{index}"
                    src.mkdir()
                    blobs = workload.write(src, seed=index)
                    case = Case(url, index, workload, src, blobs, concurrency)
                    await prepare(case)
                    results = []
                    for attempt in range(args.runs + 1):
                        fresh = root / f"run{index}-{attempt}"
                        results.append(await measure(concurrency, partial(once, case, fresh)))
                        release(fresh)
                    release(src)
                    print_row(workload, results[1:])

            trio.run(run)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except TransferError as exc:
        raise SystemExit(f"{type(exc).__name__}: {exc}") from None


def require_distribution() -> None:
    """Exit with advice when the distribution registry is not installed."""
    if shutil.which("docker-registry") is None:
        raise SystemExit("docker-registry is not on PATH: `apt-get install docker-registry`")


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    requests: int


async def measure(
    concurrency: int, transfer: Callable[[httpx.AsyncClient], Awaitable[object]]
) -> Run:
    """Time one transfer through a client like the library's own, counting its requests."""
    async with TransferClient(max_idle_connections=concurrency) as client:
        cpu, start = time.process_time(), time.perf_counter()
        await transfer(client)
        return Run(time.perf_counter() - start, time.process_time() - cpu, client.requests)


_COLUMNS = (
    ("workload", 12),
    ("MB/s", 9),
    ("blobs/s", 9),
    ("req/blob", 9),
    ("CPU ms/blob", 12),
    ("peak RSS MB", 12),
)


def print_header(title: str, runs: int) -> None:
    print(
        f"{title}; the median of {runs} runs after a warm-up, and the process's peak RSS so far",
        flush=True,
    )
    print(" ".join(f"{name:>{width}}" for name, width in _COLUMNS))


def print_row(workload: Workload, runs: list[Run]) -> None:
    """The median run (by wall time; the slower middle one of an even number) of ``runs``, and
    the process's peak RSS so far."""
    run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    total = workload.count * workload.size
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux
    values = (
        workload.label,
        f"{total / run.seconds / 1e6:.1f}",
        f"{workload.count / run.seconds:.0f}",
        f"{run.requests / workload.count:.2f}",
        f"{run.cpu_seconds * 1000 / workload.count:.3f}",
        f"{rss_mb:.1f}",
    )
    print(" ".join(f"{v:>{w}}" for v, (_, w) in zip(values, _COLUMNS, strict=True)), flush=True)
