"""trio_blobs side by side with curl and the other clients, on the distribution registry.

    python benchmarks/compare.py                                  # W1, W2, W3; 5 runs each
    python benchmarks/compare.py --runs 1 --workloads 50x64KiB,2x8MiB
    python benchmarks/compare.py --contenders trio_blobs,curl --directions download --json runs.json

It starts the distribution registry (``docker-registry``, filesystem storage in a temporary
directory, 127.0.0.1 only) and, for each workload, pushes seeded random blobs with an OCI image
manifest to a repository of their own. Then it runs every contender once to warm up and
``--runs`` counted rounds, each running every contender once, in an order that rotates from
round to round. Every run is a process of its own, started after ``os.sync()``, into a fresh
directory (download) or a fresh repository (upload), and is verified: each downloaded file's
sha256 must equal its blob's digest; each uploaded blob must answer ``HEAD`` with 200. A run
that fails or does not verify is reported, never dropped. Its files are then emptied, not
deleted, so that no run pays for the deletions of the runs before it (see ``_common.release``).

Contenders (one skipped, with the reason, when its program or package is missing):

- ``trio_blobs``: ``trio_blobs.download`` / ``upload`` with the library's defaults.
- ``curl``: ``curl --parallel --parallel-max 64`` GETs every blob into a file, no hashing (the
  download limit); uploads are parallel POSTs, then parallel PUTs of the files (the upload limit).
- ``oras-py``, ``python-dxf``: their public APIs, one blob after another (see ``_contender.py``).
- ``skopeo``: ``copy docker://... dir:...``, and ``copy --preserve-digests dir:... docker://...``
  (which also pushes the config blob and the manifest). Its blob-info cache would turn later
  uploads into cross-repository mounts, so each run gets an empty one: a private tmpfs over
  ``/var/lib/containers/cache`` (``unshare --mount``) as root, ``XDG_DATA_HOME`` otherwise.

Measured per run: wall time; MB/s (10^6 bytes) over the transfer, which for the Python
contenders is timed inside the child after its imports; the child's CPU seconds (``os.wait4``:
the process and its descendants) and its CPU during the transfer (Python contenders, measured
inside; the whole process for the others); its peak RSS (GNU ``time``'s ``%M``: the largest of
the process and its descendants); and the registry's CPU seconds (utime + stime from
``/proc/<pid>/stat`` before and after; the pid is found by scanning ``/proc`` for the
``docker-registry serve CONFIG`` whose configuration listens on the registry's port).

The tables give medians of the counted runs; rates come with their ratio to curl's median in
the same direction and workload. ``--json FILE`` writes every run, warm-ups included. The exit
status is 1 when a run failed, and 130 when Ctrl-C or SIGTERM stopped the comparison: the tables
and ``--json`` then hold the runs that finished.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import operator
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
from _common import (
    Workload,
    at_least_one,
    registry_url,
    release,
    require_distribution,
    stop_on_sigterm,
)

import trio_blobs
from trio_blobs import Blob

DEFAULT_WORKLOADS = "1000x64KiB,200x1MiB,4x128MiB"  # W1, W2, W3 in README.md
DIRECTIONS = ("download", "upload")
CHILD = Path(__file__).resolve().parent / "_contender.py"
TAG = "latest"
_MB = 10**6
_LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
_MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
_REASON_CHARS = 160
MAX_TIMEOUT = 1e6  # seconds: a run longer than 11 days is not a benchmark

# As root, skopeo's blob-info cache is /var/lib/containers/cache whatever the environment says:
# hide it behind a tmpfs in a private mount namespace (the nearest existing parent if absent).
_SKOPEO_ROOT_CACHE = (
    "for d in /var/lib/containers/cache /var/lib/containers /var/lib; do"
    ' [ -d "$d" ] && break; done; mount -t tmpfs tmpfs "$d" && exec "$@"'
)

# Parallel POSTs collect upload locations, then parallel PUTs send each file to one of them.
_CURL_UPLOAD = r"""set -eu
curl --parallel --parallel-max "$PARALLEL" --silent --show-error --fail --data-binary '' \
    --write-out '%header{location}\n' --config posts.cfg > locations
awk -v base="$BASE" '
    NR == FNR { location[FNR] = $0; next }
    {
        url = location[FNR]
        if (url ~ /^\//) url = base url
        printf "upload-file = \"%s\"\nurl = \"%s%sdigest=%s\"\noutput = \"/dev/null\"\n", \
            $2, url, (index(url, "?") ? "&" : "?"), $1
    }' locations blobs.list > puts.cfg
curl --parallel --parallel-max "$PARALLEL" --silent --show-error --fail --header 'Expect:' \
    --config puts.cfg
"""


@dataclass(frozen=True)
class Image:
    """A populated workload: its layers in ``repository``, as ``src/sha256-<hex>`` files, and
    as a skopeo ``dir:`` layout (``layout``, hard links named by hex)."""

    workload: Workload
    repository: str
    blobs: list[Blob]
    src: Path
    layout: Path


@dataclass(frozen=True)
class Target:
    """Where one run goes: ``repository`` is read (download) or created (upload); ``work`` is
    its scratch directory and ``out`` (inside it) a download's destination."""

    base_url: str
    image: Image
    repository: str
    work: Path
    parallel: int
    concurrency: int | None

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def out(self) -> Path:
        return self.work / "out"


@dataclass(frozen=True)
class Contender:
    """A client in one direction: ``command`` builds the run's argv (writing any files it
    needs into ``target.work``); ``file_name`` names a downloaded blob's file in ``out``."""

    name: str
    direction: str
    command: Callable[[Target], list[str]]
    file_name: Callable[[Blob], str] = operator.attrgetter("file_name")
    reports_timing: bool = False  # a Python child that times its transfer itself


@dataclass
class Run:
    """One run's measurements (``round`` 0 is the warm-up)."""

    contender: str
    direction: str
    workload: str
    round: int
    ok: bool
    error: str | None
    blobs: int
    bytes: int
    seconds: float
    wall_seconds: float
    mb_per_s: float | None
    client_cpu_seconds: float
    transfer_cpu_seconds: float
    peak_rss_mb: float
    registry_cpu_seconds: float | None


# -- contenders ------------------------------------------------------------------------------


def _hex(blob: Blob) -> str:
    return blob.digest.split(":", 1)[1]


def _quote(text: str) -> str:
    """A curl config file's double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _python_child(tool: str, direction: str) -> Callable[[Target], list[str]]:
    def command(target: Target) -> list[str]:
        spec = {
            "base_url": target.base_url,
            "host": target.host,
            "repository": target.repository,
            "blobs": [[blob.digest, blob.size] for blob in target.image.blobs],
            "src": os.fspath(target.image.src),
            "dest": os.fspath(target.out),
            "concurrency": target.concurrency,
        }
        path = target.work / "spec.json"
        path.write_text(json.dumps(spec))
        return [sys.executable, os.fspath(CHILD), tool, direction, os.fspath(path)]

    return command


def _curl_download(target: Target) -> list[str]:
    lines = []
    for blob in target.image.blobs:
        url = f"{target.base_url}/v2/{target.repository}/blobs/{blob.digest}"
        lines += [f"url = {_quote(url)}", f"output = {_quote(os.fspath(target.out / _hex(blob)))}"]
    config = target.work / "get.cfg"
    config.write_text("\n".join(lines) + "\n")
    parallel = ["--parallel", "--parallel-max", str(target.parallel)]
    return ["curl", *parallel, "--silent", "--show-error", "--fail", "--config", str(config)]


def _curl_upload(target: Target) -> list[str]:
    url = f"{target.base_url}/v2/{target.repository}/blobs/uploads/"
    blobs = target.image.blobs
    posts = "".join(f"url = {_quote(url)}\noutput = /dev/null\n" for _ in blobs)
    (target.work / "posts.cfg").write_text(posts)
    listing = "".join(f"{b.digest} {target.image.src / b.file_name}\n" for b in blobs)
    (target.work / "blobs.list").write_text(listing)
    script = target.work / "upload.sh"
    script.write_text(_CURL_UPLOAD)
    base, parallel = target.base_url, str(target.parallel)
    return ["env", f"BASE={base}", f"PARALLEL={parallel}", "sh", str(script)]


def _skopeo(direction: str) -> Callable[[Target], list[str]]:
    def command(target: Target) -> list[str]:
        image = f"docker://{target.host}/{target.repository}:{TAG}"
        if direction == "download":
            copy = ["--src-tls-verify=false", image, f"dir:{target.out}"]
        else:
            copy = ["--preserve-digests", "--dest-tls-verify=false", f"dir:{target.image.layout}"]
            copy.append(image)
        skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet", *copy]
        if os.geteuid() == 0:
            return ["unshare", "--mount", "sh", "-c", _SKOPEO_ROOT_CACHE, "skopeo", *skopeo]
        return ["env", f"XDG_DATA_HOME={target.work / 'xdg'}", *skopeo]

    return command


def _all_contenders() -> list[Contender]:
    found: list[Contender] = []
    for d in DIRECTIONS:
        curl = _curl_download if d == "download" else _curl_upload
        found += [
            Contender("trio_blobs", d, _python_child("trio_blobs", d), reports_timing=True),
            Contender("curl", d, curl, _hex),
            Contender("oras-py", d, _python_child("oras-py", d), reports_timing=True),
            Contender("python-dxf", d, _python_child("python-dxf", d), reports_timing=True),
            Contender("skopeo", d, _skopeo(d), _hex),
        ]
    return found


def _missing(contender: Contender) -> str | None:
    """Why ``contender`` cannot run here, or None."""
    needs = {"curl": ["curl"], "skopeo": ["skopeo"]}.get(contender.name, [])
    if contender.name == "curl" and contender.direction == "upload":
        needs += ["sh", "awk"]
    for program in needs:
        if shutil.which(program) is None:
            return f"`{program}` is not on PATH"
    module = {"oras-py": ("oras", "oras"), "python-dxf": ("dxf", "python-dxf")}.get(contender.name)
    if module and importlib.util.find_spec(module[0]) is None:
        return f"not installed (`pip install {module[1]}`)"
    if contender.name == "skopeo" and os.geteuid() == 0:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
        if probe.returncode != 0 and contender.direction == "upload":
            return "as root, needs `unshare --mount` to give each run an empty blob-info cache"
    return None


# -- the registry ----------------------------------------------------------------------------


def _registry_pid(base_url: str) -> int | None:
    """The pid of the ``docker-registry serve CONFIG`` whose configuration listens where
    ``base_url`` points, found in ``/proc``."""
    address = f"127.0.0.1:{urlsplit(base_url).port}"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) < 3 or Path(os.fsdecode(argv[0])).name != "docker-registry":
                continue
            config = json.loads(Path(os.fsdecode(argv[2])).read_text())
        except (OSError, ValueError):
            continue
        if argv[1] == b"serve" and config.get("http", {}).get("addr") == address:
            return int(entry.name)
    return None


def _cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of process ``pid`` so far, from ``/proc/<pid>/stat``."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _populate(root: Path, index: int, workload: Workload, base_url: str, seed: int) -> Image:
    """Write ``workload``'s blobs and push them with a config and an OCI image manifest."""
    src, layout = root / f"w{index}-src", root / f"w{index}-layout"
    src.mkdir()
    layout.mkdir()
    blobs = workload.write(src, seed=seed + index)
    rootfs = {"type": "layers", "diff_ids": [blob.digest for blob in blobs]}
    config_bytes = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()
    config = Blob.from_bytes(config_bytes)
    (src / config.file_name).write_bytes(config_bytes)

    def descriptor(media_type: str, blob: Blob) -> dict[str, object]:
        return {"mediaType": media_type, "digest": blob.digest, "size": blob.size}

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": _MANIFEST_TYPE,
            "config": descriptor(_CONFIG_TYPE, config),
            "layers": [descriptor(_LAYER_TYPE, blob) for blob in blobs],
        }
    ).encode()
    repository = f"compare/w{index}"

    async def push() -> None:
        await trio_blobs.upload(
            [*blobs, config],
            base_url=base_url,
            src_dir=src,
            repository=repository,
            manifest=manifest,
            manifest_ref=TAG,
        )

    trio.run(push)
    (layout / "version").write_text("Directory Transport Version: 1.1\n")
    (layout / "manifest.json").write_bytes(manifest)
    for blob in [*blobs, config]:
        os.link(src / blob.file_name, layout / _hex(blob))
    return Image(workload, repository, blobs, src, layout)


# -- one run ---------------------------------------------------------------------------------


@dataclass
class _Exit:
    status: int | None  # None: killed after the timeout
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str


@functools.cache
def _gnu_time() -> str | None:
    """GNU time's path: it reports its child's peak RSS unmixed with ours (see ``_execute``)."""
    path = shutil.which("time")
    return path if path and "GNU" in (_version([path, "--version"]) or "") else None


def _execute(argv: list[str], work: Path, timeout: float) -> _Exit:
    """Run ``argv`` in ``work`` as a process group of its own, killed after ``timeout`` s.

    CPU seconds (with its descendants') come from ``os.wait4``. Its ``ru_maxrss`` would count
    this harness's own RSS, inherited through fork up to exec, so peak RSS comes from GNU
    ``time`` run in between (a small process), when there is one.
    """
    out_path, err_path, rss_path = (work / f"child.{x}" for x in ("stdout", "stderr", "rss"))
    gnu_time = _gnu_time()
    if gnu_time:
        argv = [gnu_time, "--format=%M", f"--output={rss_path}", "--", *argv]
    lock, reaped, timed_out = threading.Lock(), threading.Event(), threading.Event()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work, start_new_session=True
        )

        def kill() -> None:
            with lock:
                if not reaped.is_set():  # the group is still ours
                    timed_out.set()
                    os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - start
            with lock:
                reaped.set()
                _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted: its session does not see the terminal's Ctrl-C
            with lock:
                if not reaped.is_set():
                    os.killpg(process.pid, signal.SIGKILL)
                    os.waitpid(process.pid, 0)
            raise
        finally:
            timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    rss_kib = usage.ru_maxrss  # KiB on Linux
    if gnu_time:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss_kib = int(rss_path.read_text().split()[-1])
    return _Exit(
        status=None if timed_out.is_set() else process.returncode,
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=rss_kib * 1024 / _MB,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def _verify_download(contender: Contender, target: Target) -> str | None:
    """None when every blob's file has the blob's sha256, else what is wrong."""
    bad = []
    for blob in target.image.blobs:
        path = target.out / contender.file_name(blob)
        try:
            with path.open("rb") as file:
                got = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
        except FileNotFoundError:
            bad.append(f"{path.name} missing")
            continue
        except OSError as exc:
            bad.append(f"{path.name}: {exc.strerror}")
            continue
        if got != blob.digest:
            bad.append(f"{path.name} has {got}")
    if bad:
        return f"{len(bad)} of {len(target.image.blobs)} files wrong (first: {bad[0]})"
    return None


def _verify_upload(target: Target) -> str | None:
    """None when every blob answers ``HEAD`` with 200 in the target repository."""
    bad = []
    try:
        with httpx.Client(base_url=target.base_url, trust_env=False, timeout=30) as client:
            for blob in target.image.blobs:
                status = client.head(f"/v2/{target.repository}/blobs/{blob.digest}").status_code
                if status != 200:
                    bad.append(f"{blob.digest[:19]}... HEAD {status}")
    except httpx.HTTPError as exc:
        return f"could not verify: {type(exc).__name__}: {exc}"
    if bad:
        return f"{len(bad)} of {len(target.image.blobs)} blobs absent (first: {bad[0]})"
    return None


def _failure(done: _Exit, timeout: float) -> str | None:
    if done.status is None:
        return f"timed out after {timeout:g} s"
    if done.status != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        return f"exit status {done.status}: {lines[-1][:_REASON_CHARS]}"
    return None


def run_once(
    contender: Contender, target: Target, registry_pid: int | None, round_: int, timeout: float
) -> Run:
    """Sync, run ``contender`` against ``target``, measure it and verify its result."""
    target.work.mkdir()
    target.out.mkdir()
    argv = contender.command(target)
    os.sync()
    registry_before = _cpu_seconds(registry_pid)
    done = _execute(argv, target.work, timeout)
    registry_after = _cpu_seconds(registry_pid)
    seconds, transfer_cpu = done.wall_seconds, done.cpu_seconds
    error = _failure(done, timeout)
    if error is None and contender.reports_timing:
        try:
            reported = json.loads(done.stdout.strip().splitlines()[-1])
            seconds, transfer_cpu = reported["seconds"], reported["cpu_seconds"]
        except (IndexError, ValueError, KeyError, TypeError):
            error = "the child did not report its timing"
    if error is None:
        if contender.direction == "download":
            error = _verify_download(contender, target)
        else:
            error = _verify_upload(target)
    release(target.work)
    image = target.image
    total = image.workload.count * image.workload.size
    registry_cpu = None
    if registry_before is not None and registry_after is not None:
        registry_cpu = registry_after - registry_before
    return Run(
        contender=contender.name,
        direction=contender.direction,
        workload=image.workload.label,
        round=round_,
        ok=error is None,
        error=error,
        blobs=image.workload.count,
        bytes=total,
        seconds=seconds,
        wall_seconds=done.wall_seconds,
        mb_per_s=total / seconds / _MB if error is None else None,
        client_cpu_seconds=done.cpu_seconds,
        transfer_cpu_seconds=transfer_cpu,
        peak_rss_mb=done.peak_rss_mb,
        registry_cpu_seconds=registry_cpu,
    )


# -- the report ------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cells(
    runs: list[Run], contenders: list[str], workloads: list[str], direction: str
) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str], list[str]]:
    """The rate and the resource cell of each (contender, workload), and the failure notes."""
    rates: dict[tuple[str, str], str] = {}
    usage: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    for run in runs:
        if run.direction == direction and not run.ok:
            kind = "warm-up" if run.round == 0 else f"round {run.round}"
            notes.append(f"{run.contender} {run.workload} {kind}: {run.error}")

    def counted(name: str, workload: str) -> list[Run]:
        return [
            r
            for r in runs
            if (r.direction, r.contender, r.workload) == (direction, name, workload) and r.round
        ]

    for workload in workloads:
        curl = _median([r.mb_per_s for r in counted("curl", workload) if r.ok])
        for name in contenders:
            these = counted(name, workload)
            ok = [r for r in these if r.ok]
            if not ok:
                first = next((r.error for r in these), "no run")
                rates[name, workload] = f"FAILED: {first}"[:60] if these else "-"
                usage[name, workload] = "-"
                continue
            rate = _median([r.mb_per_s for r in ok]) or 0.0
            ratio = f"{rate / curl:.2f}x" if curl else "n/a"
            failed = (
                f" [{len(these) - len(ok)}/{len(these)} FAILED]" if len(ok) < len(these) else ""
            )
            rates[name, workload] = f"{rate:.1f} ({ratio}){failed}"
            count = ok[0].blobs
            rss = _median([r.peak_rss_mb for r in ok]) or 0.0
            cpu = (_median([r.transfer_cpu_seconds for r in ok]) or 0.0) * 1000 / count
            registry = _median([r.registry_cpu_seconds for r in ok])
            registry_text = f"{registry * 1000 / count:.2f}" if registry is not None else "?"
            usage[name, workload] = f"{rss:.0f} / {cpu:.2f} / {registry_text}"
    return rates, usage, notes


def _table(
    title: str, cells: dict[tuple[str, str], str], rows: list[str], columns: list[str]
) -> str:
    lines = [title, "", "| contender | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cells.get((row, c), "-") for c in columns) + " |")
    return "\n".join(lines)


def report(runs: list[Run], contenders: list[Contender], workloads: list[str], rounds: str) -> str:
    """Markdown tables per direction: rates with their ratio to curl, then resources; ``rounds``
    says how many counted runs each median is of."""
    parts = []
    for direction in DIRECTIONS:
        names = [c.name for c in contenders if c.direction == direction]
        if not names:
            continue
        rates, usage, notes = _cells(runs, names, workloads, direction)
        parts.append(
            _table(
                f"{direction.capitalize()}: MB/s, median of {rounds} (ratio to curl's median)",
                rates,
                names,
                workloads,
            )
        )
        parts.append(
            _table(
                f"{direction.capitalize()}: peak RSS MB / client CPU ms per blob / "
                "registry CPU ms per blob (medians; the registry's CPU counts in 10 ms ticks)",
                usage,
                names,
                workloads,
            )
        )
        if notes:
            parts.append("Failed runs:\n" + "\n".join(f"- {note}" for note in notes))
    return "\n\n".join(parts)


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else None


def _package(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, object]:
    """Where and with what the numbers were taken."""
    cpu = ""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match[1] if match else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "trio_blobs": _package("trio_blobs"),
            "httpx": _package("httpx"),
            "trio": _package("trio"),
            "oras": _package("oras"),
            "python-dxf": _package("python-dxf"),
            "curl": _version(["curl", "--version"]),
            "skopeo": _version(["skopeo", "--version"]),
            "registry": _version(["docker-registry", "--version"]),
        },
    }


# -- main ------------------------------------------------------------------------------------


def _slug(contender: Contender) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{contender.name}-{contender.direction}".lower())


def _listing(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _workloads(text: str) -> list[Workload]:
    workloads = [Workload.parse(item) for item in _listing(text)]
    if not workloads:
        raise argparse.ArgumentTypeError("expected at least one COUNTxSIZE")
    return workloads


def _choices(allowed: Collection[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty selection from ``allowed``."""

    def parse(text: str) -> list[str]:
        chosen = _listing(text)
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"expected some of {','.join(sorted(allowed))}, got {text!r}"
            )
        return chosen

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds above 0, up to {MAX_TIMEOUT:g}, got {text!r}"
        )
    return value


def _json_path(text: str) -> Path:
    """Where ``--json`` goes: checked before hours of runs, not after (and neither emptied nor
    left behind, empty, if the runs never start)."""
    path = Path(text)
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror}") from None
    if not existed:
        path.unlink()
    return path


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workloads",
        type=_workloads,
        default=_workloads(DEFAULT_WORKLOADS),
        help=f"COUNTxSIZE,... (default {DEFAULT_WORKLOADS})",
    )
    p.add_argument(
        "--runs", type=at_least_one, default=5, help="counted rounds after a warm-up (5)"
    )
    names = sorted({c.name for c in _all_contenders()})
    p.add_argument(
        "--contenders", type=_choices(names), default=names, help=f"some of {','.join(names)} (all)"
    )
    p.add_argument(
        "--directions",
        type=_choices(DIRECTIONS),
        default=list(DIRECTIONS),
        help=f"some of {','.join(DIRECTIONS)} (both)",
    )
    p.add_argument("--parallel", type=at_least_one, default=64, help="curl's --parallel-max (64)")
    p.add_argument("--concurrency", type=at_least_one, help="trio_blobs' (default: the library's)")
    p.add_argument("--timeout", type=_seconds, default=1800, help="seconds per run (1800)")
    p.add_argument("--seed", type=int, default=0, help="of the random blobs (0)")
    p.add_argument("--json", type=_json_path, help="write every run and the machine here")
    p.add_argument("--tmpdir", type=_directory, help="for blobs and downloads (default: $TMPDIR)")
    return p


def _progress(run: Run) -> None:
    kind = "warm-up" if run.round == 0 else f"round {run.round}"
    result = f"{run.mb_per_s:8.1f} MB/s" if run.ok else f"FAILED: {run.error}"
    print(
        f"{run.direction:8} {run.workload:>12} {kind:>8} {run.contender:>11}: {result} "
        f"({run.seconds:.2f} s, {run.peak_rss_mb:.0f} MB)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def _scratch(parent: Path | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trio-blobs-compare-", dir=parent) as tmp:
        yield Path(tmp)


def main() -> None:
    args = _parser().parse_args()
    stop_on_sigterm()
    require_distribution()
    contenders, skipped = [], []
    for contender in _all_contenders():
        if contender.name in args.contenders and contender.direction in args.directions:
            reason = _missing(contender)
            if reason:
                skipped.append(f"{contender.name} {contender.direction}: skipped, {reason}")
            else:
                contenders.append(contender)
    if not _gnu_time():
        skipped.append("peak RSS: GNU time not found, so it includes this harness's own RSS")
    for note in skipped:
        print(note, file=sys.stderr)
    if not contenders:
        raise SystemExit("nothing to run: every contender chosen was skipped")
    meta = machine()
    runs: list[Run] = []
    interrupted = False
    try:
        with _scratch(args.tmpdir) as root, registry_url(None, "distribution") as base_url:
            registry_pid = _registry_pid(base_url)
            if registry_pid is None:
                skipped.append("registry CPU: docker-registry process not found in /proc")
            print(f"registry {base_url} (pid {registry_pid})", file=sys.stderr)
            for index, workload in enumerate(args.workloads):
                image = _populate(root, index, workload, base_url, args.seed)
                for round_ in range(args.runs + 1):
                    shift = round_ % len(contenders)
                    for contender in contenders[shift:] + contenders[:shift]:
                        slug = _slug(contender)
                        repository = image.repository
                        if contender.direction == "upload":
                            repository = f"compare/{slug}-w{index}-r{round_}"
                        work = root / f"run-{slug}-w{index}-r{round_}"
                        target = Target(
                            base_url, image, repository, work, args.parallel, args.concurrency
                        )
                        runs.append(run_once(contender, target, registry_pid, round_, args.timeout))
                        _progress(runs[-1])
                release(image.src)
                release(image.layout)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what finished
        interrupted = True
        skipped.append(f"interrupted after {len(runs)} runs: the tables have only those")
    labels = [w.label for w in args.workloads]
    versions = meta["versions"]
    assert isinstance(versions, dict)
    header = (
        f"{meta['date']}; {meta['cores']} cores ({meta['cpu']}), {meta['memory_gb']} GB, "
        f"Linux {meta['kernel']}, Python {meta['python']}; registry {versions['registry']}"
    )
    rounds = f"up to {args.runs}" if interrupted else str(args.runs)
    print(header + "\n\n" + report(runs, contenders, labels, rounds))
    if skipped:
        print("\n" + "\n".join(f"- {note}" for note in skipped))
    if args.json:
        document: dict[str, object] = {
            "machine": meta,
            "options": vars(args) | {"workloads": labels},
            "skipped": skipped,
            "runs": [asdict(run) for run in runs],
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if interrupted:
        raise SystemExit(130)
    if not all(run.ok for run in runs):
        raise SystemExit(1)  # reported above, run by run


if __name__ == "__main__":
    main()
