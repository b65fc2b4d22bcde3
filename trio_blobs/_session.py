"""One repository on one registry, as seen by a transfer: requests, redirects and credentials.

This is the one place where httpx errors become :class:`TransferError` and where the
``Authorization`` header is decided, so that no other code can send it to the wrong origin.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import urllib.request
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    MutableMapping,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from importlib.metadata import PackageNotFoundError, version

import httpx
import trio

from ._auth import AuthChallenge, parse_auth_challenge
from ._exceptions import AuthenticationError, ConnectionFailedError, ProtocolError, TransferError
from ._http import HTTP1Transport
from ._monitor import Watch
from ._protocol import (
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    UnknownCoding,
    error_for_response,
    location_target,
    origin,
    read_limited,
    same_origin,
)

GetToken = Callable[[AuthChallenge], Awaitable[str]]
"""``async get_token(challenge) -> str``: a token (or, for a Basic challenge, credentials)."""

ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error or redirect body worth reading
CLEANUP_TIMEOUT = 0.3  # seconds a shielded cleanup (closing a response) may take
_NO_AUTH = httpx.Auth()  # an auth flow that adds nothing

try:
    VERSION = version("trio_blobs")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0"
DEFAULT_USER_AGENT = f"trio-blobs/{VERSION}"
_PROXY_SCHEMES = frozenset({"http", "https", "all"})  # the environment's proxies httpx uses

Body = bytes | Callable[[], AsyncIterable[bytes]] | None
"""A request body: bytes, or a function that makes a fresh stream each time the request is
sent again (after a redirect or a token refresh)."""


class Credentials:
    """The ``Authorization`` value in use, and its single-flight refresh.

    When many requests are rejected with the same value at once, the first one to ask fetches a
    new token; the others wait for it and use it. ``generation`` tells them apart. Every token
    asked for covers ``scope``, the union of the scopes asked for so far: one token serves
    every request of a transfer (a mount's source and a cleanup's ``delete`` included), and no
    request's refresh takes away what another needs.

    With ``get_token`` and no token yet, the first request goes alone (:meth:`probe`): the others
    wait for its outcome, so that a registry asking for credentials rejects one request, not a
    whole first wave of them.
    """

    def __init__(self, *, token: str | None, get_token: GetToken | None) -> None:
        self.header = f"Bearer {token}" if token else None
        self.generation = 0
        self.scope: str | None = None
        self.get_token = get_token
        self._token = token
        self._lock = trio.Lock()
        self._probed: trio.Event | None = None
        self._fetched = 0  # token fetches ended, however
        self._failure: TransferError | None = None  # how the last one failed, if it did

    def for_another_origin(self) -> Credentials:
        """The same ``token`` and ``get_token``, with tokens of their own: another origin (a
        mirror) may answer with other challenges, whose tokens must not replace these."""
        return Credentials(token=self._token, get_token=self.get_token)

    def probe(self, watch: Watch | None) -> AbstractAsyncContextManager[None]:
        """Around sending a request: the first one while there is no token goes on at once,
        and the others wait (not judged a stall) until it is done, however it ends."""
        if self.header is not None or self.get_token is None:
            return nullcontext()
        return self._probe(watch)

    @asynccontextmanager
    async def _probe(self, watch: Watch | None) -> AsyncIterator[None]:
        if self._probed is not None:
            with watch.paused() if watch is not None else nullcontext():
                await self._probed.wait()
            yield
            return
        self._probed = trio.Event()
        try:
            yield
        finally:
            self._probed.set()

    async def refresh(
        self, get_token: GetToken, rejected_generation: int, challenge: AuthChallenge
    ) -> None:
        """Replace the credentials that ``rejected_generation`` used, unless replaced meanwhile
        by ones for all that ``challenge`` asks. A fetch that fails fails the requests that
        waited for it as well, rather than each asking again in turn."""
        fetched = self._fetched
        async with self._lock:
            refused = self.generation == rejected_generation
            if refused and self._fetched != fetched and self._failure is not None:
                raise copy.copy(self._failure)  # each request's own, to name its blob in
            challenge = challenge.with_scopes(self.scope)
            if not refused and challenge.scope == self.scope:
                return
            if refused and self.header is not None and challenge.error is None:
                # Ours were sent and refused: no provider should hand the same ones back.
                challenge = dataclasses.replace(challenge, error="invalid_token")
            try:
                token = await self._fetch(get_token, challenge)
            finally:
                self._fetched += 1
            scheme = "Basic" if challenge.scheme == "basic" else "Bearer"
            self.header = f"{scheme} {token}"
            self.scope = challenge.scope
            self.generation += 1

    async def _fetch(self, get_token: GetToken, challenge: AuthChallenge) -> str:
        self._failure = None
        try:
            return await get_token(challenge)
        except TransferError as exc:
            self._failure = copy.copy(exc)  # as it was, before this request names its blob
            raise
        except Exception as exc:
            error = AuthenticationError(
                f"get_token failed for {challenge.realm or 'the registry'}: {exc!r}", status=401
            )
            self._failure = copy.copy(error)
            raise error from exc


class TransferClient(httpx.AsyncClient):
    """The client a transfer makes when the caller gives none: no timeouts of its own (the
    monitor handles stalls), no automatic redirects, and an :class:`HTTP1Transport` that keeps
    up to ``max_idle_connections`` connections alive at no cost per request.

    A :class:`RegistrySession` builds its requests itself (with no client default headers to
    merge: only Host, User-Agent, the body's framing and the session's own) and hands them
    straight to that transport, past ``httpx.AsyncClient.send``: that saves about 0.15 ms of
    CPU per request (mostly the cookie jar's), and the session needs nothing it skips (auth
    flows, redirects, event hooks). Like Go's registry clients, it keeps no cookies. When the
    environment names a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``), it is a plain
    httpx client instead, which takes them and ``NO_PROXY`` as httpx does, through ``send``.
    ``requests`` counts what sessions sent through it, ``answers`` the responses they got.
    """

    def __init__(self, *, max_idle_connections: int) -> None:
        self.requests = self.answers = 0
        self.direct: HTTP1Transport | None = None
        # httpx reads these from urllib's view of the environment, and only for a client
        # without a transport of its own. No cap on connections: the transfers bound them,
        # and a request waiting in the pool would look stalled.
        if _PROXY_SCHEMES & urllib.request.getproxies().keys():
            limits = httpx.Limits(
                max_connections=None, max_keepalive_connections=max_idle_connections
            )
            super().__init__(timeout=None, follow_redirects=False, limits=limits)
            return
        self.direct = HTTP1Transport(max_idle_connections=max_idle_connections)
        super().__init__(timeout=None, follow_redirects=False, transport=self.direct)


class RegistrySession:
    """Requests to one repository of one registry, through a caller's or our own client."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        base_url: httpx.URL,
        repository: str,
        credentials: Credentials,
        user_agent: str | None,
        logger: logging.Logger,
        scope: str,
    ) -> None:
        self.client = client
        self._own = client if isinstance(client, TransferClient) else None
        self._direct = self._own.direct if self._own is not None else None
        self.base_url = base_url
        self._origin = origin(base_url)  # where credentials may go
        self._challenger = f"{base_url.scheme}://{base_url.netloc.decode('ascii')}"
        self.repository = repository
        self.credentials = credentials
        self.logger = logger
        self._user_agent = user_agent or DEFAULT_USER_AGENT
        self._scope = scope  # what a token covers, whatever one request's challenge names
        self._api = str(base_url.join(f"{base_url.path.rstrip('/')}/v2/{repository}/"))

    def mirror(self, base_url: httpx.URL, *, with_credentials: bool) -> RegistrySession:
        """The same repository on a mirror at ``base_url``, through the same client; with this
        session's credentials only if ``with_credentials``."""
        return RegistrySession(
            client=self.client,
            base_url=base_url,
            repository=self.repository,
            credentials=(
                self.credentials.for_another_origin()
                if with_credentials
                else Credentials(token=None, get_token=None)
            ),
            user_agent=self._user_agent,
            logger=self.logger,
            scope=self._scope,
        )

    def close_idle(self) -> None:
        """Close the idle connections of the client this session made, if it made one."""
        if self._direct is not None:
            self._direct.close_idle()

    def url(self, path: str) -> httpx.URL:
        """The URL of ``path`` (e.g. ``blobs/<digest>``) below this repository's API root."""
        return httpx.URL(self._api + path)  # parsing one string costs half of a join

    def stream(
        self,
        method: str,
        url: httpx.URL,
        *,
        expect: Collection[int],
        digest: str | None,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        watch: Watch | None = None,
    ) -> _Exchange:
        """``async with`` it: send a request, follow redirects and auth challenges, and get
        the final response.

        A final status outside ``expect`` raises the matching :class:`TransferError`. httpx errors
        raised here or while the caller reads the body become :class:`ConnectionFailedError`.
        Each response head and token refresh counts as activity on ``watch``. The response is
        closed on exit, shielded from cancellation and bounded in time.
        """
        return _Exchange(self, method, url, expect, digest, what, headers, body, watch)

    async def request(
        self,
        method: str,
        url: httpx.URL,
        *,
        expect: Collection[int],
        digest: str | None,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        watch: Watch | None = None,
    ) -> httpx.Response:
        """Like :meth:`stream`, for answers whose body does not matter: the body is read, so
        that its connection goes back to the pool, up to :data:`ERROR_BODY_LIMIT` bytes (the
        connection of a longer one is closed)."""
        async with self.stream(
            method,
            url,
            expect=expect,
            digest=digest,
            what=what,
            headers=headers,
            body=body,
            watch=watch,
        ) as response:
            await _read_capped(response)  # an answer longer than that is not waited for
        return response

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        *,
        digest: str | None,
        headers: Mapping[str, str] | None,
        body: Body,
        watch: Watch | None,
    ) -> tuple[httpx.Response, bool]:
        """The first response that is not a redirect or a resolvable 401, and whether a token
        refresh was tried on the way.

        A 401 to credentials sent is answered with a refresh once; a 401 to none (the first
        contact) does not count, so that a provider's cached token, refused, is replaced."""
        refreshed = done_refreshing = False
        hops = 0
        get_token = self.credentials.get_token
        while True:
            send_auth = origin(url) == self._origin
            generation = self.credentials.generation
            sent_credentials = send_auth and self.credentials.header is not None
            content = body() if callable(body) else body
            if self._direct is not None:  # no client defaults to merge: built directly
                fields = {"accept-encoding": "identity"}  # no coding the caller must undo
                fields.update((name.lower(), value) for name, value in (headers or {}).items())
                self._set_headers(fields, send_auth)
                request = httpx.Request(method, url, headers=fields, content=content)
            else:
                request = self.client.build_request(method, url, headers=headers, content=content)
                self._set_headers(request.headers, send_auth)
            if watch is not None:
                watch.url = url
            response = await self._dispatch(request)
            if watch is not None:
                watch.progress(0)
            status = response.status_code
            if status == 401 and send_auth and not done_refreshing and get_token is not None:
                await _discard(response)
                challenge = dataclasses.replace(
                    parse_auth_challenge(response.headers.get("www-authenticate", "")),
                    origin=self._challenger,
                )
                self.logger.info("fetching a token for %s (%s challenge)", url, challenge.scheme)
                with watch.paused() if watch is not None else nullcontext():
                    await self.credentials.refresh(
                        get_token, generation, challenge.with_scopes(self._scope)
                    )
                refreshed, done_refreshing = True, sent_credentials
                continue
            if status not in REDIRECT_STATUSES:
                return response, refreshed
            await _discard(response)
            hops += 1
            if hops > MAX_REDIRECTS:
                raise ProtocolError(
                    f"more than {MAX_REDIRECTS} redirects", digest=digest, url=str(url)
                )
            url = location_target(url, response)
            if status == 303:
                method, body = "GET", None

    async def _dispatch(self, request: httpx.Request) -> httpx.Response:
        """Send one request; the response's body is still to be read."""
        if self._own is None:
            return await self._send_through_client(request)
        self._own.requests += 1
        if self._direct is not None:
            response = await self._direct.handle_async_request(request)
        else:
            response = await self._send_through_client(request)
        self._own.answers += 1
        return response

    async def _send_through_client(self, request: httpx.Request) -> httpx.Response:
        # The client's own auth flow is never used: credentials are decided here alone.
        return await self.client.send(request, stream=True, follow_redirects=False, auth=_NO_AUTH)

    def _set_headers(self, headers: MutableMapping[str, str], send_auth: bool) -> None:
        """User-Agent, and ``Authorization`` for the registry's origin only: never elsewhere,
        not even when the caller's client carries one among its default headers."""
        headers["user-agent"] = self._user_agent
        if send_auth and self.credentials.header:
            headers["authorization"] = self.credentials.header
        elif not send_auth:
            headers.pop("authorization", None)


class _Exchange:
    """See :meth:`RegistrySession.stream` (a class: cheaper than @asynccontextmanager, and
    entered for every request)."""

    __slots__ = (
        "_body",
        "_digest",
        "_expect",
        "_headers",
        "_method",
        "_response",
        "_session",
        "_url",
        "_watch",
        "_what",
    )

    def __init__(
        self,
        session: RegistrySession,
        method: str,
        url: httpx.URL,
        expect: Collection[int],
        digest: str | None,
        what: str,
        headers: Mapping[str, str] | None,
        body: Body,
        watch: Watch | None,
    ) -> None:
        self._session = session
        self._method = method
        self._url = url
        self._expect = expect
        self._digest = digest
        self._what = what
        self._headers = headers
        self._body = body
        self._watch = watch
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        session, watch = self._session, self._watch
        try:
            async with session.credentials.probe(watch):  # one goes first without credentials
                response, refreshed = await session._send(
                    self._method,
                    self._url,
                    digest=self._digest,
                    headers=self._headers,
                    body=self._body,
                    watch=watch,
                )
            self._response = response
            if response.status_code not in self._expect:
                error = error_for_response(
                    response,
                    await _read_capped(response),
                    digest=self._digest,
                    what=self._what,
                    from_storage=not same_origin(response.request.url, session.base_url),
                )
                if isinstance(error, AuthenticationError):
                    if refreshed:
                        error.message += " (the registry refused the new credentials too)"
                    elif session.credentials.header:
                        error.message += " (the registry refused the token given)"
                    else:
                        error.message += " (pass token= or get_token= to authenticate)"
                raise error
            return response
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        try:
            if isinstance(exc, httpx.TransportError):
                failed_url = str(exc.request.url) if _has_request(exc) else str(self._url)
                raise ConnectionFailedError(
                    f"{type(exc).__name__}: {_reason(exc)}", digest=self._digest, url=failed_url
                ) from exc
        finally:
            if self._response is not None:
                await _close(self._response)


def _reason(exc: BaseException) -> str:
    """The first non-empty message along ``exc``'s causes (httpx's own is sometimes empty)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            return str(current)
        current = current.__cause__ or current.__context__
    return "no details"


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when unset
    except RuntimeError:
        return False
    return True


async def _read_capped(response: httpx.Response) -> bytes:
    """Up to :data:`ERROR_BODY_LIMIT` bytes of a (small, informational) response body; none
    of one in a coding that is not undone."""
    try:
        content, _ = await read_limited(response, ERROR_BODY_LIMIT)
    except UnknownCoding:
        return b""
    return content


async def _discard(response: httpx.Response) -> None:
    """Read a small body to its end (so the connection can be reused), then close it."""
    await _read_capped(response)
    await _close(response)


async def _close(response: httpx.Response) -> None:
    if response.is_closed:  # read to its end, as most are: nothing to wait for
        return
    with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
        with suppress(httpx.TransportError):
            await response.aclose()
