"""``publish_build``: build a bundle and copy it to a registry, archive or directory in one step (``build --push``).

This is what each runner of a fanned-out release does before ``sovpack assemble``: the part is built and
parity-checked on the machine that will serve it, signed, and pushed. A ``docker://`` destination's tag is
the bundle's signed tag (a registry keeps only the tag a bundle was signed with); without an output
directory the bundle is built in a temporary one, removed afterwards.

``earlier`` (``--reference-from`` / ``--reuse-from``) is a signed bundle, verified first
(sovpack.bundle.earlier), whose parity reference the build shares and, with ``reuse``, whose unchanged
targets it carries over (sovpack.bundle.build.build_bundle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack._io import Progress, no_progress
from sovpack.attest.dsse import SigningKey, VerifyingKey
from sovpack.bundle.build import BuildResult, build_bundle
from sovpack.bundle.config import DEFAULT_TAG, BuildConfig
from sovpack.bundle.earlier import verified_bundle
from sovpack.errors import UsageError
from sovpack.transport import CopyResult, RegistryEndpoint, RegistryOptions, copy_bundle, parse_endpoint


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishResult:
    """The build, and where it went (``kept``: the layout directory stays, else it was temporary)."""

    build: BuildResult
    pushed: CopyResult | None
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        document = self.build.to_dict()
        if self.pushed is not None:
            document["pushed"] = self.pushed.to_dict()
        if not self.kept:
            document["output"] = None
        return document


def push_config(config: BuildConfig, push: str | os.PathLike[str] | None) -> BuildConfig:
    """The build config with the tag a ``docker://`` destination names (UsageError if it contradicts --tag)."""
    if push is None:
        return config
    destination = parse_endpoint(push)
    if not isinstance(destination, RegistryEndpoint) or destination.ref.tag is None:
        return config
    if config.tag not in (DEFAULT_TAG, destination.ref.tag):
        raise UsageError(f"--push {destination} names tag {destination.ref.tag!r}, the bundle's is {config.tag!r}")
    return dataclasses.replace(config, tag=destination.ref.tag)


def publish_build(
    config: BuildConfig,
    *,
    key: SigningKey,
    push: str | os.PathLike[str] | None = None,
    earlier: str | os.PathLike[str] | None = None,
    reuse: bool = False,
    trusted: Sequence[VerifyingKey] = (),
    options: RegistryOptions | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> PublishResult:
    """``build_bundle``, then ``copy_bundle`` to ``push`` (if given); see the module docstring.

    ``trusted``: public keys ``earlier`` may be signed with (the public half of ``key`` always is).
    """
    config = push_config(config, push)
    options = options or RegistryOptions()
    scratch = None
    if push is not None and config.output is None:
        scratch = Path(tempfile.mkdtemp(prefix="sovpack-build-"))
        config = dataclasses.replace(config, output=scratch / "bundle")
    try:
        with contextlib.ExitStack() as stack:
            previous = None
            if earlier is not None:
                keys = tuple({k.key_id: k for k in (key.public, *trusted)}.values())
                role = "--reuse-from" if reuse else "--reference-from"
                previous = stack.enter_context(verified_bundle(earlier, keys, options, role=role))
            result = build_bundle(config, key=key, force=force, progress=progress, earlier=previous, reuse=reuse)
        pushed = None
        if push is not None:
            pushed = copy_bundle(result.output, push, options=options, progress=progress)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # the temporary build: scratch space only
    return PublishResult(build=result, pushed=pushed, kept=scratch is None)


__all__ = ["PublishResult", "publish_build", "push_config"]
