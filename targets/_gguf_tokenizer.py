"""A checkpoint's tokenizer as GGUF ``tokenizer.ggml.*`` metadata, derived from the tokenizer's own definition.

llama.cpp does not run a tokenizer.json: it re-implements a fixed set of tokenizer pipelines and picks one by
``tokenizer.ggml.model`` ("gpt2" = byte-level BPE, "llama" = SentencePiece-style BPE) and, for byte-level BPE,
by the name in ``tokenizer.ggml.pre`` (which split regex to run). So this module reads what a tokenizer.json
says it does -- normalizer, pre-tokenizer, model type, added tokens, post-processor -- and maps it onto the
llama.cpp pipeline that does the same, or refuses (``ConversionError``) when llama.cpp has none. It never
identifies a tokenizer by hashing its vocabulary.

- Byte-level BPE: the ``Split`` regex of the pre-tokenizer (or ByteLevel's built-in GPT-2 regex) selects the
  llama.cpp pre-tokenizer: the Llama 3 regex -> ``llama-bpe``, Qwen2's -> ``qwen2``, GPT-2's -> ``gpt-2``.
  Tokens and merges are copied; token types mark added special tokens CONTROL, other added tokens
  USER_DEFINED.
- SentencePiece-style BPE (spaces turned into "▁" by a Prepend+Replace normalizer, a Metaspace pre-tokenizer,
  or a bare Replace; usually byte fallback): tokenizer model ``llama``. llama.cpp's SPM tokenizer merges the
  adjacent pair whose concatenation is a vocabulary piece of the highest *score*; BPE merges the pair of the
  lowest *merge rank*. Scoring every piece ``-rank`` of the first merge that creates it makes the SPM merge
  order follow the BPE merge order. "<0xNN>" pieces are BYTE tokens (byte fallback), the unknown token is
  UNKNOWN.
- Pipelines that llama.cpp can run only approximately are converted with *known divergences*: each is a rule
  with a description and the corpus texts it affects, reported rather than judged by parity.

A ``tokenizer.model`` (SentencePiece protobuf) is not needed when tokenizer.json is present, which already
describes the same tokenizer; without a tokenizer.json it is parsed directly (a minimal protobuf reader, no
sentencepiece package), for BPE-type models only.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack.errors import ConversionError

SPIECE = "\u2581"  # "▁"

# Token types as llama.cpp reads them (gguf.TokenType); repeated here so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Byte-level split regexes, exactly as tokenizer.json files publish them, and the llama.cpp pre-tokenizer
# that runs the same split. llama.cpp rewrites the case-insensitive group for its regex engine but documents
# these source forms next to its own.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True, slots=True)
class PreTokenizerRule:
    """One llama.cpp byte-level pre-tokenizer: its name and the BPE options it implies."""

    pre: str
    ignore_merges: bool  # llama.cpp hard-codes this per pre-tokenizer


BYTE_LEVEL_SPLITS: dict[str, PreTokenizerRule] = {
    LLAMA3_REGEX: PreTokenizerRule("llama-bpe", ignore_merges=True),
    QWEN2_REGEX: PreTokenizerRule("qwen2", ignore_merges=False),
    GPT2_REGEX: PreTokenizerRule("gpt-2", ignore_merges=False),
}


# Token texts llama.cpp (0.3.36's vendored version) turns into CONTROL tokens whatever the file says: its
# end-of-generation list, plus the fill-in-the-middle names it looks for. A *normal* vocabulary entry with one of
# these texts is then matched as a special token in text, where the source tokenizer merges it from pieces.
LLAMA_CPP_CONTROL_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>",
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>",
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>",
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class KnownDivergence:
    """A documented way llama.cpp's tokenizer differs from the source tokenizer, and the texts it affects."""

    rule: str
    description: str
    texts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "description": self.description, "texts": list(self.texts)}


@dataclass(slots=True)
class GgufTokenizer:
    """Everything that goes under ``tokenizer.*`` in a GGUF file."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | None = None
    source: str = "tokenizer.json"
    padded: int = 0  # placeholder tokens appended to reach the model's vocabulary size
    divergences: list[KnownDivergence] = field(default_factory=list)

    def add_to(self, writer: Any) -> None:
        """Write the tokenizer keys with a gguf.GGUFWriter."""
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for value, add in (
            (self.bos_id, writer.add_bos_token_id),
            (self.eos_id, writer.add_eos_token_id),
            (self.unk_id, writer.add_unk_token_id),
            (self.pad_id, writer.add_pad_token_id),
        ):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def summary(self) -> dict[str, Any]:
        """What the artifact metadata records about the conversion."""
        return {
            "source": self.source,
            "model": self.model,
            "pre": self.pre,
            "tokens": len(self.tokens),
            "padded_tokens": self.padded,
            "merges": len(self.merges) if self.merges is not None else None,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "add_space_prefix": self.add_space_prefix,
            "known_divergences": [d.to_dict() for d in self.divergences],
        }

    @property
    def divergent_texts(self) -> list[str]:
        """Corpus texts some known divergence affects (what parity reports but does not judge)."""
        return sorted({t for d in self.divergences for t in d.texts})


# --------------------------------------------------------------------------------------------------------------
# entry points


def tokenizer_from_checkpoint(
    checkpoint: Any,
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
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{json_path}: cannot read tokenizer: {e}") from e
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
    if model_path is not None:
        return tokenizer_from_sentencepiece(
            model_path.read_bytes(),
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
    model = data.get("model") or {}
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
    specials = {a["content"] for a in added if a.get("special")}
    added_texts = [a["content"] for a in added]

    style = _spm_style(normalizer, pre_tokenizer, model, where)
    divergences: list[_Rule] = []
    if style is not None:
        add_prefix, prefix_rule = style
        tok = _spm_vocab(vocab, merges, added, model, vocab_size, where)
        tok.add_space_prefix = add_prefix
        if prefix_rule is not None:
            divergences.append(prefix_rule(added_texts))
        if pre_tokenizer and pre_tokenizer.get("type") == "Metaspace" and _metaspace_split(pre_tokenizer):
            divergences.append(
                _Rule(
                    "metaspace-split",
                    "the source splits words at '▁' before merging (Metaspace split=true); llama.cpp's SPM "
                    "tokenizer merges across word boundaries when a vocabulary piece spans them",
                    _differs_from_variant(data, lambda d: d["pre_tokenizer"].update(split=False)),
                )
            )
    else:
        rule = _byte_level_rule(normalizer, pre_tokenizer, where)
        tok = _byte_level_vocab(vocab, merges, added, vocab_size, where)
        tok.pre = rule.pre
        if bool(model.get("ignore_merges", False)) != rule.ignore_merges:
            divergences.append(
                _Rule(
                    "ignore-merges",
                    f"llama.cpp's {rule.pre!r} pre-tokenizer implies ignore_merges={rule.ignore_merges}, the "
                    f"source tokenizer has ignore_merges={bool(model.get('ignore_merges', False))}: a word "
                    "that is a vocabulary entry but not reachable by merges may encode differently",
                    _differs_from_variant(data, lambda d: d["model"].update(ignore_merges=rule.ignore_merges)),
                )
            )
        if normalizer is not None:
            divergences.append(
                _Rule(
                    "nfc",
                    "the source normalizes text to NFC; llama.cpp's BPE tokenizer does not normalize, so "
                    "text that is not already in NFC encodes differently",
                    lambda text: unicodedata.normalize("NFC", text) != text,
                )
            )
    divergences.extend(_strip_rules(added, specials, tok, model_name))
    looking = sorted(
        t for t, ty in zip(tok.tokens, tok.token_types, strict=True) if ty == NORMAL and t in LLAMA_CPP_CONTROL_TEXTS
    )
    if looking:
        divergences.append(
            _Rule(
                "control-looking",
                f"llama.cpp treats the ordinary vocabulary entries {', '.join(looking)} as control tokens (it "
                "recognizes them by their text) and matches them whole, where the source encodes them from pieces",
                lambda text: any(t in text for t in looking),
            )
        )

    _special_ids(tok, data, vocab, tokenizer_config or {}, fallback_ids or {}, model, where)
    tok.chat_template = chat_template
    tok.divergences = [r.known(corpus) for r in divergences]
    return tok


# --------------------------------------------------------------------------------------------------------------
# reading tokenizer.json


def _added_tokens(data: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) and "content" in a and "id" in a for a in added):
        raise ConversionError(f"{where}: malformed 'added_tokens'")
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
        raise ConversionError(f"{where}: BPE model has no 'vocab' object")
    by_id: dict[int, str] = {}
    for text, i in raw.items():
        if not isinstance(i, int) or i < 0:
            raise ConversionError(f"{where}: vocabulary id {i!r} of {text!r} is not a non-negative integer")
        by_id[i] = text
    for a in added:
        i = int(a["id"])
        if i in by_id and by_id[i] != a["content"]:
            raise ConversionError(f"{where}: added token {a['content']!r} reuses id {i} of {by_id[i]!r}")
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
    out: list[tuple[str, str]] = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ConversionError(f"{where}: merge {m!r} is not two space-separated pieces")
            out.append((parts[0], parts[1]))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append((m[0], m[1]))
        else:
            raise ConversionError(f"{where}: malformed merge {m!r}")
    return out


def _steps(node: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """Flatten a Sequence normalizer / pre-tokenizer / processor into its steps."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key) or [] for s in _steps(child, key)]
    return [node]


def _pattern(step: Mapping[str, Any]) -> tuple[str, str] | None:
    pattern = step.get("pattern") or {}
    if "String" in pattern:
        return "string", pattern["String"]
    if "Regex" in pattern:
        return "regex", pattern["Regex"]
    return None


def _metaspace_split(step: Mapping[str, Any]) -> bool:
    return bool(step.get("split", True))


def _metaspace_scheme(step: Mapping[str, Any]) -> str:
    if "prepend_scheme" in step:
        return str(step["prepend_scheme"]).lower()
    return "always" if step.get("add_prefix_space", True) else "never"


# --------------------------------------------------------------------------------------------------------------
# SentencePiece-style BPE


def _spm_style(
    normalizer: Mapping[str, Any] | None,
    pre_tokenizer: Mapping[str, Any] | None,
    model: Mapping[str, Any],
    where: str,
) -> tuple[bool, Callable[[Sequence[str]], _Rule] | None] | None:
    """(add_space_prefix, divergence rule factory) if this is a SentencePiece-style pipeline, else None."""
    norm = _steps(normalizer, "normalizers")
    pre = _steps(pre_tokenizer, "pretokenizers")
    replaces_space = any(
        s.get("type") == "Replace" and _pattern(s) == ("string", " ") and s.get("content") == SPIECE for s in norm
    )
    metaspace = [s for s in pre if s.get("type") == "Metaspace"]
    if not replaces_space and not metaspace:
        if model.get("byte_fallback"):
            raise ConversionError(
                f"{where}: a byte-fallback BPE tokenizer without a '▁' space replacement (normalizer Replace or "
                "Metaspace pre-tokenizer) has no llama.cpp equivalent"
            )
        return None
    if replaces_space and metaspace:
        raise ConversionError(f"{where}: both a '▁' normalizer and a Metaspace pre-tokenizer; not supported")
    if replaces_space:
        prepend = False
        for s in norm:
            kind = s.get("type")
            if kind == "Prepend" and s.get("prepend") == SPIECE:
                prepend = True
            elif kind == "Replace" and _pattern(s) == ("string", " ") and s.get("content") == SPIECE:
                continue
            else:
                raise ConversionError(
                    f"{where}: normalizer step {kind!r} in a SentencePiece-style tokenizer is not supported by "
                    "llama.cpp (supported: Prepend('▁'), Replace(' ', '▁'))"
                )
        for s in pre:
            # Splitting on " " after every space became "▁" is a no-op (Gemma ships one).
            if s.get("type") == "Split" and _pattern(s) == ("string", " "):
                continue
            raise ConversionError(
                f"{where}: pre-tokenizer {s.get('type')!r} after a '▁' normalizer is not supported by llama.cpp"
            )
        return prepend, None
    if norm:
        kinds = [s.get("type") for s in norm]
        raise ConversionError(f"{where}: normalizer {kinds} before a Metaspace pre-tokenizer is not supported")
    if len(pre) != 1:
        raise ConversionError(
            f"{where}: pre-tokenizer {[s.get('type') for s in pre]} is not supported by llama.cpp "
            "(a Metaspace pre-tokenizer must be the only step)"
        )
    step = metaspace[0]
    if step.get("replacement", SPIECE) != SPIECE:
        raise ConversionError(f"{where}: Metaspace replacement {step.get('replacement')!r} is not '▁'")
    scheme = _metaspace_scheme(step)
    if scheme == "never":
        return False, None
    if scheme in ("always", "first"):
        return True, lambda added: _metaspace_prefix_rule(added, first_only=scheme == "first")
    raise ConversionError(f"{where}: Metaspace prepend_scheme {scheme!r} is not supported")


def _metaspace_prefix_rule(added: Sequence[str], *, first_only: bool) -> _Rule:
    """Where Metaspace's '▁' prefix differs from llama.cpp's add_space_prefix.

    Metaspace adds the prefix only to text that does not already start with a space, and with
    prepend_scheme "first" only to the text at the very start. llama.cpp prefixes every text fragment at the
    start or after a special token, whatever it starts with.
    """

    def applies(text: str) -> bool:
        for i, (seg, is_token) in enumerate(_split_on_added(text, added)):
            if is_token or not seg:
                continue
            if seg[0] in (" ", SPIECE) or (first_only and i > 0):
                return True
        return False

    scope = "only at the start of the text (prepend_scheme 'first')" if first_only else "to every text fragment"
    return _Rule(
        "metaspace-prefix",
        f"the source adds the '▁' word prefix {scope} and only where the text does not already start with a "
        "space; llama.cpp adds it to every fragment at the start or after a special token",
        applies,
    )


def _differs_from_variant(data: Mapping[str, Any], change: Callable[[dict[str, Any]], None]) -> Callable[[str], bool]:
    """Texts the source tokenizer encodes differently from a variant of itself that differs only in what
    llama.cpp does differently (one option): the ``tokenizers`` library runs both, so the prediction is exact
    for that one difference."""
    from tokenizers import Tokenizer

    variant = json.loads(json.dumps(data))
    change(variant)
    try:
        source, other = Tokenizer.from_str(json.dumps(data)), Tokenizer.from_str(json.dumps(variant))
    except Exception:  # the tokenizers library raises plain Exceptions; then nothing can be predicted
        return lambda text: False
    return lambda text: source.encode(text).ids != other.encode(text).ids


def _split_on_added(text: str, added: Sequence[str]) -> list[tuple[str, bool]]:
    """Split text on added-token occurrences (leftmost, longest first): [(segment, is_added_token)]."""
    if not added:
        return [(text, False)]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        out.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


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
    padded = _check_size(vocab, vocab_size, where)
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


# --------------------------------------------------------------------------------------------------------------
# byte-level BPE


def _byte_level_rule(
    normalizer: Mapping[str, Any] | None, pre_tokenizer: Mapping[str, Any] | None, where: str
) -> PreTokenizerRule:
    """The llama.cpp pre-tokenizer that runs this byte-level pipeline, or a ConversionError saying why none."""
    for s in _steps(normalizer, "normalizers"):
        if s.get("type") != "NFC":
            raise ConversionError(
                f"{where}: normalizer {s.get('type')!r} is not supported by llama.cpp's BPE tokenizer "
                "(only NFC is accepted, as a documented divergence)"
            )
    steps = _steps(pre_tokenizer, "pretokenizers")
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or steps[-1].get("type") != "ByteLevel":
        raise ConversionError(
            f"{where}: pre-tokenizer {[s.get('type') for s in steps]} is not a byte-level BPE pipeline that "
            "llama.cpp can run (expected Split(regex) + ByteLevel, or ByteLevel alone)"
        )
    final = byte_level[0]
    if final.get("add_prefix_space"):
        raise ConversionError(
            f"{where}: ByteLevel add_prefix_space=true (a space added before the text) is not supported by "
            "llama.cpp's BPE tokenizers"
        )
    splits = steps[:-1]
    regexes: list[str] = []
    for s in splits:
        pattern = _pattern(s)
        if s.get("type") != "Split" or pattern is None or pattern[0] != "regex":
            raise ConversionError(
                f"{where}: pre-tokenizer step {s.get('type')!r} is not supported by llama.cpp "
                "(supported: one Split regex followed by ByteLevel)"
            )
        if s.get("behavior") != "Isolated" or s.get("invert"):
            raise ConversionError(
                f"{where}: Split behavior {s.get('behavior')!r} (invert={s.get('invert')}) is not supported; "
                "llama.cpp splits 'Isolated'"
            )
        regexes.append(pattern[1])
    if final.get("use_regex", True):
        regexes.append(GPT2_REGEX)
    if len(regexes) != 1:
        raise ConversionError(
            f"{where}: {len(regexes)} split regexes in the pre-tokenizer; llama.cpp runs exactly one of its known ones"
        )
    rule = BYTE_LEVEL_SPLITS.get(regexes[0])
    if rule is None:
        known = ", ".join(r.pre for r in BYTE_LEVEL_SPLITS.values())
        raise ConversionError(
            f"{where}: the pre-tokenizer split regex {regexes[0]!r} is not one llama.cpp implements; "
            f"llama.cpp cannot express this tokenizer (supported regexes: {known})"
        )
    return rule


def _byte_level_vocab(
    vocab: Mapping[int, str],
    merges: Sequence[tuple[str, str]],
    added: Sequence[Mapping[str, Any]],
    vocab_size: int,
    where: str,
) -> GgufTokenizer:
    padded = _check_size(vocab, vocab_size, where)
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


def _check_size(vocab: Mapping[int, str], vocab_size: int, where: str) -> int:
    top = max(vocab) + 1 if vocab else 0
    if top > vocab_size:
        raise ConversionError(
            f"{where}: the tokenizer has ids up to {top - 1} but the model's vocabulary (embedding rows) is "
            f"{vocab_size}"
        )
    return vocab_size - len(vocab)


# --------------------------------------------------------------------------------------------------------------
# special tokens, lstrip/rstrip


def _special_ids(
    tok: GgufTokenizer,
    data: Mapping[str, Any],
    vocab: Mapping[int, str],
    config: Mapping[str, Any],
    fallback: Mapping[str, int | None],
    model: Mapping[str, Any],
    where: str,
) -> None:
    ids = {text: i for i, text in vocab.items()}

    def named(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        return None

    prefix, suffix = _template_specials(data.get("post_processor"), ids, where)
    tok.bos_id = named("bos_token")
    tok.eos_id = named("eos_token")
    tok.pad_id = named("pad_token")
    unk = model.get("unk_token")
    tok.unk_id = ids.get(unk) if isinstance(unk, str) else named("unk_token")
    if tok.bos_id is None:
        tok.bos_id = prefix[0] if prefix else fallback.get("bos")
    if tok.eos_id is None:
        tok.eos_id = suffix[-1] if suffix else fallback.get("eos")
    if tok.pad_id is None:
        tok.pad_id = fallback.get("pad")
    if data.get("post_processor") is not None and _has_template(data.get("post_processor")):
        tok.add_bos, tok.add_eos = bool(prefix), bool(suffix)
    else:
        tok.add_bos = bool(config.get("add_bos_token", False))
        tok.add_eos = bool(config.get("add_eos_token", False))
    if (
        len(prefix) > 1
        or len(suffix) > 1
        or (prefix and prefix[0] != tok.bos_id)
        or (suffix and suffix[0] != tok.eos_id)
    ):
        raise ConversionError(
            f"{where}: the post-processor adds {prefix} before and {suffix} after the text; llama.cpp can add "
            f"only the BOS ({tok.bos_id}) and EOS ({tok.eos_id}) tokens"
        )
    for name, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id)):
        if value is not None and not 0 <= value < len(tok.tokens):
            raise ConversionError(f"{where}: {name} token id {value} is outside the vocabulary")


def _has_template(node: Mapping[str, Any] | None) -> bool:
    return any(s.get("type") == "TemplateProcessing" for s in _steps(node, "processors"))


def _template_specials(
    node: Mapping[str, Any] | None, ids: Mapping[str, int], where: str
) -> tuple[list[int], list[int]]:
    """Ids a TemplateProcessing post-processor adds before and after a single sequence."""
    for step in _steps(node, "processors"):
        kind = step.get("type")
        if kind in ("ByteLevel",):
            continue
        if kind == "BertProcessing" or kind == "RobertaProcessing":
            raise ConversionError(f"{where}: post-processor {kind!r} is not supported")
        if kind != "TemplateProcessing":
            continue
        before: list[int] = []
        after: list[int] = []
        seen_sequence = False
        declared = step.get("special_tokens") or {}
        for piece in step.get("single") or []:
            if "Sequence" in piece:
                seen_sequence = True
                continue
            name = piece.get("SpecialToken", {}).get("id")
            token_ids = (declared.get(name) or {}).get("ids") or ([ids[name]] if name in ids else None)
            if not token_ids:
                raise ConversionError(f"{where}: post-processor special token {name!r} has no id")
            (after if seen_sequence else before).extend(int(t) for t in token_ids)
        return before, after
    return [], []


def _strip_rules(
    added: Sequence[Mapping[str, Any]], specials: set[str], tok: GgufTokenizer, model_name: str
) -> list[_Rule]:
    """lstrip/rstrip of added tokens: GGUF cannot store them; llama.cpp sets them only for some model names.

    llama.cpp strips whitespace after every special token except <unk>, <s> and <|endoftext|> (and after
    </s>) when general.name contains "phi3" or "phi-3", and never otherwise. Whatever the source does
    differently is a known divergence, listed with the tokens it concerns.
    """
    source_r = {a["content"] for a in added if a.get("rstrip")}
    source_l = {a["content"] for a in added if a.get("lstrip")}
    lowered = model_name.lower()
    llama_r: set[str] = set()
    if "phi3" in lowered or "phi-3" in lowered:
        llama_r = {
            t for t, ty in zip(tok.tokens, tok.token_types, strict=True) if ty in (CONTROL, USER_DEFINED, UNKNOWN)
        }
        llama_r |= {"</s>"} & set(tok.tokens)
        llama_r -= {"<unk>", "<s>", "<|endoftext|>"}
    rules: list[_Rule] = []
    differ_r = sorted(source_r ^ llama_r)
    if differ_r:
        rules.append(
            _Rule(
                "rstrip",
                f"whitespace after {', '.join(differ_r)} is stripped by one tokenizer and kept by the other "
                "(GGUF has no per-token rstrip; llama.cpp applies it only to models named phi-3)",
                _followed_by_space(differ_r, added),
            )
        )
    if source_l:
        tokens = sorted(source_l)
        rules.append(
            _Rule(
                "lstrip",
                f"the source strips whitespace before {', '.join(tokens)}; llama.cpp does not",
                _preceded_by_space(tokens, added),
            )
        )
    return rules


def _followed_by_space(tokens: Iterable[str], added: Sequence[Mapping[str, Any]]) -> Callable[[str], bool]:
    wanted = set(tokens)
    contents = [a["content"] for a in added]

    def applies(text: str) -> bool:
        segments = _split_on_added(text, contents)
        for (seg, is_tok), nxt in itertools.pairwise(segments):
            if is_tok and seg in wanted and not nxt[1] and nxt[0][:1].isspace():
                return True
        return False

    return applies


def _preceded_by_space(tokens: Iterable[str], added: Sequence[Mapping[str, Any]]) -> Callable[[str], bool]:
    wanted = set(tokens)
    contents = [a["content"] for a in added]

    def applies(text: str) -> bool:
        segments = _split_on_added(text, contents)
        for prev, (seg, is_tok) in itertools.pairwise(segments):
            if is_tok and seg in wanted and not prev[1] and prev[0][-1:].isspace():
                return True
        return False

    return applies


@dataclass(frozen=True, slots=True)
class _Rule:
    rule: str
    description: str
    applies: Callable[[str], bool]

    def known(self, corpus: Sequence[str]) -> KnownDivergence:
        return KnownDivergence(self.rule, self.description, tuple(t for t in corpus if self.applies(t)))


# --------------------------------------------------------------------------------------------------------------
# tokenizer.model (SentencePiece protobuf), read without the sentencepiece package

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_MODEL_BPE = 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


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


@dataclass(slots=True)
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
        raise ConversionError(f"{where}: not a SentencePiece model: {e}") from e
    if not sp.pieces:
        raise ConversionError(f"{where}: not a SentencePiece model (no pieces)")
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
