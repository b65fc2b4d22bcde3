"""Digests, the file names they map to, and Blob validation."""

from __future__ import annotations

import dataclasses
import hashlib
import ntpath
import posixpath
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_blobs._digest import Blob, check_digest, digest_to_path, path_to_digest

HEX = "0123456789abcdef"
LENGTHS = {"sha256": 64, "sha512": 128}
EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def is_valid_digest(value: object, sep: str = ":") -> bool:
    """An oracle written independently of the module's regexes (``sep="-"``: file names)."""
    if type(value) is not str:
        return False
    algorithm, found, hex_ = value.partition(sep)
    return (
        found == sep
        and algorithm in LENGTHS
        and len(hex_) == LENGTHS[algorithm]
        and all(c in HEX for c in hex_)
    )


valid_digests = st.sampled_from(sorted(LENGTHS)).flatmap(
    lambda alg: st.text(HEX, min_size=LENGTHS[alg], max_size=LENGTHS[alg]).map(
        lambda hex_: f"{alg}:{hex_}"
    )
)


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """Strings that look like a digest but are not one."""
    digest = draw(valid_digests)
    alg, _, hex_ = digest.partition(":")
    pos = draw(st.integers(0, len(hex_) - 1))
    junk = draw(st.text(min_size=1, max_size=3))
    other_alg = draw(st.sampled_from(["sha384", "md5", "sha-256", "blake3", "sha1", ""]))
    return draw(
        st.sampled_from(
            [
                # Wrong case, wrong characters, wrong length.
                f"{alg}:{hex_[:pos]}{draw(st.sampled_from('ABCDEFG'))}{hex_[pos + 1 :]}",
                f"{alg}:{hex_[:pos]}{draw(st.sampled_from('gxz:/-٣３.'))}{hex_[pos + 1 :]}",
                digest.upper(),
                f"{alg.upper()}:{hex_}",
                f"{alg}:{hex_[:pos]}{hex_[pos + 1 :]}",
                f"{alg}:{hex_}{draw(st.sampled_from(HEX))}",
                f"{alg}:{hex_[:64] if alg == 'sha512' else hex_ + hex_}",
                f"{alg}:",
                # Other algorithms and separators.
                f"{other_alg}:{hex_}",
                f"{alg}-{hex_}",
                f"{alg}::{hex_}",
                f"{alg} :{hex_}",
                hex_,
                # Paths.
                f"sha256:../{hex_[:61]}",
                f"sha256:{hex_[:60]}/../",
                f"{alg}:{hex_}/..",
                f"../{digest}",
                # Whitespace, prefixes and suffixes.
                f"{digest}\n",
                f"{digest}\x00",
                f" {digest}",
                f"{digest} ",
                f"{digest}{junk}",
                f"{junk}{digest}",
            ]
        )
    )


non_strings: list[Any] = [
    None,
    42,
    EMPTY_SHA256.encode(),
    bytearray(EMPTY_SHA256.encode()),
    memoryview(EMPTY_SHA256.encode()),
    [EMPTY_SHA256],
    (EMPTY_SHA256,),
    {EMPTY_SHA256: 1},
]


# --- digest_to_path / path_to_digest --------------------------------------------------------


def test_examples() -> None:
    assert digest_to_path(EMPTY_SHA256) == EMPTY_SHA256.replace(":", "-")
    assert path_to_digest(EMPTY_SHA256.replace(":", "-")) == EMPTY_SHA256
    sha512 = "sha512:" + hashlib.sha512(b"x").hexdigest()
    assert digest_to_path(sha512) == "sha512-" + sha512[7:]
    assert check_digest(EMPTY_SHA256) == EMPTY_SHA256


@given(valid_digests)
def test_round_trip(digest: str) -> None:
    path = digest_to_path(digest)
    assert path_to_digest(path) == digest
    assert digest_to_path(path_to_digest(path)) == path


@given(valid_digests)
def test_single_path_component(digest: str) -> None:
    path = digest_to_path(digest)
    assert path
    assert path not in (".", "..")
    assert not any(c in path for c in "/\\\x00:")
    assert posixpath.basename(path) == path
    assert ntpath.basename(path) == path
    assert path.isprintable()
    assert path.isascii()


@given(valid_digests, valid_digests)
def test_injective(a: str, b: str) -> None:
    assert (digest_to_path(a) == digest_to_path(b)) == (a == b)


@settings(max_examples=300)
@given(near_misses())
def test_rejects_near_misses(value: str) -> None:
    assert not is_valid_digest(value)
    with pytest.raises(ValueError, match="not a valid digest"):
        digest_to_path(value)
    with pytest.raises(ValueError, match="not a valid digest"):
        check_digest(value)
    # The same mistakes in file-name form are rejected by the inverse.
    name = value.replace(":", "-", 1)
    if not is_valid_digest(name, sep="-"):  # "sha256-<hex>" was a near miss as a digest
        with pytest.raises(ValueError, match="not a valid blob file name"):
            path_to_digest(name)


@settings(max_examples=300)
@given(st.text() | st.text(HEX + "sha256:-", max_size=140))
def test_accepts_exactly_the_valid_digests(value: str) -> None:
    if is_valid_digest(value):
        assert path_to_digest(digest_to_path(value)) == value
    else:
        with pytest.raises(ValueError, match="not a valid digest"):
            digest_to_path(value)


@given(valid_digests)
def test_inverse_rejects_digest_form(digest: str) -> None:
    with pytest.raises(ValueError, match="not a valid blob file name"):
        path_to_digest(digest)


@pytest.mark.parametrize("value", non_strings, ids=repr)
def test_rejects_non_strings(value: Any) -> None:
    with pytest.raises(ValueError, match="not a valid digest"):
        digest_to_path(value)
    with pytest.raises(ValueError, match="not a valid blob file name"):
        path_to_digest(value)
    with pytest.raises(ValueError, match="not a valid digest"):
        Blob(value, 0)


# --- Blob -------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_an_empty_blob_has_the_digest_of_no_bytes(algorithm: str) -> None:
    """Size 0 with any other digest could never verify: refused at once, not retried."""
    digest = Blob.from_bytes(b"x", algorithm=algorithm).digest
    empty = Blob.from_bytes(b"", algorithm=algorithm).digest
    with pytest.raises(ValueError, match=f"size 0 means no bytes, whose digest is {empty}"):
        Blob(digest, 0)


def test_blob() -> None:
    blob = Blob(EMPTY_SHA256, 0)
    assert blob.file_name == digest_to_path(EMPTY_SHA256)
    assert blob.mount_from is None
    assert Blob(EMPTY_SHA256, 2**40, mount_from="library/ubuntu").size == 2**40
    assert Blob.from_bytes(b"") == blob
    data = b"hello"
    assert Blob.from_bytes(data, algorithm="sha512") == Blob(
        "sha512:" + hashlib.sha512(data).hexdigest(), 5
    )


@settings(max_examples=50)
@given(st.binary(max_size=200), st.sampled_from(sorted(LENGTHS)))
def test_blob_from_bytes(data: bytes, algorithm: str) -> None:
    blob = Blob.from_bytes(data, algorithm=algorithm)
    assert blob.size == len(data)
    assert blob.digest == f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@settings(max_examples=100)
@given(near_misses())
def test_blob_rejects_bad_digest(value: str) -> None:
    with pytest.raises(ValueError, match="not a valid digest"):
        Blob(value, 1)


@pytest.mark.parametrize("size", [-1, -(2**63), True, False, 1.0, 0.0, "1", None, 1j])
def test_blob_rejects_bad_size(size: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        Blob(EMPTY_SHA256, size)


@pytest.mark.parametrize("mount_from", [b"library/ubuntu", 1, ["a"], "../x", "a&b=c", "a/"])
def test_blob_rejects_bad_mount_from(mount_from: Any) -> None:
    with pytest.raises(ValueError, match="mount_from"):
        Blob(EMPTY_SHA256, 1, mount_from=mount_from)


def test_blob_is_frozen() -> None:
    blob = Blob(EMPTY_SHA256, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        blob.digest = "../../etc/passwd"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        blob.size = -1  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        blob.extra = 1  # type: ignore[attr-defined]
    assert blob == Blob(EMPTY_SHA256, 1)
    assert hash(blob) == hash(Blob(EMPTY_SHA256, 1))
