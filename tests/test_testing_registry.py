"""The in-process registry (``trio_blobs.testing``), driven through plain httpx clients.

Most tests run against both front ends: the in-memory transport and a real loopback server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
import trio
import trio.testing

import trio_blobs.testing
from trio_blobs._digest import compute_digest
from trio_blobs.testing import Fault, Registry

from ._real import skopeo  # noqa: F401 - a fixture

Connect = Callable[[Registry], AbstractAsyncContextManager[httpx.AsyncClient]]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"


@asynccontextmanager
async def memory_client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    transport = registry.transport()
    async with httpx.AsyncClient(transport=transport, base_url="http://registry.test") as client:
        yield client


@asynccontextmanager
async def socket_client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        registry.serving() as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as client,
    ):
        yield client


@pytest.fixture(params=[memory_client, socket_client], ids=["memory", "socket"])
def connect(request: pytest.FixtureRequest) -> Connect:
    front_end: Connect = request.param
    return front_end


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    code: str = response.json()["errors"][0]["code"]
    return code


async def read_into(received: bytearray, client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("GET", url) as response:
        async for chunk in response.aiter_raw():
            received += chunk


def origin(client: httpx.AsyncClient) -> str:
    return str(client.base_url).rstrip("/")


def test_public_surface() -> None:
    assert trio_blobs.testing.__all__ == [
        "DistributionBasicAuth",
        "DistributionTokenAuth",
        "Fault",
        "RecordedRequest",
        "Registry",
        "RegistryStartError",
        "distribution_registry",
    ]


def test_fault_validates() -> None:
    for bad in (
        {"times": 0},
        {"digest": "sha256:nope"},
        {"status": 99},
        {"trickle": 0},
        {"delay": float("nan")},
        {"trickle": float("nan")},
    ):
        with pytest.raises(ValueError):  # noqa: PT011
            Fault(**bad)
    for wrong, message in (
        ({"body": "<html>"}, "body and extra must be bytes"),
        ({"extra": "x"}, "body and extra must be bytes"),
        ({"headers": {"Retry-After": 1}}, "headers must map str to str"),
        ({"truncate_at": 5.5}, "truncate_at must be an int or None"),
        ({"times": True}, "times must be an int or None"),
        ({"method": b"GET"}, "method must be a str or None"),
        ({"corrupt": "yes"}, "corrupt must be True or False"),
        ({"headers": None}, "headers must map str to str"),
        ({"delay": "1"}, "delay must be a number"),
    ):
        with pytest.raises(TypeError, match=message):
            Fault(**wrong)  # type: ignore[arg-type]


def test_blobs_go_only_into_repositories_the_registry_serves() -> None:
    registry = Registry()
    for name in ("Org/App", "", "org/app/", "a//b"):
        with pytest.raises(ValueError, match="is not a repository name"):
            registry.add_blob(b"x", name)
    assert registry.blobs == {}


async def test_an_answer_without_a_body_can_be_lost_or_held(connect: Connect) -> None:
    registry = Registry()
    data = b"tensor"
    digest = compute_digest(data)
    registry.add_fault(Fault(method="POST", digest=digest, truncate_at=0))  # by its ?digest=
    async with connect(registry) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"/v2/app/blobs/uploads/?digest={digest}", content=data)
        assert registry.blobs["app"][digest] == data  # it took effect; its answer was lost
        registry.add_fault(Fault(method="HEAD", digest=digest, stall_after=0))
        with trio.move_on_after(0.2) as held:
            await client.head(f"/v2/app/blobs/{digest}")
        assert held.cancelled_caught
        registry.add_fault(Fault(method="HEAD", digest=digest, truncate_at=1000))
        assert (await client.head(f"/v2/app/blobs/{digest}")).status_code == 200  # nothing to cut


async def test_blob_get_head_and_unknown(connect: Connect) -> None:
    registry = Registry()
    data = bytes(range(256)) * 12_289  # a few 1 MiB slices and a remainder
    blob = registry.add_blob(data, "a/b/c")
    async with connect(registry) as client:
        url = f"/v2/a/b/c/blobs/{blob.digest}"
        got = await client.get(url)
        assert got.status_code == 200
        assert got.content == data
        assert got.headers["docker-content-digest"] == blob.digest
        assert got.headers["content-type"] == "application/octet-stream"
        head = await client.head(url)
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(data))
        assert head.content == b""
        unknown = await client.get(f"/v2/a/b/c/blobs/{compute_digest(b'other')}")
        assert (unknown.status_code, error_code(unknown)) == (404, "BLOB_UNKNOWN")
        elsewhere = await client.get(f"/v2/a/b/blobs/{blob.digest}")
        assert elsewhere.status_code == 404
        malformed = await client.get("/v2/a/b/c/blobs/sha256:zz")
        assert (malformed.status_code, error_code(malformed)) == (400, "DIGEST_INVALID")
        assert (await client.get("/v2/")).json() == {}
    first = registry.requests[0]
    assert (first.method, first.url, first.body_size) == ("GET", str(got.request.url), 0)
    assert first.headers["HOST"] == got.request.headers["host"]


async def test_unknown_route_and_method(connect: Connect) -> None:
    registry = Registry()
    blob = registry.add_blob(b"x")
    async with connect(registry) as client:
        nowhere = await client.get("/nowhere")
        assert (nowhere.status_code, error_code(nowhere)) == (404, "NAME_UNKNOWN")
        delete = await client.delete(f"/v2/library/_/blobs/{blob.digest}")
        assert (delete.status_code, error_code(delete)) == (405, "UNSUPPORTED")
        assert delete.headers["allow"] == "GET, HEAD"


async def test_chunked_upload_with_416_recovery(connect: Connect) -> None:
    registry = Registry(chunk_min_length=4)
    data = b"0123456789"
    digest = compute_digest(data)
    async with connect(registry) as client:
        start = await client.post("/v2/lib/x/blobs/uploads/")
        assert start.status_code == 202
        assert start.headers["range"] == "0-0"
        assert start.headers["oci-chunk-min-length"] == "4"
        assert start.headers["docker-upload-uuid"] in start.headers["location"]
        assert start.headers["location"].startswith("/v2/lib/x/blobs/uploads/")
        first = await client.patch(
            start.headers["location"],
            content=data[:4],
            headers={"Content-Range": "0-3", "Content-Type": "application/octet-stream"},
        )
        assert (first.status_code, first.headers["range"]) == (202, "0-3")
        skipped = await client.patch(
            first.headers["location"], content=data[6:], headers={"Content-Range": "6-9"}
        )
        assert (skipped.status_code, skipped.headers["range"]) == (416, "0-3")
        status = await client.get(first.headers["location"])
        assert (status.status_code, status.headers["range"]) == (204, "0-3")

        async def rest() -> AsyncIterator[bytes]:  # streamed: chunked on the wire
            yield data[4:6]
            yield data[6:]

        second = await client.patch(
            status.headers["location"], content=rest(), headers={"Content-Range": "4-9"}
        )
        assert (second.status_code, second.headers["range"]) == (202, "0-9")
        stale = await client.put(f"{first.headers['location']}&digest={digest}")
        assert (stale.status_code, error_code(stale)) == (400, "BLOB_UPLOAD_INVALID")
        done = await client.put(f"{second.headers['location']}&digest={digest}")
        assert done.status_code == 201
        assert done.headers["location"] == f"/v2/lib/x/blobs/{digest}"
        assert done.headers["docker-content-digest"] == digest
        assert (await client.get(f"/v2/lib/x/blobs/{digest}")).content == data
        gone = await client.get(second.headers["location"])
        assert (gone.status_code, error_code(gone)) == (404, "BLOB_UPLOAD_UNKNOWN")
    assert [r.body_size for r in registry.requests if r.method == "PATCH"] == [4, 4, 6]


async def test_upload_session_rules() -> None:
    registry = Registry(chunk_min_length=4)
    async with memory_client(registry) as client:
        location = (await client.post("/v2/x/blobs/uploads/")).headers["location"]
        bare = await client.get(location.partition("?")[0])
        assert (bare.status_code, error_code(bare)) == (400, "BLOB_UPLOAD_INVALID")
        short = await client.patch(location, content=b"ab")  # no Content-Range: appended
        assert (short.status_code, short.headers["range"]) == (202, "0-1")
        after_short = await client.patch(short.headers["location"], content=b"cdef")
        assert (after_short.status_code, error_code(after_short)) == (400, "BLOB_UPLOAD_INVALID")
        mismatch = await client.put(f"{short.headers['location']}&digest={compute_digest(b'x')}")
        assert (mismatch.status_code, error_code(mismatch)) == (400, "DIGEST_INVALID")
        assert (await client.get(short.headers["location"])).status_code == 404

        location = (await client.post("/v2/x/blobs/uploads/")).headers["location"]
        malformed = await client.put(f"{location}&digest=sha256:abc")
        assert (malformed.status_code, error_code(malformed)) == (400, "DIGEST_INVALID")
        assert (await client.delete(location)).status_code == 204
        assert (await client.delete(location)).status_code == 404
    assert registry.blobs == {}


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_an_upload_cancelled_while_its_body_comes_is_unknown(
    connect: Connect, method: str
) -> None:
    registry = Registry()
    data = b"blob" * 1000
    halfway = trio.Event()
    cancelled = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield data[:10]
        halfway.set()
        await cancelled.wait()
        yield data[10:]

    async with connect(registry) as client:
        location = (await client.post("/v2/x/blobs/uploads/")).headers["location"]
        target = location if method == "PATCH" else f"{location}&digest={compute_digest(data)}"
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                answer = await client.request(method, target, content=body())
                assert (answer.status_code, error_code(answer)) == (404, "BLOB_UPLOAD_UNKNOWN")

            nursery.start_soon(send)
            await halfway.wait()
            assert (await client.delete(location)).status_code == 204
            cancelled.set()
        assert (await client.get("/v2/")).status_code == 200
    assert registry.blobs == {}


async def test_monolithic_upload_keeps_the_location_query(connect: Connect) -> None:
    registry = Registry()
    data, other = b"monolithic" * 1000, b"single request"
    async with connect(registry) as client:
        location = (await client.post("/v2/lib/x/blobs/uploads/")).headers["location"]
        assert "?_state=" in location
        put = await client.put(f"{location}&digest={compute_digest(data)}", content=data)
        assert put.status_code == 201
        recorded = registry.requests[-1]
        assert recorded.url == f"{origin(client)}{location}&digest={compute_digest(data)}"
        assert recorded.body_size == len(data)
        single = await client.post(
            "/v2/lib/x/blobs/uploads/", params={"digest": compute_digest(other)}, content=other
        )
        assert single.status_code == 201
        assert single.headers["docker-content-digest"] == compute_digest(other)
    assert registry.blobs["lib/x"] == {compute_digest(data): data, compute_digest(other): other}


async def test_mount(connect: Connect) -> None:
    registry = Registry()
    blob = registry.add_blob(b"shared", "src/repo")
    async with connect(registry) as client:
        params = {"mount": blob.digest, "from": "src/repo"}
        mounted = await client.post("/v2/dst/blobs/uploads/", params=params)
        assert mounted.status_code == 201
        assert mounted.headers["location"] == f"/v2/dst/blobs/{blob.digest}"
        assert mounted.headers["docker-content-digest"] == blob.digest
        assert registry.blobs["dst"] == {blob.digest: b"shared"}
        unknown = {"mount": compute_digest(b"?"), "from": "src/repo"}
        opened = await client.post("/v2/dst/blobs/uploads/", params=unknown)
        assert opened.status_code == 202
        assert "/blobs/uploads/" in opened.headers["location"]
        registry.mount = False
        refused = await client.post("/v2/other/blobs/uploads/", params=params)
        assert refused.status_code == 202
    assert "other" not in registry.blobs


def small_image(registry: Registry, repository: str) -> bytes:
    """An image manifest whose config (its only blob) is stored in ``repository``."""
    config = registry.add_blob(b"{}", repository)
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config.digest, "size": config.size},
            "layers": [],
        }
    ).encode()


async def test_tags_and_repositories_are_listed_a_page_at_a_time(connect: Connect) -> None:
    registry = Registry()
    manifest = small_image(registry, "org/app")
    registry.add_blob(b"only a blob", "org/blobs")
    async with connect(registry) as client:
        for tag in ("v2", "v1", "latest"):
            put = await client.put(
                f"/v2/org/app/manifests/{tag}", content=manifest, headers={"Content-Type": MANIFEST}
            )
            assert put.status_code == 201
        listed = await client.get("/v2/org/app/tags/list")
        assert listed.json() == {"name": "org/app", "tags": ["latest", "v1", "v2"]}
        first = await client.get("/v2/org/app/tags/list", params={"n": "2"})
        assert first.json()["tags"] == ["latest", "v1"]
        assert first.headers["link"] == '</v2/org/app/tags/list?n=2&last=v1>; rel="next"'
        rest = await client.get("/v2/org/app/tags/list", params={"n": "2", "last": "v1"})
        assert rest.json()["tags"] == ["v2"]
        assert "link" not in rest.headers
        assert (await client.get("/v2/org/blobs/tags/list")).json()["tags"] == []
        unknown = await client.get("/v2/org/none/tags/list")
        assert (unknown.status_code, error_code(unknown)) == (404, "NAME_UNKNOWN")
        bad = await client.get("/v2/org/app/tags/list", params={"n": "-1"})
        assert (bad.status_code, error_code(bad)) == (400, "PAGINATION_NUMBER_INVALID")
        catalog = await client.get("/v2/_catalog")
        assert catalog.json() == {"repositories": ["org/app", "org/blobs"]}
        assert (await client.head("/v2/")).status_code == 200


async def test_skopeo_lists_and_inspects_what_the_registry_serves(skopeo: str) -> None:  # noqa: F811
    registry = Registry()
    manifest = small_image(registry, "org/app")
    async with registry.serving() as url:
        host = url.removeprefix("http://")
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            put = await client.put(
                "/v2/org/app/manifests/v1", content=manifest, headers={"Content-Type": MANIFEST}
            )
            assert put.status_code == 201
        tls = "--tls-verify=false"
        tags = await trio.run_process(
            [skopeo, "list-tags", tls, f"docker://{host}/org/app"], capture_stdout=True
        )
        assert json.loads(tags.stdout)["Tags"] == ["v1"]
        raw = await trio.run_process(
            [skopeo, "inspect", tls, "--raw", f"docker://{host}/org/app:v1"], capture_stdout=True
        )
        assert raw.stdout == manifest


async def test_manifests(connect: Connect) -> None:
    registry = Registry()
    config, layer = registry.add_blob(b"{}", "app"), registry.add_blob(b"layer", "app")

    def image(layer_digest: str) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": "x", "digest": config.digest, "size": config.size},
                "layers": [{"mediaType": "y", "digest": layer_digest, "size": 5}],
            },
            indent=3,
        ).encode()

    manifest = image(layer.digest)
    digest = compute_digest(manifest)
    async with connect(registry) as client:
        put = await client.put(
            "/v2/app/manifests/v1", content=manifest, headers={"Content-Type": MANIFEST}
        )
        assert put.status_code == 201
        assert put.headers["docker-content-digest"] == digest
        assert put.headers["location"] == f"/v2/app/manifests/{digest}"
        for reference in ("v1", digest):
            got = await client.get(f"/v2/app/manifests/{reference}")
            assert (got.content, got.headers["content-type"]) == (manifest, MANIFEST)
            assert got.headers["docker-content-digest"] == digest
        head = await client.head("/v2/app/manifests/v1")
        assert (head.status_code, head.content) == (200, b"")

        dangling = image(compute_digest(b"not pushed"))
        bad = await client.put(
            "/v2/app/manifests/v2", content=dangling, headers={"Content-Type": MANIFEST}
        )
        assert (bad.status_code, error_code(bad)) == (400, "MANIFEST_BLOB_UNKNOWN")
        wrong = await client.put(
            f"/v2/app/manifests/{compute_digest(b'x')}",
            content=manifest,
            headers={"Content-Type": MANIFEST},
        )
        assert (wrong.status_code, error_code(wrong)) == (400, "DIGEST_INVALID")

        def index(manifest_digest: str) -> bytes:
            entry = {"mediaType": MANIFEST, "digest": manifest_digest, "size": 1}
            return json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()

        ok = await client.put(
            "/v2/app/manifests/all", content=index(digest), headers={"Content-Type": INDEX}
        )
        assert ok.status_code == 201
        unknown_child = index(compute_digest(b"no manifest"))
        bad_index = await client.put(
            "/v2/app/manifests/all", content=unknown_child, headers={"Content-Type": INDEX}
        )
        assert (bad_index.status_code, error_code(bad_index)) == (400, "MANIFEST_BLOB_UNKNOWN")
        garbage = await client.put(
            "/v2/app/manifests/g", content=b"<html>", headers={"Content-Type": MANIFEST}
        )
        assert (garbage.status_code, error_code(garbage)) == (400, "MANIFEST_INVALID")
        missing = await client.get("/v2/app/manifests/nope")
        assert (missing.status_code, error_code(missing)) == (404, "MANIFEST_UNKNOWN")
    assert set(registry.manifests["app"]) == {"v1", digest, "all", compute_digest(index(digest))}


async def test_token_auth(connect: Connect) -> None:
    registry = Registry(token="secret-1")
    blob = registry.add_blob(b"private")
    url = f"/v2/library/_/blobs/{blob.digest}"
    async with connect(registry) as client:
        realm = f'Bearer realm="{origin(client)}/token",service="trio-blobs-test"'
        pull = await client.get(url)
        assert (pull.status_code, error_code(pull)) == (401, "UNAUTHORIZED")
        assert pull.headers["www-authenticate"] == f'{realm},scope="repository:library/_:pull"'
        push = await client.post("/v2/library/_/blobs/uploads/")
        assert push.headers["www-authenticate"] == f'{realm},scope="repository:library/_:pull,push"'
        assert (await client.get("/v2/")).headers["www-authenticate"] == realm

        params = {"service": "trio-blobs-test", "scope": "repository:library/_:pull"}
        issued = (await client.get("/token", params=params)).json()
        assert issued["token"] == issued["access_token"] == "secret-1"
        assert issued["expires_in"] == 300
        assert "issued_at" in issued
        assert registry.token_requests == 1
        auth = {"Authorization": "Bearer secret-1"}
        assert (await client.get(url, headers=auth)).content == b"private"
        registry.token = "secret-2"  # the old token expires
        assert (await client.get(url, headers=auth)).status_code == 401


async def test_redirect_to_a_second_origin() -> None:
    registry = Registry(token="t")
    blob = registry.add_blob(b"stored elsewhere" * 1000)
    auth = {"Authorization": "Bearer t"}
    async with (
        registry.serving() as registry_url,
        trio.open_nursery() as nursery,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        storage_url = await nursery.start(registry.serve)
        assert storage_url != registry_url
        registry.redirect_blobs_to = storage_url
        url = f"{registry_url}/v2/library/_/blobs/{blob.digest}"
        redirect = await client.get(url, headers=auth)
        assert redirect.status_code == 307
        location = redirect.headers["location"]
        assert location.startswith(f"{storage_url}/_storage/{blob.digest}?expires=")
        assert "&sig=" in location
        stored = await client.get(location)
        assert stored.content == b"stored elsewhere" * 1000
        assert (await client.head(url, headers=auth)).status_code == 200  # HEAD is answered
        nursery.cancel_scope.cancel()
    at_storage = [r for r in registry.requests if r.url.startswith(storage_url)]
    assert [r.url for r in at_storage] == [location]
    assert "authorization" not in at_storage[0].headers


async def test_fault_status_and_headers(connect: Connect) -> None:
    registry = Registry()
    blob = registry.add_blob(b"data")
    url = f"/v2/library/_/blobs/{blob.digest}"
    fault = registry.add_fault(Fault(digest=blob.digest, status=429, headers={"Retry-After": "7"}))
    async with connect(registry) as client:
        limited = await client.get(url)
        assert (limited.status_code, error_code(limited)) == (429, "TOOMANYREQUESTS")
        assert limited.headers["retry-after"] == "7"
        assert (await client.get(url)).content == b"data"
        assert fault.matched == 1

        page = {"Content-Type": "text/html"}
        registry.add_fault(Fault(path="/blobs/", status=503, body=b"<html/>", headers=page))
        cdn = await client.get(url)
        assert (cdn.status_code, cdn.headers["content-type"], cdn.content) == (
            503,
            "text/html",
            b"<html/>",
        )

        registry.add_fault(Fault(status=404, times=5, method=None))
        missing = [
            error_code(await client.request(method, path))
            for method, path in [
                ("GET", url),
                ("PATCH", "/v2/library/_/blobs/uploads/some-id"),
                ("GET", "/v2/org/blobs/manifests/v1"),  # a repository named org/blobs
                ("GET", f"/_storage/{blob.digest}"),
                ("GET", "/v2/org/app/tags/list"),
            ]
        ]
        assert missing == [
            "BLOB_UNKNOWN",
            "BLOB_UPLOAD_UNKNOWN",
            "MANIFEST_UNKNOWN",
            "BLOB_UNKNOWN",
            "NAME_UNKNOWN",
        ]

        registry.add_fault(Fault(method="PUT", path="/manifests/", status=500))
        put = await client.put(
            "/v2/library/_/manifests/v1", content=b"{}", headers={"Content-Type": MANIFEST}
        )
        assert put.status_code == 500
    assert registry.manifests == {}  # a status fault leaves the state alone
    assert registry.requests[-1].body_size == 2


async def test_fault_times_method_and_order() -> None:
    registry = Registry()
    blob = registry.add_blob(b"data")
    url = f"/v2/library/_/blobs/{blob.digest}"
    registry.add_fault(Fault(method="HEAD", status=404, times=None))
    registry.add_fault(Fault(path="/blobs/", status=500, times=2))
    registry.add_fault(Fault(method=None, digest=blob.digest, status=503, times=None))
    async with memory_client(registry) as client:
        statuses = [(await client.get(url)).status_code for _ in range(4)]
        assert statuses == [500, 500, 503, 503]
        assert (await client.head(url)).status_code == 404
        assert (await client.delete(url)).status_code == 503


async def test_fault_delay_holds_back_the_head(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    blob = registry.add_blob(b"late")
    registry.add_fault(Fault(delay=30))
    async with memory_client(registry) as client:
        start = trio.current_time()
        got = await client.get(f"/v2/library/_/blobs/{blob.digest}")
        assert got.content == b"late"
        assert trio.current_time() - start == 30


async def test_fault_delay_over_a_socket_times_out_the_read() -> None:
    registry = Registry()
    blob = registry.add_blob(b"late")
    registry.add_fault(Fault(delay=1))
    async with socket_client(registry) as client:
        with pytest.raises(httpx.ReadTimeout):
            # only the read is short: connecting may take longer on a busy machine
            await client.get(
                f"/v2/library/_/blobs/{blob.digest}", timeout=httpx.Timeout(5.0, read=0.05)
            )
        assert (await client.get(f"/v2/library/_/blobs/{blob.digest}")).content == b"late"


async def test_fault_stall_after(connect: Connect) -> None:
    registry = Registry()
    blob = registry.add_blob(b"s" * 100_000)
    registry.add_fault(Fault(digest=blob.digest, stall_after=1000))
    received = bytearray()
    async with connect(registry) as client:
        with trio.move_on_after(0.2) as scope:
            await read_into(received, client, f"/v2/library/_/blobs/{blob.digest}")
        assert scope.cancelled_caught
        assert len(received) == 1000
        assert len((await client.get(f"/v2/library/_/blobs/{blob.digest}")).content) == 100_000


async def test_fault_trickle_timing(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    data = bytes(range(256)) * 4
    blob = registry.add_blob(data)
    registry.add_fault(Fault(trickle=512))
    async with memory_client(registry) as client:
        start = trio.current_time()
        async with client.stream("GET", f"/v2/library/_/blobs/{blob.digest}") as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
        assert trio.current_time() - start == pytest.approx(2.0)
    assert b"".join(chunks) == data
    assert len(chunks) > 20


async def test_fault_truncate(connect: Connect) -> None:
    registry = Registry()
    data = b"t" * (3 << 20)
    blob = registry.add_blob(data)
    registry.add_fault(Fault(digest=blob.digest, truncate_at=(1 << 20) + 10))
    received = bytearray()
    async with connect(registry) as client:
        url = f"/v2/library/_/blobs/{blob.digest}"
        with pytest.raises(httpx.RemoteProtocolError):
            await read_into(received, client, url)
        assert len(received) == (1 << 20) + 10
        assert (await client.get(url)).content == data


async def test_fault_corrupt_and_extra(connect: Connect) -> None:
    registry = Registry()
    data = bytes(range(256)) * 40
    blob = registry.add_blob(data)
    url = f"/v2/library/_/blobs/{blob.digest}"
    registry.add_fault(Fault(digest=blob.digest, corrupt=True))
    registry.add_fault(Fault(digest=blob.digest, extra=b"!!"))
    async with connect(registry) as client:
        corrupted = (await client.get(url)).content
        assert len(corrupted) == len(data)
        assert sum(a != b for a, b in zip(corrupted, data, strict=True)) == 1
        longer = await client.get(url)
        assert longer.content == data + b"!!"
        assert longer.headers["content-length"] == str(len(data) + 2)


async def test_server_keeps_connections_alive() -> None:
    registry = Registry()
    async with socket_client(registry) as client:
        first, second = await client.get("/v2/"), await client.get("/v2/")
        streams = [r.extensions["network_stream"] for r in (first, second)]
        assert streams[0].get_extra_info("client_addr") == streams[1].get_extra_info("client_addr")


async def test_server_survives_clients_that_break_off() -> None:
    registry = Registry()
    big = registry.add_blob(b"b" * (32 << 20))
    async with (
        registry.serving() as url,
        httpx.AsyncClient(base_url=url, trust_env=False) as client,
    ):
        async with client.stream("GET", f"/v2/library/_/blobs/{big.digest}") as response:
            assert response.status_code == 200  # then hang up, the body barely begun
        host, port = url.removeprefix("http://").split(":")
        for sent, answer in [
            (b"NOT HTTP AT ALL\r\n\r\n", b""),
            (b"PUT /v2/x/manifests/a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nabc", b""),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"HTTP/1.1 200 "),
        ]:
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(sent)
                await stream.send_eof()
                received = bytearray()
                while chunk := await stream.receive_some():
                    received += chunk
            assert received.startswith(answer)
            assert bool(received) == bool(answer)
        await trio.sleep(0.05)
        assert (await client.get("/v2/")).status_code == 200


async def test_serving_lets_the_block_error_and_cancellation_through() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with Registry().serving():
            raise KeyError("mine")
    with trio.move_on_after(0.01) as scope:
        async with Registry().serving():
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_serving_lets_the_blocks_error_out_beside_a_cancellation() -> None:
    async def fail_while_cancelled(outer: trio.CancelScope) -> None:
        async with Registry().serving():
            outer.cancel()
            try:
                await trio.sleep(1)
            finally:
                raise OSError("disk gone")

    with trio.CancelScope() as outer, pytest.raises(OSError, match="disk gone"):
        await fail_while_cancelled(outer)


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "body"),
    [
        ("bytes=4-", 206, "bytes 4-9/10", b"456789"),
        ("bytes=2-4", 206, "bytes 2-4/10", b"234"),
        ("bytes=0-", 206, "bytes 0-9/10", b"0123456789"),
        ("bytes=10-", 416, "bytes */10", b""),
        ("items=1-", 200, None, b"0123456789"),
    ],
)
async def test_blob_ranges(
    connect: Connect, range_header: str, status: int, content_range: str | None, body: bytes
) -> None:
    registry = Registry()
    blob = registry.add_blob(b"0123456789")
    async with connect(registry) as client:
        response = await client.get(
            f"/v2/library/_/blobs/{blob.digest}", headers={"range": range_header}
        )
    assert response.status_code == status
    assert response.headers.get("content-range") == content_range
    assert response.content == body


async def test_blob_ranges_can_be_ignored() -> None:
    registry = Registry(ranges=False)
    blob = registry.add_blob(b"0123456789")
    async with memory_client(registry) as client:
        response = await client.get(
            f"/v2/library/_/blobs/{blob.digest}", headers={"range": "bytes=4-"}
        )
    assert (response.status_code, response.content) == (200, b"0123456789")
