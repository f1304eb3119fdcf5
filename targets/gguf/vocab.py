"""What goes under ``tokenizer.*`` in a GGUF file, and the known divergences recorded beside it.

Token types are llama.cpp's (gguf.TokenType), repeated here so the tokenizer modules import without gguf.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sovpack.errors import ConversionError

SPIECE = "\u2581"  # "▁"

# Token types as llama.cpp reads them (gguf.TokenType); repeated here so this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True, kw_only=True, slots=True)
class KnownDivergence:
    """A documented way llama.cpp's tokenizer differs from the source tokenizer, and the texts it affects."""

    rule: str
    description: str
    texts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "description": self.description, "texts": list(self.texts)}


@dataclass(kw_only=True, slots=True)
class GgufTokenizer:
    """Everything that goes under ``tokenizer.*`` in a GGUF file (filled in as the conversion decides it)."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"; encoders: "bert" (WordPiece) or "t5" (Unigram)
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
    # Encoder tokenizers only (None: the key is not written): the separator and mask ids, llama.cpp's
    # BertNormalizer options (WordPiece), the SentencePiece normaliser table (Unigram), token-type count.
    sep_id: int | None = None
    mask_id: int | None = None
    normalizer_lowercase: bool | None = None
    normalizer_strip_accents: bool | None = None
    precompiled_charsmap: bytes | None = None
    token_type_count: int | None = None
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
        self._add_encoder_keys(writer)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def _add_encoder_keys(self, writer: Any) -> None:
        """The keys only encoder tokenizers set (gguf-py 0.19 has no writer method for the normaliser flags)."""
        if self.sep_id is not None:
            writer.add_sep_token_id(self.sep_id)
        if self.mask_id is not None:
            writer.add_mask_token_id(self.mask_id)
        if self.normalizer_lowercase is not None:
            writer.add_bool("tokenizer.ggml.normalizer.lowercase", self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            writer.add_bool("tokenizer.ggml.normalizer.strip_accents", self.normalizer_strip_accents)
        if self.precompiled_charsmap:
            writer.add_precompiled_charsmap(bytes(self.precompiled_charsmap))  # a UINT8 array
        if self.token_type_count is not None:
            writer.add_token_type_count(self.token_type_count)

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


@dataclass(frozen=True, kw_only=True, slots=True)
class DivergenceRule:
    """A divergence as the converter finds it: a rule, and a predicate telling which texts it affects."""

    rule: str
    description: str
    applies: Callable[[str], bool]

    def known(self, corpus: Sequence[str]) -> KnownDivergence:
        texts = tuple(t for t in corpus if self.applies(t))
        return KnownDivergence(rule=self.rule, description=self.description, texts=texts)


def split_on_added(text: str, added: Sequence[str]) -> list[tuple[str, bool]]:
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


def check_size(vocab: Mapping[int, str], vocab_size: int, where: str) -> int:
    """Placeholder tokens needed to reach the model's vocabulary size; refuse ids beyond it."""
    top = max(vocab) + 1 if vocab else 0
    if top > vocab_size:
        raise ConversionError(
            f"{where}: the tokenizer has ids up to {top - 1} but the model's vocabulary (embedding rows) is "
            f"{vocab_size}"
        )
    return vocab_size - len(vocab)
