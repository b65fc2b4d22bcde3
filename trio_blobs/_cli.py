"""The ``trio-blobs`` command line: ``pull``, ``push``, ``serve`` and ``demo``.

Built on the library's public pieces (:func:`download`, :func:`upload`, :func:`fetch_manifest`,
:class:`Reference`, :class:`RegistryAuth`, :class:`trio_blobs.testing.Registry`). Results go to
stdout (one JSON line with ``--json``); progress goes to stderr, as a bar redrawn in place when
``rich`` is installed and stderr is a terminal, else as a plain line every few seconds. A failure
is explained in a few lines (no traceback unless ``-v``) and exits 1; SIGINT and SIGTERM cancel
the command cleanly and exit 130 and 143, except ``serve``, for which they are the normal end.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from ._auth_provider import RegistryAuth
from ._digest import Blob, Hasher, compute_digest, digest_to_path, path_to_digest
from ._download import download, hidden_file
from ._exceptions import (
    AuthenticationError,
    ConnectionFailedError,
    IntegrityError,
    LocalFileError,
    ProtocolError,
    RegistryError,
    RetriesExhaustedError,
    SlowTransferError,
    StallError,
    TransferError,
)
from ._manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    Manifest,
    Platform,
    PlatformNotFoundError,
    Reference,
    fetch_manifest,
)
from ._protocol import check_repository
from ._retry import RetryPolicy
from ._session import VERSION, TransferClient
from ._upload import DAMAGED, upload
from .testing import Registry

_T = TypeVar("_T")

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

__all__ = ["main"]

log = logging.getLogger("trio_blobs.cli")

PULL_CONCURRENCY = 64
PUSH_CONCURRENCY = 32
PLAIN_INTERVAL = 2.0  # seconds between plain progress lines
LARGEST_SHOWN = 3  # blobs in flight shown below the progress bar
ROW_AFTER = 1.0  # seconds a blob is in flight before it is shown there
SYNC_INTERVAL = 0.1  # seconds between choices of the blobs that get rows under the rich bar
SAVE_INTERVAL = 1.0  # seconds between saves of `serve --storage`
CHILD_TIMEOUT = 2.0  # seconds a child registry gets to exit
WAIT_NOTICE = 5.0  # seconds without a manifest (pull) or any answer (push) before a notice
MANIFEST_STALLS = 3  # stalled manifest requests in a row before a pull gives up
INCOMING = ".trio-blobs-incoming"  # an OCI layout's staging directory for downloads
REF_NAME = "org.opencontainers.image.ref.name"
STORAGE_INDEX = "repositories.json"
DEMO_REPOSITORY = "trio-blobs/demo"
DEMO_TENSOR = "application/vnd.trio-blobs.demo.tensor"
DEMO_CONFIG = "application/vnd.trio-blobs.demo.config.v1+json"
DEMO_VOCAB, DEMO_LAYERS = 32000, 24
DEMO_PIECE = 8 * 1024 * 1024  # bytes of a demo tensor made and written at a time
_ANY_SHA256 = "sha256:" + "0" * 64  # its path in a layout shows where sha256 blobs go
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
_SIZE_UNITS |= {"gib": 2**30}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trio-blobs`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        args = _parse(sys.argv[1:] if argv is None else argv)
        args.style = _style(args)
        _configure_logging(args)
        try:
            code: int = trio.run(_run, args)
        except Exception as exc:  # a bug: say so briefly, in full with -v
            if _interrupted(exc):
                return 130
            if args.verbose:
                traceback.print_exception(exc)
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            print(f"trio-blobs: unexpected error: {exc!r} (-v shows where)", file=sys.stderr)
            return 1
    except BaseException as exc:  # before the command runs, or a second Ctrl-C
        if _interrupted(exc):
            return 130
        raise
    return code


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is or holds a KeyboardInterrupt, or was raised while one was handled: a
    second Ctrl-C can reach tasks that are ending, or trio itself, wherever they are."""
    for link in _chain(exc):
        if isinstance(link, KeyboardInterrupt) or (
            isinstance(link, BaseExceptionGroup) and link.subgroup(KeyboardInterrupt) is not None
        ):
            return True
    return False


# -- arguments ---------------------------------------------------------------------------------


class _UsageError(SystemExit):
    """A usage error: exit status 2, with the message and the command it is about."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(2)
        self.command = prog.partition(" ")[2] or None
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, raising :class:`_UsageError` for a usage error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise _UsageError(self.prog, message)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments; a usage error exits 2 after saying why, in a JSON line too with
    ``--json``."""
    try:
        args = _parser().parse_args(argv)
        _check_args(args)
    except _UsageError as exc:
        if "--json" in argv:
            error = {"command": exc.command, "ok": False, "error": exc.message}
            print(json.dumps(error), flush=True)
        raise
    return args


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress, summary or 'serving' line (a --json line still comes)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON summary line")
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what happens beyond progress (tokens, retries, platform choices; for serve, "
        "each request); tracebacks on errors",
    )
    remote = _Parser(add_help=False)
    remote.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help=f"blobs in flight (default: {PULL_CONCURRENCY} pulling, {PUSH_CONCURRENCY} pushing)",
    )
    remote.add_argument(
        "--username", help="registry user (default: $TRIO_BLOBS_USERNAME; none: anonymous)"
    )
    remote.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (default: $TRIO_BLOBS_PASSWORD)",
    )
    insecure = _Parser(add_help=False)
    insecure.add_argument(
        "--insecure", action="store_true", help="plain HTTP (as does an http:// reference)"
    )
    reference_help = (
        "[http://][REGISTRY[:PORT]/]NAMESPACE/NAME[:TAG|@DIGEST]; a bare NAME means "
        "registry.ollama.ai/library/NAME:latest"
    )

    parser = _Parser(
        prog="trio-blobs",
        description="Move images and models between this machine and OCI / Docker registries.",
        epilog="Run 'trio-blobs COMMAND --help' for each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"trio-blobs {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, example: str, *parents: _Parser) -> Any:
        sub = commands.add_parser(
            name,
            parents=[*parents, common],
            help=summary,
            description=summary,
            epilog=example,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(parser=sub)
        return sub

    pull = command(
        "pull",
        "Download an image's manifest, config and layers into DIR.",
        "examples:\n"
        "  trio-blobs pull llama3.2 ~/.ollama/models\n"
        "  trio-blobs pull http://localhost:5000/library/model:v1 ./model --layout oci\n"
        "  trio-blobs pull ghcr.io/org/app:1.0 ./app --layout oci --platform linux/arm64",
        remote,
        insecure,
    )
    pull.add_argument("reference", metavar="REFERENCE", help=reference_help)
    pull.add_argument("dir", metavar="DIR", type=Path, help="where to store the image")
    pull.add_argument(
        "--layout",
        choices=("ollama", "oci"),
        help="ollama: blobs/sha256-<hex> and manifests/<registry>/<repository>/<tag>; "
        "oci: an OCI image layout (oci-layout, index.json, blobs/sha256/<hex>) "
        "(default: DIR's layout if it holds images, else ollama)",
    )
    pull.add_argument(
        "--platform",
        type=_platform,
        metavar="OS/ARCH[/VARIANT]",
        help=f"which image of a multi-platform index (default: this machine's, "
        f"{Platform.current()})",
    )
    pull.set_defaults(handler=_pull)

    push = command(
        "push",
        "Upload an image from DIR (either layout) to a registry; blobs it has are skipped.",
        "examples:\n"
        "  trio-blobs push ~/.ollama/models http://localhost:5000/me/llama3.2:latest\n"
        "  trio-blobs push ./app registry.example.com/org/app:1.0 --mount-from org/base",
        remote,
        insecure,
    )
    push.add_argument("dir", metavar="DIR", type=Path, help="an ollama model store or OCI layout")
    push.add_argument("reference", metavar="REFERENCE", help=reference_help)
    push.add_argument(
        "--image",
        metavar="NAME",
        help="which image of DIR (default: the only one, or the one named like REFERENCE)",
    )
    push.add_argument(
        "--mount-from",
        type=_repository,
        metavar="REPO",
        help="mount blobs from this repository of the same registry instead of uploading them",
    )
    push.set_defaults(handler=_push)

    serve = command(
        "serve",
        "Run the in-process test registry on a loopback port until Ctrl-C.",
        "example:\n"
        "  trio-blobs serve --port 5000 --storage ./registry-data\n"
        "  trio-blobs push ./model http://127.0.0.1:5000/me/model:v1   # in another shell",
    )
    serve.add_argument(
        "--port", type=_port, default=5000, help="port on 127.0.0.1 (default 5000; 0: any free)"
    )
    serve.add_argument(
        "--storage",
        type=Path,
        metavar="DIR",
        help="load the registry's content from DIR and save it there (default: memory only)",
    )
    serve.set_defaults(handler=_serve)

    demo = command(
        "demo",
        "Push a synthetic tensor model to a registry, pull it back, verify it, show the speed.",
        "examples:\n"
        "  trio-blobs demo                     # against an embedded registry\n"
        "  trio-blobs demo --size 1GB\n"
        "  trio-blobs demo --url http://localhost:5000",
        remote,
    )
    demo.add_argument(
        "--url",
        type=_url,
        help="registry to use, where the demo writes trio-blobs/demo:latest (default: start an "
        "embedded one on loopback)",
    )
    demo.add_argument(
        "--size",
        type=_size_arg,
        default=300 * 10**6,
        help="about how big a model to make (default 300MB; 1.2MB at least)",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (0-65535), got {text!r}")
    return int(text)


def _platform(text: str) -> Platform:
    try:
        return Platform.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _repository(text: str) -> str:
    try:
        return check_repository(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _url(text: str) -> str:
    if not re.fullmatch(r"https?://[^/\s]+/?", text):
        raise argparse.ArgumentTypeError(f"expected http(s)://HOST[:PORT], got {text!r}")
    url = text.rstrip("/")
    try:
        Reference.parse(f"{url}/{DEMO_REPOSITORY}")  # where the demo will write
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return url


def _size_arg(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 300MB or 2GiB, got {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])


def _check_args(args: argparse.Namespace) -> None:
    """Parse the reference and gather credentials; a problem is a usage error (exit 2)."""
    parser: argparse.ArgumentParser = args.parser
    if "reference" in args:
        try:
            args.reference = Reference.parse(args.reference, insecure=args.insecure)
        except ValueError as exc:
            parser.error(f"bad reference {args.reference!r}: {exc}")
    if "username" in args:
        username = args.username or os.environ.get("TRIO_BLOBS_USERNAME") or None
        if args.password_stdin:
            if username is None:
                parser.error("--password-stdin needs --username (or TRIO_BLOBS_USERNAME)")
            password = sys.stdin.read().rstrip("\r\n")
            if not password:
                parser.error("the password read from stdin is empty")
        else:
            password = os.environ.get("TRIO_BLOBS_PASSWORD") if username else None
        if username is not None and not password:
            parser.error("--username needs --password-stdin (or TRIO_BLOBS_PASSWORD)")
        args.username, args.password = username, password


def _style(args: argparse.Namespace) -> str:
    """How to show progress: ``rich`` on a terminal if rich is installed, else ``plain``
    lines, or ``off`` when quiet."""
    if args.quiet:
        return "off"
    try:
        from rich.console import Console
    except ImportError:
        return "plain"
    return "rich" if Console(stderr=True).is_terminal else "plain"


def _configure_logging(args: argparse.Namespace) -> None:
    if not args.verbose:
        return
    handler: logging.Handler
    if args.style == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    handler.addFilter(_escape_record)
    logging.basicConfig(
        level=logging.INFO if args.verbose == 1 else logging.DEBUG, handlers=[handler]
    )


def _escape_record(record: logging.LogRecord) -> bool:
    """Log a registry's words (in retry messages, say) with their control characters escaped."""
    record.msg, record.args = _shown(record.getMessage()), None
    return True


# -- running a command, and its failures ---------------------------------------------------------


class _Failure(Exception):
    """A failure the command line finds itself: what went wrong, what it means, what to try."""

    def __init__(self, message: str, meaning: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.meaning = meaning
        self.hint = hint


async def _run(args: argparse.Namespace) -> int:
    """Run the command; the first SIGINT or SIGTERM cancels it (exit 130 or 143), or ends
    ``serve``, which runs until then, normally (exit 0 unless it failed meanwhile)."""
    codes: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(_cancel_on_signal, nursery.cancel_scope, codes)
        codes.append(await _command(args))
        nursery.cancel_scope.cancel()
    if args.command == "serve":
        return codes[-1] if codes[-1] < 128 else 0
    if codes[0] > 128:
        if not args.quiet:
            print("trio-blobs: interrupted", file=sys.stderr)
        _emit_json(args, {"ok": False, "error": "interrupted"})
    return codes[0]


async def _cancel_on_signal(
    scope: trio.CancelScope,
    codes: list[int],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            codes.append(128 + signum)
            scope.cancel()
            return


async def _command(args: argparse.Namespace) -> int:
    try:
        code: int = await args.handler(args)
    except (TransferError, _Failure, OSError) as exc:
        _report(args, exc)
        return 1
    return code


def _report(args: argparse.Namespace, exc: TransferError | _Failure | OSError) -> None:
    """Explain a failure on stderr: what failed, the registry's answer, what it means, what
    to try; a traceback only with ``-v``."""
    if args.verbose:
        traceback.print_exception(exc)
    if args.command == "pull":
        headline = f"could not pull {args.reference}"
    elif args.command == "push":
        headline = f"could not push {args.dir} to {args.reference}"
    else:
        headline = f"{args.command} failed"
    message = exc.message if isinstance(exc, TransferError | _Failure) else str(exc)
    where = {"digest": exc.digest, "url": exc.url} if isinstance(exc, TransferError) else {}
    known = {key: value for key, value in where.items() if value}
    meaning, hint = _advice(exc)
    if args.command == "demo":  # it has --url, neither a reference nor --insecure
        hint = hint.replace(_PLAIN_HTTP, "an http:// --url")
    lines = [f"trio-blobs: {headline}", message, *(f"{k}: {v}" for k, v in known.items())]
    parts = [*lines, meaning, f"Try: {hint}"]  # a registry's words among them
    print("\n  ".join(_shown(part) for part in parts), file=sys.stderr)
    record: dict[str, object] = {"ok": False, "error": message, **known}
    cause = exc.last_error if isinstance(exc, RetriesExhaustedError) else exc
    if isinstance(cause, RegistryError):
        record |= {"status": cause.status, "code": cause.code}
    _emit_json(args, record)


_PLAIN_HTTP = "an http:// reference or --insecure"  # in hints; demo's differ
_REGISTRY_ADVICE = {
    "MANIFEST_UNKNOWN": (
        "The repository has no manifest with that tag or digest.",
        "check the tag (tags are case-sensitive) or the digest.",
    ),
    "NAME_UNKNOWN": (
        "The registry has no repository of that name.",
        "check the name; a bare NAME means registry.ollama.ai/library/NAME.",
    ),
    "BLOB_UNKNOWN": (
        "The registry lacks a blob that the image lists.",
        "the image is incomplete on the registry: push it again.",
    ),
    "MANIFEST_BLOB_UNKNOWN": (
        "The registry refused the manifest: it lists blobs the repository does not have.",
        "run the push again.",
    ),
    "MANIFEST_INVALID": (
        "The registry refused the manifest as invalid.",
        "check the image in DIR; -v shows details.",
    ),
    403: (
        "Access denied: these credentials may not do this in this repository.",
        "check the repository name and your account's permissions.",
    ),
    404: (
        "The registry has nothing at that address.",
        "check the registry, the name and the tag.",
    ),
    429: (
        "The registry is limiting the rate of requests.",
        "wait a while, or lower --concurrency.",
    ),
    500: ("The registry failed to answer.", "try again later."),
}
_ADVICE: list[tuple[tuple[type[Exception], ...], str, str]] = [
    (
        (AuthenticationError,),
        "The registry wants credentials, or refused the ones given.",
        "pass --username with --password-stdin (or set TRIO_BLOBS_USERNAME and "
        "TRIO_BLOBS_PASSWORD), and check them.",
    ),
    (
        (ConnectionFailedError,),
        "The registry could not be reached, or the connection dropped.",
        f"check the address and that the registry is up; a plain-HTTP registry needs "
        f"{_PLAIN_HTTP}.",
    ),
    (
        (StallError, SlowTransferError),
        "The transfer stopped making progress.",
        "check the network and run the command again: finished blobs are kept.",
    ),
    (
        (IntegrityError,),
        "What arrived does not match its digest or size: the registry, a proxy or the disk "
        "corrupted it, or the manifest gives a wrong size.",
        "run the command again; if it keeps failing, the registry holds a broken blob.",
    ),
    (
        (LocalFileError,),
        "A local file could not be read or written.",
        "check free space and permissions; for a push, that DIR holds the whole image.",
    ),
    (
        (ProtocolError,),
        "The registry answered in a way no client should accept.",
        "run with -v for details, and tell the registry's operator.",
    ),
]


def _advice(exc: BaseException) -> tuple[str, str]:
    """What ``exc`` means for the person at the terminal, and what to try."""
    if isinstance(exc, RetriesExhaustedError):
        exc = exc.last_error
    if isinstance(exc, _Failure):
        return exc.meaning, exc.hint
    tls = next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)
    if isinstance(exc, ConnectionFailedError) and tls is not None:
        return (
            f"The TLS handshake with the registry failed ({tls.reason or tls}).",
            f"is this a plain-HTTP registry? Use {_PLAIN_HTTP}.",
        )
    if isinstance(exc, PlatformNotFoundError):
        choices = " or ".join(f"--platform {p}" for p in exc.available[:3])
        return "The image is not published for that platform.", f"{choices or 'another image'}."
    if isinstance(exc, RegistryError) and not isinstance(exc, AuthenticationError):
        status = 500 if exc.status >= 500 else exc.status
        return _REGISTRY_ADVICE.get(exc.code or "") or _REGISTRY_ADVICE.get(
            status, ("The registry refused the request.", "run with -v for details.")
        )
    if isinstance(exc, LocalFileError) and exc.message.endswith(DAMAGED):
        return (
            "A file in DIR is damaged: a pull skips files of the right size without reading them.",
            "delete that file, pull the image again, then push.",
        )
    for kinds, meaning, hint in _ADVICE:
        if isinstance(exc, kinds):
            return meaning, hint
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "Another program uses that port.", "pick another --port, or --port 0 for a free one."
    return "A local file or resource could not be used.", "check the path and its permissions."


def _shown(text: str) -> str:
    """``text`` with its control characters (line breaks too) escaped, as Python writes them:
    what a registry or DIR says is shown, never obeyed by the terminal."""
    return _CONTROL.sub(lambda match: repr(match[0])[1:-1], text)


def _warn(text: str) -> None:
    print(f"trio-blobs: warning: {text}", file=sys.stderr, flush=True)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling, innermost last (httpcore
    re-raises ``from None``, so a suppressed context counts too)."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _say(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or args.json):
        print(text, flush=True)


def _emit_json(args: argparse.Namespace, record: dict[str, object]) -> None:
    if args.json:
        print(json.dumps({"command": args.command, **record}), flush=True)


# -- progress ----------------------------------------------------------------------------------


class _Progress:
    """One transfer's progress on stderr: bytes done and total, speed, ETA, blobs done and
    total, and the few largest blobs that have been in flight for over a second.

    A rich bar redrawn in place (style ``rich``), a line every few seconds (``plain``), or
    nothing (``off``). Use it as a context manager; pass it as ``progress=`` and its
    :meth:`blob` as ``blob_progress=``.

    Events update the bar in place, which costs microseconds; which blobs have rows is decided
    at most every :data:`SYNC_INTERVAL`, as adding a row draws the whole bar at once (about a
    millisecond), and a pull of many small blobs reports thousands of events a second.
    """

    def __init__(self, label: str, *, total: int, blobs: int, style: str) -> None:
        self._label = label
        self._blobs = blobs
        self._style = style
        self._started = self._last_time = self._next_sync = time.monotonic()
        self._last_done = 0
        self._finished: set[str] = set()
        # digest -> (size, bytes so far, when its first bytes were reported)
        self._flying: dict[str, tuple[int, int, float]] = {}
        self._rows: dict[str, TaskID] = {}  # rich rows of the blobs shown below the bar
        self._bar: RichProgress | None = None
        if style == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[blobs]}"),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(label, total=total, blobs=self._count())

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _count(self) -> str:
        return f"{len(self._finished)}/{self._blobs} blobs"

    def _largest(self, now: float) -> list[tuple[str, int, int]]:
        """Up to three blobs in flight for over :data:`ROW_AFTER`, largest first: (digest,
        size, bytes so far)."""
        since = now - ROW_AFTER
        shown = sorted(
            (item for item in self._flying.items() if item[1][2] <= since),
            key=lambda item: -item[1][0],
        )
        return [(digest, size, done) for digest, (size, done, _) in shown[:LARGEST_SHOWN]]

    def blob(self, blob: Blob, done: int) -> None:
        """``done`` bytes of ``blob`` moved; ``blob.size`` means it is finished."""
        now = time.monotonic()
        finished = done >= blob.size
        if finished:
            self._flying.pop(blob.digest, None)
            self._finished.add(blob.digest)
        else:
            self._finished.discard(blob.digest)
            flying = self._flying.get(blob.digest)
            self._flying[blob.digest] = (blob.size, done, now if flying is None else flying[2])
        if self._bar is None:
            return
        row = self._rows.get(blob.digest)
        if row is not None and finished:
            self._bar.remove_task(self._rows.pop(blob.digest))
        elif row is not None:
            self._bar.update(row, completed=done)
        self._bar.update(self._task, blobs=self._count())
        if now >= self._next_sync:
            self._sync(now)

    def __call__(self, completed: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total)
            return
        now = time.monotonic()
        if self._style != "plain" or now - self._last_time < PLAIN_INTERVAL:
            return
        rate = max(0, completed - self._last_done) / (now - self._last_time)
        average = completed / (now - self._started)
        eta = f"{(total - completed) / average:.0f} s" if average > 0 else "unknown"
        percent = 100 * completed / total if total else 100.0
        flying = ", ".join(
            f"{digest[:19]} {100 * so_far / size:.0f}% of {_size(size)}"
            for digest, size, so_far in self._largest(now)
        )
        print(
            f"{self._label}: {percent:3.0f}%  {_size(completed)} of {_size(total)}  "
            f"{_size(rate)}/s  ETA {eta}  {self._count()}"
            + (f"  (largest in flight: {flying})" if flying else ""),
            file=sys.stderr,
            flush=True,
        )
        self._last_time, self._last_done = now, completed

    def _sync(self, now: float) -> None:
        """Give rows to the largest blobs in flight for over a second, in place of others."""
        assert self._bar is not None
        self._next_sync = now + SYNC_INTERVAL
        shown = {digest: (size, done) for digest, size, done in self._largest(now)}
        for digest in [d for d in self._rows if d not in shown]:
            self._bar.remove_task(self._rows.pop(digest))
        for digest, (size, done) in shown.items():
            if digest not in self._rows:  # add_task draws the bar at once: rows change only here
                self._rows[digest] = self._bar.add_task(
                    f"  {digest[:19]}", total=size, completed=done, blobs=""
                )


def _plural(count: int, noun: str) -> str:
    """``1 blob``, ``2 blobs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _size(nbytes: float) -> str:
    """``1234567`` -> ``1.2 MB``."""
    value, units = float(nbytes), ["B", "kB", "MB", "GB", "TB"]
    while abs(value) >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{value:.0f} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


# -- layouts -----------------------------------------------------------------------------------


def _write_hidden(beside: Path, pieces: Iterable[bytes], hasher: Hasher | None = None) -> Path:
    """A new hidden file beside ``beside`` (whose directory is made if missing) that holds
    ``pieces``, each given to ``hasher`` too; removed again if writing fails."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    fd, name = hidden_file(beside)
    try:
        with os.fdopen(fd, "wb") as file:
            for piece in pieces:
                if hasher is not None:
                    hasher.update(piece)
                file.write(piece)
    except BaseException:
        name.unlink(missing_ok=True)
        raise
    return name


def _rename(name: Path, path: Path) -> None:
    """Give the written hidden file ``name`` its final name ``path`` (or remove it)."""
    try:
        os.replace(name, path)
    except BaseException:
        name.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that it never exists half-written."""
    _rename(_write_hidden(path, [data]), path)


def _has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except (FileNotFoundError, NotADirectoryError):
        return False


class _Layout(abc.ABC):
    """An image store in a directory: where a pull puts blobs and manifests, and where a push
    finds them. Blobs are verified before they get their final names, so a file there with the
    right size is the blob."""

    kind: str

    def __init__(self, root: Path) -> None:
        self.root = root

    @abc.abstractmethod
    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` is kept."""

    def missing(self, blobs: Sequence[Blob]) -> list[Blob]:
        """The ``blobs`` not kept here yet."""
        return [blob for blob in blobs if not _has(self.blob_path(blob.digest), blob.size)]

    @abc.abstractmethod
    def receiving(self) -> contextlib.AbstractContextManager[Path]:
        """A directory that :func:`download` may fill with ``sha256-<hex>`` files; on exit
        they are kept here, whether the download finished or not."""

    @abc.abstractmethod
    def sending(self, blobs: Sequence[Blob]) -> contextlib.AbstractContextManager[Path]:
        """A directory where :func:`upload` finds ``blobs`` as ``sha256-<hex>`` files."""

    @abc.abstractmethod
    def store(self, ref: Reference, manifest: Manifest) -> Manifest:
        """Record ``manifest`` under ``ref`` (its blobs are here already); return it as
        stored."""

    @abc.abstractmethod
    def images(self) -> list[str]:
        """The names of the images kept here."""

    @abc.abstractmethod
    def load(self, name: str) -> Manifest:
        """The manifest of the image ``name``."""

    def _directory(self, directory: Path) -> Path:
        """``directory``, below the root, with no symbolic link on the way there: nothing is
        written outside DIR (nor moved out of another directory)."""
        current = self.root
        for part in directory.relative_to(self.root).parts:
            current /= part
            if current.is_symlink():
                raise _Failure(
                    f"{current} is a symbolic link",
                    "trio-blobs writes nothing outside DIR, and this link leads out of it.",
                    "replace the link with a directory, or give the directory it points to as DIR.",
                )
        return directory

    def _inside(self, path: Path) -> Path:
        """``path``, below the root, once its directory is there (see :meth:`_directory`)."""
        self._directory(path.parent).mkdir(parents=True, exist_ok=True)
        return path

    def _parse(self, data: bytes, media_type: str | None, name: str) -> Manifest:
        try:
            return Manifest.parse(data, media_type=media_type)
        except ValueError as exc:
            raise _Failure(
                f"{name} in {self.root} is not a usable manifest: {exc}",
                "The image in DIR is damaged.",
                "pull it again.",
            ) from exc


class _OllamaLayout(_Layout):
    """``blobs/sha256-<hex>`` and ``manifests/<registry>/<repository>/<tag>``, as ollama keeps
    its models."""

    kind = "ollama"

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest_to_path(digest)

    @contextlib.contextmanager
    def receiving(self) -> Iterator[Path]:
        yield self._directory(self.root / "blobs")

    @contextlib.contextmanager
    def sending(self, blobs: Sequence[Blob]) -> Iterator[Path]:
        yield self.root / "blobs"

    def store(self, ref: Reference, manifest: Manifest) -> Manifest:
        name = ref.tag or digest_to_path(manifest.digest)
        path = self.root / "manifests" / ref.registry / ref.repository / name
        _write_atomic(self._inside(path), manifest.data)
        return manifest

    def images(self) -> list[str]:
        base = self.root / "manifests"
        return sorted(
            f"{path.parent.relative_to(base).as_posix()}:{path.name}"
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        )

    def load(self, name: str) -> Manifest:
        directory, _, tag = name.rpartition(":")
        return self._parse((self.root / "manifests" / directory / tag).read_bytes(), None, name)


class _OciLayout(_Layout):
    """An OCI image layout: ``oci-layout``, ``index.json`` and ``blobs/<algorithm>/<hex>``.

    Downloads land in a staging directory (:data:`INCOMING`) as ``sha256-<hex>`` files and
    are renamed into ``blobs/`` when the download ends, however it ends; uploads read symlinks
    named ``sha256-<hex>`` in a directory of the system's temporary directory. Docker schema 2
    manifests are stored converted to OCI ones.
    """

    kind = "oci"

    def blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest_to_path(digest).partition("-")
        return self.root / "blobs" / algorithm / encoded

    @contextlib.contextmanager
    def receiving(self) -> Iterator[Path]:
        staging = self._directory(self.root / INCOMING)
        try:
            yield staging
        finally:
            if staging.is_dir() and not staging.is_symlink():
                for path in staging.iterdir():
                    if path.is_symlink() or not path.is_file():
                        continue  # not a blob a download put there
                    with contextlib.suppress(ValueError):  # not a finished blob: leave it
                        target = self._inside(self.blob_path(path_to_digest(path.name)))
                        with contextlib.suppress(FileNotFoundError):  # another pull moved it
                            os.replace(path, target)
                with contextlib.suppress(OSError):
                    staging.rmdir()

    @contextlib.contextmanager
    def sending(self, blobs: Sequence[Blob]) -> Iterator[Path]:
        # In the system's temporary directory: a push never writes to DIR (it may be read-only).
        with tempfile.TemporaryDirectory(prefix="trio-blobs-outgoing-") as staging:
            for blob in blobs:
                os.symlink(self.blob_path(blob.digest).resolve(), Path(staging, blob.file_name))
            yield Path(staging)

    def store(self, ref: Reference, manifest: Manifest) -> Manifest:
        """As :meth:`_Layout.store`; a tag names one image (another with the tag is replaced,
        with a warning, as skopeo does) and a digest is listed once."""
        manifest = manifest.as_oci()  # other tools only read OCI manifests from a layout
        _write_atomic(self._inside(self.blob_path(manifest.digest)), manifest.data)
        if not (self.root / "oci-layout").exists():
            _write_atomic(self.root / "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        entries = self._entries()
        entry: dict[str, object] = {
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": len(manifest.data),
        }
        if ref.tag:
            entry["annotations"] = {REF_NAME: ref.tag}
            for old in entries:
                if self._name(old) == ref.tag and old["digest"] != manifest.digest:
                    _warn(
                        f"{ref} replaces the image tagged {ref.tag} ({old['digest']}) "
                        f"in {self.root / 'index.json'}"
                    )
        elif any(e["digest"] == manifest.digest for e in entries):
            return manifest  # listed already
        # Entries named like the new one: by its tag, or untagged with its digest.
        kept = [e for e in entries if self._name(e) not in (ref.tag, manifest.digest)]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*kept, entry]}
        _write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())
        return manifest

    def images(self) -> list[str]:
        return [self._name(entry) for entry in self._entries()]

    def load(self, name: str) -> Manifest:
        entry = next(e for e in self._entries() if self._name(e) == name)
        data = self.blob_path(entry["digest"]).read_bytes()
        if compute_digest(data, entry["digest"].partition(":")[0]) != entry["digest"]:
            raise _Failure(
                f"{name}'s manifest in {self.root} does not match its digest",
                "The image in DIR is damaged.",
                "pull it again.",
            )
        return self._parse(data, entry.get("mediaType"), name)

    @staticmethod
    def _name(entry: dict[str, Any]) -> str:
        """An entry's tag, or its digest when it has none."""
        return str((entry.get("annotations") or {}).get(REF_NAME) or entry["digest"])

    def _entries(self) -> list[dict[str, Any]]:
        path = self.root / "index.json"
        if not path.exists():
            return []
        try:
            entries = json.loads(path.read_bytes())["manifests"]
            for entry in entries:
                Blob(entry["digest"], entry["size"])
                if not isinstance(entry.get("annotations") or {}, dict):
                    raise TypeError(f"annotations of {entry['digest']} are not an object")
                if not isinstance(entry.get("mediaType", ""), str):
                    raise TypeError(f"mediaType of {entry['digest']} is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise _Failure(
                f"{path} is not an OCI image index: {exc!r}",
                "DIR is not an OCI image layout trio-blobs can use.",
                "pick another DIR, or repair index.json.",
            ) from exc
        return list(entries)


_LAYOUTS: dict[str, type[_Layout]] = {"ollama": _OllamaLayout, "oci": _OciLayout}


def _find_layout(root: Path) -> _Layout | None:
    """The layout of the image store in ``root``, if there is one (an OCI layout's first pull,
    interrupted, left blobs but no ``oci-layout`` yet)."""
    if any(path.exists() for path in (root / "oci-layout", root / INCOMING, root / "blobs/sha256")):
        return _OciLayout(root)
    if (root / "manifests").is_dir():
        return _OllamaLayout(root)
    return None


def _pull_layout(root: Path, kind: str | None) -> _Layout:
    """Where a pull into ``root`` goes: the store there, which ``kind`` (``--layout``) must
    not contradict, else a new store of ``kind`` (ollama by default)."""
    if root.exists() and not root.is_dir():
        raise _Failure(
            f"{root} is not a directory",
            "DIR is the directory the image is stored in (made if missing).",
            "pick another DIR.",
        )
    found = _find_layout(root)
    if found is None:
        return _LAYOUTS[kind or "ollama"](root)
    if kind not in (None, found.kind):
        raise _Failure(
            f"{root} holds an {found.kind} image store, not an {kind} one",
            "A directory keeps images in one layout.",
            f"leave out --layout to pull into the {found.kind} store, or pick another DIR.",
        )
    return found


def _open_layout(root: Path) -> _Layout:
    """The layout of an existing image store that holds an image."""
    if not root.is_dir():
        raise _Failure(
            f"{root}: no such directory" if not root.exists() else f"{root} is not a directory",
            "DIR is the directory the image was pulled into.",
            "check the path.",
        )
    if (found := _find_layout(root)) and found.images():
        return found
    raise _Failure(
        f"no image in {root}",
        "DIR must be an ollama model store (blobs/, manifests/) or an OCI image layout "
        "(oci-layout, index.json, blobs/).",
        "pull an image into it first, or pick the right directory.",
    )


def _choose_image(layout: _Layout, ref: Reference, wanted: str | None) -> str:
    """The image of ``layout`` to push as ``ref``: the one named ``wanted`` (``--image``), else
    the only one, else the one with ``ref``'s digest, or named like ``ref``: by repository and
    tag, else by the repository's last component and tag (an ollama store's names say
    ``registry.ollama.ai/library/NAME:TAG`` whatever the registry pushed to)."""
    names = layout.images()
    if wanted:
        found = [n for n in names if n == wanted or n.endswith(f"/{wanted}")]
    elif len(names) == 1:
        found = names
    elif ref.tag is None:  # the same manifest under several names is still one image
        found = [n for n in names if layout.load(n).digest == ref.digest][:1]
    else:
        last = ref.repository.rpartition("/")[2]
        found = [n for n in names if n == ref.tag or n.endswith(f"/{ref.repository}:{ref.tag}")]
        found = found or [n for n in names if n.endswith(f"/{last}:{ref.tag}")]
    if len(found) == 1:
        return found[0]
    match = f"{len(found)} of them match" if found else "none matches"
    raise _Failure(
        f"{layout.root} holds {_plural(len(names), 'image')}; {match} "
        f"{f'--image {wanted}' if wanted else ref}: {', '.join(names)}",
        "It is not clear which image to push.",
        "give --image one of the names listed." if wanted else "name it with --image NAME.",
    )


# -- pull and push -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stats:
    """What one pull or push did."""

    digest: str  # the manifest's
    stored_digest: str | None  # a pull's manifest as stored: an OCI layout converts Docker ones
    blobs: int
    bytes: int
    transferred: int  # blobs sent or received
    transferred_bytes: int
    mounted: int
    seconds: float
    requests: int

    def rate(self) -> str:
        return f"{_size(self.transferred_bytes / max(self.seconds, 1e-9))}/s"


@dataclass
class _Remote:
    """What one command's requests share: the client, credentials, limits, progress style."""

    client: TransferClient  # counts the requests sent
    auth: RegistryAuth
    concurrency: int | None
    style: str


@contextlib.asynccontextmanager
async def _connect(args: argparse.Namespace, base_url: str) -> AsyncIterator[_Remote]:
    concurrency = args.concurrency or PULL_CONCURRENCY
    async with TransferClient(max_idle_connections=concurrency) as client:
        yield _Remote(
            client,
            RegistryAuth(base_url, args.username, args.password),
            args.concurrency,
            args.style,
        )


async def _fetch_manifest(remote: _Remote, ref: Reference, platform: Platform | None) -> Manifest:
    """``ref``'s manifest. A registry that has not given it after :data:`WAIT_NOTICE` seconds
    is said to be waited for, and one that stalls :data:`MANIFEST_STALLS` times in a row is
    given up on (nothing else shows that the command is waiting)."""
    fetching = fetch_manifest(
        base_url=ref.base_url,
        repository=ref.repository,
        reference=ref.manifest_ref,
        platform=platform,
        client=remote.client,
        get_token=remote.auth,
        retry=RetryPolicy(max_stalls=MANIFEST_STALLS),
    )
    return await _waited_for(ref, fetching, lambda: True)


async def _waited_for(ref: Reference, work: Awaitable[_T], waiting: Callable[[], bool]) -> _T:
    """``await work``, saying that ``ref``'s registry is waited for if, :data:`WAIT_NOTICE`
    seconds in, the work is not done and ``waiting()`` says so."""
    failure: Exception | None = None

    async def notice() -> None:
        await trio.sleep(WAIT_NOTICE)
        if waiting():
            _warn(
                f"no answer from {ref.registry} after {WAIT_NOTICE:.0f} s; "
                "still trying (Ctrl-C stops)"
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(notice)
        try:
            result = await work
        except Exception as exc:  # raised outside the nursery, which would wrap it in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


async def _pull_image(
    remote: _Remote, ref: Reference, layout: _Layout, platform: Platform | None
) -> _Stats:
    """Fetch ``ref``'s manifest, download the blobs ``layout`` lacks, store the manifest."""
    started, requests = time.perf_counter(), remote.client.requests
    manifest = await _fetch_manifest(remote, ref, platform)
    todo = layout.missing(manifest.blobs)
    size = sum(blob.size for blob in todo)
    style = remote.style if todo else "off"
    with (
        layout.receiving() as dest,
        _Progress("pull", total=size, blobs=len(todo), style=style) as progress,
    ):
        result = await download(
            todo,
            base_url=ref.base_url,
            repository=ref.repository,
            dest_dir=dest,
            concurrency=remote.concurrency or PULL_CONCURRENCY,
            progress=progress,
            blob_progress=progress.blob,
            client=remote.client,
            get_token=remote.auth,
        )
    stored = layout.store(ref, manifest)
    fetched = set(result.downloaded)  # not those a killed pull left finished in the staging
    return _Stats(
        digest=manifest.digest,
        stored_digest=stored.digest,
        blobs=len(manifest.blobs),
        bytes=sum(blob.size for blob in manifest.blobs),
        transferred=len(fetched),
        transferred_bytes=sum(blob.size for blob in todo if blob.digest in fetched),
        mounted=0,
        seconds=time.perf_counter() - started,
        requests=remote.client.requests - requests,
    )


async def _push_image(
    remote: _Remote, ref: Reference, layout: _Layout, manifest: Manifest, mount_from: str | None
) -> _Stats:
    """Upload ``manifest``'s blobs from ``layout`` (those the repository lacks), then the
    manifest as ``ref``."""
    if manifest.is_index:
        raise _Failure(
            "the image in DIR is a multi-platform index",
            "Pushing an index with its platform images is not supported.",
            "pull one platform's image (pull --platform) and push that.",
        )
    if ref.digest is not None and ref.digest != manifest.digest:
        raise _Failure(
            f"the image's manifest is {manifest.digest}, not {ref.digest}",
            "A push by digest must name the manifest's own digest.",
            "push by tag, or give the right digest.",
        )
    missing = layout.missing(manifest.blobs)
    if missing:
        raise _Failure(
            f"{layout.root} lacks {len(missing)} of the image's {len(manifest.blobs)} blobs "
            f"(first: {missing[0].digest})",
            "The image in DIR is incomplete.",
            "pull it again to complete it.",
        )
    started, requests = time.perf_counter(), remote.client.requests
    blobs = [Blob(blob.digest, blob.size, mount_from) for blob in manifest.blobs]
    size = sum(blob.size for blob in blobs)
    with (
        layout.sending(blobs) as src,
        _Progress("push", total=size, blobs=len(blobs), style=remote.style) as progress,
    ):
        answers = remote.client.answers
        pushing = upload(
            blobs,
            base_url=ref.base_url,
            repository=ref.repository,
            src_dir=src,
            concurrency=remote.concurrency or PUSH_CONCURRENCY,
            progress=progress,
            blob_progress=progress.blob,
            client=remote.client,
            get_token=remote.auth,
            manifest=manifest.data,
            manifest_ref=ref.tag or manifest.digest,
            manifest_media_type=manifest.media_type,
        )
        try:  # a pull has its manifest to wait for, a push only the registry's first answer
            result = await _waited_for(ref, pushing, lambda: remote.client.answers == answers)
        except TransferError as exc:
            _name_layout_files(exc, src, layout)
            raise
    uploaded = set(result.uploaded)
    return _Stats(
        digest=manifest.digest,
        stored_digest=None,
        blobs=len(blobs),
        bytes=size,
        transferred=len(uploaded),
        transferred_bytes=sum(blob.size for blob in blobs if blob.digest in uploaded),
        mounted=len(result.mounted),
        seconds=time.perf_counter() - started,
        requests=remote.client.requests - requests,
    )


def _name_layout_files(exc: TransferError, src: Path, layout: _Layout) -> None:
    """Where ``exc`` (or the error it gave up on) names a blob's file in ``src``, name the
    layout's own file instead: an OCI layout's are pushed through links in a temporary
    directory, gone once the command ends."""
    last = exc.last_error if isinstance(exc, RetriesExhaustedError) else None
    for error in (exc, last):
        if error is not None and error.digest is not None:
            link = str(src / digest_to_path(error.digest))
            error.message = error.message.replace(link, str(layout.blob_path(error.digest)))


async def _pull(args: argparse.Namespace) -> int:
    ref: Reference = args.reference
    layout = _pull_layout(args.dir, args.layout)
    async with _connect(args, ref.base_url) as remote:
        stats = await _pull_image(remote, ref, layout, args.platform)
    if stats.transferred:
        _say(
            args,
            f"pulled {ref} into {args.dir}: {stats.transferred} of {stats.blobs} blobs, "
            f"{_size(stats.transferred_bytes)} in {stats.seconds:.1f} s ({stats.rate()})",
        )
    else:
        _say(args, f"{ref} is up to date in {args.dir}: {stats.blobs} blobs, nothing transferred")
    if stats.stored_digest != stats.digest:
        _say(args, f"its manifest is stored converted to OCI, as {stats.stored_digest}")
    record = {"reference": str(ref), "dir": str(args.dir), "layout": layout.kind}
    _emit_json(args, {"ok": True, **record, **dataclasses.asdict(stats)})
    return 0


async def _push(args: argparse.Namespace) -> int:
    ref: Reference = args.reference
    layout = _open_layout(args.dir)
    name = _choose_image(layout, ref, args.image)
    manifest = layout.load(name)
    async with _connect(args, ref.base_url) as remote:
        stats = await _push_image(remote, ref, layout, manifest, args.mount_from)
    present = stats.blobs - stats.transferred - stats.mounted
    uploaded = (
        f"{_plural(stats.transferred, 'blob')} uploaded ({_size(stats.transferred_bytes)} in "
        f"{stats.seconds:.1f} s, {stats.rate()})"
        if stats.transferred
        else "nothing uploaded"
    )
    _say(
        args,
        f"pushed {_shown(name)} to {ref}: {uploaded}, {stats.mounted} mounted, "
        f"{present} already there",  # the name comes from DIR
    )
    record = {"reference": str(ref), "dir": str(args.dir), "layout": layout.kind, "image": name}
    _emit_json(args, {"ok": True, **record, **dataclasses.asdict(stats)})
    return 0


# -- serve -------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    registry = Registry()
    storage: Path | None = args.storage
    if storage is not None:
        await trio.to_thread.run_sync(_load_storage, registry, storage)
    async with registry.serving(port=args.port) as url:
        where = f"storage {storage}" if storage else "memory only"
        _say(args, f"serving the in-process registry at {url} ({where}); Ctrl-C stops it")
        _emit_json(args, {"ok": True, "url": url, "storage": str(storage) if storage else None})
        await _housekeep(registry, storage)
    return 0


async def _housekeep(registry: Registry, storage: Path | None) -> None:
    """Every second, log the requests served (``-v``), forget them, and save what changed to
    ``storage``; save once more when cancelled."""
    saved: set[str] = set()
    try:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            changed = False
            for request in registry.requests:
                log.info("%s %s", request.method, request.url)
                changed |= request.method not in ("GET", "HEAD")
            registry.requests.clear()
            if storage is not None and changed:
                await _save(registry, storage, saved)
    finally:
        if storage is not None:
            with trio.CancelScope(shield=True):
                await _save(registry, storage, saved)


async def _save(registry: Registry, storage: Path, saved: set[str]) -> None:
    blobs = {repository: dict(stored) for repository, stored in registry.blobs.items()}
    manifests = {repository: dict(stored) for repository, stored in registry.manifests.items()}
    await trio.to_thread.run_sync(_save_storage, storage, blobs, manifests, saved)


def _save_storage(
    root: Path,
    blobs: dict[str, dict[str, bytes]],
    manifests: dict[str, dict[str, tuple[bytes, str]]],
    saved: set[str],
) -> None:
    """Write every blob and manifest not ``saved`` yet to ``root/blobs/sha256-<hex>``, and
    which repository holds what to ``root/repositories.json``."""

    def keep(digest: str, data: bytes) -> None:
        path = root / "blobs" / digest_to_path(digest)
        if digest not in saved and not path.exists():
            _write_atomic(path, data)
        saved.add(digest)

    state: dict[str, object] = {}
    for repository in sorted(blobs.keys() | manifests.keys()):
        for digest, data in blobs.get(repository, {}).items():
            keep(digest, data)
        refs = {}
        for ref, (data, media_type) in manifests.get(repository, {}).items():
            digest = compute_digest(data)
            keep(digest, data)
            refs[ref] = [digest, media_type]
        state[repository] = {"blobs": sorted(blobs.get(repository, {})), "manifests": refs}
    _write_atomic(root / STORAGE_INDEX, json.dumps(state, indent=1).encode())


def _load_storage(registry: Registry, root: Path) -> None:
    """Check that ``root`` can keep the registry's content, then fill ``registry`` from what
    :func:`_save_storage` wrote there, if anything."""
    path = root / STORAGE_INDEX
    if not path.exists() and (found := _find_layout(root)) is not None:
        raise _Failure(
            f"{root} holds an {found.kind} image store",
            "--storage keeps the registry's own files; they would mix with the store's.",
            "pick an empty directory (push the store's images to the registry once it runs).",
        )
    try:
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for directory in (root, root / "blobs"):
            tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise _Failure(
            f"cannot keep the registry's content in {root}: {exc}",
            "--storage must name a directory that trio-blobs can write to.",
            "pick another directory, or fix its permissions.",
        ) from exc
    if not path.exists():
        return
    contents: dict[str, bytes] = {}

    def read(digest: str) -> bytes:
        if digest not in contents:
            contents[digest] = (root / "blobs" / digest_to_path(digest)).read_bytes()
        return contents[digest]

    try:
        for repository, entry in json.loads(path.read_bytes()).items():
            registry.blobs[repository] = {digest: read(digest) for digest in entry["blobs"]}
            registry.manifests[repository] = {
                ref: (read(digest), media_type)
                for ref, (digest, media_type) in entry["manifests"].items()
            }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Failure(
            f"{path} is not a trio-blobs registry storage index: {exc!r}",
            "The storage directory is damaged, or belongs to something else.",
            "pick an empty directory, or repair or remove that file.",
        ) from exc


# -- demo --------------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="trio-blobs-demo-") as tmp:
        source, pulled = _OllamaLayout(Path(tmp, "source")), _OllamaLayout(Path(tmp, "pulled"))
        made = sum(nbytes for _, nbytes in _model_shapes(args.size)[1])
        _say(args, f"generating a synthetic model of {_size(made)}")
        manifest = await _generate_model(source, args.size)
        async with _demo_registry(args.url) as url:
            ref = Reference.parse(f"{url}/{DEMO_REPOSITORY}:latest")
            _say(args, f"pushing it to {url} and pulling it back")
            async with _connect(args, ref.base_url) as remote:
                pushed = await _push_image(remote, ref, source, manifest, None)
                fetched = await _pull_image(remote, ref, pulled, None)
        problems = await _verify(pulled, manifest)
    if problems:
        raise _Failure(
            f"the pulled copy differs: {'; '.join(problems[:3])}",
            "The registry did not give back what was pushed.",
            "run with -v, and check the registry.",
        )
    sizes = [blob.size for blob in manifest.blobs]
    count = len(sizes)
    lines = [
        f"demo against {args.url or 'an embedded registry'}",
        f"  model  {count} blobs, {_size(sum(sizes))} ({_size(min(sizes))} to {_size(max(sizes))})",
    ]
    for label, stats in (("push", pushed), ("pull", fetched)):
        lines.append(
            f"  {label}   {_size(stats.transferred_bytes)} in {stats.seconds:.2f} s = "
            f"{stats.rate()}, {stats.requests / count:.2f} requests per blob"
        )
    lines.append("  verified: every blob's digest and the manifest match")
    _say(args, "\n".join(lines))
    _emit_json(
        args,
        {
            "ok": True,
            "url": url,
            "blobs": count,
            "bytes": sum(sizes),
            "push": dataclasses.asdict(pushed),
            "pull": dataclasses.asdict(fetched),
            "verified": True,
        },
    )
    return 0


def _model_shapes(size: int) -> tuple[int, list[tuple[str, int]]]:
    """The hidden size and (tensor name, bytes) list of a float16 transformer of about ``size``
    bytes: embeddings, then per layer four attention matrices, three biases, three MLP
    matrices and two norms, then a final norm."""
    # size ~ 2 V h + 24 L h^2: solve for h, a multiple of 16.
    a, b = 24 * DEMO_LAYERS, 2 * DEMO_VOCAB
    hidden = max(16, int((math.sqrt(b * b + 4 * a * size) - b) / (2 * a)) // 16 * 16)
    inner = hidden * 8 // 3
    shapes = [("embed_tokens.weight", 2 * DEMO_VOCAB * hidden)]
    for layer in range(DEMO_LAYERS):
        prefix = f"layers.{layer}."
        shapes += [(f"{prefix}attn.{m}.weight", 2 * hidden * hidden) for m in "qkvo"]
        shapes += [(f"{prefix}attn.{m}.bias", 2 * hidden) for m in "qkv"]
        shapes += [(f"{prefix}mlp.{m}.weight", 2 * hidden * inner) for m in ("gate", "up", "down")]
        shapes += [(f"{prefix}{m}.weight", 2 * hidden) for m in ("input_norm", "post_norm")]
    shapes.append(("norm.weight", 2 * hidden))
    return hidden, shapes


async def _generate_model(layout: _Layout, size: int) -> Manifest:
    """Write a synthetic model of random tensors to ``layout``; return its OCI manifest."""
    hidden, shapes = _model_shapes(size)
    rng = random.Random()
    layers = []
    for name, nbytes in shapes:
        blob = _write_blob(layout, _random_pieces(rng, nbytes))
        layers.append(
            {
                "mediaType": DEMO_TENSOR,
                "digest": blob.digest,
                "size": blob.size,
                "annotations": {"org.opencontainers.image.title": name},
            }
        )
        await trio.lowlevel.checkpoint()
    config = {"hidden_size": hidden, "num_layers": DEMO_LAYERS, "vocab_size": DEMO_VOCAB}
    config_blob = _write_blob(layout, [json.dumps({**config, "dtype": "float16"}).encode()])
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": DEMO_CONFIG,
            "digest": config_blob.digest,
            "size": config_blob.size,
        },
        "layers": layers,
    }
    return Manifest.parse(json.dumps(document, indent=1).encode())


def _random_pieces(rng: random.Random, nbytes: int) -> Iterator[bytes]:
    """``nbytes`` random bytes, a few MiB at a time: a tensor may be larger than memory allows,
    or than ``randbytes`` can make at once (256 MiB)."""
    for start in range(0, nbytes, DEMO_PIECE):
        yield rng.randbytes(min(DEMO_PIECE, nbytes - start))


def _write_blob(layout: _Layout, pieces: Iterable[bytes]) -> Blob:
    """Store the blob made of ``pieces`` in ``layout``, hashed as it is written; it gets its
    name once whole."""
    hasher = hashlib.sha256()
    name = _write_hidden(layout._inside(layout.blob_path(_ANY_SHA256)), pieces, hasher)
    blob = Blob(f"sha256:{hasher.hexdigest()}", name.stat().st_size)
    _rename(name, layout.blob_path(blob.digest))
    return blob


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()


async def _verify(layout: _Layout, manifest: Manifest) -> list[str]:
    """What differs between ``manifest`` and the copy of it in ``layout``, hashed anew."""
    problems = []
    for blob in manifest.blobs:
        path = layout.blob_path(blob.digest)
        actual = await trio.to_thread.run_sync(_file_digest, path)
        if actual != blob.digest:
            problems.append(f"{path.name} hashes to {actual}")
    if [layout.load(name).data for name in layout.images()] != [manifest.data]:
        problems.append("the stored manifest is not the one pushed")
    return problems


@contextlib.asynccontextmanager
async def _demo_registry(url: str | None) -> AsyncIterator[str]:
    """``url``, or the address of ``trio-blobs serve`` run meanwhile in a child process, which
    has a core of its own as a real registry would."""
    if url:
        yield url
        return
    command = [sys.executable, "-m", "trio_blobs", "serve", "--port", "0", "--json", "--quiet"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        line = b""
        while not line.endswith(b"\n") and (chunk := await process.stdout.receive_some()):
            line += chunk
        try:
            served: str = json.loads(line)["url"]
        except (ValueError, KeyError) as exc:
            raise _Failure(
                "the embedded registry did not start",
                "The child process running `trio-blobs serve` failed.",
                "run `trio-blobs serve -v` to see why.",
            ) from exc
        yield served
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(CHILD_TIMEOUT):
                await process.wait()
            process.kill()  # if it is still there
            await process.wait()
            await process.stdout.aclose()
