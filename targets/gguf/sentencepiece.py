"""``tokenizer.model`` (a serialized SentencePiece ModelProto) read without the sentencepiece package.

Used only when a checkpoint has no tokenizer.json (which describes the same tokenizer and is preferred): a
minimal protobuf reader takes the pieces, their scores and types, and the normalizer options, and a BPE-type
model becomes a GGUF SPM vocabulary with its own scores and piece types.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sovpack.errors import ConversionError, SourceError
from sovpack.targets.gguf.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, GgufTokenizer

# SentencePiece's piece types (ModelProto.SentencePiece.Type) and its BPE model type (TrainerSpec.ModelType).
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_MODEL_BPE = 2


_MAX_VARINT_BYTES = 10  # a protobuf varint encodes at most 64 bits


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """One base-128 varint at ``pos``: (value, position after it).

    NOTE: capped at 10 bytes like protobuf itself: a long run of continuation bytes would otherwise build an
    ever larger integer (quadratic time on a hostile file).
    """
    value = shift = 0
    for _ in range(_MAX_VARINT_BYTES):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError(f"varint longer than {_MAX_VARINT_BYTES} bytes")


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, wire, value


@dataclass(kw_only=True, slots=True)
class SentencePieceModel:
    """The parts of a SentencePiece ModelProto a GGUF vocabulary needs."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: int = 1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    byte_fallback: bool = False


def parse_sentencepiece(data: bytes) -> SentencePieceModel:
    """Parse a serialized sentencepiece ModelProto (pieces = field 1, trainer_spec = 2, normalizer_spec = 3)."""
    model = SentencePieceModel(pieces=[])
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            piece, score, kind = "", 0.0, _SP_NORMAL
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2 and wire == 2:
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    model.model_type = v
                elif n == 35 and w == 0:
                    model.byte_fallback = bool(v)
        elif number == 3 and wire == 2:
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    model.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    model.remove_extra_whitespaces = bool(v)
    return model


def tokenizer_from_sentencepiece(
    data: bytes,
    *,
    vocab_size: int,
    tokenizer_config: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    fallback_ids: Mapping[str, int | None] | None = None,
    where: str = "tokenizer.model",
) -> GgufTokenizer:
    """A GGUF SPM vocabulary straight from a SentencePiece BPE model (its own scores and piece types)."""
    try:
        sp = parse_sentencepiece(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{where}: not a SentencePiece model: {e}") from e
    if not sp.pieces:
        raise SourceError(f"{where}: not a SentencePiece model (no pieces)")
    bad = next((p for p, score, _ in sp.pieces if not math.isfinite(score)), None)
    if bad is not None:
        raise SourceError(f"{where}: piece {bad!r} has a non-finite score")
    if sp.model_type != _SP_MODEL_BPE:
        raise ConversionError(
            f"{where}: SentencePiece model type {sp.model_type} is not BPE (2); only BPE SentencePiece models "
            "map onto llama.cpp's SPM tokenizer"
        )
    if len(sp.pieces) > vocab_size:
        raise ConversionError(f"{where}: {len(sp.pieces)} pieces but the model's vocabulary is {vocab_size}")
    kinds = {
        _SP_NORMAL: NORMAL,
        _SP_UNKNOWN: UNKNOWN,
        _SP_CONTROL: CONTROL,
        _SP_USER_DEFINED: USER_DEFINED,
        _SP_UNUSED: UNUSED,
        _SP_BYTE: BYTE,
    }
    tokens = [p for p, _, _ in sp.pieces]
    scores = [float(s) for _, s, _ in sp.pieces]
    types = [kinds.get(k, NORMAL) for _, _, k in sp.pieces]
    padded = vocab_size - len(tokens)
    floor = min(scores) - 1.0 if scores else -1.0
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(floor)
        types.append(UNUSED)
    config = tokenizer_config or {}
    fallback = fallback_ids or {}
    ids = {t: i for i, t in enumerate(tokens)}

    def named(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return ids.get(value) if isinstance(value, str) else None

    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    return GgufTokenizer(
        model="llama",
        pre=None,
        tokens=tokens,
        token_types=types,
        scores=scores,
        bos_id=named("bos_token") if named("bos_token") is not None else fallback.get("bos"),
        eos_id=named("eos_token") if named("eos_token") is not None else fallback.get("eos"),
        unk_id=unk,
        pad_id=named("pad_token") if named("pad_token") is not None else fallback.get("pad"),
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        add_space_prefix=sp.add_dummy_prefix,
        remove_extra_whitespaces=sp.remove_extra_whitespaces,
        chat_template=chat_template,
        source="tokenizer.model",
        padded=padded,
    )
