"""The sentence-transformers layout beside an encoder checkpoint: which modules follow the transformer, how they pool.

``modules.json`` lists the pipeline (Transformer, then Pooling, optionally Normalize); ``1_Pooling/config.json``
(or wherever modules.json points) names the pooling mode; ``sentence_bert_config.json`` caps the input length.
A bare encoder without these files gets sentence-transformers' own default for a plain Hugging Face model: mean
pooling, no normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovpack._io import check_relative_path, read_json_file, shorten
from sovpack.errors import SourceError
from sovpack.source.spec import Pooling, PoolingMode

MODULES_FILE = "modules.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
_JSON_CAP = 1024 * 1024
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
# pooling config flag -> mode; weighted mean has learned per-position weights no target carries, so it is refused
_MODES: dict[str, PoolingMode | None] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last_token",
    "pooling_mode_weightedmean_tokens": None,
}
_MAX_MODULES = 16


def read_pooling(root: Path) -> Pooling:
    """The pooling a checkpoint directory declares; SourceError naming the file for anything unsupported."""
    modules_path = root / MODULES_FILE
    max_length = _max_seq_length(root)
    if not modules_path.exists():
        return Pooling(max_seq_length=max_length)
    modules = read_json_file(modules_path, _JSON_CAP)
    if not isinstance(modules, list) or not 1 <= len(modules) <= _MAX_MODULES:
        raise SourceError(f"{modules_path}: must be a list of 1 to {_MAX_MODULES} modules, got {shorten(modules)}")
    kinds = [_module_type(m, modules_path) for m in modules]
    if kinds[0][0] != _TRANSFORMER or kinds[0][1] not in ("", "."):
        raise SourceError(f"{modules_path}: the first module must be the Transformer at the checkpoint root")
    rest = [kind for kind, _ in kinds[1:]]
    unsupported = [k for k in rest if k not in (_POOLING, _NORMALIZE)]
    if unsupported:
        raise SourceError(f"{modules_path}: module {shorten(unsupported[0])} is not supported "
                          "(only Transformer, Pooling and Normalize)")
    if rest[:1] != [_POOLING] or rest.count(_POOLING) != 1 or rest[1:] not in ([], [_NORMALIZE]):
        raise SourceError(f"{modules_path}: expected Transformer, Pooling and optionally Normalize, in that order")
    mode, include_prompt = _pooling_config(root / kinds[1][1] / "config.json")
    return Pooling(mode=mode, normalize=_NORMALIZE in rest, max_seq_length=max_length,
                   include_prompt=include_prompt)


def _module_type(module: Any, where: Path) -> tuple[str, str]:
    if not isinstance(module, dict) or not isinstance(module.get("type"), str):
        raise SourceError(f"{where}: each module must be an object with a 'type', got {shorten(module)}")
    path = module.get("path", "")
    if not isinstance(path, str):
        raise SourceError(f"{where}: module 'path' must be a string, got {shorten(path)}")
    if path not in ("", "."):
        check_relative_path(path, str(where), error=SourceError)
    return module["type"], path


def _pooling_config(path: Path) -> tuple[PoolingMode, bool]:
    if not path.is_file():
        raise SourceError(f"{path}: missing (modules.json names a Pooling module here)")
    config = read_json_file(path, _JSON_CAP)
    if not isinstance(config, dict):
        raise SourceError(f"{path}: must be a JSON object")
    # NOTE: sentence-transformers writes one boolean per mode (its ``pooling_mode`` string is a constructor
    # argument that it saves as those booleans).
    chosen: list[str] = []
    for key in _MODES:
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise SourceError(f"{path}: {key!r} must be true or false, got {shorten(value)}")
        if value:
            chosen.append(key)
    if len(chosen) != 1:
        raise SourceError(f"{path}: exactly one pooling mode must be set, got {len(chosen)} "
                          "(concatenated poolings are not supported)")
    mode = _MODES[chosen[0]]
    if mode is None:
        raise SourceError(f"{path}: weighted-mean pooling is not supported (its learned weights live nowhere "
                          "a runtime reads them)")
    include_prompt = config.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise SourceError(f"{path}: 'include_prompt' must be true or false")
    return mode, include_prompt


def _max_seq_length(root: Path) -> int | None:
    path = root / SBERT_CONFIG_FILE
    if not path.exists():
        return None
    config = read_json_file(path, _JSON_CAP)
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**20:
        raise SourceError(f"{path}: 'max_seq_length' must be an integer from 1 to {2**20}, got {shorten(value)}")
    return value
