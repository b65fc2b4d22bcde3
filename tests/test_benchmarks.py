"""The benchmark scripts as a person runs them: usage errors, a failed run's exit status, and
SIGTERM leaving nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._real import require

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(
    script: str, *args: str, tmp: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"TMPDIR": str(tmp)},
        check=False,
    )


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("download.py", ["--runs", "0"], "--runs: expected a whole number of 1 or more"),
        ("upload.py", ["-w", "0x64KiB"], "at least 1 blob of 16 bytes"),
        ("upload.py", ["-w", "300x1b"], "at least 1 blob of 16 bytes"),
        ("upload.py", ["-w", "3x1tb"], "SIZE in b, kb, mb, gb, KiB, MiB or GiB"),
        ("download.py", ["--url", "127.0.0.1:5000"], "--url: expected http://"),
        ("download.py", ["--url", "http://"], "--url: expected http://"),
        ("download.py", ["--url", "http://127.0.0.1:99999"], "--url: expected a port in 1-65535"),
        ("compare.py", ["--timeout", "inf"], "seconds above 0, up to 1e+06"),
        ("compare.py", ["--directions", "down"], "expected some of download,upload"),
        ("compare.py", ["--contenders="], "--contenders: expected some of"),
        ("compare.py", ["--json", "/nonexistent/runs.json"], "cannot write /nonexistent"),
        ("compare.py", ["--timeout", "0"], "seconds above 0"),
    ],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, script: str, args: list[str], says: str
) -> None:
    done = _run(script, *args, tmp=tmp_path, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_a_json_file_named_for_runs_that_never_start_is_not_left_behind(tmp_path: Path) -> None:
    json_file = tmp_path / "runs.json"
    done = _run("compare.py", "--json", str(json_file), "--timeout", "0", tmp=tmp_path)
    assert done.returncode == 2
    assert not json_file.exists()


def test_a_failed_transfer_is_one_line_and_status_1(tmp_path: Path) -> None:
    done = _run(
        "download.py", "--url", "http://127.0.0.1:1", "-w", "2x1KiB", "--runs", "1", tmp=tmp_path
    )
    assert done.returncode == 1
    assert done.stderr.startswith("RetriesExhaustedError: ")
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_compare_exits_1_when_a_run_fails(tmp_path: Path) -> None:
    """A run killed by --timeout is reported in the table and makes the exit status 1."""
    require("docker-registry")
    done = _run(
        "compare.py",
        *("--contenders", "trio_blobs", "--directions", "download", "--runs", "1"),
        *("--workloads", "3x1KiB", "--timeout", "0.001"),
        tmp=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "FAILED: timed out after 0.001 s" in done.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_stops_a_benchmark_and_its_registry(tmp_path: Path, ctrl_c: bool) -> None:
    """SIGTERM, even to a process whose shell ignores SIGINT, ends the run as Ctrl-C does, and
    Ctrl-C (SIGINT to the whole process group, the registry child included) ends it quietly:
    the registry child stops and the temporary files go."""
    # Ctrl-C comes while blobs move (the registry child busy), SIGTERM while they are written.
    workload = ["-w", "300x64KiB", "--runs", "1000"] if ctrl_c else ["-w", "100000x1KiB"]
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "download.py"), *workload],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": ""},
        start_new_session=ctrl_c,  # a process group of its own, as a terminal's foreground job
        # As a shell starts a background job:
        preexec_fn=None if ctrl_c else lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # the header: the registry is up, the blobs are being written
        if ctrl_c:
            time.sleep(2)
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130
    assert stderr.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_the_registry_child_stops_when_the_benchmark_is_killed(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "download.py"), "-w", "100000x1KiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=os.environ | {"TMPDIR": str(tmp_path)},
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # the header: the registry child is up
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        [child] = [  # the registry's, beside multiprocessing's resource tracker
            Path(f"/proc/{pid}")
            for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        process.kill()  # no cleanup runs in the benchmark
        process.wait()
        deadline = time.monotonic() + 10
        while child.exists() and "Z" not in _state(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            assert not child.exists() or "Z" in _state(child)  # exited (perhaps not yet reaped)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child.name), signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()


def _state(process: Path) -> str:
    try:
        return (process / "stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"
