"""A ready ``get_token``: the Docker token protocol for Bearer challenges, and Basic auth."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterable

import httpx
import trio

from ._auth import AuthChallenge
from ._exceptions import AuthenticationError, ConnectionFailedError
from ._protocol import (
    UnknownCoding,
    check_base_url,
    http_url,
    origin,
    parse_error_body,
    read_limited,
)

__all__ = ["RegistryAuth"]

DEFAULT_EXPIRES_IN = 60  # seconds, when the token service does not say
TOKEN_TIMEOUT = 30.0  # seconds a token request may wait where no client timeout says otherwise
TOKEN_DEADLINE = 60.0  # seconds a token request may take in all, however its answer trickles
MAX_TOKEN_ANSWER = 1024 * 1024  # bytes of a token service's answer: a token is a few KB


class RegistryAuth:
    """Answers registry challenges; pass it as ``get_token`` to :func:`download` or :func:`upload`.

    A Bearer challenge is answered with a token from its realm (``GET <realm>?service=&scope=``),
    asked for anonymously or, with ``username`` and ``password``, with Basic credentials. Tokens
    are cached per realm, service and scope until shortly before their ``expires_in`` runs out,
    within one ``trio.run``; a challenge that says a token was refused (its ``error``) gets a
    new one. A Basic challenge is answered with the credentials themselves.

    Credentials only ever go to a realm the caller trusts: one on ``base_url``'s own host (over
    https, or over http when the registry itself is http), on an origin listed in
    ``trusted_realms``, or the https realm that the registry's first challenge named (trust on
    first use, not from a mirror's challenge: a realm that later moves elsewhere gets anonymous
    requests). ``client`` is used for token
    requests (redirects are not followed), with its timeouts but 30 s where it has none (such as
    the ``timeout=None`` that suits transfers); without one, a short-lived client with a 30 s
    timeout.
    """

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        trusted_realms: Iterable[str] = (),
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._registry = check_base_url(base_url)
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        self._basic = (
            base64.b64encode(f"{username}:{password}".encode()).decode()
            if username is not None
            else None
        )
        self._trusted = {_origin_of_realm(realm) for realm in trusted_realms}
        self._first_realm: tuple[str, str, int | None] | None = None
        self._client = client
        # (realm, service, scope) -> token, when to refresh it, and the run whose clock says so
        self._tokens: dict[
            tuple[str, str | None, str | None], tuple[str, float, trio.lowlevel.TrioToken]
        ] = {}

    def __repr__(self) -> str:  # never shows the credentials
        user = "with credentials" if self._basic else "anonymous"
        return f"RegistryAuth({str(self._registry)!r}, {user})"

    async def __call__(self, challenge: AuthChallenge) -> str:
        """The token (or Basic credentials) that answers ``challenge``."""
        if challenge.scheme == "basic":
            if self._basic is None:
                raise AuthenticationError(
                    "the registry asks for a username and password", status=401
                )
            return self._basic
        if challenge.scheme != "bearer" or not challenge.realm:
            raise AuthenticationError(
                f"cannot answer a {challenge.scheme or 'malformed'} challenge", status=401
            )
        key = (challenge.realm, challenge.service, challenge.scope)
        run = trio.lowlevel.current_trio_token()  # each run's clock starts somewhere else
        cached = self._tokens.get(key)
        if (
            cached is not None
            and challenge.error is None
            and cached[2] is run
            and trio.current_time() < cached[1]
        ):
            return cached[0]
        token, lifetime = await self._fetch(challenge)
        # Refresh a little before the token runs out: a tenth of its life, at most 30 s.
        self._tokens[key] = (token, trio.current_time() + lifetime - min(lifetime / 10, 30.0), run)
        return token

    def _may_send_credentials(self, realm: httpx.URL, challenger: str | None) -> bool:
        realm_origin = origin(realm)
        from_registry = challenger is None or origin(httpx.URL(challenger)) == origin(
            self._registry
        )
        if realm.scheme == "https" and self._first_realm is None and from_registry:
            self._first_realm = realm_origin
        return (
            (realm.host == self._registry.host and realm.scheme in ("https", self._registry.scheme))
            or realm_origin in self._trusted
            or realm_origin == self._first_realm
        )

    async def _fetch(self, challenge: AuthChallenge) -> tuple[str, float]:
        """Ask the token service; returns the token and its lifetime in seconds."""
        realm, service, scope = challenge.realm or "", challenge.service, challenge.scope
        url = http_url(realm)
        if url is None:
            raise AuthenticationError(f"unusable token realm {realm!r}", status=401)
        # Only what the challenge names: a realm's own query (``?service=`` in it) stays.
        wanted = {"service": [service] if service else [], "scope": (scope or "").split()}
        url = url.copy_merge_params({name: values for name, values in wanted.items() if values})
        headers = {"accept-encoding": "gzip, deflate"}  # what read_limited undoes
        if self._basic is not None and self._may_send_credentials(url, challenge.origin):
            headers["authorization"] = f"Basic {self._basic}"
        try:
            with trio.fail_after(TOKEN_DEADLINE):
                async with contextlib.AsyncExitStack() as stack:
                    client = self._client
                    if client is None:  # one of ours, for this request
                        client = await stack.enter_async_context(
                            httpx.AsyncClient(timeout=TOKEN_TIMEOUT)
                        )
                    response = await stack.enter_async_context(
                        client.stream(
                            "GET",
                            url,
                            headers=headers,
                            follow_redirects=False,
                            timeout=_bounded(client.timeout),
                        )
                    )
                    answer = await _read_answer(response, realm)
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"token request failed: {exc!r}", url=realm) from exc
        except trio.TooSlowError as exc:
            raise ConnectionFailedError(
                f"token request took over {TOKEN_DEADLINE:g} s", url=realm
            ) from exc
        return _read_token(response, answer, realm)


def _origin_of_realm(realm: object) -> tuple[str, str, int | None]:
    """The origin of a ``trusted_realms`` entry: an http(s) URL whose path and query do not
    matter."""
    url = http_url(realm)
    if url is None or url.userinfo:
        raise ValueError(f"trusted_realms takes http:// or https:// URLs, got {realm!r}")
    return origin(url)


def _bounded(timeout: httpx.Timeout) -> httpx.Timeout:
    """``timeout`` with :data:`TOKEN_TIMEOUT` wherever it has none: transfers wait for a token
    without being judged stalled, so a token request must not wait forever."""
    return httpx.Timeout(
        **{
            name: TOKEN_TIMEOUT if value is None else value
            for name, value in timeout.as_dict().items()
        }
    )


async def _read_answer(response: httpx.Response, realm: str) -> bytes:
    """The token service's answer, refused past :data:`MAX_TOKEN_ANSWER` bytes (decoded)."""
    try:
        answer, more = await read_limited(response, MAX_TOKEN_ANSWER)
    except UnknownCoding as exc:
        raise AuthenticationError(
            f"the token service's answer is unreadable: {exc}",
            status=response.status_code,
            url=realm,
        ) from exc
    if more:
        raise AuthenticationError(
            f"the token service's answer is over {MAX_TOKEN_ANSWER} bytes",
            status=response.status_code,
            url=realm,
        )
    return answer


def _read_token(response: httpx.Response, answer: bytes, realm: str) -> tuple[str, float]:
    """``(token, lifetime)`` from a token service's answer, or :class:`AuthenticationError`."""
    if response.status_code != 200:
        code, message, _ = parse_error_body(response.headers.get("content-type", ""), answer)
        detail = ": ".join(part for part in (code, message) if part)
        raise AuthenticationError(
            f"the token service refused the request ({response.status_code})"
            + (f": {detail}" if detail else ""),
            status=response.status_code,
            code=code,
            error_message=message,
            url=realm,
        )
    try:
        document = json.loads(answer)
        token = document.get("token") or document.get("access_token")
        expires_in = document.get("expires_in", DEFAULT_EXPIRES_IN)
    except (ValueError, AttributeError):
        token, expires_in = None, None
    if not isinstance(token, str) or not token:
        raise AuthenticationError("the token service sent no token", status=200, url=realm)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return token, float(expires_in)
