"""Image references, platforms and manifests: what a puller needs before it fetches any blob.

:meth:`Reference.parse` reads ``[registry[:port]/]namespace/name[:tag|@digest]`` as ``docker``
and ``ollama`` do; :func:`fetch_manifest` fetches a manifest by tag or digest, verifies it and
resolves an OCI index or Docker manifest list to the entry for one :class:`Platform`.
"""

from __future__ import annotations

import json
import logging
import platform as _platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import trio

from ._digest import Blob, check_digest, compute_digest
from ._exceptions import IntegrityError, ProtocolError, StallError, TransferError
from ._monitor import Monitor, RateHistory, Watch
from ._protocol import MAX_PORT, TAG_RE, UnknownCoding, read_limited
from ._retry import AttemptBudget, RetryPolicy
from ._session import GetToken, RegistrySession
from ._transfer import check_stall_and_retry, open_session, session_options, unwrap_group

__all__ = [
    "Descriptor",
    "Manifest",
    "Platform",
    "PlatformNotFoundError",
    "Reference",
    "fetch_manifest",
]

DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
# Docker Hub's names, and where its registry API is; there too a bare name is in library/.
_DOCKER_HUB = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
DEFAULT_TAG = "latest"
MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # what registries accept; more is not a manifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST, *INDEX_TYPES})
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
# Docker schema 2 media types of configs and layers -> their OCI equivalents.
_OCI_EQUIVALENTS = {
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}

# OCI distribution spec: path components of a repository name, and a registry host[:port].
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_REGISTRY_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::([0-9]+))?"
)

# Architecture names as machines report them -> (OCI architecture, variant).
_ARCH_ALIASES = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "aarch64": ("arm64", None),
    "armv8l": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
}
# The variant an entry without one has, as container runtimes assume.
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Reference:
    """An image in a registry: ``registry`` (``host[:port]``), ``repository`` (``namespace/name``),
    a ``tag`` and/or a ``digest``, and the ``scheme`` to reach the registry with.

    Construction validates every part; :meth:`parse` reads the usual text form.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    scheme: str = "https"

    def __post_init__(self) -> None:
        registry = _REGISTRY_RE.fullmatch(self.registry)
        if not registry or not 0 < int(registry[1] or 443) <= MAX_PORT:
            raise ValueError(f"{self.registry!r} is not a registry host[:port]")
        if not all(_COMPONENT_RE.fullmatch(c) for c in self.repository.split("/")):
            raise ValueError(
                f"{self.repository!r} is not a repository name: expected namespace/name in "
                "lowercase letters, digits and separators (. _ -)"
            )
        if self.tag is not None and not TAG_RE.fullmatch(self.tag):
            raise ValueError(f"{self.tag!r} is not a tag: up to 128 letters, digits, . _ -")
        if self.digest is not None:
            check_digest(self.digest)
        if self.tag is None and self.digest is None:
            raise ValueError("a reference needs a tag or a digest")
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {self.scheme!r}")

    @classmethod
    def parse(cls, text: str, *, insecure: bool = False) -> Reference:
        """Read ``[http(s)://][registry[:port]/]namespace/name[:tag][@digest]``.

        The first component is a registry when it is ``localhost`` or holds a ``.`` or ``:``
        (or an ``http(s)://`` prefix says so); otherwise the registry is ``registry.ollama.ai``,
        where a bare ``name`` lives in the ``library`` namespace, as on Docker Hub (``docker.io``).
        Without tag or digest the tag is ``latest``. The scheme is ``http`` with an ``http://``
        prefix or ``insecure``. Raises :class:`ValueError` saying what is wrong.
        """
        rest = text.strip()
        scheme = None
        for prefix in ("http://", "https://"):
            if rest.startswith(prefix):
                scheme, rest = prefix[:-3], rest[len(prefix) :]
        rest, at, digest = rest.partition("@")
        first, slash, remainder = rest.partition("/")
        registry = DEFAULT_REGISTRY
        if scheme or (slash and (first == "localhost" or "." in first or ":" in first)):
            registry, rest = first, remainder
        name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not name:
            raise ValueError(f"{text!r} names no repository")
        if (registry == DEFAULT_REGISTRY or registry in _DOCKER_HUB) and "/" not in name:
            name = f"{DEFAULT_NAMESPACE}/{name}"
        return cls(
            registry=registry,
            repository=name,
            tag=tag if colon else (None if at else DEFAULT_TAG),
            digest=digest if at else None,
            scheme=scheme or ("http" if insecure else "https"),
        )

    @property
    def base_url(self) -> str:
        """The registry's base URL, e.g. ``https://registry.ollama.ai`` (Docker Hub's API is at
        ``registry-1.docker.io``)."""
        return f"{self.scheme}://{_DOCKER_HUB.get(self.registry, self.registry)}"

    @property
    def manifest_ref(self) -> str:
        """What ``manifests/<ref>`` is asked for: the digest if there is one, else the tag."""
        ref = self.digest or self.tag
        assert ref is not None  # construction makes sure
        return ref

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tag}{digest}"


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform: ``os``, ``architecture`` and maybe a ``variant`` (``linux/arm64/v8``)."""

    os: str
    architecture: str
    variant: str | None = None

    def __post_init__(self) -> None:
        if not self.os or not self.architecture or self.variant == "":
            raise ValueError("a platform needs an os and an architecture")

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Read ``os/architecture[/variant]``; machine names such as ``x86_64`` are understood."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform such as linux/amd64 or linux/arm/v7")
        architecture, variant = _ARCH_ALIASES.get(parts[1], (parts[1], None))
        return cls(parts[0], architecture, parts[2] if len(parts) == 3 else variant)

    @classmethod
    def current(cls) -> Platform:
        """This machine's platform, with ``linux`` as the os everywhere but Windows (images
        for macOS hosts are Linux images)."""
        machine = _platform.machine().lower()
        architecture, variant = _ARCH_ALIASES.get(machine, (machine, None))
        return cls("windows" if sys.platform == "win32" else "linux", architecture, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def rank(self, other: Platform) -> int | None:
        """How well an image for ``other`` fits this platform: 0 exactly, higher for older
        compatible variants (arm/v6 on an arm/v7 machine), None when it cannot run."""
        if (other.os, other.architecture) != (self.os, self.architecture):
            return None
        wanted = self.variant or _DEFAULT_VARIANTS.get(self.architecture)
        offered = other.variant or _DEFAULT_VARIANTS.get(other.architecture)
        if wanted == offered:
            return 0
        numbers = [re.fullmatch(r"v(\d+)", v or "") for v in (wanted, offered)]
        if numbers[0] and numbers[1] and int(numbers[1][1]) < int(numbers[0][1]):
            return int(numbers[0][1]) - int(numbers[1][1])
        return None


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An entry of an image index: the manifest's ``digest``, ``size``, ``media_type`` and the
    ``platform`` it is for (None when the index does not say)."""

    digest: str
    size: int
    media_type: str
    platform: Platform | None = None


class PlatformNotFoundError(TransferError):
    """An image index has no manifest for the platform asked for; ``available`` lists those
    it has."""

    def __init__(
        self, platform: Platform, available: tuple[Platform, ...], *, url: str | None = None
    ) -> None:
        offered = ", ".join(map(str, available)) or "none"
        super().__init__(f"no manifest for {platform} (the index has: {offered})", url=url)
        self.platform = platform
        self.available = available


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as stored: its exact bytes, media type and sha256 digest, with what it lists.

    ``blobs`` are an image manifest's config and layers (each digest once, config first);
    ``manifests`` the entries of an index or manifest list. Build one with :meth:`parse`.
    """

    data: bytes
    media_type: str
    digest: str
    blobs: tuple[Blob, ...]
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, *, media_type: str | None = None) -> Manifest:
        """Read an image manifest or index (OCI, or Docker schema 2).

        The media type is ``media_type`` if it is a manifest type, else the document's own
        ``mediaType``, else what its fields say. Raises :class:`ValueError` for anything else.
        """
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("schemaVersion") != 2:
            raise ValueError("not a schema 2 manifest (schema 1 is not supported)")
        declared = document.get("mediaType")
        if media_type not in MANIFEST_TYPES:
            media_type = declared if declared in MANIFEST_TYPES else None
        if media_type is None:
            media_type = untyped_media_type(document)
        try:
            if media_type in INDEX_TYPES:
                blobs: list[Blob] = []
                manifests = [_descriptor(entry) for entry in document["manifests"]]
            else:
                manifests = []
                blobs = [_blob(document["config"])]
                blobs += [_blob(layer) for layer in document.get("layers") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed {media_type}: {exc!r}") from None
        unique: dict[str, Blob] = {}
        for blob in blobs:
            if unique.setdefault(blob.digest, blob).size != blob.size:
                raise ValueError(f"{blob.digest} is listed with two sizes")
        return cls(data, media_type, compute_digest(data), tuple(unique.values()), tuple(manifests))

    @property
    def is_index(self) -> bool:
        """Whether this is an OCI index or Docker manifest list."""
        return self.media_type in INDEX_TYPES

    def as_oci(self) -> Manifest:
        """This image manifest as an OCI one: a Docker schema 2 manifest is rewritten with
        the OCI media types (same blobs, new bytes and digest), as OCI image layouts need."""
        if self.media_type != DOCKER_MANIFEST:
            return self
        document = json.loads(self.data)
        document["mediaType"] = OCI_MANIFEST
        for descriptor in [document["config"], *(document.get("layers") or ())]:
            kind = descriptor.get("mediaType")
            descriptor["mediaType"] = _OCI_EQUIVALENTS.get(kind, kind)
        # Compact, as Go's encoding/json writes it when containers/image (skopeo, podman)
        # converts a manifest: a new document's digest is of whatever bytes are written.
        return Manifest.parse(json.dumps(document, separators=(",", ":")).encode())

    def select(self, platform: Platform) -> Descriptor:
        """The entry of this index that fits ``platform`` best (the first of equals).

        Raises :class:`PlatformNotFoundError` when none fits.
        """
        fits = [
            (rank, index, entry)
            for index, entry in enumerate(self.manifests)
            if entry.platform is not None and (rank := platform.rank(entry.platform)) is not None
        ]
        if not fits:
            available = tuple(e.platform for e in self.manifests if e.platform is not None)
            raise PlatformNotFoundError(platform, available)
        return min(fits, key=lambda fit: fit[:2])[2]


def _blob(descriptor: dict[str, object]) -> Blob:
    digest, size = descriptor["digest"], descriptor["size"]
    if not isinstance(digest, str) or not isinstance(size, int):
        raise TypeError("a descriptor needs a string digest and an integer size")
    return Blob(digest, size)


def _descriptor(entry: dict[str, object]) -> Descriptor:
    blob = _blob(entry)
    media_type = entry.get("mediaType")
    platform = entry.get("platform")
    found = None
    if isinstance(platform, dict):
        os_, arch, variant = (platform.get(k) for k in ("os", "architecture", "variant"))
        if isinstance(os_, str) and isinstance(arch, str) and os_ and arch:
            found = Platform(os_, arch, variant if isinstance(variant, str) and variant else None)
    return Descriptor(
        blob.digest, blob.size, media_type if isinstance(media_type, str) else "", found
    )


async def fetch_manifest(
    *,
    base_url: str,
    repository: str,
    reference: str = DEFAULT_TAG,
    platform: Platform | None = None,
    client: httpx.AsyncClient | None = None,
    token: str | None = None,
    get_token: GetToken | None = None,
    user_agent: str | None = None,
    stall_timeout: float = 10.0,
    logger: logging.Logger | None = None,
    retry: RetryPolicy | None = None,
) -> Manifest:
    """Fetch the image manifest that ``reference`` (a tag or digest) names in ``repository``.

    An OCI index or Docker manifest list is resolved to its entry for ``platform`` (this
    machine's, :meth:`Platform.current`, by default), which is fetched by digest. Every manifest
    is checked against the digest it was asked for and the registry's ``Docker-Content-Digest``.
    Credentials, redirects and retries work as in :func:`download`; an attempt with no answer
    for ``stall_timeout`` seconds is retried. Raises :class:`TransferError` (an unusable
    manifest is a :class:`ProtocolError`; a missing platform a :class:`PlatformNotFoundError`),
    and :class:`ValueError` / :class:`TypeError` for bad arguments before any I/O.
    """
    if not isinstance(reference, str) or not (TAG_RE.fullmatch(reference) or _is_digest(reference)):
        raise ValueError(f"reference must be a tag or a digest, got {reference!r}")
    if platform is not None and not isinstance(platform, Platform):
        hint = f" (Platform.parse({platform!r}))" if isinstance(platform, str) else ""
        raise TypeError(f"platform must be a Platform{hint}, got {platform!r}")
    check_stall_and_retry(stall_timeout, retry)
    policy = retry or RetryPolicy()
    options = session_options(
        client=client,
        base_url=base_url,
        repository=repository,
        token=token,
        get_token=get_token,
        user_agent=user_agent,
        logger=logger,
    )
    async with open_session(options, concurrency=1, actions="pull") as session:
        manifest = await _fetch(session, reference, None, stall_timeout, policy)
        if not manifest.is_index:
            return manifest
        try:
            entry = manifest.select(platform or Platform.current())
        except PlatformNotFoundError as exc:
            exc.url = str(session.url(f"manifests/{reference}"))
            raise
        session.logger.info("%s resolves to %s for its platform", reference, entry.digest)
        chosen = await _fetch(session, entry.digest, entry.size, stall_timeout, policy)
        if chosen.is_index:
            raise ProtocolError(
                "an index entry is another index; nested indexes are not supported",
                digest=entry.digest,
                url=str(session.url(f"manifests/{entry.digest}")),
            )
        return chosen


def untyped_media_type(document: Mapping[str, object]) -> str:
    """The media type of a manifest that names none (OCI 1.0 left ``mediaType`` optional): an
    OCI index if it lists ``manifests``, else an OCI image manifest."""
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


def _is_digest(text: str) -> bool:
    try:
        check_digest(text)
    except ValueError:
        return False
    return True


async def _fetch(
    session: RegistrySession,
    reference: str,
    size: int | None,
    stall_timeout: float,
    policy: RetryPolicy,
) -> Manifest:
    """One manifest, verified, with retries as ``policy`` allows. An attempt is cut off when
    nothing arrives for ``stall_timeout`` seconds, as a blob's is: waiting for a token does not
    count."""
    url = session.url(f"manifests/{reference}")
    digest = reference if _is_digest(reference) else None
    if size is not None and size > MAX_MANIFEST_SIZE:
        raise ProtocolError(
            f"the index lists a manifest of {size} bytes, more than the {MAX_MANIFEST_SIZE} a "
            "manifest may have",
            digest=digest,
            url=str(url),
        )
    budget = AttemptBudget(policy)
    monitor = Monitor(stall_timeout=stall_timeout, history=RateHistory())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            while True:
                try:
                    with monitor.watch() as watch:
                        manifest = await _fetch_once(session, url, digest, size, watch)
                        break
                    # Only the monitor cancels the watch: this attempt stalled.
                    raise watch.error(stall_timeout=stall_timeout, digest=digest) or StallError(
                        "no manifest", digest=digest, url=str(url)
                    )
                except TransferError as exc:
                    delay = budget.after_failure(exc)
                    session.logger.info("manifest fetch failed, retrying in %.2f s: %s", delay, exc)
                    await trio.sleep(delay)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # raised as it would be without the monitor's nursery
        raise unwrap_group(group) from None
    return manifest


async def _fetch_once(
    session: RegistrySession, url: httpx.URL, digest: str | None, size: int | None, watch: Watch
) -> Manifest:
    limit = MAX_MANIFEST_SIZE if size is None else size
    async with session.stream(
        "GET",
        url,
        expect=(200,),
        digest=digest,
        what="manifest",
        headers={"accept": ACCEPT},
        watch=watch,
    ) as response:
        try:
            data, more = await read_limited(response, limit, watch.progress)
        except UnknownCoding as exc:
            raise ProtocolError(f"unusable manifest: {exc}", digest=digest, url=str(url)) from exc
        if more:
            error = ProtocolError if size is None else IntegrityError
            raise error(f"manifest is larger than {limit} bytes", digest=digest, url=str(url))
    if size is not None and len(data) != size:
        raise IntegrityError(
            f"manifest has {len(data)} bytes, the index says {size}", digest=digest, url=str(url)
        )
    for expected, source in (
        (digest, "asked for"),
        (response.headers.get("docker-content-digest"), "the registry announced"),
    ):
        if expected is not None:
            _check_digest(data, expected.strip(), source, url)
    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
    try:
        return Manifest.parse(data, media_type=content_type)
    except ValueError as exc:
        raise ProtocolError(f"unusable manifest: {exc}", digest=digest, url=str(url)) from exc


def _check_digest(data: bytes, expected: str, source: str, url: httpx.URL) -> None:
    try:
        actual = compute_digest(data, expected.partition(":")[0])
    except ValueError:
        actual = None
    if actual != expected:
        raise IntegrityError(
            f"manifest does not match the digest {source} ({expected})",
            digest=expected if _is_digest(expected) else None,
            url=str(url),
        )
