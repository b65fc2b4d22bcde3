"""Real servers for the tests against the distribution registry: fixtures that run it in each
configuration, the token server its token auth trusts, and the file server its redirects go to.

Without ``docker-registry`` (or ``skopeo``, ``htpasswd``) the tests skip, saying what to install;
when the ``CI`` environment variable is set they fail instead, so that CI cannot pass without
running them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from trio_blobs.testing import DistributionBasicAuth, DistributionTokenAuth, distribution_registry
from trio_blobs.testing._server import Response, listen, run_server

PACKAGES = {"htpasswd": "apache2-utils"}  # program -> Debian package, where they differ
USERS = {"alice": "alice-secret"}
# The registry accepts a token for this long after its ``exp`` claim (clock skew allowance).
REGISTRY_LEEWAY = 60
_PIECE = 1 << 20


def require(*programs: str) -> None:
    """Skip the test (fail it when ``CI`` is set) unless every program is on PATH."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        packages = " ".join(PACKAGES.get(p, p) for p in missing)
        message = f"{', '.join(missing)} not found: install with `apt-get install {packages}`"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message} (CI is set: real-registry tests must run)")
        pytest.skip(message)


@dataclass(frozen=True)
class RealRegistry:
    """A running distribution registry: its base URL and its storage directory."""

    url: str
    storage: Path

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, as skopeo's ``docker://`` references want it."""
        return self.url.removeprefix("http://")

    def blob_path(self, digest: str) -> str:
        """The storage path of a blob's bytes, which redirects point at."""
        algorithm, _, hex_ = digest.partition(":")
        return f"/docker/registry/v2/blobs/{algorithm}/{hex_[:2]}/{hex_}/data"

    def has_blob(self, digest: str) -> bool:
        return (self.storage / self.blob_path(digest).lstrip("/")).exists()


async def _send(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def _reply(status: int, body: bytes = b"") -> Response:
    headers = [("Content-Length", str(len(body))), ("Content-Type", "application/json")]
    return Response(status, headers, _send(body))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token server: who asked (None: anonymous), for what, what it got."""

    user: str | None
    scopes: tuple[str, ...]
    granted: tuple[str, ...]
    status: int


class TokenServer:
    """A Docker token server whose ES256 JWTs the registry's ``auth: token`` accepts.

    It signs with a P-256 key generated here and certified by a self-signed certificate, the
    registry's root bundle. The JWT header names the key by ``x5c`` (the certificate chain,
    verified against the bundle) or by ``kid`` (the libtrust fingerprint of the bundle's key:
    base32 of the first 30 bytes of the SHA-256 of its DER SubjectPublicKeyInfo, in groups of
    four joined by ``:``); distribution 2.8 accepts either.

    Anonymous requests get ``anonymous`` actions, ``users`` with the right password get
    ``authenticated`` ones, of those they ask for; a wrong password gets 401. ``expires_in`` may
    be changed at any time; the registry refuses a token once it has run out. Every request is
    recorded in ``requests``.
    """

    service = "trio-blobs-real-registry"
    issuer = "trio-blobs-test-token-server"

    def __init__(
        self,
        directory: Path,
        *,
        users: Mapping[str, str],
        anonymous: Collection[str] = ("pull",),
        authenticated: Collection[str] = ("pull", "push"),
        key_header: Literal["x5c", "kid"] = "x5c",
    ) -> None:
        self.users = dict(users)
        self.anonymous = frozenset(anonymous)
        self.authenticated = frozenset(authenticated)
        self.key_header = key_header
        self.expires_in = 60
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        self.realm = ""
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.UTC)
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle = directory / "root-bundle.pem"
        self.bundle.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def auth(self) -> DistributionTokenAuth:
        """The registry configuration that trusts this server (once it serves)."""
        return DistributionTokenAuth(
            realm=self.realm, service=self.service, issuer=self.issuer, rootcertbundle=self.bundle
        )

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on a loopback port until cancelled; reports the realm URL."""
        listeners, base_url = await listen("127.0.0.1", 0)
        self.realm = f"{base_url}/token"
        task_status.started(self.realm)
        await run_server(self._handle, listeners, base_url)

    async def _handle(
        self,
        method: str,
        target: str,
        headers: httpx.Headers,
        body: AsyncIterable[bytes],
        origin: str,
    ) -> Response:
        parts = urlsplit(target)
        if method != "GET" or parts.path != "/token":
            return _reply(404)
        query = parse_qs(parts.query)
        scopes = tuple(query.get("scope", []))
        user = self._user(headers.get("authorization"))
        if user is False or query.get("service") != [self.service]:
            self.requests.append(TokenRequest(None, scopes, (), 401))
            return _reply(401, b'{"details":"bad credentials or service"}')
        allowed = self.anonymous if user is None else self.authenticated
        access: list[dict[str, object]] = []
        granted = []
        for scope in scopes:  # type:name:actions
            kind, _, rest = scope.partition(":")
            name, _, asked = rest.rpartition(":")
            actions = sorted(allowed.intersection(asked.split(",")))
            access.append({"type": kind, "name": name, "actions": actions})
            granted.append(f"{kind}:{name}:{','.join(actions)}")
        self.requests.append(TokenRequest(user, scopes, tuple(granted), 200))
        token = self._sign(user or "", access)
        self.issued.append(token)
        return _reply(200, json.dumps({"token": token, "expires_in": self.expires_in}).encode())

    def _user(self, authorization: str | None) -> str | Literal[False] | None:
        """The authenticated user, None for anonymous, False for wrong credentials."""
        if authorization is None:
            return None
        scheme, _, credentials = authorization.partition(" ")
        try:
            user, _, password = base64.b64decode(credentials).decode().partition(":")
        except ValueError:
            return False
        if scheme.lower() != "basic" or self.users.get(user) != password:
            return False
        return user

    def _sign(self, subject: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header: dict[str, object] = {"typ": "JWT", "alg": "ES256"}
        if self.key_header == "x5c":
            der = self._certificate.public_bytes(serialization.Encoding.DER)
            header["x5c"] = [base64.b64encode(der).decode()]
        else:
            header["kid"] = self.key_id()
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            # The registry refuses the token once expires_in has run out (up to a second
            # sooner, as claims are whole seconds), not a minute after.
            "exp": now + self.expires_in - REGISTRY_LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = ".".join(_b64url(json.dumps(p).encode()) for p in (header, claims))
        der_signature = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der_signature)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def key_id(self) -> str:
        """The libtrust fingerprint of the signing key, as the registry computes it."""
        spki = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        encoded = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode()
        return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class ServedRequest:
    method: str
    path: str
    headers: httpx.Headers


@dataclass
class FileServer:
    """Serves the files under ``root`` (GET and HEAD), as a CDN in front of the registry's
    storage would; records every request."""

    root: Path
    requests: list[ServedRequest] = field(default_factory=list)
    url: str = ""

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners, self.url = await listen("127.0.0.1", 0)
        task_status.started(self.url)
        await run_server(self._handle, listeners, self.url)

    async def _handle(
        self,
        method: str,
        target: str,
        headers: httpx.Headers,
        body: AsyncIterable[bytes],
        origin: str,
    ) -> Response:
        path = unquote(urlsplit(target).path)
        self.requests.append(ServedRequest(method, path, headers))
        parts = path.strip("/").split("/")
        file = self.root.joinpath(*parts)
        if method not in ("GET", "HEAD") or ".." in parts or not file.is_file():
            return _reply(404)
        size = file.stat().st_size
        content = _read(file) if method == "GET" else _send(b"")
        headers_out = [("Content-Length", str(size)), ("Content-Type", "application/octet-stream")]
        return Response(200, headers_out, content)


async def _read(file: Path) -> AsyncGenerator[bytes, None]:
    with file.open("rb") as stream:
        while piece := stream.read(_PIECE):
            yield piece
            await trio.lowlevel.checkpoint()


# -- fixtures ----------------------------------------------------------------------------------


# The programs are looked for in plain fixtures: a skip from a trio fixture loses its message.
@pytest.fixture
def programs() -> None:
    """Skip (or fail, in CI) without the registry and htpasswd."""
    require("docker-registry", "htpasswd")


@pytest.fixture
def skopeo() -> str:
    """The path of the skopeo program."""
    require("skopeo")
    return str(shutil.which("skopeo"))


@pytest.fixture
async def plain_registry(tmp_path: Path, programs: None) -> AsyncIterator[RealRegistry]:
    """The registry without auth."""
    storage = tmp_path / "storage"
    async with distribution_registry(storage=storage) as url:
        yield RealRegistry(url, storage)


@pytest.fixture
async def token_server(
    tmp_path: Path, nursery: trio.Nursery, request: pytest.FixtureRequest
) -> TokenServer:
    """A token server that grants pull to anyone and pull+push to :data:`USERS`; indirect
    parametrization picks its ``key_header``."""
    server = TokenServer(
        tmp_path / "token", users=USERS, key_header=getattr(request, "param", "x5c")
    )
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def token_registry(
    tmp_path: Path, programs: None, token_server: TokenServer
) -> AsyncIterator[RealRegistry]:
    """The registry with ``auth: token``, trusting ``token_server``."""
    storage = tmp_path / "storage"
    async with distribution_registry(storage=storage, auth=token_server.auth()) as url:
        yield RealRegistry(url, storage)


@pytest.fixture
async def basic_registry(tmp_path: Path, programs: None) -> AsyncIterator[RealRegistry]:
    """The registry with htpasswd Basic auth for :data:`USERS`."""
    storage = tmp_path / "storage"
    async with distribution_registry(
        storage=storage, auth=DistributionBasicAuth(users=USERS)
    ) as url:
        yield RealRegistry(url, storage)


@pytest.fixture
async def file_server(tmp_path: Path, nursery: trio.Nursery) -> FileServer:
    """A file server for the storage directory of the registry fixtures."""
    server = FileServer(tmp_path / "storage")
    server.root.mkdir(parents=True, exist_ok=True)
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def redirect_registry(programs: None, file_server: FileServer) -> AsyncIterator[RealRegistry]:
    """The registry with Basic auth whose blob downloads redirect to ``file_server``."""
    storage = file_server.root
    async with distribution_registry(
        storage=storage, auth=DistributionBasicAuth(users=USERS), redirect_to=file_server.url
    ) as url:
        yield RealRegistry(url, storage)
