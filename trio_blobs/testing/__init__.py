"""An in-process OCI registry for tests and demos, with faults injected on demand.

:class:`Registry` keeps blobs, manifests and upload sessions in memory and serves the distribution
API subset that blob transfers use (blobs, uploads, mounts, manifests, bearer tokens, redirects to
a storage origin), either in memory through :meth:`Registry.transport` or over loopback HTTP/1.1
through :meth:`Registry.serving` / :meth:`Registry.serve`. Every request is recorded as a
:class:`RecordedRequest`. A :class:`Fault` makes matching requests misbehave: ``status`` (with
``headers`` such as Retry-After, and ``body``) answers instead of the registry; ``delay`` holds
the response head back; ``stall_after``, ``trickle``, ``truncate_at``, ``corrupt`` and ``extra``
apply to the body and compose. Faults apply in the order added; the first match wins::

    registry = Registry()
    blob = registry.add_blob(b"hello")
    registry.add_fault(Fault(digest=blob.digest, status=503, headers={"Retry-After": "1"}))
    async with httpx.AsyncClient(transport=registry.transport(), base_url="http://r.test") as c:
        url = f"/v2/library/_/blobs/{blob.digest}"
        assert (await c.get(url)).status_code == 503
        assert (await c.get(url)).content == b"hello"

:func:`distribution_registry` runs the real distribution registry (Debian's
``docker-registry``) on a free loopback port with filesystem storage, optionally behind
:class:`DistributionTokenAuth` or :class:`DistributionBasicAuth` and with blob downloads
redirected to another server; it raises :class:`RegistryStartError` when the registry is not
installed or does not come up::

    async with distribution_registry() as base_url:
        await trio_blobs.upload(blobs, base_url=base_url, repository="org/model", src_dir="blobs")
"""

from ._distribution import (
    DistributionBasicAuth,
    DistributionTokenAuth,
    RegistryStartError,
    distribution_registry,
)
from ._registry import Fault, RecordedRequest, Registry

__all__ = [
    "DistributionBasicAuth",
    "DistributionTokenAuth",
    "Fault",
    "RecordedRequest",
    "Registry",
    "RegistryStartError",
    "distribution_registry",
]
