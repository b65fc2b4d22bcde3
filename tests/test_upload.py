"""upload(): behaviour against the in-process registry, in memory and over loopback."""

import json
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from trio_blobs import (
    AuthChallenge,
    Blob,
    LocalFileError,
    ProtocolError,
    RegistryError,
    RetriesExhaustedError,
    RetryPolicy,
    UploadResult,
    upload,
)
from trio_blobs._upload import SMALL_BLOB, WHOLE_POST_LIMIT, _held, _with_digest
from trio_blobs.testing import Fault, RecordedRequest, Registry

from ._helpers import BASE_URL, CountingTransport, went_backwards

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def registry() -> Registry:
    """Most tests here are about upload sessions: this registry opens one for every POST, as
    the distribution registry does (so only the first small blob of each upload offers itself
    whole with its POST, in vain). Registries that take such POSTs are made where needed."""
    return Registry(whole_posts=False)


def write_blobs(src: Path, *sizes: int) -> list[Blob]:
    """Random blobs of the given sizes, as files in ``src``."""
    blobs = []
    for size in sizes:
        data = os.urandom(size)
        blob = Blob.from_bytes(data)
        (src / blob.file_name).write_bytes(data)
        blobs.append(blob)
    return blobs


def requests_of(registry: Registry, method: str, part: str = "") -> list[str]:
    return [r.url for r in registry.requests if r.method == method and part in r.url]


def assert_stored(
    registry: Registry, src: Path, blobs: list[Blob], repo: str = "library/_"
) -> None:
    for blob in blobs:
        assert registry.blobs[repo][blob.digest] == (src / blob.file_name).read_bytes()


def image_manifest(blobs: list[Blob], media_type: str | None = OCI_MANIFEST) -> bytes:
    config, *layers = blobs
    document: dict[str, object] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/json", "digest": config.digest, "size": config.size},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": b.digest, "size": b.size}
            for b in layers
        ],
    }
    if media_type is not None:
        document["mediaType"] = media_type
    return json.dumps(document, indent=1).encode()


# -- 1. sources checked before anything is sent ---------------------------------------------


async def test_a_missing_or_wrong_sized_source_fails_before_any_request(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    good, short = write_blobs(tmp_path, 10, 20)
    (tmp_path / short.file_name).write_bytes(b"x")
    with pytest.raises(LocalFileError, match=short.file_name) as caught:
        await upload([good, short], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert caught.value.digest == short.digest
    missing = Blob.from_bytes(b"nowhere")
    with pytest.raises(LocalFileError, match=missing.file_name):
        await upload([good, missing], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert registry.requests == []


# -- 2. existence checks first, with their own limit ---------------------------------------


async def test_present_blobs_are_skipped_after_a_head(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    present, new = write_blobs(tmp_path, 100, 200)
    registry.add_blob((tmp_path / present.file_name).read_bytes())
    calls: list[tuple[int, int]] = []
    result = await upload(
        [present, new],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result == UploadResult(
        uploaded=(new.digest,), skipped=(present.digest,), mounted=(), manifest_digest=None
    )
    assert len(requests_of(registry, "HEAD")) == 2
    assert len(requests_of(registry, "POST")) == 1
    assert calls[0] == (100, 300)
    assert calls[-1] == (300, 300)
    assert_stored(registry, tmp_path, [present, new])


async def test_existence_checks_run_wide_with_their_own_limit(
    registry: Registry, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blobs = write_blobs(tmp_path, *[10] * 300)
    for blob in blobs:
        registry.add_blob((tmp_path / blob.file_name).read_bytes())
    registry.add_fault(Fault(method="HEAD", delay=1.0, times=None))
    transport = CountingTransport(registry.transport())
    async with httpx.AsyncClient(transport=transport) as client:
        result = await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert transport.peak == 128
    assert len(result.skipped) == 300


async def test_a_first_push_asks_about_a_few_small_blobs_only(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """None of the first 16 small blobs is there: the other small ones go without a HEAD
    (one of them is there after all and is simply pushed again); big blobs are always asked."""
    small = write_blobs(tmp_path, *[100] * 40)
    (big,) = write_blobs(tmp_path, SMALL_BLOB)
    registry.add_blob((tmp_path / small[30].file_name).read_bytes())
    result = await upload([*small, big], base_url=BASE_URL, src_dir=tmp_path, client=client)
    heads = requests_of(registry, "HEAD")
    assert sorted(heads) == sorted(
        f"{BASE_URL}/v2/library/_/blobs/{blob.digest}" for blob in [*small[:16], big]
    )
    assert len(requests_of(registry, "POST")) == 41
    assert result.uploaded == tuple(blob.digest for blob in [*small, big])
    assert result.skipped == ()
    assert_stored(registry, tmp_path, [*small, big])


async def test_all_small_blobs_are_asked_about_when_a_probe_finds_one(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    small = write_blobs(tmp_path, *[100] * 40)
    for blob in (small[3], small[30]):
        registry.add_blob((tmp_path / blob.file_name).read_bytes())
    result = await upload(small, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(requests_of(registry, "HEAD")) == 40
    assert len(requests_of(registry, "POST")) == 38
    assert result.skipped == (small[3].digest, small[30].digest)
    assert_stored(registry, tmp_path, small)


# -- 3. cross-repository mount --------------------------------------------------------------


def mountable_blob(registry: Registry, tmp_path: Path) -> tuple[Blob, Blob]:
    """A blob written to ``tmp_path`` and stored in ``models/base``, and the same blob to be
    mounted from there."""
    [blob] = write_blobs(tmp_path, 5000)
    registry.add_blob((tmp_path / blob.file_name).read_bytes(), "models/base")
    return blob, Blob(blob.digest, blob.size, mount_from="models/base")


async def test_mount_answered_201_sends_no_body(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blob, mountable = mountable_blob(registry, tmp_path)
    result = await upload([mountable], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert result.mounted == (blob.digest,)
    assert result.uploaded == ()
    [post] = [r for r in registry.requests if r.method == "POST"]
    assert post.url.endswith(f"/blobs/uploads/?mount={blob.digest}&from=models/base")
    assert [r.method for r in registry.requests] == ["HEAD", "POST"]
    assert_stored(registry, tmp_path, [blob])


async def test_a_blob_listed_twice_is_mounted_if_either_listing_says_from_where(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blob, mountable = mountable_blob(registry, tmp_path)
    result = await upload([blob, mountable], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert result.mounted == (blob.digest,)
    assert [r.method for r in registry.requests] == ["HEAD", "POST"]


async def test_mount_answered_202_uploads_into_the_offered_session(
    tmp_path: Path,
) -> None:
    registry = Registry(mount=False)
    blob, mountable = mountable_blob(registry, tmp_path)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        result = await upload(
            [mountable],
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
        )
    assert result.uploaded == (blob.digest,)
    assert result.mounted == ()
    assert [r.method for r in registry.requests] == ["HEAD", "POST", "PUT"]
    assert_stored(registry, tmp_path, [blob])


# -- 4. monolithic push: POST, then PUT to the Location with its query kept ------------------


class BodyChunkTransport(httpx.AsyncBaseTransport):
    """Records the largest piece a request body was streamed in."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.largest = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)

        async def pieces() -> AsyncIterator[bytes]:
            async for piece in stream:
                self.largest = max(self.largest, len(piece))
                yield piece

        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, stream=_Stream(pieces())
        )
        return await self.inner.handle_async_request(forwarded)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self.source = source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self.source:
            yield piece


# -- small blobs sent whole with their POST ---------------------------------------------------


def whole_posts(registry: Registry) -> list[RecordedRequest]:
    return [r for r in registry.requests if r.method == "POST" and "?digest=" in r.url]


async def test_small_blobs_go_whole_with_their_post_where_the_registry_takes_them(
    tmp_path: Path,
) -> None:
    registry = Registry()
    blob, mountable = mountable_blob(registry, tmp_path)
    small = write_blobs(tmp_path, *[1000] * 5, WHOLE_POST_LIMIT - 1)
    [large] = write_blobs(tmp_path, WHOLE_POST_LIMIT)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        result = await upload(
            [*small, large, mountable], base_url=BASE_URL, src_dir=tmp_path, client=client
        )
    assert set(result.uploaded) == {b.digest for b in [*small, large]}
    assert result.mounted == (blob.digest,)
    posted = whole_posts(registry)
    assert sorted(r.body_size for r in posted) == sorted(b.size for b in small)
    [put] = requests_of(registry, "PUT")  # the large blob alone goes in a session
    assert put.endswith(f"digest={large.digest}")
    assert_stored(registry, tmp_path, [*small, large, blob])


async def test_no_blob_goes_whole_when_chunks_are_asked_for(tmp_path: Path) -> None:
    registry = Registry()
    blobs = write_blobs(tmp_path, 1000, 3000)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        push = partial(upload, blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
        await push(chunk_size=500)
        await push(repository="other/repo", chunk_threshold=2000)
    assert [r.body_size for r in whole_posts(registry)] == [1000]  # under the threshold
    assert_stored(registry, tmp_path, blobs, "other/repo")


async def test_a_registry_that_ignores_whole_posts_is_sent_one_in_vain(tmp_path: Path) -> None:
    registry = Registry(whole_posts=False)  # as the distribution registry: 202 and a session
    blobs = write_blobs(tmp_path, *[1000] * 10)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        result = await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(result.uploaded) == 10
    assert [r.body_size for r in whole_posts(registry)] == [1000]
    assert len(requests_of(registry, "POST")) == len(requests_of(registry, "PUT")) == 10
    assert_stored(registry, tmp_path, blobs)


@pytest.mark.parametrize("status", [400, 415, 501])
async def test_a_registry_that_refuses_whole_posts_gets_the_usual_flow(
    tmp_path: Path, status: int
) -> None:
    registry = Registry()
    registry.add_fault(Fault(method="POST", status=status, times=1))
    blobs = write_blobs(tmp_path, *[1000] * 4)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(whole_posts(registry)) == 1  # refused: not offered again
    assert len(requests_of(registry, "POST")) == 5
    assert len(requests_of(registry, "PUT")) == 4
    assert_stored(registry, tmp_path, blobs)


async def test_a_whole_post_that_fails_lets_another_blob_ask(tmp_path: Path) -> None:
    registry = Registry()
    registry.add_fault(Fault(method="POST", status=503, times=1))
    blobs = write_blobs(tmp_path, *[1000] * 4)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        result = await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(result.uploaded) == 4
    assert len(whole_posts(registry)) == 5  # the failed one, then each blob whole
    assert requests_of(registry, "PUT") == []
    assert_stored(registry, tmp_path, blobs)


async def test_blobs_waiting_for_the_asking_one_are_not_stalled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = Registry()
    registry.add_fault(Fault(method="POST", delay=30.0, times=1))  # a slow first answer
    blobs = write_blobs(tmp_path, *[1000] * 4)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, stall_timeout=1)
    assert len(requests_of(registry, "HEAD")) == 4  # no attempt was cut off and asked again
    assert len(whole_posts(registry)) == 4


async def test_progress_never_counts_a_whole_post_the_registry_ignored(tmp_path: Path) -> None:
    registry = Registry(whole_posts=False)
    [blob] = write_blobs(tmp_path, 100_000)
    totals: list[int] = []
    done: list[int] = []
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload(
            [blob],
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            progress=lambda total, _: totals.append(total),
            blob_progress=lambda _, n: done.append(n),
        )
    sent = [r.body_size for r in registry.requests if r.method in ("POST", "PUT")]
    assert sent == [blob.size] * 2
    assert totals == sorted(totals)  # sent twice, counted once
    assert totals[-1] == blob.size
    assert done == [blob.size]


class _PutsNeverRead(httpx.AsyncBaseTransport):
    """Passes requests on, except that a PUT's body is never read nor answered."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            await trio.sleep_forever()
        return await self.inner.handle_async_request(request)


async def test_the_put_after_an_ignored_whole_post_gets_no_commit_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = Registry(whole_posts=False)
    [blob] = write_blobs(tmp_path, 100_000)
    start = trio.current_time()
    async with httpx.AsyncClient(transport=_PutsNeverRead(registry.transport())) as client:
        with pytest.raises(RetriesExhaustedError, match="no data for 2 s"):
            await upload(
                [blob],
                base_url=BASE_URL,
                src_dir=tmp_path,
                client=client,
                stall_timeout=2,
                retry=RetryPolicy(max_stalls=1),
            )
    assert trio.current_time() - start < 10  # not the 60 s given once a body is all sent


async def test_a_refusal_after_the_registry_took_a_whole_post_is_an_error(
    tmp_path: Path,
) -> None:
    registry = Registry()
    blobs = write_blobs(tmp_path, 1000, 2000)

    def refuse_the_next(blob: Blob, done: int) -> None:
        if done == blob.size:
            registry.add_fault(Fault(method="POST", status=400, times=1))

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        with pytest.raises(RegistryError, match="400"):
            await upload(
                blobs,
                base_url=BASE_URL,
                src_dir=tmp_path,
                client=client,
                concurrency=1,
                blob_progress=refuse_the_next,
            )
    assert len(requests_of(registry, "POST")) == 2  # no plain POST after the refusal


async def test_monolithic_push_streams_the_file_in_bounded_pieces(
    registry: Registry, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 5_000_000)
    transport = BodyChunkTransport(registry.transport())
    async with httpx.AsyncClient(transport=transport) as client:
        result = await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert result.uploaded == (blob.digest,)
    assert [r.method for r in registry.requests] == ["HEAD", "POST", "PUT"]
    put = registry.requests[-1]
    assert "_state=" in put.url  # the Location's own query is kept
    assert put.url.endswith(f"&digest={blob.digest}")
    assert put.headers["content-length"] == str(blob.size)
    assert 0 < transport.largest <= 1024 * 1024
    assert_stored(registry, tmp_path, [blob])


@pytest.mark.parametrize(
    ("location", "url"),
    [
        (
            "http://r.test/v2/a/blobs/uploads/u",
            "http://r.test/v2/a/blobs/uploads/u?digest=sha256:0",
        ),
        (
            "http://r.test/v2/a/blobs/uploads/u?_state=a%2Bb%3D&x=1",
            "http://r.test/v2/a/blobs/uploads/u?_state=a%2Bb%3D&x=1&digest=sha256:0",
        ),
        (
            "https://s3.test/bucket/k?X-Amz-Signature=ab%2F&X-Amz-Date=1",
            "https://s3.test/bucket/k?X-Amz-Signature=ab%2F&X-Amz-Date=1&digest=sha256:0",
        ),
    ],
)
def test_digest_is_added_to_the_location_query_as_it_is(location: str, url: str) -> None:
    assert str(_with_digest(httpx.URL(location), "sha256:0")) == url


# -- 5. chunked push --------------------------------------------------------------------------


async def test_chunked_push_when_asked(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 2_500_000, 0)
    result = await upload(
        blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=1_000_000
    )
    assert result.uploaded == tuple(b.digest for b in blobs)
    patches = [r for r in registry.requests if r.method == "PATCH"]
    assert sorted(r.headers["content-range"] for r in patches) == [
        "0-999999",
        "1000000-1999999",
        "2000000-2499999",
    ]
    assert all(r.headers["content-type"] == "application/octet-stream" for r in patches)
    assert all(r.body_size == 0 for r in registry.requests if r.method == "PUT")
    assert_stored(registry, tmp_path, blobs)


async def test_chunked_push_above_the_threshold(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    small, large = write_blobs(tmp_path, 1000, 3000)
    await upload(
        [small, large], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_threshold=2000
    )
    assert len(requests_of(registry, "PATCH")) == 1
    [patch] = [r for r in registry.requests if r.method == "PATCH"]
    assert patch.body_size == 3000
    assert_stored(registry, tmp_path, [small, large])


async def test_chunked_push_when_the_registry_asks_for_a_minimum_chunk(tmp_path: Path) -> None:
    registry = Registry(chunk_min_length=3_000_000)
    [blob] = write_blobs(tmp_path, 7_000_000)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=1000)
    sizes = [r.body_size for r in registry.requests if r.method == "PATCH"]
    assert sizes == [3_000_000, 3_000_000, 1_000_000]
    assert_stored(registry, tmp_path, [blob])


async def test_chunked_push_recovers_from_416(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    registry.add_fault(Fault(method="PATCH", times=1))  # the first chunk goes through as usual
    registry.add_fault(Fault(method="PATCH", status=416, times=1))  # the second is refused once
    calls: list[tuple[int, int]] = []
    await upload(
        [blob],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        chunk_size=1_000_000,
        progress=lambda done, total: calls.append((done, total)),
    )
    methods = [r.method for r in registry.requests]
    assert methods == ["HEAD", "POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"]
    assert all(0 <= done <= total for done, total in calls)
    assert calls[-1] == (3_000_000, 3_000_000)
    assert_stored(registry, tmp_path, [blob])


class PatchAnswers201(httpx.AsyncBaseTransport):
    """A registry that answers PATCH with 201 and a stale Range, as some do."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "PATCH":
            return response
        await response.aread()
        headers = httpx.Headers(response.headers)
        headers["range"] = "0-0"
        return httpx.Response(201, headers=headers, stream=httpx.ByteStream(response.content))


async def test_chunked_push_tolerates_201_on_patch(registry: Registry, tmp_path: Path) -> None:
    [blob] = write_blobs(tmp_path, 2_000_000)
    async with httpx.AsyncClient(transport=PatchAnswers201(registry.transport())) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=700_000)
    assert len(requests_of(registry, "PATCH")) == 3
    assert_stored(registry, tmp_path, [blob])


# -- 6. a 307 on PUT sends the body on, without Authorization to another origin --------------


class RedirectPuts(httpx.AsyncBaseTransport):
    """Answers every PUT to the registry with a 307 to the same path on a storage origin."""

    def __init__(self, inner: httpx.AsyncBaseTransport, storage: str) -> None:
        self.inner = inner
        self.storage = storage

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method in ("PUT", "PATCH") and request.url.host == "registry.test":
            await request.aread()
            target = f"{self.storage}{request.url.raw_path.decode()}"
            return httpx.Response(307, headers={"location": target}, stream=httpx.ByteStream(b""))
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("chunk_size", [None, 400_000])
async def test_307_sends_the_body_to_storage_without_the_token(
    registry: Registry, tmp_path: Path, chunk_size: int | None
) -> None:
    [blob] = write_blobs(tmp_path, 1_000_000)
    transport = RedirectPuts(registry.transport(), "http://storage.test")
    async with httpx.AsyncClient(transport=transport) as client:
        await upload(
            [blob],
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            token="s3cret",
            chunk_size=chunk_size,
        )
    stored = [r for r in registry.requests if r.url.startswith("http://storage.test/")]
    assert stored, "the body went to the storage origin"
    assert all("authorization" not in r.headers for r in stored)
    assert sum(r.body_size for r in stored) == blob.size
    assert all(
        r.headers["authorization"] == "Bearer s3cret"
        for r in registry.requests
        if r.url.startswith(BASE_URL)
    )
    assert_stored(registry, tmp_path, [blob])


# -- 7. the source is hashed as it streams ---------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 300_000])
async def test_a_changed_source_is_never_committed(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, chunk_size: int | None
) -> None:
    [blob] = write_blobs(tmp_path, 1_000_000)
    path = tmp_path / blob.file_name
    path.write_bytes(b"\0" * blob.size)  # same size, other bytes
    with pytest.raises(LocalFileError, match="changed or is corrupt") as caught:
        await upload(
            [blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=chunk_size
        )
    assert caught.value.digest == blob.digest
    assert blob.digest not in registry.blobs.get("library/_", {})
    assert requests_of(registry, "DELETE")  # the session was abandoned
    assert len(requests_of(registry, "POST")) == 1  # and not retried
    assert not [r for r in registry.requests if r.method == "PUT" and r.body_size == blob.size]


# -- 8. retries, stalls, progress roll-back, cancellation, auth ------------------------------


async def test_a_put_failing_twice_is_retried_and_each_session_abandoned(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 300_000)
    registry.add_fault(Fault(method="PUT", status=500, times=2))
    calls: list[tuple[int, int]] = []
    result = await upload(
        [blob],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.uploaded == (blob.digest,)
    assert len(requests_of(registry, "POST")) == 3
    puts, deletes = requests_of(registry, "PUT"), requests_of(registry, "DELETE")
    # each failed session is abandoned at its own place, without the digest its PUT added
    assert deletes == [put.replace(f"&digest={blob.digest}", "") for put in puts[:2]]
    assert len(set(deletes)) == 2
    assert all(0 <= done <= total == blob.size for done, total in calls)
    assert went_backwards(calls)
    assert calls[-1] == (blob.size, blob.size)
    assert_stored(registry, tmp_path, [blob])


async def test_permanent_errors_fail_the_upload_at_once(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 1000)
    registry.add_fault(Fault(method="POST", status=403, times=None))
    with pytest.raises(RegistryError, match="403") as caught:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert caught.value.digest == blob.digest
    assert len(requests_of(registry, "POST")) == 1


class StallingReader(httpx.AsyncBaseTransport):
    """The first PUT's body stops being read after ``after`` bytes, or is read at ``rate``
    bytes per second (in 100 ms steps); every other request passes straight on."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, *, after: int | None = None, rate: float = 0
    ) -> None:
        self.inner = inner
        self.after = after
        self.rate = rate
        self.done = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "PUT" or self.done:
            return await self.inner.handle_async_request(request)
        self.done = True
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        body, received = bytearray(), 0
        async for piece in stream:
            body += piece
            received += len(piece)
            if self.after is not None and received >= self.after:
                await trio.sleep_forever()
            if self.rate:
                await trio.sleep(len(piece) / self.rate)
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, content=bytes(body)
        )
        return await self.inner.handle_async_request(forwarded)


async def test_an_upload_that_stops_flowing_is_cancelled_and_retried(
    registry: Registry, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    transport = StallingReader(registry.transport(), after=1_000_000)
    start = trio.current_time()
    async with httpx.AsyncClient(transport=transport) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, stall_timeout=4)
    assert 4 <= trio.current_time() - start <= 5
    # the stalled PUT never reached the registry; the retry asked first, then pushed again
    assert [r.method for r in registry.requests] == [
        "HEAD",
        "POST",
        "DELETE",
        "HEAD",
        "POST",
        "PUT",
    ]
    assert_stored(registry, tmp_path, [blob])


async def test_an_upload_that_flows_slowly_is_not_a_stall(
    registry: Registry, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    [blob] = write_blobs(tmp_path, 5 * 1024 * 1024)
    transport = StallingReader(registry.transport(), rate=512 * 1024)  # 10 s for the body
    start = trio.current_time()
    async with httpx.AsyncClient(transport=transport) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, stall_timeout=4)
    assert 10 <= trio.current_time() - start <= 11
    assert len(requests_of(registry, "PUT")) == 1


async def test_a_registry_slow_to_commit_is_given_time(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = write_blobs(tmp_path, 200_000)
    registry.add_fault(Fault(method="PUT", delay=30, times=1))  # hashing a big blob, say
    start = trio.current_time()
    result = await upload(
        [blob], base_url=BASE_URL, src_dir=tmp_path, client=client, stall_timeout=4
    )
    assert 30 <= trio.current_time() - start <= 31
    assert result.uploaded == (blob.digest,)
    assert len(requests_of(registry, "PUT")) == 1


async def test_a_registry_that_never_commits_is_a_stall_after_the_grace(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = write_blobs(tmp_path, 200_000)
    registry.add_fault(Fault(method="PUT", delay=1e6, status=500, times=None))  # never stored
    start = trio.current_time()
    with pytest.raises(RetriesExhaustedError, match=r"no answer for 64\.01 s after the last byte"):
        await upload(
            [blob],
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            stall_timeout=4,
            retry=RetryPolicy(max_stalls=2),
        )
    assert 128 <= trio.current_time() - start <= 140  # two attempts, each given 64.01 s
    assert len(requests_of(registry, "PUT")) == 2


async def test_a_lost_answer_is_found_by_asking_before_pushing_again(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    [blob] = write_blobs(tmp_path, 200_000)
    registry.add_fault(Fault(method="PUT", delay=1e6, times=1))  # stored, but no answer
    result = await upload(
        [blob], base_url=BASE_URL, src_dir=tmp_path, client=client, stall_timeout=4
    )
    assert result.uploaded == (blob.digest,)
    assert [r.method for r in registry.requests] == ["HEAD", "POST", "PUT", "DELETE", "HEAD"]


async def test_cancelling_an_upload_returns_and_abandons_the_session(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = write_blobs(tmp_path, *[100_000] * 4)
    registry.add_fault(Fault(method="PATCH", delay=1e6, times=None))
    with trio.move_on_after(3) as scope:
        await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=60_000)
    assert scope.cancelled_caught
    assert len(requests_of(registry, "DELETE")) == 4
    assert registry.blobs.get("library/_", {}) == {}


async def test_push_asks_for_a_pull_and_push_token(tmp_path: Path) -> None:
    registry = Registry(token="t1")
    blobs = write_blobs(tmp_path, *[100] * 20)
    challenges: list[AuthChallenge] = []

    async def get_token(challenge: AuthChallenge) -> str:
        challenges.append(challenge)
        assert registry.token is not None
        return registry.token

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, get_token=get_token)
    assert len(challenges) == 1
    assert challenges[0].scope is not None
    assert challenges[0].scope.endswith(":pull,push") or challenges[0].scope.endswith(":pull")
    assert_stored(registry, tmp_path, blobs)


# -- 9. the manifest, after every blob ---------------------------------------------------


async def test_a_long_answer_to_an_upload_request_is_not_waited_for(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nothing of an upload's answers is used but their heads: a body (a registry's, or an
    attacker's) of any length is read up to 64 KiB, not to its end."""
    [blob] = write_blobs(tmp_path, 10)
    registry.add_fault(
        Fault(method="POST", path="/blobs/uploads/", extra=b"x" * 2**24, stall_after=2**17)
    )
    start = trio.current_time()
    result = await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert result.uploaded == (blob.digest,)
    assert trio.current_time() - start < 1  # no stall: the rest was never asked for


@pytest.mark.parametrize(
    ("declared", "given", "sent"),
    [
        (OCI_MANIFEST, None, OCI_MANIFEST),
        (None, None, OCI_MANIFEST),
        (OCI_MANIFEST, "application/vnd.custom+json", "application/vnd.custom+json"),
    ],
)
async def test_manifest_is_pushed_last_as_given(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    declared: str | None,
    given: str | None,
    sent: str,
) -> None:
    blobs = write_blobs(tmp_path, 10, 20_000, 30_000)
    manifest = image_manifest(blobs, declared)
    result = await upload(
        blobs,
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        manifest=manifest,
        manifest_ref="v1",
        manifest_media_type=given,
    )
    last = registry.requests[-1]
    assert last.method == "PUT"
    assert last.url == f"{BASE_URL}/v2/library/_/manifests/v1"
    assert last.headers["content-type"] == sent
    assert registry.manifests["library/_"]["v1"] == (manifest, sent)
    assert result.manifest_digest == Blob.from_bytes(manifest).digest


async def test_manifest_ref_defaults_to_its_digest(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10, 20)
    manifest = image_manifest(blobs)
    result = await upload(
        blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, manifest=manifest
    )
    assert result.manifest_digest is not None
    assert registry.requests[-1].url.endswith(f"/manifests/{result.manifest_digest}")


async def test_no_manifest_when_a_blob_fails(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10, 20)
    # The first POST, carrying its blob, is taken for a refusal of that form; the plain POST
    # that follows is refused too, and fails the upload.
    registry.add_fault(Fault(method="POST", status=400, times=None))
    with pytest.raises(RegistryError):
        await upload(
            blobs,
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            manifest=image_manifest(blobs),
            concurrency=1,
        )
    assert requests_of(registry, "PUT", "/manifests/") == []


async def test_a_wrong_manifest_digest_from_the_registry_is_an_error(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    blobs = write_blobs(tmp_path, 10, 20)
    registry.add_fault(
        Fault(
            method="PUT",
            path="/manifests/",
            status=201,
            headers={"docker-content-digest": "sha256:" + "0" * 64},
            times=None,
        )
    )
    with pytest.raises(ProtocolError, match="stored the manifest as sha256:0000"):
        await upload(
            blobs,
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            manifest=image_manifest(blobs),
        )
    assert len(requests_of(registry, "PUT", "/manifests/")) == 1  # not sent again in vain


async def test_a_manifest_with_unknown_blobs_is_refused_by_the_registry(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10, 20)
    manifest = image_manifest([*blobs, Blob.from_bytes(b"never pushed")])
    with pytest.raises(RegistryError, match="MANIFEST_BLOB_UNKNOWN"):
        await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, manifest=manifest)


# -- 10. nothing to do ----------------------------------------------------------------------


async def test_nothing_to_do_returns_at_once(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    result = await upload([], base_url=BASE_URL, src_dir=tmp_path / "nowhere", client=client)
    assert result == UploadResult((), (), (), None)
    assert registry.requests == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"manifest_ref": "v1"}, ValueError, "need a manifest"),
        ({"manifest": b"{}", "manifest_ref": "bad/tag"}, ValueError, "manifest_ref"),
        ({"manifest": b"{}", "manifest_ref": "sha256:" + "0" * 64}, ValueError, "digest"),
        ({"manifest": "{}"}, TypeError, "bytes"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"head_concurrency": 0}, ValueError, "head_concurrency"),
        ({"concurrency": -1}, ValueError, "concurrency"),
        ({"base_url": "ftp://x"}, ValueError, "base_url"),
        ({"repository": "a//b"}, ValueError, "repository"),
        ({"src_dir": None}, TypeError, "src_dir must be a path"),
        ({"src_dir": ""}, ValueError, "src_dir is empty"),
        ({"retry": 3}, TypeError, "retry must be a RetryPolicy"),
        ({"progress": 5}, TypeError, "progress must be callable"),
        ({"stall_timeout": True}, ValueError, "stall_timeout"),
        ({"token": "a\nb"}, ValueError, "token must be a str with no line breaks"),
        ({"logger": "trio_blobs"}, TypeError, "logger must be a logging.Logger"),
        ({"client": "nope"}, TypeError, "client must be an httpx.AsyncClient"),
    ],
)
@pytest.mark.parametrize("count", [1, 0])
async def test_bad_arguments_fail_before_any_request(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
    count: int,
) -> None:
    args: dict[str, object] = {
        "blobs": write_blobs(tmp_path, 10)[:count],
        "base_url": BASE_URL,
        "src_dir": tmp_path,
        "client": client,
    } | kwargs
    with pytest.raises(error, match=match):
        await upload(**args)  # type: ignore[arg-type]
    assert registry.requests == []


# -- over real sockets ----------------------------------------------------------------------


async def test_push_and_pull_round_trip_over_loopback(registry: Registry, tmp_path: Path) -> None:
    from trio_blobs import download

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    blobs = write_blobs(src, 0, 1, 100_000, 3_000_000)
    manifest = image_manifest(blobs)
    async with registry.serving() as base_url:
        pushed = await upload(
            blobs, base_url=base_url, src_dir=src, manifest=manifest, manifest_ref="latest"
        )
        pulled = await download(blobs, base_url=base_url, dest_dir=dest)
    assert set(pushed.uploaded) == set(pulled.downloaded) == {b.digest for b in blobs}
    for blob in blobs:
        assert (dest / blob.file_name).read_bytes() == (src / blob.file_name).read_bytes()
    assert registry.manifests["library/_"]["latest"][0] == manifest


# -- edge cases from review -----------------------------------------------------------------


class Rewrite(httpx.AsyncBaseTransport):
    """Changes the headers of answers to ``method`` requests with ``change(headers)``."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, method: str, change: dict[str, str | None]
    ) -> None:
        self.inner = inner
        self.method = method
        self.change = change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != self.method:
            return response
        headers = httpx.Headers(response.headers)
        for name, value in self.change.items():
            if value is None:
                del headers[name]
            else:
                headers[name] = value.format(location=response.headers.get("location", ""))
        return httpx.Response(response.status_code, headers=headers, stream=response.stream)


@pytest.mark.parametrize(
    "change",
    [
        {"location": None, "docker-upload-location": "{location}"},  # the older header
        {"location": "http://registry.test{location}"},  # absolute, same origin
    ],
)
async def test_upload_locations_in_their_other_forms(
    registry: Registry, tmp_path: Path, change: dict[str, str | None]
) -> None:
    [blob] = write_blobs(tmp_path, 1000)
    async with httpx.AsyncClient(transport=Rewrite(registry.transport(), "POST", change)) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, token="t")
    put = registry.requests[-1]
    assert put.method == "PUT"
    assert put.headers["authorization"] == "Bearer t"
    assert put.headers["content-type"] == "application/octet-stream"
    assert_stored(registry, tmp_path, [blob])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"location": "http://[::1"}, "unusable Location"),
        ({"location": "ftp://registry.test/x"}, "unusable Location"),
        ({"location": None}, "without a Location"),
    ],
)
async def test_unusable_upload_locations_are_protocol_errors(
    registry: Registry, tmp_path: Path, change: dict[str, str | None], match: str
) -> None:
    [blob] = write_blobs(tmp_path, 1000)
    async with httpx.AsyncClient(transport=Rewrite(registry.transport(), "POST", change)) as client:
        with pytest.raises(ProtocolError, match=match) as caught:
            await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert caught.value.digest == blob.digest


@pytest.mark.parametrize(("value", "patches"), [("abc", 0), ("-5", 0), ("2000", 1)])
async def test_a_minimum_chunk_length_is_read_leniently(
    registry: Registry, tmp_path: Path, value: str, patches: int
) -> None:
    [blob] = write_blobs(tmp_path, 3000)
    transport = Rewrite(registry.transport(), "POST", {"oci-chunk-min-length": value})
    async with httpx.AsyncClient(transport=transport) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(requests_of(registry, "PATCH")) == patches
    assert_stored(registry, tmp_path, [blob])


async def test_a_minimum_chunk_length_alone_makes_the_push_chunked(tmp_path: Path) -> None:
    registry = Registry(chunk_min_length=400_000)
    [blob] = write_blobs(tmp_path, 1_000_000)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(requests_of(registry, "PATCH")) == 1  # the default chunk is larger than the blob


async def test_a_blob_at_the_threshold_goes_in_one_put(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 2000)
    await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_threshold=2000)
    assert requests_of(registry, "PATCH") == []


async def test_a_416_on_the_first_chunk_starts_the_session_over(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    registry.add_fault(Fault(method="PATCH", status=416, times=1))
    calls: list[tuple[int, int]] = []
    await upload(
        [blob],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        chunk_size=1_000_000,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [r.method for r in registry.requests][:5] == ["HEAD", "POST", "PATCH", "GET", "PATCH"]
    assert all(0 <= done <= total for done, total in calls)
    assert_stored(registry, tmp_path, [blob])


async def test_a_registry_that_keeps_refusing_chunks_gets_a_new_session(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    registry.add_fault(Fault(method="PATCH", status=416, times=4))
    await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=1_000_000)
    assert len(requests_of(registry, "POST")) == 2
    assert_stored(registry, tmp_path, [blob])


async def test_progress_of_a_failed_chunked_attempt_is_taken_back(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    registry.add_fault(Fault(method="PUT", status=500, times=1))
    calls: list[tuple[int, int]] = []
    await upload(
        [blob],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        chunk_size=1_000_000,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert all(0 <= done <= total for done, total in calls)
    assert went_backwards(calls)
    assert calls[-1] == (blob.size, blob.size)


async def test_a_failed_chunked_attempt_deletes_its_newest_location(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    registry.add_fault(Fault(method="PATCH", times=2))  # two chunks go through
    registry.add_fault(Fault(method="PATCH", status=400, times=1))  # the third is refused
    with pytest.raises(RegistryError):
        await upload(
            [blob], base_url=BASE_URL, src_dir=tmp_path, client=client, chunk_size=1_000_000
        )
    patches, [delete] = requests_of(registry, "PATCH"), requests_of(registry, "DELETE")
    assert delete == patches[-1]


async def test_a_file_changed_before_a_resend_is_never_committed(
    registry: Registry, tmp_path: Path
) -> None:
    [blob] = write_blobs(tmp_path, 1_000_000)
    path = tmp_path / blob.file_name

    def progress(done: int, total: int) -> None:
        if done == total:  # the first send is complete: change the file before the resend
            path.write_bytes(b"\0" * total)

    transport = RedirectPuts(registry.transport(), "http://storage.test")
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(LocalFileError, match="changed"):
            await upload(
                [blob], base_url=BASE_URL, src_dir=tmp_path, client=client, progress=progress
            )
    assert blob.digest not in registry.blobs.get("library/_", {})


@pytest.mark.parametrize("chunk_size", [None, 300_000])
async def test_a_file_changed_during_the_upload_is_never_committed(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path, chunk_size: int | None
) -> None:
    [blob] = write_blobs(tmp_path, 3_000_000)
    path = tmp_path / blob.file_name

    def progress(done: int, total: int) -> None:
        if done >= 1_000_000:
            with path.open("r+b") as file:
                file.seek(2_500_000)
                file.write(b"changed")

    with pytest.raises(LocalFileError, match="changed"):
        await upload(
            [blob],
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            chunk_size=chunk_size,
            progress=progress,
        )
    assert blob.digest not in registry.blobs.get("library/_", {})


async def test_a_directory_is_not_a_source(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    good = write_blobs(tmp_path, 10)[0]
    odd = Blob.from_bytes(b"")
    (tmp_path / odd.file_name).mkdir()
    with pytest.raises(LocalFileError, match=odd.file_name):
        await upload([good, odd], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert registry.requests == []


async def test_a_fifo_is_refused_without_waiting_for_a_writer(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blob = Blob.from_bytes(b"hello")
    os.mkfifo(tmp_path / blob.file_name)
    # A blocking open() would hold the loop, which fail_after cannot cut: pytest-timeout would.
    with trio.fail_after(5), pytest.raises(LocalFileError, match="not a regular file"):
        await upload([blob], base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert registry.requests == []


async def test_a_mounted_blob_counts_for_progress(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    _, mountable = mountable_blob(registry, tmp_path)
    calls: list[tuple[int, int]] = []
    await upload(
        [mountable],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (5000, 5000)


async def test_a_scopeless_challenge_asks_for_push(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10)
    registry.add_fault(
        Fault(
            method="POST",
            status=401,
            headers={"www-authenticate": 'Bearer realm="http://registry.test/token"'},
        )
    )
    seen: list[AuthChallenge] = []

    async def get_token(challenge: AuthChallenge) -> str:
        seen.append(challenge)
        return "t"

    await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, get_token=get_token)
    assert [c.scope for c in seen] == ["repository:library/_:pull,push"]


async def test_existence_checks_are_retried(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10)
    registry.add_fault(Fault(method="HEAD", status=503, times=1))
    await upload(blobs, base_url=BASE_URL, src_dir=tmp_path, client=client)
    assert len(requests_of(registry, "HEAD")) == 2


async def test_the_retry_policy_is_the_callers(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10)
    registry.add_fault(Fault(method="PUT", status=500, times=None))
    with pytest.raises(RetriesExhaustedError):
        await upload(
            blobs,
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            retry=RetryPolicy(max_attempts=2),
        )
    assert len(requests_of(registry, "PUT")) == 2


async def test_a_manifest_answered_200_is_accepted(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    blobs = write_blobs(tmp_path, 10, 20)
    manifest = image_manifest(blobs)
    digest = Blob.from_bytes(manifest).digest
    registry.add_fault(
        Fault(
            method="PUT", path="/manifests/", status=200, headers={"docker-content-digest": digest}
        )
    )
    result = await upload(
        blobs, base_url=BASE_URL, src_dir=tmp_path, client=client, manifest=manifest
    )
    assert result.manifest_digest == digest


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"manifest_media_type": "application/vnd.oci.image.manifest.v1+json\r\nX: y"},
            "type/subtype",
        ),
        ({"manifest_media_type": "application/vnd.ocï+json"}, "type/subtype"),
        ({"manifest_ref": "sha512:" + "0" * 128}, "manifest_ref"),
    ],
)
async def test_bad_manifest_options_fail_before_any_request(
    registry: Registry,
    client: httpx.AsyncClient,
    tmp_path: Path,
    kwargs: dict[str, str],
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        await upload(
            write_blobs(tmp_path, 10),
            base_url=BASE_URL,
            src_dir=tmp_path,
            client=client,
            manifest=b"{}",
            **kwargs,  # type: ignore[arg-type]
        )
    assert registry.requests == []


def test_held_bytes_are_read_from_the_range_header() -> None:
    def held(value: str | None) -> int:
        headers = {} if value is None else {"range": value}
        return _held(httpx.Response(204, headers=headers))

    assert [held(v) for v in ("0-0", "0-99", "bytes=0-99", " 0-1 ", None, "5-9", "x")] == [
        0,
        100,
        100,
        2,
        0,
        0,
        0,
    ]


async def test_errors_from_a_mock_transport_are_transfer_errors(tmp_path: Path) -> None:
    [blob] = write_blobs(tmp_path, 10)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(404)
        return httpx.Response(500, json={"errors": [{"code": "UNKNOWN", "message": "boom"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(RetriesExhaustedError, match="boom"):
            await upload(
                [blob],
                base_url=BASE_URL,
                src_dir=tmp_path,
                client=client,
                retry=RetryPolicy(max_attempts=1),
            )


async def test_blob_progress_follows_each_blob(
    registry: Registry, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    present, mounted, pushed, empty = write_blobs(tmp_path, 100, 200, 3_000_000, 0)
    registry.add_blob((tmp_path / present.file_name).read_bytes())
    registry.add_blob((tmp_path / mounted.file_name).read_bytes(), "models/base")
    seen: dict[str, list[int]] = {}
    await upload(
        [present, Blob(mounted.digest, mounted.size, mount_from="models/base"), pushed, empty],
        base_url=BASE_URL,
        src_dir=tmp_path,
        client=client,
        chunk_size=1_000_000,
        blob_progress=lambda blob, done: seen.setdefault(blob.digest, []).append(done),
    )
    assert seen[present.digest] == [100]
    assert seen[mounted.digest] == [200]
    assert seen[pushed.digest][-1] == 3_000_000
    assert seen[pushed.digest] == sorted(seen[pushed.digest])
    assert seen[empty.digest] == [0]  # done, though no byte moved
