# ruff: noqa: F811 - test parameters name the fixtures imported from _real
"""upload() and download() against the real distribution registry, its token and Basic auth,
its storage redirects, and skopeo.

Each test starts its own registry (it answers in well under a second); see ``_real.py``.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

import trio_blobs
from trio_blobs import AuthenticationError, Blob, RegistryAuth, download, upload
from trio_blobs.testing import DistributionTokenAuth, RegistryStartError, distribution_registry

from ._real import (  # noqa: F401 - fixtures
    USERS,
    FileServer,
    RealRegistry,
    TokenServer,
    basic_registry,
    file_server,
    plain_registry,
    programs,
    redirect_registry,
    skopeo,
    token_registry,
    token_server,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_SIZES = (0, 1, 4096, 3 * 1024 * 1024 + 7)
REPO = "trio-blobs/real"
PASSWORD = USERS["alice"]


@dataclass(frozen=True)
class Image:
    config: Blob
    layers: list[Blob]
    manifest: bytes

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def digest(self) -> str:
        return f"sha256:{hashlib.sha256(self.manifest).hexdigest()}"


def write_blob(src: Path, data: bytes) -> Blob:
    src.mkdir(parents=True, exist_ok=True)
    blob = Blob.from_bytes(data)
    (src / blob.file_name).write_bytes(data)
    return blob


def make_image(
    src: Path,
    layers: list[bytes],
    *,
    media_types: tuple[str, str, str] = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
) -> Image:
    """An image of these layers, with a config and a manifest, as files in ``src``."""
    manifest_type, config_type, layer_type = media_types
    layer_blobs = [write_blob(src, data) for data in layers]
    config_document = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layer_blobs]},
    }
    config = write_blob(src, json.dumps(config_document).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": config.digest, "size": config.size},
        "layers": [
            {"mediaType": layer_type, "digest": b.digest, "size": b.size} for b in layer_blobs
        ],
    }
    return Image(config, layer_blobs, json.dumps(manifest, indent=3).encode())


def random_layers(*sizes: int) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


def tar_gz_layer(name: str, content: bytes) -> bytes:
    """A real layer: a gzipped tar holding one file."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return gzip.compress(archive.getvalue(), mtime=0)


def assert_same_files(src: Path, dest: Path, blobs: list[Blob]) -> None:
    for blob in blobs:
        assert (dest / blob.file_name).read_bytes() == (src / blob.file_name).read_bytes()


async def get_manifest(
    registry: RealRegistry, repository: str, reference: str, media_type: str
) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        url = f"{registry.url}/v2/{repository}/manifests/{reference}"
        response = await client.get(url, headers={"Accept": media_type})
    assert response.status_code == 200, response.text
    return response


async def assert_manifest_stored(
    registry: RealRegistry, repository: str, reference: str, manifest: bytes, media_type: str
) -> None:
    """The registry gives back ``manifest`` byte for byte, under its own type and digest."""
    response = await get_manifest(registry, repository, reference, media_type)
    assert response.content == manifest
    assert response.headers["content-type"] == media_type
    digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    assert response.headers["docker-content-digest"] == digest


@dataclass(frozen=True)
class Seen:
    method: str
    url: httpx.URL
    status: int


@contextmanager
def recorded() -> Iterator[tuple[httpx.AsyncClient, list[Seen]]]:
    """A client that records the method, URL and status of every response it gets."""
    seen: list[Seen] = []

    async def record(response: httpx.Response) -> None:
        request = response.request
        seen.append(Seen(request.method, request.url, response.status_code))

    yield httpx.AsyncClient(trust_env=False, event_hooks={"response": [record]}), seen


def alice(registry: RealRegistry, tokens: TokenServer | None = None) -> RegistryAuth:
    """The built-in provider with alice's credentials, trusting the token server's realm."""
    realms = (tokens.realm,) if tokens is not None else ()
    return RegistryAuth(registry.url, "alice", PASSWORD, trusted_realms=realms)


# -- 1. round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "media_types",
    [(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER), (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)],
    ids=["oci", "docker-v2"],
)
async def test_image_round_trip_is_byte_identical(
    plain_registry: RealRegistry, tmp_path: Path, media_types: tuple[str, str, str]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    image = make_image(src, random_layers(*LAYER_SIZES), media_types=media_types)
    result = await upload(
        image.blobs,
        base_url=plain_registry.url,
        repository=REPO,
        src_dir=src,
        manifest=image.manifest,
        manifest_ref="v1",
    )
    assert sorted(result.uploaded) == sorted(b.digest for b in image.blobs)
    assert result.manifest_digest == image.digest
    for reference in ("v1", image.digest):
        await assert_manifest_stored(
            plain_registry, REPO, reference, image.manifest, media_types[0]
        )

    pulled = await download(
        image.blobs, base_url=plain_registry.url, repository=REPO, dest_dir=dest
    )
    assert len(pulled.downloaded) == len(image.blobs)
    assert_same_files(src, dest, image.blobs)


async def test_a_manifest_without_media_type_is_pushed_as_oci(
    plain_registry: RealRegistry, tmp_path: Path
) -> None:
    image = make_image(tmp_path, random_layers(1000))
    document = json.loads(image.manifest)
    del document["mediaType"]  # optional in OCI 1.0
    manifest = json.dumps(document).encode()
    result = await upload(
        image.blobs,
        base_url=plain_registry.url,
        repository=REPO,
        src_dir=tmp_path,
        manifest=manifest,
        manifest_ref="v1",
    )
    assert result.manifest_digest == f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    await assert_manifest_stored(plain_registry, REPO, "v1", manifest, OCI_MANIFEST)


async def test_index_round_trip_is_byte_identical(
    plain_registry: RealRegistry, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    shared = os.urandom(100_000)
    children = [make_image(src, [shared, os.urandom(size)]) for size in (10_000, 1024 * 1024)]
    for child in children:  # by digest, before the index that names them
        await upload(
            child.blobs,
            base_url=plain_registry.url,
            repository=REPO,
            src_dir=src,
            manifest=child.manifest,
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child.digest,
                    "size": len(child.manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for child, arch in zip(children, ("amd64", "arm64"), strict=True)
            ],
        }
    ).encode()
    result = await upload(
        [],
        base_url=plain_registry.url,
        repository=REPO,
        src_dir=src,
        manifest=index,
        manifest_ref="multi",
    )
    assert result.manifest_digest == f"sha256:{hashlib.sha256(index).hexdigest()}"

    await assert_manifest_stored(plain_registry, REPO, "multi", index, OCI_INDEX)
    blobs = {b.digest: b for child in children for b in child.blobs}
    for child in children:
        await assert_manifest_stored(
            plain_registry, REPO, child.digest, child.manifest, OCI_MANIFEST
        )
    await download(blobs.values(), base_url=plain_registry.url, repository=REPO, dest_dir=dest)
    assert_same_files(src, dest, list(blobs.values()))


# -- 2. cross-repository mount ------------------------------------------------------------------


async def test_mount_is_answered_201_and_sends_no_body(
    plain_registry: RealRegistry, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    image = make_image(src, random_layers(1000, 200_000))
    await upload(image.blobs, base_url=plain_registry.url, repository="lib/base", src_dir=src)
    mountable = [Blob(b.digest, b.size, mount_from="lib/base") for b in image.blobs]

    with recorded() as (client, seen):
        async with client:
            result = await upload(
                mountable,
                base_url=plain_registry.url,
                repository="lib/app",
                src_dir=src,
                client=client,
            )
    assert sorted(result.mounted) == sorted(b.digest for b in image.blobs)
    assert result.uploaded == ()
    posts = [s for s in seen if s.method == "POST"]
    assert len(posts) == len(image.blobs)
    assert all(s.status == 201 and "mount=" in str(s.url) for s in posts)
    assert {s.method for s in seen} == {"HEAD", "POST"}  # no PUT, no PATCH: no body sent
    pulled = await download(
        image.blobs, base_url=plain_registry.url, repository="lib/app", dest_dir=tmp_path / "d"
    )
    assert len(pulled.downloaded) == len(image.blobs)


async def test_mount_refused_falls_back_to_an_upload(
    plain_registry: RealRegistry, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    blob = write_blob(src, os.urandom(50_000))
    # lib/empty does not have it: the registry opens an ordinary upload session instead.
    with recorded() as (client, seen):
        async with client:
            result = await upload(
                [Blob(blob.digest, blob.size, mount_from="lib/empty")],
                base_url=plain_registry.url,
                repository="lib/app",
                src_dir=src,
                client=client,
            )
    assert result.uploaded == (blob.digest,)
    assert result.mounted == ()
    assert [(s.method, s.status) for s in seen] == [("HEAD", 404), ("POST", 202), ("PUT", 201)]
    assert plain_registry.has_blob(blob.digest)


async def test_a_whole_blob_post_gets_a_session_and_the_others_post_bare(
    plain_registry: RealRegistry, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    blobs = [write_blob(src, os.urandom(size)) for size in (1000, 2000, 3000, 4000)]
    with recorded() as (client, seen):
        async with client:
            result = await upload(
                blobs, base_url=plain_registry.url, repository=REPO, src_dir=src, client=client
            )
    assert len(result.uploaded) == 4
    posts = [s for s in seen if s.method == "POST"]
    # distribution 2.8 ignores a blob sent with its POST and opens a session (202): one blob
    # asks, and is then PUT into that session as the others are into theirs.
    assert [s.status for s in posts] == [202] * 4
    assert sum("digest=" in str(s.url) for s in posts) == 1
    assert [s.status for s in seen if s.method == "PUT"] == [201] * 4
    assert all(plain_registry.has_blob(blob.digest) for blob in blobs)


# -- 3. chunked push ----------------------------------------------------------------------------


async def test_chunked_push_is_accepted(plain_registry: RealRegistry, tmp_path: Path) -> None:
    src = tmp_path / "src"
    chunk = 256 * 1024
    image = make_image(src, random_layers(0, 1000, 4 * chunk, 4 * chunk + 1))
    with recorded() as (client, seen):
        async with client:
            result = await upload(
                image.blobs,
                base_url=plain_registry.url,
                repository=REPO,
                src_dir=src,
                manifest=image.manifest,
                chunk_size=chunk,
                client=client,
            )
    assert len(result.uploaded) == len(image.blobs)
    patches = [s for s in seen if s.method == "PATCH"]
    assert len(patches) == sum(-(-b.size // chunk) for b in image.blobs)
    assert all(s.status == 202 for s in patches)
    blob_puts = [s for s in seen if s.method == "PUT" and "/blobs/uploads/" in s.url.path]
    assert [s.status for s in blob_puts] == [201] * len(image.blobs)
    await download(
        image.blobs, base_url=plain_registry.url, repository=REPO, dest_dir=tmp_path / "d"
    )
    assert_same_files(src, tmp_path / "d", image.blobs)


# -- 4. token auth with the built-in provider ---------------------------------------------------


async def test_a_pull_only_token_is_refused_for_push(
    token_registry: RealRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    blob = write_blob(src, os.urandom(1000))
    anonymous = RegistryAuth(token_registry.url)
    with pytest.raises(AuthenticationError) as caught:
        await upload(
            [blob], base_url=token_registry.url, repository=REPO, src_dir=src, get_token=anonymous
        )
    error = caught.value
    assert error.status == 401
    assert error.code == "UNAUTHORIZED"
    assert error.digest == blob.digest
    assert "/blobs/uploads/" in str(error)
    # It asked for push, and got pull only.
    asked_push = [r for r in token_server.requests if any("push" in s for s in r.scopes)]
    assert asked_push
    assert all(r.user is None and r.granted == (f"repository:{REPO}:pull",) for r in asked_push)
    assert not token_registry.has_blob(blob.digest)


@pytest.mark.parametrize("token_server", ["x5c", "kid"], indirect=True)
async def test_push_with_credentials_then_pull_anonymously(
    token_registry: RealRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    image = make_image(src, random_layers(*LAYER_SIZES))
    result = await upload(
        image.blobs,
        base_url=token_registry.url,
        repository=REPO,
        src_dir=src,
        manifest=image.manifest,
        manifest_ref="v1",
        get_token=alice(token_registry, token_server),
    )
    assert result.manifest_digest == image.digest
    assert token_server.requests
    assert all(r.user == "alice" for r in token_server.requests)
    assert any(r.granted == (f"repository:{REPO}:pull,push",) for r in token_server.requests)

    pushed = len(token_server.requests)
    await download(
        image.blobs,
        base_url=token_registry.url,
        repository=REPO,
        dest_dir=dest,
        get_token=RegistryAuth(token_registry.url),
    )
    assert_same_files(src, dest, image.blobs)
    assert [r.user for r in token_server.requests[pushed:]] == [None]  # one token for all


async def test_an_expired_token_is_refreshed_once_for_many_waiters(
    token_registry: RealRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    blobs = [write_blob(src, os.urandom(10_000)) for _ in range(17)]
    await upload(
        blobs,
        base_url=token_registry.url,
        repository=REPO,
        src_dir=src,
        get_token=alice(token_registry, token_server),
    )
    token_server.expires_in = 2
    anonymous = RegistryAuth(token_registry.url)
    first, *rest = blobs
    await download(
        [first], base_url=token_registry.url, repository=REPO, dest_dir=dest, get_token=anonymous
    )
    stale = token_server.issued[-1]
    await trio.sleep(2.1)  # both the registry and the provider now hold it expired
    issued = len(token_server.requests)

    # Every request starts with the expired token, as the requests of a long transfer would.
    with recorded() as (client, seen):
        async with client:
            await download(
                rest,
                base_url=token_registry.url,
                repository=REPO,
                dest_dir=dest,
                token=stale,
                get_token=anonymous,
                concurrency=len(rest),
                client=client,
            )
    assert [s.status for s in seen].count(401) == len(rest)
    assert [(r.user, r.status) for r in token_server.requests[issued:]] == [(None, 200)]
    assert_same_files(src, dest, blobs)


class FirstPutFails(httpx.AsyncBaseTransport):
    """The first blob PUT of each digest fails to connect, as on a flaky network."""

    def __init__(self) -> None:
        self._inner = trio_blobs.HTTP1Transport()
        self._failed: set[str | None] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "/blobs/uploads/" in request.url.path:
            digest = request.url.params.get("digest")
            if digest not in self._failed:
                self._failed.add(digest)
                raise httpx.ConnectError("connection reset", request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_failed_attempts_cleanup_keeps_the_token_the_others_use(
    token_registry: RealRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    blobs = [write_blob(src, os.urandom(300_000 + i)) for i in range(12)]
    async with httpx.AsyncClient(transport=FirstPutFails(), trust_env=False) as client:
        result = await upload(
            blobs,
            base_url=token_registry.url,
            repository=REPO,
            src_dir=src,
            client=client,
            get_token=alice(token_registry, token_server),
        )
    assert sorted(result.uploaded) == sorted(blob.digest for blob in blobs)
    # The cleanups' DELETEs asked for delete, which alice may not; what she may was kept.
    assert {r.granted for r in token_server.requests} == {(f"repository:{REPO}:pull,push",)}
    assert any("delete" in scope for r in token_server.requests for scope in r.scopes)


async def test_mounts_and_uploads_in_one_call_share_a_token_for_both_repositories(
    token_registry: RealRegistry, token_server: TokenServer, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    auth = alice(token_registry, token_server)
    base = [write_blob(src, os.urandom(20_000 + i)) for i in range(8)]
    await upload(
        base, base_url=token_registry.url, repository="lib/base", src_dir=src, get_token=auth
    )
    own = [write_blob(src, os.urandom(30_000 + i)) for i in range(8)]
    mixed = [Blob(b.digest, b.size, mount_from="lib/base") for b in base] + own
    asked = len(token_server.requests)
    with recorded() as (client, seen):
        async with client:
            result = await upload(
                mixed,
                base_url=token_registry.url,
                repository="lib/app",
                src_dir=src,
                client=client,
                get_token=alice(token_registry, token_server),
            )
    assert sorted(result.mounted) == sorted(b.digest for b in base)
    assert sorted(result.uploaded) == sorted(b.digest for b in own)
    # The first token asked for everything the call needs: one 401 (the first request's).
    assert [s.status for s in seen].count(401) == 1
    [token] = token_server.requests[asked:]
    assert token.scopes == ("repository:lib/app:pull,push", "repository:lib/base:pull")


# -- 5. Basic auth ------------------------------------------------------------------------------


async def test_basic_auth_end_to_end(basic_registry: RealRegistry, tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    image = make_image(src, random_layers(0, 1000, 300_000))
    result = await upload(
        image.blobs,
        base_url=basic_registry.url,
        repository=REPO,
        src_dir=src,
        manifest=image.manifest,
        get_token=alice(basic_registry),
    )
    assert result.manifest_digest == image.digest
    await download(
        image.blobs,
        base_url=basic_registry.url,
        repository=REPO,
        dest_dir=dest,
        get_token=alice(basic_registry),
    )
    assert_same_files(src, dest, image.blobs)

    wrong = RegistryAuth(basic_registry.url, "alice", "not-the-password")
    for get_token in (None, wrong):
        with pytest.raises(AuthenticationError) as caught:
            await download(
                image.blobs,
                base_url=basic_registry.url,
                repository=REPO,
                dest_dir=tmp_path / "other",
                get_token=get_token,
            )
        assert caught.value.status == 401


# -- 6. downloads through the redirect middleware ------------------------------------------------


async def test_downloads_follow_the_storage_redirect_without_credentials(
    redirect_registry: RealRegistry, file_server: FileServer, tmp_path: Path
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    image = make_image(src, random_layers(*LAYER_SIZES))
    await upload(
        image.blobs,
        base_url=redirect_registry.url,
        repository=REPO,
        src_dir=src,
        get_token=alice(redirect_registry),
    )
    assert file_server.requests == []  # the blobs were not there yet: no redirect

    with recorded() as (client, seen):
        async with client:
            await download(
                image.blobs,
                base_url=redirect_registry.url,
                repository=REPO,
                dest_dir=dest,
                get_token=alice(redirect_registry),
                client=client,
            )
    assert_same_files(src, dest, image.blobs)
    # The registry answered each blob with a redirect (after a 401 asking for credentials) ...
    registry_port = httpx.URL(redirect_registry.url).port
    answers = [s.status for s in seen if s.url.port == registry_port]
    # (a retry after a dropped keep-alive connection may add one more of each)
    assert set(answers) == {401, 307}
    fetched = [b for b in image.blobs if b.size]  # an empty blob needs no request
    assert answers.count(307) >= len(fetched)
    # ... and every blob came from the file server, from the path of its data in storage.
    assert {s.status for s in seen if s.url.port != registry_port} == {200}
    gets = [r for r in file_server.requests if r.method == "GET"]
    assert {r.path for r in gets} == {redirect_registry.blob_path(b.digest) for b in fetched}

    # Existence checks are redirected too; the file server answers them.
    again = await upload(
        image.blobs,
        base_url=redirect_registry.url,
        repository=REPO,
        src_dir=src,
        get_token=alice(redirect_registry),
    )
    assert len(again.skipped) == len(image.blobs)
    assert {r.method for r in file_server.requests} == {"GET", "HEAD"}
    assert all("authorization" not in r.headers for r in file_server.requests)


# -- 7. skopeo ----------------------------------------------------------------------------------


def dir_name(blob: Blob) -> str:
    """The name of a blob's file in skopeo's ``dir:`` layout: its hex digest."""
    return blob.digest.partition(":")[2]


async def run_skopeo(program: str, *args: str) -> None:
    """``skopeo copy`` without a signature policy; its output is shown if it fails."""
    done = await trio.run_process(
        [program, "copy", "--insecure-policy", *args],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")


async def test_skopeo_reads_what_we_pushed(
    plain_registry: RealRegistry, skopeo: str, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "skopeo-dir"
    image = make_image(src, random_layers(*LAYER_SIZES))
    await upload(
        image.blobs,
        base_url=plain_registry.url,
        repository=REPO,
        src_dir=src,
        manifest=image.manifest,
        manifest_ref="v1",
    )
    await run_skopeo(
        skopeo, "--src-tls-verify=false", f"docker://{plain_registry.host}/{REPO}:v1", f"dir:{out}"
    )
    assert (out / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        assert (out / dir_name(blob)).read_bytes() == (src / blob.file_name).read_bytes()


async def test_we_pull_what_skopeo_pushed(
    plain_registry: RealRegistry, skopeo: str, tmp_path: Path
) -> None:
    layout, dest = tmp_path / "skopeo-dir", tmp_path / "dest"
    layers = [tar_gz_layer(f"file{i}", os.urandom(size)) for i, size in enumerate((10, 2_000_000))]
    image = make_image(layout, layers)
    for blob in image.blobs:
        (layout / blob.file_name).rename(layout / dir_name(blob))
    (layout / "manifest.json").write_bytes(image.manifest)
    (layout / "version").write_text("Directory Transport Version: 1.1\n")
    await run_skopeo(
        skopeo,
        "--dest-tls-verify=false",
        "--preserve-digests",  # fail rather than recompress a layer
        f"dir:{layout}",
        f"docker://{plain_registry.host}/skopeo/pushed:v1",
    )
    await assert_manifest_stored(
        plain_registry, "skopeo/pushed", "v1", image.manifest, OCI_MANIFEST
    )
    pulled = await download(
        image.blobs, base_url=plain_registry.url, repository="skopeo/pushed", dest_dir=dest
    )
    assert len(pulled.downloaded) == len(image.blobs)
    for blob in image.blobs:
        assert (dest / blob.file_name).read_bytes() == (layout / dir_name(blob)).read_bytes()


# -- the context manager itself -----------------------------------------------------------------


async def test_a_registry_that_cannot_start_raises_with_its_output(
    programs: None, tmp_path: Path
) -> None:
    auth = DistributionTokenAuth(
        realm="http://127.0.0.1:9/", service="s", issuer="i", rootcertbundle=tmp_path
    )
    with pytest.raises(RegistryStartError, match="exited with status") as caught:
        async with distribution_registry(auth=auth):
            pytest.fail("it started")
    assert "root certificate bundle" in str(caught.value)


async def test_a_missing_registry_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RegistryStartError, match="apt-get install docker-registry"):
        async with distribution_registry():
            pytest.fail("it started")


async def test_the_registry_stops_on_exit_and_keeps_given_storage(
    programs: None, tmp_path: Path
) -> None:
    storage = tmp_path / "kept"
    async with distribution_registry(storage=storage) as url:
        blob = write_blob(tmp_path / "src", b"kept")
        await upload([blob], base_url=url, repository=REPO, src_dir=tmp_path / "src")
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(trust_env=False) as client:
            await client.get(f"{url}/v2/")
    assert RealRegistry(url, storage).has_blob(blob.digest)


_HOST = """
import sys, trio
from trio_blobs.testing import distribution_registry

async def main():
    async with distribution_registry(storage=sys.argv[1]) as url:
        print(url, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


# A registry that ignores SIGTERM: it answers every GET with 200 on its configured address.
_STUBBORN_REGISTRY = f"""#!{sys.executable}
import http.server, json, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
host, port = json.load(open(sys.argv[2]))["http"]["addr"].rsplit(":", 1)
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
http.server.HTTPServer((host, int(port)), Answer).serve_forever()
"""


@pytest.mark.parametrize("registry", ["distribution", "ignoring SIGTERM"])
async def test_the_registry_stops_when_its_host_process_is_killed(
    programs: None, tmp_path: Path, registry: str
) -> None:
    (tmp_path / "tmp").mkdir()  # what a killed host cannot remove stays in here
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(trio_blobs.__file__).parents[1]),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    if registry != "distribution":
        stub = tmp_path / "bin" / "docker-registry"
        stub.parent.mkdir()
        stub.write_text(_STUBBORN_REGISTRY)
        stub.chmod(0o755)
        env["PATH"] = f"{stub.parent}{os.pathsep}{env['PATH']}"
    async with trio.open_nursery() as nursery:
        host = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", _HOST, str(tmp_path / "storage")],
                stdout=subprocess.PIPE,
                check=False,
                env=env,
            )
        )
        try:
            assert host.stdout is not None
            with trio.fail_after(30):
                url = (await host.stdout.receive_some()).decode().strip()
            fresh_connections = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(trust_env=False, limits=fresh_connections) as client:
                assert (await client.get(f"{url}/v2/")).status_code == 200
                host.kill()  # no cleanup runs in the host
                await host.wait()
                # SIGTERM at once, SIGKILL after STOP_TIMEOUT (5 s) for one that ignores it
                with trio.fail_after(15):
                    while True:
                        try:
                            await client.get(f"{url}/v2/")
                        except httpx.ConnectError:
                            break  # no longer listening
                        except httpx.TransportError:
                            pass  # shutting down: connections accepted, then dropped
                        await trio.sleep(0.05)
        finally:
            host.kill()
