"""An embedding encoder's tokenizer.json as llama.cpp's encoder tokenizers: WordPiece -> "bert" (WPM), Unigram
-> "t5" (UGM), byte-level BPE -> "gpt2" (BPE), with the texts llama.cpp encodes differently listed as known divergences.

WordPiece (BERT, MiniLM). llama.cpp's WPM splits words at whitespace, punctuation and CJK characters itself,
applies BertNormalizer's lowercase / strip_accents (``tokenizer.ggml.normalizer.*``) and matches each word
greedily, longest piece first, from a vocabulary in "phantom space" form: a word-initial piece ``w`` is stored
as ``▁w`` and a continuation ``##w`` as ``w`` (what llama.cpp's own converter writes). It always adds the BOS
(= [CLS]) and separator (= [SEP]) tokens, so the source must add exactly those.

Unigram (XLM-RoBERTa). llama.cpp's UGM runs the SentencePiece Viterbi over the piece scores after its own
normaliser: the ``precompiled_charsmap`` of a ``Precompiled`` normalizer, then the word marker before every run
of non-space text (``remove_extra_whitespaces`` with ``add_space_prefix``), which is what a Metaspace
pre-tokenizer (optionally after WhitespaceSplit) does to space-separated words. Special tokens are CONTROL and
never matched in text; the unknown piece is UNKNOWN.

Byte-level BPE (ModernBERT). The decoder's conversion (``tokenizer.tokenizer_from_json``) maps it onto
llama.cpp's "gpt2" tokenizer, its pre-tokenizer named from the split regex (ModernBERT's GPT-2 ByteLevel regex ->
"gpt-2", which llama.cpp runs exactly as its own converter's "modern-bert"), and the post-processor's
``[CLS] $A [SEP]`` becomes BOS = [CLS], EOS = [SEP] with add_bos / add_eos: llama.cpp's BPE tokenizer adds
exactly those two (what llama.cpp's converter writes for ModernBertModel). The separator id is [SEP] too.

NOTE: ``llama_cpp.Llama.embed`` tokenizes with ``special=False``: a special token's text inside the input is
plain text to llama.cpp, where the ``tokenizers`` library matches it as the token. That is a divergence of
every encoder tokenizer (rule ``special-text``).
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from sovpack._io import read_json_file
from sovpack.errors import ConversionError, SourceError
from sovpack.source.checkpoint import MAX_TOKENIZER_BYTES, Checkpoint
from sovpack.source.tokenizer import check_tokenizer_json
from sovpack.targets.gguf.pretokenizer import flatten_steps
from sovpack.targets.gguf.tokenizer import tokenizer_from_json
from sovpack.targets.gguf.vocab import (
    CONTROL,
    NORMAL,
    SPIECE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    DivergenceRule,
    GgufTokenizer,
    check_size,
)

# llama.cpp's WPM treats these code points as CJK (single-character words); the tokenizers library's BERT
# pre-tokenizer uses the same blocks except one (its 0x2B820..0x2B91F gap): see llama-vocab.cpp's is_chinese_char.
_CJK = re.compile(
    "[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b81f"
    "\U0002b920-\U0002ceaf\U0002f800-\U0002fa1f]"
)


def encoder_tokenizer(
    checkpoint: Checkpoint,
    *,
    vocab_size: int,
    type_vocab_size: int,
    pad_id: int | None = None,
    corpus: Sequence[str] = (),
) -> GgufTokenizer:
    """The checkpoint's tokenizer.json as a llama.cpp encoder tokenizer; ConversionError for what it cannot run."""
    path = checkpoint.tokenizer_json
    if path is None:
        raise ConversionError(f"{checkpoint.root}: an encoder's GGUF file needs its tokenizer.json (none found)")
    where = str(path)
    data = read_json_file(path, MAX_TOKENIZER_BYTES, where=where)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise SourceError(f"{where}: malformed tokenizer.json: no 'model' object")
    # NOTE: check_tokenizer_json expects a BPE/WordPiece vocabulary object; a Unigram vocabulary is a list of
    # [piece, score] pairs, checked here (_unigram) while the shared check covers every other component.
    pieces = data["model"].get("vocab")
    check_tokenizer_json(
        {**data, "model": {**data["model"], "vocab": None}} if isinstance(pieces, list) else data, where
    )
    kind = data["model"].get("type")
    config = checkpoint.tokenizer_config or {}
    if kind == "WordPiece":
        tok, rules = _wordpiece(data, vocab_size, where)
    elif kind == "Unigram":
        tok, rules = _unigram(data, vocab_size, where)
    elif kind == "BPE":
        tok, rules = _byte_level_bpe(data, vocab_size, config, pad_id, corpus, where)
    else:
        raise ConversionError(
            f"{where}: encoder tokenizer model {kind!r} has no llama.cpp encoder tokenizer (WordPiece, Unigram or "
            "byte-level BPE)"
        )
    specials = sorted({a["content"] for a in data.get("added_tokens") or [] if a.get("special")})
    rules.append(
        DivergenceRule(
            rule="special-text",
            description=f"the text of a special token ({', '.join(specials)}) inside the input: the tokenizers "
            "library matches it as that token, llama.cpp's Llama.embed tokenizes it as plain text (special=False)",
            applies=lambda text: any(s in text for s in specials),
        )
    )
    # pad / mask ids: config.json's pad_token_id, tokenizer_config.json's mask_token (informative for llama.cpp)
    texts = {t: i for i, t in enumerate(tok.tokens)}
    mask = config.get("mask_token")
    mask = mask.get("content") if isinstance(mask, dict) else mask
    tok.pad_id = pad_id if pad_id is not None and 0 <= pad_id < vocab_size else None
    tok.mask_id = texts.get(mask) if isinstance(mask, str) else None
    # llama.cpp's BERT graph needs a token-type count; with no type table it adds nothing (row 0 of none).
    tok.token_type_count = max(type_vocab_size, 1)
    # NOTE: the byte-level conversion lists its own divergences already (the decoder's rules); add the encoder's.
    tok.divergences = [*tok.divergences, *(r.known(corpus) for r in rules)]
    return tok


# ---------------------------------------------------------------------------------------------------- WordPiece


def _wordpiece(data: Mapping[str, Any], vocab_size: int, where: str) -> tuple[GgufTokenizer, list[DivergenceRule]]:
    model = data["model"]
    prefix = model.get("continuing_subword_prefix", "##")
    if prefix != "##":
        raise ConversionError(f"{where}: WordPiece continuing_subword_prefix {prefix!r}; llama.cpp's WPM assumes '##'")
    rules: list[DivergenceRule] = []
    norm = data.get("normalizer")
    lowercase, strip_accents = False, False
    if norm is not None:
        if norm.get("type") != "BertNormalizer":
            raise ConversionError(
                f"{where}: WordPiece normalizer {norm.get('type')!r}; llama.cpp's WPM has only BertNormalizer's options"
            )
        lowercase = bool(norm.get("lowercase", True))
        accents = norm.get("strip_accents")
        strip_accents = lowercase if accents is None else bool(accents)
        if not norm.get("handle_chinese_chars", True):
            rules.append(
                DivergenceRule(
                    rule="cjk-split",
                    description="llama.cpp always splits CJK characters into words of their own; the "
                    "source normalizer does not (handle_chinese_chars=false)",
                    applies=lambda t: bool(_CJK.search(t)),
                )
            )
        if not norm.get("clean_text", True):
            rules.append(
                DivergenceRule(
                    rule="control-chars",
                    description="llama.cpp always drops control characters; the source keeps them (clean_text=false)",
                    applies=lambda t: any(unicodedata.category(c) == "Cc" and not c.isspace() for c in t),
                )
            )
    else:
        rules.append(
            DivergenceRule(
                rule="no-normalizer",
                description="the source has no BertNormalizer: llama.cpp still drops control "
                "characters and splits CJK characters",
                applies=lambda t: (
                    bool(_CJK.search(t)) or any(unicodedata.category(c) == "Cc" and not c.isspace() for c in t)
                ),
            )
        )
    steps = [s.get("type") for s in flatten_steps(data.get("pre_tokenizer"), "pretokenizers")]
    if steps != ["BertPreTokenizer"]:
        raise ConversionError(f"{where}: WordPiece pre-tokenizer {steps}; llama.cpp's WPM splits like BertPreTokenizer")
    added = data.get("added_tokens") or []
    special = {int(a["id"]) for a in added if a.get("special")}
    user = {int(a["id"]) for a in added if not a.get("special")}
    by_id: dict[int, str] = {}
    for text, i in (model.get("vocab") or {}).items():
        by_id[int(i)] = text
    for a in added:
        by_id.setdefault(int(a["id"]), a["content"])
    padded = check_size(by_id, vocab_size, where)
    tokens: list[str] = []
    types: list[int] = []
    seen: dict[str, int] = {}
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            text, kind = f"[PAD{i}]", UNUSED
        elif i in special:
            kind = CONTROL
        else:
            kind = USER_DEFINED if i in user else NORMAL
            text = text[2:] if text.startswith("##") else SPIECE + text  # llama.cpp's "phantom space" form
        if text in seen:
            raise ConversionError(f"{where}: tokens {seen[text]} and {i} are both {text!r} in llama.cpp's WPM form")
        seen[text] = i
        tokens.append(text)
        types.append(kind)
    ids = {t: i for i, t in by_id.items()}
    first, last = _template(data, ids, where)
    if first is None or last is None:
        raise ConversionError(
            f"{where}: llama.cpp's WPM always adds [CLS] ... [SEP]; the source post-processor "
            "does not add one token before and one after the text"
        )
    unk = model.get("unk_token")
    tok = GgufTokenizer(model="bert", pre="default", tokens=tokens, token_types=types, padded=padded)
    tok.bos_id, tok.sep_id = first, last
    tok.unk_id = ids.get(unk) if isinstance(unk, str) else None
    tok.add_bos, tok.add_eos = True, False  # WPM adds BOS and SEP whatever add_bos says
    tok.normalizer_lowercase, tok.normalizer_strip_accents = lowercase, strip_accents
    limit = int(model.get("max_input_chars_per_word", 100))
    rules.append(
        DivergenceRule(
            rule="long-word",
            description=f"a word longer than {limit} characters: the source encodes it as the unknown "
            "token (max_input_chars_per_word), llama.cpp splits it into pieces",
            applies=lambda t: any(len(w) > limit for w in re.findall(r"\w+", t)),
        )
    )
    if strip_accents:
        rules.append(
            DivergenceRule(
                rule="strip-accents",
                description="llama.cpp strips accents by mapping each code point to the first of its NFD "
                "decomposition and dropping every mark (\\p{M}); the source drops only nonspacing marks (Mn) of the "
                "full decomposition: Hangul syllables, spacing vowel signs (Devanagari etc.) and multi-letter "
                "decompositions differ",
                applies=lambda t: any(_llama_strip(c) != _source_strip(c) for c in t),
            )
        )
    if lowercase:
        rules.append(
            DivergenceRule(
                rule="lowercase-expands",
                description="characters whose lowercase is more than one character (İ): the "
                "source lowercases them in full, llama.cpp maps one code point to one",
                applies=lambda t: any(len(c.lower()) != 1 for c in t),
            )
        )
    return tok, rules


def _source_strip(c: str) -> str:
    """BertNormalizer's strip_accents of one character: NFD, nonspacing marks removed."""
    return "".join(x for x in unicodedata.normalize("NFD", c) if unicodedata.category(x) != "Mn")


def _llama_strip(c: str) -> str:
    """llama.cpp's WPM strip_accents of one character: the first code point of its NFD, dropped if a mark."""
    first = unicodedata.normalize("NFD", c)[:1]
    return "" if unicodedata.category(first).startswith("M") else first


def _template(data: Mapping[str, Any], ids: Mapping[str, int], where: str) -> tuple[int | None, int | None]:
    """The one special token the post-processor adds before and after a single text (None where it adds none
    or more than one)."""
    for step in flatten_steps(data.get("post_processor"), "processors"):
        kind = step.get("type")
        if kind in ("BertProcessing", "RobertaProcessing"):
            return int(step["cls"][1]), int(step["sep"][1])
        if kind != "TemplateProcessing":
            continue
        before: list[int] = []
        after: list[int] = []
        seen = False
        declared = step.get("special_tokens") or {}
        for piece in step.get("single") or []:
            if "Sequence" in piece:
                seen = True
                continue
            name = piece.get("SpecialToken", {}).get("id")
            found = (declared.get(name) or {}).get("ids") or ([ids[name]] if name in ids else None)
            if not found:
                raise SourceError(f"{where}: post-processor special token {name!r} has no id")
            (after if seen else before).extend(int(t) for t in found)
        return (before[0] if len(before) == 1 else None), (after[0] if len(after) == 1 else None)
    return None, None


# --------------------------------------------------------------------------------------------- byte-level BPE


def _byte_level_bpe(
    data: Mapping[str, Any],
    vocab_size: int,
    config: Mapping[str, Any],
    pad_id: int | None,
    corpus: Sequence[str],
    where: str,
) -> tuple[GgufTokenizer, list[DivergenceRule]]:
    """A byte-level BPE (ModernBERT) through the decoder's conversion, checked to add [CLS] ... [SEP]."""
    # NOTE: an encoder's BOS / EOS are the tokens its post-processor adds ([CLS], [SEP]); a bos_token / eos_token
    # in tokenizer_config.json (a decoder's notion) would name others and make special_ids refuse the template.
    tok = tokenizer_from_json(
        data,
        vocab_size=vocab_size,
        tokenizer_config={k: v for k, v in config.items() if k not in ("bos_token", "eos_token")},
        fallback_ids={"pad": pad_id},
        corpus=corpus,
        where=where,
    )
    if tok.model != "gpt2":
        raise ConversionError(
            f"{where}: a {tok.model!r}-style BPE encoder tokenizer; llama.cpp's encoders run byte-level BPE only"
        )
    ids = {t: i for i, t in enumerate(tok.tokens)}
    first, last = _template(data, ids, where)
    if first is None or last is None or not (tok.add_bos and tok.add_eos):
        raise ConversionError(
            f"{where}: an encoder's byte-level BPE must add one token before and one after the text "
            "([CLS] $A [SEP]); llama.cpp's BPE tokenizer adds only BOS and EOS"
        )
    # special_ids has checked the template's tokens are BOS and EOS; the separator is the one after the text.
    tok.sep_id = last
    return tok, []


# ------------------------------------------------------------------------------------------------------ Unigram


def _unigram(data: Mapping[str, Any], vocab_size: int, where: str) -> tuple[GgufTokenizer, list[DivergenceRule]]:
    model = data["model"]
    if model.get("byte_fallback"):
        raise ConversionError(f"{where}: Unigram byte_fallback; llama.cpp's UGM tokenizer has no byte fallback")
    charsmap, collapses = _unigram_normalizer(data.get("normalizer"), where)
    split_first = _metaspace(data.get("pre_tokenizer"), where)
    pieces = model.get("vocab")
    if not isinstance(pieces, list):
        raise SourceError(f"{where}: Unigram model has no 'vocab' list")
    added = data.get("added_tokens") or []
    special = {int(a["id"]) for a in added if a.get("special")}
    user = {int(a["id"]) for a in added if not a.get("special")}
    unk_id = model.get("unk_id")
    by_id: dict[int, tuple[str, float]] = {}
    for i, entry in enumerate(pieces):
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], int | float)
        ):
            raise SourceError(f"{where}: Unigram vocab entry {i} is not [piece, score]")
        by_id[i] = (entry[0], float(entry[1]))
    for a in added:
        by_id.setdefault(int(a["id"]), (a["content"], 0.0))
    padded = check_size({i: p for i, (p, _) in by_id.items()}, vocab_size, where)
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(-10000.0)
            continue
        text, score = by_id[i]
        tokens.append(text)
        scores.append(score)
        types.append(UNKNOWN if i == unk_id else CONTROL if i in special else USER_DEFINED if i in user else NORMAL)
    ids = {t: i for i, t in enumerate(tokens)}
    first, last = _template(data, ids, where)
    tok = GgufTokenizer(model="t5", pre="default", tokens=tokens, token_types=types, scores=scores, padded=padded)
    tok.bos_id, tok.eos_id = first, last
    tok.add_bos, tok.add_eos = first is not None, last is not None
    tok.unk_id = unk_id if isinstance(unk_id, int) else None
    tok.add_space_prefix, tok.remove_extra_whitespaces = True, True
    tok.precompiled_charsmap = charsmap
    rules: list[DivergenceRule] = []
    if charsmap is None and split_first:
        rules.append(
            DivergenceRule(
                rule="whitespace-kinds",
                description="the source splits words at every whitespace character; llama.cpp's "
                "UGM (no precompiled_charsmap to map them to spaces) only at spaces",
                applies=lambda t: any(c.isspace() and c != " " for c in t),
            )
        )
    if not split_first:
        rules.append(
            DivergenceRule(
                rule="edge-whitespace",
                description="llama.cpp's UGM drops leading, trailing and repeated spaces before "
                "marking words; the source Metaspace keeps a word marker for "
                + ("leading and trailing whitespace" if collapses else "each extra space"),
                applies=(lambda t: t != t.strip() or bool(re.search(r"\s\s", t)))
                if not collapses
                else (lambda t: t != t.strip()),
            )
        )
    return tok, rules


def _unigram_normalizer(node: Mapping[str, Any] | None, where: str) -> tuple[bytes | None, bool]:
    """(precompiled_charsmap or None, whether space runs are collapsed) of the supported normalizers."""
    charsmap: bytes | None = None
    collapses = False
    for step in flatten_steps(node, "normalizers"):
        kind = step.get("type")
        if kind == "Precompiled":
            try:
                charsmap = base64.b64decode(step.get("precompiled_charsmap") or "", validate=True) or None
            except (binascii.Error, ValueError) as e:
                raise SourceError(f"{where}: precompiled_charsmap is not base64 ({e})") from e
        elif kind == "Replace" and (step.get("pattern") or {}).get("Regex") == " {2,}" and step.get("content") == " ":
            collapses = True
        else:
            raise ConversionError(f"{where}: Unigram normalizer step {kind!r} has no llama.cpp UGM equivalent")
    return charsmap, collapses


def _metaspace(node: Mapping[str, Any] | None, where: str) -> bool:
    """Check the pre-tokenizer is [WhitespaceSplit,] Metaspace(▁, prepended); True when words are split first."""
    steps = flatten_steps(node, "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds not in (["Metaspace"], ["WhitespaceSplit", "Metaspace"]):
        raise ConversionError(
            f"{where}: Unigram pre-tokenizer {kinds}; llama.cpp's UGM marks words like [WhitespaceSplit,] Metaspace"
        )
    meta = steps[-1]
    prepend = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
    if meta.get("replacement", SPIECE) != SPIECE or prepend != "always":
        raise ConversionError(
            f"{where}: Metaspace replacement {meta.get('replacement')!r} / prepend_scheme "
            f"{prepend!r}; llama.cpp's UGM prepends '{SPIECE}' to every word"
        )
    return kinds[0] == "WhitespaceSplit"
