"""RegistryAuth, the built-in get_token: token requests, caching, and where credentials go."""

import base64
import dataclasses
import gzip
import logging
import tracemalloc
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

import trio_blobs._auth_provider
from trio_blobs import (
    AuthChallenge,
    AuthenticationError,
    ConnectionFailedError,
    RegistryAuth,
    RetriesExhaustedError,
    RetryPolicy,
    download,
)
from trio_blobs.testing import Registry

from ._helpers import BASE_URL, Pieces, add_blobs

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


class TokenService:
    """A fake token service: answers with ``answer`` and records what it was asked."""

    def __init__(self, answer: object = None, status: int = 200) -> None:
        self.answer = {"token": "tok", "expires_in": 60} if answer is None else answer
        self.status = status
        self.requests: list[httpx.Request] = []

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.answer)


def bearer(realm: str, scope: str | None = "repository:a/b:pull") -> AuthChallenge:
    return AuthChallenge(scheme="bearer", realm=realm, service="reg", scope=scope)


async def test_end_to_end_with_the_in_process_registry(tmp_path: Path) -> None:
    registry = Registry(token="t1")
    auth = RegistryAuth(BASE_URL)
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        auth_via_registry = RegistryAuth(BASE_URL, client=client)
        for dest in ("one", "two"):
            await download(
                add_blobs(registry, 10, 20),
                base_url=BASE_URL,
                dest_dir=tmp_path / dest,
                client=client,
                get_token=auth_via_registry,
            )
    assert registry.token_requests == 1  # the second call reused the cached token
    assert repr(auth) == "RegistryAuth('http://registry.test/', anonymous)"


async def test_the_request_carries_service_and_every_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = TokenService()
    auth = RegistryAuth("https://registry.test", client=service.client())
    challenge = bearer(
        "https://auth.test/token?account=x", "repository:a/b:pull repository:c/d:pull"
    )
    assert await auth(challenge) == "tok"
    [request] = service.requests
    assert request.url.params.get_list("scope") == ["repository:a/b:pull", "repository:c/d:pull"]
    assert request.url.params["service"] == "reg"
    assert request.url.params["account"] == "x"  # the realm's own query is kept


async def test_tokens_are_cached_until_shortly_before_they_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = TokenService({"access_token": "tok", "expires_in": 300})
    auth = RegistryAuth("https://registry.test", client=service.client())
    challenge = bearer("https://registry.test/token")
    await auth(challenge)
    await trio.sleep(269)
    await auth(challenge)
    assert len(service.requests) == 1
    await auth(bearer("https://registry.test/token", "repository:other:pull"))
    assert len(service.requests) == 2  # another scope, another token
    await trio.sleep(2)  # 271 s: within 30 s of the end
    await auth(challenge)
    assert len(service.requests) == 3


async def test_a_challenge_that_says_the_token_was_refused_gets_a_new_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = TokenService()
    auth = RegistryAuth("https://registry.test", client=service.client())
    challenge = bearer("https://registry.test/token")
    await auth(challenge)
    await auth(challenge)
    assert len(service.requests) == 1
    await auth(dataclasses.replace(challenge, error="invalid_token"))
    assert len(service.requests) == 2


def test_tokens_are_not_trusted_across_trio_runs() -> None:
    """Each run's clock starts at another point: a token's expiry means nothing in the next."""
    service = TokenService()
    auth = RegistryAuth("https://registry.test", client=service.client())
    for _ in range(2):
        trio.run(auth, bearer("https://registry.test/token"))
    assert len(service.requests) == 2


async def test_a_revoked_cached_token_is_replaced(tmp_path: Path) -> None:
    registry = Registry()
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        auth = RegistryAuth(BASE_URL, client=client)
        # The second token refuses the first from then on, though it has not expired.
        for size, registry.token in ((10, "first"), (20, "second")):
            blobs = add_blobs(registry, size)
            await download(
                blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=auth
            )
    assert registry.token_requests == 2


async def test_a_failed_token_fetch_fails_those_that_waited_for_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trio_blobs")
    registry = Registry(token="t")
    blobs = add_blobs(registry, *range(100, 120))
    calls = 0

    async def get_token(challenge: AuthChallenge) -> str:
        nonlocal calls
        calls += 1
        await trio.sleep(30)  # a token service that takes connections and never answers
        raise ConnectionFailedError("token request failed: ReadTimeout")

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        start = trio.current_time()
        with pytest.raises(RetriesExhaustedError):
            await download(
                blobs,
                base_url=BASE_URL,
                dest_dir=tmp_path,
                client=client,
                get_token=get_token,
                retry=RetryPolicy(max_attempts=2),
            )
    # One fetch for the first request, one for all the others, whose second attempts wait for
    # it too: not one fetch after another for each of the 20 blobs, each taking its 30 s.
    assert calls == 2
    assert trio.current_time() - start == pytest.approx(60)
    # Each blob's failure names that blob, though they come from one fetch.
    retried = [r.args for r in caplog.records if r.msg.startswith("attempt %d for %s failed")]
    assert len(retried) > 2
    assert all(isinstance(a, tuple) and a[1] == a[3].digest for a in retried)


@pytest.mark.parametrize(
    ("answer", "lifetime"),
    [
        ({"token": "tok"}, 60),
        ({"token": "tok", "expires_in": "soon"}, 60),
        ({"token": "tok", "expires_in": 10}, 10),
    ],
)
async def test_lifetime_defaults_to_sixty_seconds(
    autojump_clock: trio.testing.MockClock, answer: object, lifetime: float
) -> None:
    service = TokenService(answer)
    auth = RegistryAuth("https://registry.test", client=service.client())
    await auth(bearer("https://registry.test/token"))
    await trio.sleep(lifetime * 0.89)
    await auth(bearer("https://registry.test/token"))
    assert len(service.requests) == 1
    await trio.sleep(lifetime * 0.02)
    await auth(bearer("https://registry.test/token"))
    assert len(service.requests) == 2


@pytest.mark.parametrize(
    ("status", "answer", "match"),
    [
        (
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": "bad password"}]},
            "401.*bad password",
        ),
        (200, {"expires_in": 60}, "no token"),
        (200, ["not", "an", "object"], "no token"),
        (500, {}, "500"),
    ],
)
async def test_a_refused_token_request_is_an_authentication_error(
    status: int, answer: object, match: str
) -> None:
    service = TokenService(answer, status)
    auth = RegistryAuth("https://registry.test", "alice", "s3cret", client=service.client())
    with pytest.raises(AuthenticationError, match=match):
        await auth(bearer("https://registry.test/token"))


@pytest.mark.parametrize(
    ("registry", "realms", "trusted", "sent"),
    [
        # the registry's own host, any port
        ("https://registry.test", ["https://registry.test:8443/token"], (), [True]),
        ("http://127.0.0.1:5000", ["http://127.0.0.1:5001/token"], (), [True]),
        # an https registry's credentials never go over http
        ("https://registry.test", ["http://registry.test/token"], (), [False]),
        # trust on first use: the first https realm, and only that one
        (
            "https://registry.test",
            ["https://auth.test/token", "https://evil.test/token"],
            (),
            [True, False],
        ),
        ("https://registry.test", ["http://auth.test/token"], (), [False]),
        # listed by the caller
        ("https://registry.test", ["http://auth.test/token"], ("http://auth.test",), [True]),
        # ... as a whole realm URL: only its origin counts
        (
            "https://registry.test",
            ["http://auth.test/token"],
            ("http://auth.test/v2/token?service=reg",),
            [True],
        ),
    ],
)
async def test_credentials_go_only_to_trusted_realms(
    registry: str, realms: list[str], trusted: tuple[str, ...], sent: list[bool]
) -> None:
    service = TokenService()
    auth = RegistryAuth(
        registry, "alice", "s3cret", trusted_realms=trusted, client=service.client()
    )
    for realm in realms:
        await auth(bearer(realm))
    assert [r.headers.get("authorization") == BASIC for r in service.requests] == sent
    assert all(r.headers.get("authorization") in (None, BASIC) for r in service.requests)


async def test_a_mirrors_challenge_is_not_trusted_on_first_use(tmp_path: Path) -> None:
    """With ``mirror_credentials=True`` a mirror may challenge first: its realm must not become
    the trusted one, or the registry's own realm elsewhere would get no credentials."""
    service = TokenService()
    auth = RegistryAuth("https://registry.test", "alice", "s3cret", client=service.client())
    challenges = [
        ("https://auth.mirror.test/token", "https://mirror.test"),
        ("https://auth.registry-tokens.test/token", "https://registry.test"),
        ("https://auth.mirror.test/token", "https://mirror.test"),
    ]
    for n, (realm, challenger) in enumerate(challenges):  # each its own scope: none cached
        await auth(dataclasses.replace(bearer(realm, f"repository:r{n}:pull"), origin=challenger))
    sent = [r.headers.get("authorization") == BASIC for r in service.requests]
    assert sent == [False, True, False]


async def test_transfers_say_who_challenged(tmp_path: Path) -> None:
    registry = Registry(token="t")
    origins: list[str | None] = []

    async def get_token(challenge: AuthChallenge) -> str:
        origins.append(challenge.origin)
        return "t"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        blobs = add_blobs(registry, 10)
        await download(
            blobs, base_url=BASE_URL, dest_dir=tmp_path, client=client, get_token=get_token
        )
    assert origins == ["http://registry.test"]


async def test_basic_challenges_get_the_credentials() -> None:
    auth = RegistryAuth("https://registry.test", "alice", "s3cret")
    assert "Basic " + await auth(AuthChallenge(scheme="basic", realm="registry")) == BASIC
    with pytest.raises(AuthenticationError, match="username and password"):
        await RegistryAuth("https://registry.test")(AuthChallenge(scheme="basic"))


@pytest.mark.parametrize(
    "challenge",
    [AuthChallenge(), AuthChallenge(scheme="digest", realm="x"), AuthChallenge(scheme="bearer")],
)
async def test_unanswerable_challenges_are_clear_errors(challenge: AuthChallenge) -> None:
    with pytest.raises(AuthenticationError, match="challenge"):
        await RegistryAuth("https://registry.test")(challenge)


def test_credentials_never_show() -> None:
    auth = RegistryAuth("https://registry.test", "alice", "s3cret")
    assert "s3cret" not in repr(auth)
    assert "alice" not in repr(auth)
    with pytest.raises(ValueError, match="together"):
        RegistryAuth("https://registry.test", "alice")
    with pytest.raises(ValueError, match="base_url"):
        RegistryAuth("registry.test")


async def test_a_token_service_that_never_answers_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even through a client with ``timeout=None`` (as transfers want): while a token is fetched,
    transfers are not judged stalled, so the token request bounds itself."""
    monkeypatch.setattr(trio_blobs._auth_provider, "TOKEN_TIMEOUT", 0.2)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, silent, [listener])
        async with httpx.AsyncClient(timeout=None) as client:
            auth = RegistryAuth("http://127.0.0.1", client=client)
            with trio.fail_after(10), pytest.raises(ConnectionFailedError, match="ReadTimeout"):
                await auth(bearer(f"http://127.0.0.1:{port}/token"))
        nursery.cancel_scope.cancel()


async def test_a_token_answer_that_never_ends_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte every 0.1 s keeps every read within its timeout: the whole request has a limit."""
    monkeypatch.setattr(trio_blobs._auth_provider, "TOKEN_DEADLINE", 0.5)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def trickle(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        while True:
            await stream.send_all(b" ")
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, trickle, [listener])
        async with httpx.AsyncClient(timeout=None) as client:
            auth = RegistryAuth("http://127.0.0.1", client=client)
            with (
                trio.fail_after(10),
                pytest.raises(ConnectionFailedError, match=r"took over 0\.5 s"),
            ):
                await auth(bearer(f"http://127.0.0.1:{port}/token"))
        nursery.cancel_scope.cancel()


async def test_a_token_answer_too_big_for_a_token_is_refused() -> None:
    service = TokenService({"token": "x" * (2 * 1024 * 1024)})
    auth = RegistryAuth("https://registry.test", client=service.client())
    with pytest.raises(AuthenticationError, match="answer is over 1048576 bytes"):
        await auth(bearer("https://registry.test/token"))


async def test_a_compressed_token_answer_is_not_expanded_past_the_limit() -> None:
    """A few KB of gzip in gzip that would be 128 MiB: refused once 1 MiB is decoded."""
    bomb = gzip.compress(gzip.compress(b" " * 2**27, mtime=0), mtime=0)

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-encoding": "gzip, gzip"}, stream=Pieces([bomb])
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    auth = RegistryAuth("https://registry.test", client=client)
    tracemalloc.start()
    try:
        with pytest.raises(AuthenticationError, match="answer is over 1048576 bytes"):
            await auth(bearer("https://registry.test/token"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
