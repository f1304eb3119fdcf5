"""The source tokenizer (tokenizer.json via the ``tokenizers`` package): encode prompts, decode outputs.

Also the shape check every reader of tokenizer.json runs first (``read_tokenizer_json``): the GGUF and OpenVINO
tokenizer converters walk the file's components themselves, so a component of the wrong JSON type must be a
SourceError naming the file and the component, never an AttributeError deep inside a converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovpack._io import read_capped, read_json_file
from sovpack.errors import SourceError
from sovpack.source.checkpoint import MAX_TOKENIZER_BYTES

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(tokenizer_json: Path) -> Tokenizer:
    """Open a tokenizer.json with the ``tokenizers`` library (no transformers, no network); errors name the file.

    The file is read here (a regular file, at most MAX_TOKENIZER_BYTES) and handed over as text, so the
    library never opens a FIFO or slurps a huge file.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    if not path.exists():
        raise SourceError(f"{path}: tokenizer file not found")
    raw = read_capped(path, MAX_TOKENIZER_BYTES, error=SourceError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason})") from e
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers package raises plain Exception subclasses on malformed files
        raise SourceError(f"{path}: cannot load tokenizer: {e}") from e
    # NOTE: padding and truncation saved in tokenizer.json are batch-time settings of whoever saved it
    # (all-MiniLM-L6-v2's pads every text to 128 tokens); one text's token ids are what every runtime must agree
    # on, so neither applies here. An encoder's input-length cap comes from its sentence_bert_config.json.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class SourceTokenizer:
    """A tokenizer.json, loaded without transformers (and without any network)."""

    def __init__(self, path: Path, *, max_length: int | None = None) -> None:
        """``max_length``: truncate each encoding to this many tokens, special tokens included (an embedding
        encoder's max_seq_length, as sentence-transformers truncates)."""
        self.path = path
        self._tok = load_tokenizer(path)
        if max_length is not None:
            self._tok.enable_truncation(max_length)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


# --------------------------------------------------------------------------------------------- tokenizer.json shape


def read_tokenizer_json(path: Path, where: str | None = None) -> dict[str, Any]:
    """tokenizer.json parsed (a regular file within MAX_TOKENIZER_BYTES, standard JSON) and shape-checked."""
    display = where or str(path)
    data = read_json_file(Path(path), MAX_TOKENIZER_BYTES, where=display)
    return check_tokenizer_json(data, display)


# Sequence components and the key that lists their steps.
_SEQUENCE_KEYS = {
    "normalizer": "normalizers",
    "pre_tokenizer": "pretokenizers",
    "post_processor": "processors",
    "decoder": "decoders",
}
_STRING_FIELDS = ("type", "content", "prepend", "replacement", "behavior", "prepend_scheme")
_INTEGER_FIELDS = ("start", "stop")


class _Shape:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str, value: Any) -> SourceError:
        text = repr(value)
        shown = text if len(text) <= 60 else text[:57] + "..."
        return SourceError(f"{self.where}: malformed tokenizer.json: {what} (got {shown})")

    def obj(self, value: Any, what: str, *, optional: bool = False) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be an object", value)
        return value

    def lst(self, value: Any, what: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"{what} must be a list", value)
        return value

    def string(self, node: Mapping[str, Any], key: str, what: str) -> None:
        if node.get(key) is not None and not isinstance(node[key], str):
            raise self.fail(f"{what}.{key} must be a string", node[key])

    def token_id(self, value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{what} must be a non-negative integer token id", value)


def check_tokenizer_json(data: Any, where: str) -> dict[str, Any]:
    """``data`` if it has the JSON shape of a tokenizer.json in every part a converter reads, else SourceError."""
    shape = _Shape(where)
    if not isinstance(data, dict):
        raise shape.fail("the document must be an object", data)
    top: dict[str, Any] = data
    model = shape.obj(top.get("model"), "'model'")
    for key in ("type", "unk_token"):
        shape.string(model, key, "model")
    if isinstance(model.get("vocab"), list):  # Unigram: [piece, log probability] pairs, ids by position
        for i, entry in enumerate(shape.lst(model.get("vocab"), "model.vocab")):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], int | float) and not isinstance(entry[1], bool)):
                raise shape.fail(f"model.vocab[{i}] must be a [piece, score] pair", entry)
        if model.get("unk_id") is not None:
            shape.token_id(model["unk_id"], "model.unk_id")
    else:
        vocab = shape.obj(model.get("vocab"), "model.vocab", optional=True)
        for text, token_id in vocab.items():
            shape.token_id(token_id, f"model.vocab[{text!r}]")
    for merge in shape.lst(model.get("merges"), "model.merges"):
        if not isinstance(merge, str) and not (
            isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge)
        ):
            raise shape.fail("each merge must be 'a b' or a pair of strings", merge)
    for i, token in enumerate(shape.lst(top.get("added_tokens"), "'added_tokens'")):
        entry = shape.obj(token, f"added_tokens[{i}]")
        if not isinstance(entry.get("content"), str):
            raise shape.fail(f"added_tokens[{i}].content must be a string", entry.get("content"))
        shape.token_id(entry.get("id"), f"added_tokens[{i}].id")
    for component, key in _SEQUENCE_KEYS.items():
        if top.get(component) is not None:
            _check_step(shape, top[component], component, key)
    return top


def _check_step(shape: _Shape, node: Any, what: str, key: str) -> None:
    """One component step (recursing into Sequences; JSON nesting is capped, so the recursion is too)."""
    step = shape.obj(node, what)
    for field in _STRING_FIELDS:
        shape.string(step, field, what)
    for field in _INTEGER_FIELDS:
        value = step.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise shape.fail(f"{what}.{field} must be an integer", value)
    if step.get("pattern") is not None:
        pattern = shape.obj(step["pattern"], f"{what}.pattern")
        if not any(k in pattern for k in ("String", "Regex")):
            raise shape.fail(f"{what}.pattern must have a 'String' or 'Regex'", pattern)
        for k in ("String", "Regex"):
            shape.string(pattern, k, f"{what}.pattern")
    if step.get("type") == "Sequence":
        for i, child in enumerate(shape.lst(step.get(key), f"{what}.{key}")):
            _check_step(shape, child, f"{what}.{key}[{i}]", key)
    if step.get("type") == "TemplateProcessing":
        _check_template(shape, step, what)


def _check_template(shape: _Shape, step: Mapping[str, Any], what: str) -> None:
    for side in ("single", "pair"):
        for i, piece in enumerate(shape.lst(step.get(side), f"{what}.{side}")):
            entry = shape.obj(piece, f"{what}.{side}[{i}]")
            if len(entry) != 1 or next(iter(entry)) not in ("Sequence", "SpecialToken"):
                raise shape.fail(f"{what}.{side}[{i}] must be one 'Sequence' or 'SpecialToken' object", entry)
            body = shape.obj(next(iter(entry.values())), f"{what}.{side}[{i}]")
            if not isinstance(body.get("id"), str):
                raise shape.fail(f"{what}.{side}[{i}].id must be a string", body.get("id"))
            type_id = body.get("type_id", 0)
            if isinstance(type_id, bool) or not isinstance(type_id, int):
                raise shape.fail(f"{what}.{side}[{i}].type_id must be an integer", type_id)
    specials = shape.obj(step.get("special_tokens"), f"{what}.special_tokens", optional=True)
    for name, special in specials.items():
        entry = shape.obj(special, f"{what}.special_tokens[{name!r}]")
        for token_id in shape.lst(entry.get("ids"), f"{what}.special_tokens[{name!r}].ids"):
            shape.token_id(token_id, f"{what}.special_tokens[{name!r}].ids[]")
