"""Per-target tags: every target of a bundle is also tagged on its own, beside the bundle tag.

Tools that pull one model by tag (KitOps ``kit pull``, modctl, ORAS) expect the tag to resolve to one ModelPack
manifest, not to an index; the bundle tag resolves to the bundle index (the unit ``verify`` vouches for).
So each target also gets ``<bundle tag>-<format>-<precision>`` (``1.0-gguf-q4_k_m``), in a layout's
``index.json`` and in a registry, resolving straight to that target's manifest; its attestations stay
discoverable as its referrers. The tags are derived from the bundle index, never stored in what is signed:
any copy (build, copy, archive, registry push) writes the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sovpack.errors import VerificationError
from sovpack.oci.blobs import json_object
from sovpack.oci.descriptor import Descriptor
from sovpack.oci.media import (
    ANN_KIND,
    ANN_REF_NAME,
    ANN_TARGET,
    AT_MODEL,
    KIND_TARGET,
    MANIFEST_TYPES,
    MT_MANIFEST,
    TAG_RE,
)


def target_tag(bundle_tag: str, target: str) -> str:
    """``1.0`` + ``gguf:q4_k_m`` -> ``1.0-gguf-q4_k_m``."""
    return f"{bundle_tag}-{target.replace(':', '-')}"


def bundle_tag_of(tag: str, target: str) -> str | None:
    """The bundle tag a per-target tag of ``target`` was derived from, or None if ``tag`` is not one."""
    suffix = "-" + target.replace(":", "-")
    if not tag.endswith(suffix) or len(tag) == len(suffix):
        return None
    return tag[: -len(suffix)]


def target_entries(bundle_index: Mapping[str, Any], bundle_tag: str | None) -> list[Descriptor]:
    """The per-target entries of a layout's ``index.json`` for a bundle index document (none without a tag).

    A target whose tag would not be a valid OCI tag (a bundle tag near the 128-character limit) gets none.
    """
    if bundle_tag is None:
        return []
    entries = []
    manifests = bundle_index.get("manifests")
    for i, raw in enumerate(manifests if isinstance(manifests, list) else []):
        entry = Descriptor.from_dict(raw, f"bundle index manifests[{i}]")  # VerificationError if malformed
        target = entry.annotations.get(ANN_TARGET)
        if entry.annotations.get(ANN_KIND) != KIND_TARGET or not isinstance(target, str):
            continue
        tag = target_tag(bundle_tag, target)
        if TAG_RE.match(tag) and entry.media_type == MT_MANIFEST:
            entries.append(Descriptor(media_type=MT_MANIFEST, digest=entry.digest, size=entry.size,
                                      artifact_type=AT_MODEL, annotations={ANN_REF_NAME: tag, ANN_TARGET: target}))
    return entries


def manifest_target(data: bytes, media_type: str) -> str | None:
    """The target a manifest says it is (its ``dev.sovpack.target`` annotation), if it is a target manifest."""
    if media_type not in MANIFEST_TYPES:
        return None
    try:
        annotations = json_object(data, "manifest").get("annotations")
    except VerificationError:
        return None
    target = annotations.get(ANN_TARGET) if isinstance(annotations, Mapping) else None
    return target if isinstance(target, str) else None


def tagged_target(data: bytes, media_type: str, tag: str | None) -> str | None:
    """The target a registry tag names when it is a per-target tag: a target manifest reached by
    ``<bundle tag>-<format>-<precision>``; None for anything else."""
    target = manifest_target(data, media_type)
    return target if target is not None and tag is not None and bundle_tag_of(tag, target) is not None else None


def check_target_tags(bundle_tag: str, targets: list[str]) -> str | None:
    """Why a bundle tag cannot carry per-target tags for these targets (too long), or None."""
    for target in targets:
        if not TAG_RE.match(target_tag(bundle_tag, target)):
            return (f"tag {bundle_tag!r} is too long for its per-target tags ({target_tag(bundle_tag, target)!r} "
                    "exceeds OCI's 128 characters)")
    return None


__all__ = ["bundle_tag_of", "check_target_tags", "manifest_target", "tagged_target", "target_entries", "target_tag"]
