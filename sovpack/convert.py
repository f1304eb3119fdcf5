"""``sovpack convert``: checkpoint -> one runnable artifact directory, parity-checked on its runtime."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovpack import __version__
from sovpack.errors import ParityError
from sovpack.fsutil import atomic_directory, atomic_write_bytes
from sovpack.model import SourceModel, open_model
from sovpack.targets import load_targets
from sovpack.targets.base import ARTIFACT_FILE, Progress, TargetRef, no_progress

PARITY_FILE = "parity.json"
TOKENIZER_COPY = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ConvertResult:
    """Where the artifact went and how parity went (None when skipped)."""

    target: str
    out_dir: Path
    files: tuple[str, ...]
    parity: Any | None  # sovpack.parity.ParityReport


def copy_support_files(model: SourceModel, out_dir: Path, names: Sequence[str] = TOKENIZER_COPY) -> list[str]:
    """Copy tokenizer and config files that runtimes read beside the weights; returns what was copied."""
    copied = []
    for name in names:
        path = model.checkpoint.file(name)
        if path is not None:
            shutil.copyfile(path, out_dir / name)
            copied.append(name)
    return copied


def artifact_metadata(model: SourceModel, ref: TargetRef, files: Sequence[str], extra: Mapping[str, Any]) -> dict:
    return {
        "schema_version": 1,
        "sovpack_version": __version__,
        "target": str(ref),
        "format": ref.format,
        "precision": ref.precision,
        "name": model.name,
        "files": sorted(files),
        "spec": model.spec.to_dict(),
        "source": [f.to_dict() for f in model.checkpoint.source_files],
        "format_metadata": dict(extra),
    }


def write_metadata(out_dir: Path, metadata: Mapping[str, Any]) -> None:
    text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(out_dir / ARTIFACT_FILE, text.encode("utf-8"))


def convert(
    checkpoint: str | Path,
    target: str | TargetRef,
    out_dir: str | Path,
    *,
    parity: bool = True,
    prompts: Sequence[str] = (),
    threshold_overrides: Mapping[str, float | bool | None] | None = None,
    allow_nonfinite: bool = False,
    force: bool = False,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Write one target artifact; run parity on its runtime unless told not to. FAILED parity writes nothing."""
    load_targets()
    ref = target if isinstance(target, TargetRef) else TargetRef.parse(target)
    model = open_model(checkpoint, allow_nonfinite=allow_nonfinite)
    out = Path(out_dir)
    with atomic_directory(out, force=force) as tmp:
        written = ref.target.write(model, ref.precision, tmp, progress)
        metadata = artifact_metadata(model, ref, [*written.files, ARTIFACT_FILE], written.metadata)
        write_metadata(tmp, metadata)
        report = None
        if parity:
            report = run_parity(model, ref, tmp, metadata, prompts, threshold_overrides, progress)
            report.save(tmp / PARITY_FILE)
            if report.status == "FAILED":
                raise ParityError(f"{ref}: parity FAILED, nothing written: " + "; ".join(report.reasons))
    return ConvertResult(target=str(ref), out_dir=out, files=tuple(metadata["files"]), parity=report)


def run_parity(
    model: SourceModel,
    ref: TargetRef,
    artifact_dir: Path,
    metadata: Mapping[str, Any],
    prompts: Sequence[str],
    threshold_overrides: Mapping[str, float | bool | None] | None,
    progress: Progress = no_progress,
) -> Any:
    """Check an artifact directory against the numpy reference on the target's own runtime."""
    from sovpack.parity import check_parity, thresholds_for
    from sovpack.prompts import PROMPT_LABELS, PROMPTS, encode_prompts
    from sovpack.reference import ReferenceModel

    progress(f"{ref}: parity", 0, 1)
    tokenizer_json = model.checkpoint.tokenizer_json
    if tokenizer_json is None:
        raise ParityError(f"{model.path}: parity needs tokenizer.json to encode its prompts")
    encoded = encode_prompts(tokenizer_json, list(prompts) or list(PROMPTS))
    labels = None if prompts else list(PROMPT_LABELS)
    runner = ref.target.open_runner(artifact_dir, dict(metadata))
    report = check_parity(
        ReferenceModel(model),
        runner,
        target=str(ref),
        precision=ref.precision,
        prompts=encoded,
        tokenizer_json=tokenizer_json,
        # A target may publish looser limits where its runtime cannot meet the defaults (e.g. ggml's float16
        # GELU table); they sit beneath the user's overrides and are recorded in the report's thresholds.
        thresholds=thresholds_for(
            ref.precision, {**getattr(runner, "threshold_overrides", {}), **(threshold_overrides or {})}
        ),
        prompt_labels=labels,
        stop_ids=model.spec.eos_token_ids,
        known_tokenizer_divergences=getattr(runner, "known_tokenizer_divergences", ()),
    )
    progress(f"{ref}: parity", 1, 1)
    return report
