"""Helpers shared by the tests."""

import os

from trio_blobs import Blob
from trio_blobs.testing import Registry

BASE_URL = "http://registry.test"


def add_blobs(registry: Registry, *sizes: int, repository: str = "library/_") -> list[Blob]:
    """Random blobs of the given sizes, stored in ``registry``."""
    return [registry.add_blob(os.urandom(size), repository) for size in sizes]
