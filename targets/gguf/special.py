"""Special tokens in GGUF terms: BOS/EOS/UNK/PAD ids, add_bos/add_eos, and what GGUF cannot say about them.

The ids come from tokenizer_config.json, else the post-processor's template, else config.json. GGUF has no
per-token lstrip/rstrip, and llama.cpp decides some token attributes by name or text itself: whatever it then
does differently from the source tokenizer is a known divergence, listed with the texts it affects.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sovpack.errors import ConversionError, SourceError
from sovpack.targets.gguf.pretokenizer import flatten_steps
from sovpack.targets.gguf.vocab import (
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    DivergenceRule,
    GgufTokenizer,
    split_on_added,
)

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


def special_ids(
    tok: GgufTokenizer,
    data: Mapping[str, Any],
    vocab: Mapping[int, str],
    config: Mapping[str, Any],
    fallback: Mapping[str, int | None],
    model: Mapping[str, Any],
    where: str,
) -> None:
    """Set the special-token ids and add_bos/add_eos of ``tok``; refuse what llama.cpp cannot add itself."""
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
    """Whether a post-processor adds tokens by template (then it, not tokenizer_config, decides add_bos/eos)."""
    return any(s.get("type") == "TemplateProcessing" for s in flatten_steps(node, "processors"))


def _template_specials(
    node: Mapping[str, Any] | None, ids: Mapping[str, int], where: str
) -> tuple[list[int], list[int]]:
    """Ids a TemplateProcessing post-processor adds before and after a single sequence."""
    for step in flatten_steps(node, "processors"):
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
                raise SourceError(f"{where}: post-processor special token {name!r} has no id")
            (after if seen_sequence else before).extend(int(t) for t in token_ids)
        return before, after
    return [], []


def strip_rules(added: Sequence[Mapping[str, Any]], tok: GgufTokenizer, model_name: str) -> list[DivergenceRule]:
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
    rules: list[DivergenceRule] = []
    differ_r = sorted(source_r ^ llama_r)
    if differ_r:
        rules.append(
            DivergenceRule(
                rule="rstrip",
                description=f"whitespace after {', '.join(differ_r)} is stripped by one tokenizer and kept by the "
                "other (GGUF has no per-token rstrip; llama.cpp applies it only to models named phi-3)",
                applies=_followed_by_space(differ_r, added),
            )
        )
    if source_l:
        tokens = sorted(source_l)
        rules.append(
            DivergenceRule(
                rule="lstrip",
                description=f"the source strips whitespace before {', '.join(tokens)}; llama.cpp does not",
                applies=_preceded_by_space(tokens, added),
            )
        )
    return rules


def _followed_by_space(tokens: Iterable[str], added: Sequence[Mapping[str, Any]]) -> Callable[[str], bool]:
    wanted = set(tokens)
    contents = [a["content"] for a in added]

    def applies(text: str) -> bool:
        segments = split_on_added(text, contents)
        for (seg, is_tok), nxt in itertools.pairwise(segments):
            if is_tok and seg in wanted and not nxt[1] and nxt[0][:1].isspace():
                return True
        return False

    return applies


def _preceded_by_space(tokens: Iterable[str], added: Sequence[Mapping[str, Any]]) -> Callable[[str], bool]:
    wanted = set(tokens)
    contents = [a["content"] for a in added]

    def applies(text: str) -> bool:
        segments = split_on_added(text, contents)
        for prev, (seg, is_tok) in itertools.pairwise(segments):
            if is_tok and seg in wanted and not prev[1] and prev[0][-1:].isspace():
                return True
        return False

    return applies


def control_looking_rule(tok: GgufTokenizer) -> DivergenceRule | None:
    """Ordinary vocabulary entries llama.cpp turns into control tokens by their text (LLAMA_CPP_CONTROL_TEXTS)."""
    looking = sorted(
        t for t, ty in zip(tok.tokens, tok.token_types, strict=True) if ty == NORMAL and t in LLAMA_CPP_CONTROL_TEXTS
    )
    if not looking:
        return None
    return DivergenceRule(
        rule="control-looking",
        description=f"llama.cpp treats the ordinary vocabulary entries {', '.join(looking)} as control tokens (it "
        "recognizes them by their text) and matches them whole, where the source encodes them from pieces",
        applies=lambda text: any(t in text for t in looking),
    )
