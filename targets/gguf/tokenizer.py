"""A checkpoint's tokenizer as GGUF ``tokenizer.ggml.*`` metadata, derived from the tokenizer's own definition.

llama.cpp does not run a tokenizer.json: it re-implements a fixed set of tokenizer pipelines and picks one by
``tokenizer.ggml.model`` ("gpt2" = byte-level BPE, "llama" = SentencePiece-style BPE) and, for byte-level BPE,
by the name in ``tokenizer.ggml.pre`` (which split regex to run). So this module reads what a tokenizer.json
says it does -- normalizer, pre-tokenizer, model type, added tokens, post-processor -- and maps it onto the
llama.cpp pipeline that does the same (``pretokenizer``), or refuses (``ConversionError``) when llama.cpp has
none. It never identifies a tokenizer by hashing its vocabulary.

- Byte-level BPE: tokens and merges are copied; token types mark added special tokens CONTROL, other added
  tokens USER_DEFINED.
- SentencePiece-style BPE: tokenizer model ``llama``. llama.cpp's SPM tokenizer merges the adjacent pair whose
  concatenation is a vocabulary piece of the highest *score*; BPE merges the pair of the lowest *merge rank*.
  Scoring every piece ``-rank`` of the first merge that creates it makes the SPM merge order follow the BPE
  merge order. "<0xNN>" pieces are BYTE tokens (byte fallback), the unknown token is UNKNOWN.
- Pipelines that llama.cpp can run only approximately are converted with *known divergences*: each is a rule
  with a description and the corpus texts it affects, reported rather than judged by parity (``special`` has
  the special-token rules).

A ``tokenizer.model`` (SentencePiece protobuf) is not needed when tokenizer.json is present, which already
describes the same tokenizer; without a tokenizer.json it is parsed directly (``sentencepiece``), for BPE-type
models only. A tokenizer file that cannot be read or is malformed is a ``SourceError``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sovpack.errors import ConversionError, SourceError
from sovpack.source.checkpoint import Checkpoint
from sovpack.source.tokenizer import check_tokenizer_json, read_tokenizer_json
from sovpack.targets.gguf.pretokenizer import byte_level_rule, metaspace_split, spm_style
from sovpack.targets.gguf.sentencepiece import tokenizer_from_sentencepiece
from sovpack.targets.gguf.special import control_looking_rule, special_ids, strip_rules
from sovpack.targets.gguf.vocab import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    DivergenceRule,
    GgufTokenizer,
    check_size,
)


def tokenizer_from_checkpoint(
    checkpoint: Checkpoint,
    *,
    vocab_size: int,
    model_name: str,
    fallback_ids: Mapping[str, int | None] | None = None,
    corpus: Sequence[str] = (),
) -> GgufTokenizer:
    """Convert a checkpoint's tokenizer (tokenizer.json, else tokenizer.model) for a model of ``vocab_size``.

    ``model_name`` is the GGUF ``general.name`` (llama.cpp keys some token attributes on it). ``fallback_ids``
    (bos/eos/pad from config.json) fill in special ids the tokenizer files do not name. Known divergences list
    the texts of ``corpus`` they affect.
    """
    config = checkpoint.tokenizer_config or {}
    template = checkpoint.chat_template
    json_path: Path | None = checkpoint.tokenizer_json
    if json_path is not None:
        # size-capped, regular file only, standard JSON without duplicate keys, then shape-checked
        data = read_tokenizer_json(json_path)
        return tokenizer_from_json(
            data,
            vocab_size=vocab_size,
            tokenizer_config=config,
            chat_template=template,
            model_name=model_name,
            fallback_ids=fallback_ids,
            corpus=corpus,
            where=str(json_path),
        )
    model_path: Path | None = checkpoint.tokenizer_model
    raw = checkpoint.read_bytes("tokenizer.model") if model_path is not None else None
    if model_path is not None and raw is not None:
        return tokenizer_from_sentencepiece(
            raw,
            vocab_size=vocab_size,
            tokenizer_config=config,
            chat_template=template,
            fallback_ids=fallback_ids,
            where=str(model_path),
        )
    raise ConversionError(
        f"{checkpoint.root}: no tokenizer.json or tokenizer.model; a GGUF file must carry its tokenizer"
    )


def tokenizer_from_json(
    data: Mapping[str, Any],
    *,
    vocab_size: int,
    tokenizer_config: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    model_name: str = "",
    fallback_ids: Mapping[str, int | None] | None = None,
    corpus: Sequence[str] = (),
    where: str = "tokenizer.json",
) -> GgufTokenizer:
    """Convert a parsed tokenizer.json (see the module docstring for what is supported)."""
    data = check_tokenizer_json(data, where)
    model = data["model"]
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ConversionError(
            f"{where}: tokenizer model {model.get('type')!r} is not supported for GGUF: only BPE tokenizers "
            "(byte-level or SentencePiece-style) map onto a llama.cpp tokenizer"
        )
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise ConversionError(f"{where}: BPE option {option}={model[option]!r} has no llama.cpp equivalent")
    added = _added_tokens(data, where)
    vocab = _vocab(model, added, where)
    merges = _merges(model, where)
    normalizer = data.get("normalizer")
    pre_tokenizer = data.get("pre_tokenizer")
    added_texts = [a["content"] for a in added]

    style = spm_style(normalizer, pre_tokenizer, model, where)
    divergences: list[DivergenceRule] = []
    if style is not None:
        add_prefix, prefix_rule = style
        tok = _spm_vocab(vocab, merges, added, model, vocab_size, where)
        tok.add_space_prefix = add_prefix
        if prefix_rule is not None:
            divergences.append(prefix_rule(added_texts))
        if pre_tokenizer and pre_tokenizer.get("type") == "Metaspace" and metaspace_split(pre_tokenizer):
            divergences.append(
                DivergenceRule(
                    rule="metaspace-split",
                    description="the source splits words at '▁' before merging (Metaspace split=true); llama.cpp's "
                    "SPM tokenizer merges across word boundaries when a vocabulary piece spans them",
                    applies=_differs_from_variant(data, lambda d: d["pre_tokenizer"].update(split=False), where),
                )
            )
    else:
        rule = byte_level_rule(normalizer, pre_tokenizer, where)
        tok = _byte_level_vocab(vocab, merges, added, vocab_size, where)
        tok.pre = rule.pre
        if bool(model.get("ignore_merges", False)) != rule.ignore_merges:
            divergences.append(
                DivergenceRule(
                    rule="ignore-merges",
                    description=f"llama.cpp's {rule.pre!r} pre-tokenizer implies ignore_merges={rule.ignore_merges}, "
                    f"the source tokenizer has ignore_merges={bool(model.get('ignore_merges', False))}: a word "
                    "that is a vocabulary entry but not reachable by merges may encode differently",
                    applies=_differs_from_variant(
                        data, lambda d: d["model"].update(ignore_merges=rule.ignore_merges), where
                    ),
                )
            )
        if normalizer is not None:
            divergences.append(
                DivergenceRule(
                    rule="nfc",
                    description="the source normalizes text to NFC; llama.cpp's BPE tokenizer does not normalize, "
                    "so text that is not already in NFC encodes differently",
                    applies=lambda text: unicodedata.normalize("NFC", text) != text,
                )
            )
    divergences.extend(strip_rules(added, tok, model_name))
    control = control_looking_rule(tok)
    if control is not None:
        divergences.append(control)

    special_ids(tok, data, vocab, tokenizer_config or {}, fallback_ids or {}, model, where)
    tok.chat_template = chat_template
    tok.divergences = [r.known(corpus) for r in divergences]
    return tok


# --------------------------------------------------------------------------------------------------------------
# reading tokenizer.json


def _added_tokens(data: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The added tokens, refusing those llama.cpp cannot express."""
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) and "content" in a and "id" in a for a in added):
        raise SourceError(f"{where}: malformed 'added_tokens'")
    for a in added:
        if a.get("single_word"):
            raise ConversionError(
                f"{where}: added token {a['content']!r} is single_word, which llama.cpp cannot express"
            )
    return added


def _vocab(model: Mapping[str, Any], added: Sequence[Mapping[str, Any]], where: str) -> dict[int, str]:
    """id -> token text over the model vocabulary and the added tokens."""
    raw = model.get("vocab")
    if not isinstance(raw, dict):
        raise SourceError(f"{where}: BPE model has no 'vocab' object")
    by_id: dict[int, str] = {}
    for text, i in raw.items():
        if not isinstance(i, int) or i < 0:
            raise SourceError(f"{where}: vocabulary id {i!r} of {text!r} is not a non-negative integer")
        by_id[i] = text
    for a in added:
        i = int(a["id"])
        if i in by_id and by_id[i] != a["content"]:
            raise SourceError(f"{where}: added token {a['content']!r} reuses id {i} of {by_id[i]!r}")
        by_id[i] = a["content"]
    texts: dict[str, int] = {}
    for i, text in sorted(by_id.items()):
        if text in texts:
            raise ConversionError(
                f"{where}: token text {text!r} has two ids ({texts[text]} and {i}); GGUF vocabularies map each "
                "text to one id"
            )
        texts[text] = i
    return by_id


def _merges(model: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """The merges as (left, right) pairs, from either of tokenizer.json's two spellings."""
    out: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise SourceError(f"{where}: merge {m!r} is not two space-separated pieces")
            out.append((parts[0], parts[1]))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append((m[0], m[1]))
        else:
            raise SourceError(f"{where}: malformed merge {m!r}")
    return out


def _differs_from_variant(
    data: Mapping[str, Any], change: Callable[[dict[str, Any]], None], where: str
) -> Callable[[str], bool]:
    """Texts the source tokenizer encodes differently from a variant of itself that differs only in what
    llama.cpp does differently (one option): the ``tokenizers`` library runs both, so the prediction is exact
    for that one difference."""
    from tokenizers import Tokenizer

    variant = json.loads(json.dumps(data))
    change(variant)
    # NOTE: the tokenizers library raises plain Exceptions for a tokenizer it cannot load, hence the broad
    # catches; each re-raises as a SovpackError with the library's message.
    try:
        source = Tokenizer.from_str(json.dumps(data))
    except Exception as e:
        raise SourceError(f"{where}: the tokenizers library cannot load this tokenizer: {e}") from e
    try:
        other = Tokenizer.from_str(json.dumps(variant))
    except Exception as e:
        raise ConversionError(
            f"{where}: cannot build the variant that predicts where llama.cpp's tokenizer differs: {e}"
        ) from e
    return lambda text: source.encode(text).ids != other.encode(text).ids


def _spm_vocab(
    vocab: Mapping[int, str],
    merges: Sequence[tuple[str, str]],
    added: Sequence[Mapping[str, Any]],
    model: Mapping[str, Any],
    vocab_size: int,
    where: str,
) -> GgufTokenizer:
    """Tokens, merge-rank scores and token types for llama.cpp's SPM tokenizer."""
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    added_by_id = {int(a["id"]): a for a in added}
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    floor = -float(len(merges) + 1)  # below every merge: pieces no merge creates are never preferred
    padded = check_size(vocab, vocab_size, where)
    for i in range(vocab_size):
        text = vocab.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(floor)
            continue
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else floor)
        if text == unk:
            types.append(UNKNOWN)
        elif i in added_by_id:
            types.append(CONTROL if added_by_id[i].get("special") else USER_DEFINED)
        elif model.get("byte_fallback") and _BYTE_PIECE.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return GgufTokenizer(model="llama", pre=None, tokens=tokens, token_types=types, scores=scores, padded=padded)


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _byte_level_vocab(
    vocab: Mapping[int, str],
    merges: Sequence[tuple[str, str]],
    added: Sequence[Mapping[str, Any]],
    vocab_size: int,
    where: str,
) -> GgufTokenizer:
    """Tokens, token types and "a b" merges for llama.cpp's byte-level BPE tokenizer."""
    padded = check_size(vocab, vocab_size, where)
    added_by_id = {int(a["id"]): a for a in added}
    tokens, types = [], []
    for i in range(vocab_size):
        text = vocab.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added_by_id:
            tokens.append(text)
            types.append(CONTROL if added_by_id[i].get("special") else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(NORMAL)
    for a, b in merges:
        if " " in a or " " in b or not a or not b:
            raise ConversionError(f"{where}: merge ({a!r}, {b!r}) contains a space; GGUF merges are 'a b' strings")
    return GgufTokenizer(
        model="gpt2", pre=None, tokens=tokens, token_types=types, merges=[f"{a} {b}" for a, b in merges], padded=padded
    )
