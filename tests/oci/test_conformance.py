"""Conformance: every document of a bundle against the published OCI image-spec JSON schemas (issue 19).

The schemas are image-spec's own, as Debian ships them in ``golang-github-opencontainers-image-spec-dev``
(installed by ``.ci/run``; version 1.1.0~rc2 there, read from dpkg): oci-layout, ``index.json``, the bundle
index, every manifest and every descriptor. ModelPack configs are checked against
``schemas/modelpack-config.schema.json`` (written from model-spec's config.md, stricter than it: no unknown
fields, precision from its table); the official model-spec schema ships in no package registry reachable
here and is not copied into this repository.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from sovpack._schemas import validate
from sovpack.attest.dsse import SigningKey, generate_key_pair
from sovpack.bundle import BuildConfig, build_bundle
from sovpack.bundle.assemble import assemble_bundle
from sovpack.oci.blobs import collect
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import INDEX_TYPES, MT_MODEL_CONFIG
from sovpack.oci.reader import Layout
from sovpack.oci.writer import read_layout_top

SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema")
PACKAGE = "golang-github-opencontainers-image-spec-dev"

pytestmark = pytest.mark.skipif(
    not (SCHEMA_DIR / "image-manifest-schema.json").is_file(),
    reason=f"needs image-spec's schemas: apt-get install -y {PACKAGE} (.ci/run does)",
)


def _validator(name: str) -> Draft4Validator:
    """One image-spec schema, its relative ``$ref``s resolved to the files beside it (as image-spec's own Go
    loader does, by file name: the schemas' ``id``s do not share one base)."""
    def retrieve(uri: str) -> Resource[Any]:
        return Resource.from_contents(json.loads((SCHEMA_DIR / uri.rsplit("/", 1)[-1]).read_text()),
                                      default_specification=DRAFT4)

    schema = json.loads((SCHEMA_DIR / name).read_text())
    return Draft4Validator(schema, registry=Registry(retrieve=retrieve))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> list[Path]:
    """A build (decoder, two targets) and an assembled bundle of two parts."""
    root = tmp_path_factory.mktemp("conformance")
    key = SigningKey.load(generate_key_pair(root / "keys").private_key)
    built = root / "built"
    build_bundle(BuildConfig(checkpoint=checkpoints["llama3"], output=built, tag="1.0",
                             targets=("onnx:fp32", "gguf:q8_0")), key=key)
    part = root / "part"
    build_bundle(BuildConfig(checkpoint=checkpoints["llama3"], output=part, tag="1.0-more",
                             targets=("openvino:fp32",)), key=key)
    assembled = root / "assembled"
    assemble_bundle(assembled, [built, part], key=key, tag="1.0")
    return [built, assembled]


def test_the_schemas_are_image_specs_own() -> None:
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("1.1"), version.stdout


def test_every_document_conforms(bundles: list[Path]) -> None:
    layout_schema, index_schema = _validator("image-layout-schema.json"), _validator("image-index-schema.json")
    manifest_schema, descriptor_schema = _validator("image-manifest-schema.json"), _validator("content-descriptor.json")
    for path in bundles:
        layout_schema.validate(json.loads((path / "oci-layout").read_text()))
        top_level = json.loads((path / "index.json").read_text())
        index_schema.validate(top_level)
        for entry in top_level["manifests"]:
            descriptor_schema.validate(entry)
        layout = Layout(path)
        top, _tag = read_layout_top(path)
        graph = collect(lambda d: layout.read(d, d.digest), top)  # noqa: B023  (used at once)
        configs = 0
        for node in graph.manifests:
            document = json.loads(node.data)
            if node.descriptor.media_type in INDEX_TYPES:
                index_schema.validate(document)
                for entry in document["manifests"]:
                    descriptor_schema.validate(entry)
                continue
            manifest_schema.validate(document)
            for blob in [document["config"], *document["layers"]]:
                descriptor_schema.validate(blob)
            if document["config"]["mediaType"] == MT_MODEL_CONFIG:
                config = Descriptor.from_dict(document["config"], "config")
                validate(json.loads(layout.read(config, "config")), "modelpack-config")
                configs += 1
        assert configs == 3 if path.name == "assembled" else configs == 2
