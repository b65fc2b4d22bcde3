"""Shared fixtures: an in-process registry, and a client that reaches it in memory."""

from collections.abc import AsyncIterator

import httpx
import pytest

from trio_blobs.testing import Registry


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
async def client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=registry.transport()) as client:
        yield client
