"""The OCI vocabulary sovpack speaks: layout file names, media and artifact types, annotation keys, limits.

OCI image-spec v1.1 (layout, index, manifest), CNCF ModelPack (model manifest, config and layer types),
Sigstore bundle v0.3, and sovpack's own types (bundle index, parity reference, bundle kinds).
"""

from __future__ import annotations

import re

OCI_LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
LAYOUT_VERSION = "1.0.0"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
# Docker schema 2 types: registries may serve them for what was pushed as OCI.
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST, *INDEX_TYPES)
MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

AT_MODEL = "application/vnd.cncf.model.manifest.v1+json"
MT_MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MT_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
MT_WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MT_DOC = "application/vnd.cncf.model.doc.v1.raw"
MODEL_LAYER_TYPES = (MT_WEIGHT, MT_WEIGHT_CONFIG, MT_DOC)

AT_BUNDLE = "application/vnd.sovpack.bundle.v1+json"
AT_PARITY_REFERENCE = "application/vnd.sovpack.parity-reference.v1+json"
MT_PARITY_REFERENCE_CONFIG = "application/vnd.sovpack.parity-reference.config.v1+json"
MT_LOGITS = "application/vnd.sovpack.reference-logits.v1.npy"
MT_PARITY_REPORT = "application/vnd.sovpack.parity-report.v1+json"
AT_SIGSTORE = "application/vnd.dev.sigstore.bundle.v0.3+json"

ANN_FILEPATH = "org.cncf.model.filepath"
ANN_FILE_METADATA = "org.cncf.model.file.metadata+json"  # ModelPack "File Metadata Annotation Value"
ANN_REF_NAME = "org.opencontainers.image.ref.name"  # image-spec: only on index.json descriptors
ANN_BUNDLE_TAG = "dev.sovpack.tag"  # the bundle index's own record of its tag (older bundles: ANN_REF_NAME)
ANN_CREATED = "org.opencontainers.image.created"
ANN_TITLE = "org.opencontainers.image.title"
ANN_LICENSES = "org.opencontainers.image.licenses"
ANN_VERSION = "org.opencontainers.image.version"
ANN_KIND = "dev.sovpack.kind"  # target | parity-reference | attestation
ANN_TARGET = "dev.sovpack.target"
ANN_TARGETS = "dev.sovpack.targets"
ANN_FORMAT = "dev.sovpack.format"
ANN_PRECISION = "dev.sovpack.precision"
ANN_ATTESTATION = "dev.sovpack.attestation"  # signature | provenance | parity
ANN_SUBJECT = "dev.sovpack.subject"
ANN_BUNDLE_VERSION = "dev.sovpack.bundle.version"
ANN_SOVPACK_VERSION = "dev.sovpack.version"
ANN_PREDICATE_TYPE = "dev.sigstore.bundle.predicateType"
ANN_BUNDLE_CONTENT = "dev.sigstore.bundle.content"

# What each bundle-index entry is (ANN_KIND), and the attestations every target carries.
KIND_TARGET = "target"
KIND_REFERENCE = "parity-reference"
KIND_ATTESTATION = "attestation"
KIND_RELEASE = "release"  # the signed release statement (sovpack.attest.release)
ATTESTATION_KINDS = ("signature", "provenance", "parity")
BUNDLE_FORMAT_VERSION = "1"
PARITY_PREDICATE_TYPE = "https://in-toto.io/attestation/test-result/v0.1"

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

# One cap for every JSON document read from a layout, archive or registry (index, manifest, config,
# signature): registries refuse manifests over 4 MiB, so 8 MiB leaves room and never buffers a "manifest"
# that is really a multi-gigabyte blob.
MAX_JSON_DOCUMENT = 8 * 1024 * 1024
