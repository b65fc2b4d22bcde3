"""Parallel, verified blob transfers between a machine and OCI / Docker registries, for Trio.

Public names are re-exported here; the modules that define them are private.
"""

from ._auth import AuthChallenge, parse_auth_challenge
from ._auth_provider import RegistryAuth
from ._digest import Blob, digest_to_path, path_to_digest
from ._download import DownloadResult, download
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
from ._http import HTTP1Transport
from ._manifest import (
    Descriptor,
    Manifest,
    Platform,
    PlatformNotFoundError,
    Reference,
    fetch_manifest,
)
from ._retry import RetryPolicy
from ._upload import UploadResult, upload

__all__ = [
    "AuthChallenge",
    "AuthenticationError",
    "Blob",
    "ConnectionFailedError",
    "Descriptor",
    "DownloadResult",
    "HTTP1Transport",
    "IntegrityError",
    "LocalFileError",
    "Manifest",
    "Platform",
    "PlatformNotFoundError",
    "ProtocolError",
    "Reference",
    "RegistryAuth",
    "RegistryError",
    "RetriesExhaustedError",
    "RetryPolicy",
    "SlowTransferError",
    "StallError",
    "TransferError",
    "UploadResult",
    "digest_to_path",
    "download",
    "fetch_manifest",
    "parse_auth_challenge",
    "path_to_digest",
    "upload",
]

# Public classes say ``trio_blobs.X`` in reprs and tracebacks, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__"):
        _obj.__module__ = __name__
del _name, _obj
