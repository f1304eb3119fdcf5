"""``sovpack build``: one signed, content-addressed OCI image layout holding every target of a model.

Layout (OCI image layout 1.0, readable by skopeo/oras/crane)::

    BUNDLE/oci-layout                      {"imageLayoutVersion": "1.0.0"}
    BUNDLE/index.json                      the bundle index by its tag (org.opencontainers.image.ref.name), then
                                           each target manifest by its per-target tag TAG-FORMAT-PRECISION
    BUNDLE/blobs/sha256/<hex>              every manifest, config and file, stored once by digest

The bundle index (an OCI image index, also carrying its tag as ``dev.sovpack.tag`` and the bundle name) lists:

- one **target manifest** per target variant, CNCF ModelPack style (``modelpack``): artifactType
  ``application/vnd.cncf.model.manifest.v1+json``, config ``application/vnd.cncf.model.config.v1+json``
  (descriptor + architecture/format/paramSize/precision/quantization + modelfs), one raw layer per file with
  its relative path in ``org.cncf.model.filepath``. Weights are ``...model.weight.v1.raw``; tokenizer, model
  config and ``sovpack-artifact.json`` (runtimes read it) are ``...model.weight.config.v1.raw``;
  ``parity.json`` (a report, not needed to run) is ``...model.doc.v1.raw``.
- one **parity reference** manifest (``application/vnd.sovpack.parity-reference.v1+json``): the prompts'
  token ids, the reference's greedy tokens and fp32 logits (one .npy layer per prompt) and the source
  tokenizer.json, so a deploy site can re-check parity without the checkpoint (``sovpack parity``). For an
  embedding encoder the same kind of manifest holds, under config ``application/vnd.sovpack.embedding-reference
  .config.v1+json`` (schemas/embedding-reference.schema.json: texts, labels, token ids, truncation, max_length,
  dimension), the reference's fp32 embeddings [texts, dim] and all token states [tokens, dim] as two .npy
  layers (``sovpack.parity.embeddings``).
- three **attestation** manifests per target (``attestations``), each an OCI 1.1 referrer (``subject`` = the
  target manifest) holding one Sigstore bundle v0.3 (DSSE, in-toto Statement v1): the OpenSSF model-signing
  signature of the target's files, SLSA provenance v1, and the parity result as an in-toto test-result. Index
  entries also carry ``dev.sovpack.*`` annotations (kind, target, attestation, subject) as an explicit mapping,
  so tools without referrers support still find them; verification trusts only what is signed.

Signatures name target *manifest* digests, never the index: tools such as ``skopeo copy --all`` rewrite the
indexes (they drop descriptor ``artifactType``), but copy manifests and blobs byte for byte.
Same checkpoint + options give byte-identical bytes throughout (no timestamps unless SOURCE_DATE_EPOCH).
"""

from sovpack.bundle.build import BuildResult, BuiltTarget, build_bundle
from sovpack.bundle.config import BuildConfig, BundleMetadata, load_build_config
from sovpack.bundle.modelpack import layer_media_type, modelpack_config, modelpack_precision, param_size

__all__ = [
    "BuildConfig",
    "BuildResult",
    "BuiltTarget",
    "BundleMetadata",
    "build_bundle",
    "layer_media_type",
    "load_build_config",
    "modelpack_config",
    "modelpack_precision",
    "param_size",
]
