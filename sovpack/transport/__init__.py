"""Moving bundles: ``sovpack copy`` between layout directories, ``oci-archive:`` tars and OCI registries.

- :mod:`~sovpack.transport.endpoints`: what a location string names (directory, archive, ``docker://``);
- :mod:`~sovpack.transport.copy`: the copy itself (verified, resumable, tag last);
- :mod:`~sovpack.transport.remote`: a registry read like a layout (``RegistryLayout``) for ``verify``/``inspect``,
  and a local copy of any location for ``extract``/``run``/``parity``;
- :mod:`~sovpack.transport.client` (+ ``session``, ``auth``, ``reference``): the OCI distribution client.

The layout and archive mechanics underneath are OCI, not transport: :mod:`sovpack.oci.writer`,
:mod:`sovpack.oci.archive`, and the bundle graph walk :func:`sovpack.oci.blobs.collect`.
"""

from __future__ import annotations

from sovpack.oci.archive import read_archive, write_archive
from sovpack.oci.blobs import Graph, ManifestNode, collect
from sovpack.oci.writer import LayoutWriter
from sovpack.transport.auth import Credentials, RegistryOptions, parse_challenge, resolve_credentials
from sovpack.transport.client import RegistryClient
from sovpack.transport.copy import CopyResult, copy_bundle
from sovpack.transport.endpoints import (
    ArchiveEndpoint,
    Endpoint,
    LayoutEndpoint,
    RegistryEndpoint,
    parse_endpoint,
)
from sovpack.transport.reference import Reference, is_registry_reference
from sovpack.transport.remote import RegistryLayout, bundle_location, local_bundle, target_of_tag
from sovpack.transport.session import StallError

__all__ = [
    "ArchiveEndpoint",
    "CopyResult",
    "Credentials",
    "Endpoint",
    "Graph",
    "LayoutEndpoint",
    "LayoutWriter",
    "ManifestNode",
    "Reference",
    "RegistryClient",
    "RegistryEndpoint",
    "RegistryLayout",
    "RegistryOptions",
    "StallError",
    "bundle_location",
    "collect",
    "copy_bundle",
    "is_registry_reference",
    "local_bundle",
    "parse_challenge",
    "parse_endpoint",
    "read_archive",
    "resolve_credentials",
    "target_of_tag",
    "write_archive",
]
