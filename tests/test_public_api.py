"""The public surface is exactly what we mean to export."""

import copy
import pickle

import pytest

import trio_blobs
import trio_blobs.testing


def test_trio_blobs_exports() -> None:
    assert trio_blobs.__all__ == sorted(trio_blobs.__all__)
    assert set(trio_blobs.__all__) == {
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
    }


def test_public_names_say_trio_blobs() -> None:
    assert repr(trio_blobs.Blob) == "<class 'trio_blobs.Blob'>"
    for name in trio_blobs.__all__:
        assert getattr(trio_blobs, name).__module__ == "trio_blobs"


def test_every_error_is_a_transfer_error() -> None:
    errors = [getattr(trio_blobs, n) for n in trio_blobs.__all__ if n.endswith("Error")]
    assert all(issubclass(e, trio_blobs.TransferError) for e in errors)


@pytest.mark.parametrize(
    "error",
    [
        trio_blobs.RegistryError("refused", status=503, code="UNAVAILABLE", retryable=True),
        trio_blobs.AuthenticationError("no", status=401, url="http://registry.test/v2/"),
        trio_blobs.StallError("no data", digest="sha256:" + "0" * 64),
        trio_blobs.RetriesExhaustedError(trio_blobs.StallError("no data"), attempts=3),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_copy_and_pickle_whole(error: trio_blobs.TransferError) -> None:
    for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(twin) is type(error)
        assert str(twin) == str(error)
        assert vars(twin).keys() == vars(error).keys()
