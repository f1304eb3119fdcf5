"""The sentence-transformers files beside an encoder: pooling read as published, anything else refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fixtures.encoders import make_encoder_checkpoint
from sovpack.errors import SourceError
from sovpack.source.sentence_transformers import read_pooling
from sovpack.source.spec import Pooling


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.mark.parametrize(("flag", "mode"), [("cls", "cls"), ("mean", "mean"), ("max", "max"),
                                            ("mean_sqrt_len", "mean_sqrt_len"), ("lasttoken", "last_token")])
def test_each_published_mode_is_read(tmp_path: Path, flag: str, mode: str) -> None:
    root = make_encoder_checkpoint("bert", tmp_path / "c", pooling=flag, normalize=flag != "max")
    assert read_pooling(root) == Pooling(mode=mode, normalize=flag != "max", max_seq_length=48)  # type: ignore[arg-type]


def test_a_bare_encoder_pools_by_mean_without_normalising(tmp_path: Path) -> None:
    root = make_encoder_checkpoint("bert", tmp_path / "c", sentence_transformers=False)
    assert read_pooling(root) == Pooling(mode="mean", normalize=False, max_seq_length=None)


def _broken(tmp_path: Path) -> Path:
    return make_encoder_checkpoint("bert", tmp_path / "c")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: _write(r / "modules.json", {"not": "a list"}), "list of 1 to 16 modules"),
    (lambda r: _write(r / "modules.json", [{"type": "sentence_transformers.models.Transformer", "path": ""},
                                           {"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]),
     "Dense"),
    (lambda r: _write(r / "modules.json", [{"type": "sentence_transformers.models.Transformer", "path": ""},
                                           {"type": "sentence_transformers.models.Pooling", "path": "../x"}]),
     "path"),
    (lambda r: _write(r / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True,
                                                        "pooling_mode_cls_token": True}), "exactly one"),
    (lambda r: _write(r / "1_Pooling" / "config.json", {"pooling_mode_weightedmean_tokens": True}),
     "weighted-mean"),
    (lambda r: _write(r / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": "yes"}), "true or false"),
    (lambda r: (r / "1_Pooling" / "config.json").unlink(), "missing"),
    (lambda r: _write(r / "sentence_bert_config.json", {"max_seq_length": -3}), "max_seq_length"),
    (lambda r: (r / "modules.json").write_bytes(b"\xff\xfe"), "modules.json"),
])
def test_refusals_name_the_file(tmp_path: Path, edit: Any, message: str) -> None:
    root = _broken(tmp_path)
    edit(root)
    with pytest.raises(SourceError, match=message):
        read_pooling(root)
