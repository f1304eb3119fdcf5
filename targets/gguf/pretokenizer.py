"""Which llama.cpp tokenizer pipeline runs a tokenizer.json's normalizer + pre-tokenizer, or why none does.

- Byte-level BPE: the ``Split`` regex of the pre-tokenizer (or ByteLevel's built-in GPT-2 regex) selects the
  llama.cpp pre-tokenizer (``tokenizer.ggml.pre``): the Llama 3 regex -> ``llama-bpe``, Qwen2's -> ``qwen2``,
  GPT-2's -> ``gpt-2``.
- SentencePiece-style BPE: spaces turned into "▁" by a Prepend+Replace normalizer, a Metaspace pre-tokenizer,
  or a bare Replace -> llama.cpp's SPM tokenizer, with ``add_space_prefix`` as the pipeline says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sovpack.errors import ConversionError
from sovpack.targets.gguf.vocab import SPIECE, DivergenceRule, split_on_added

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


@dataclass(frozen=True, kw_only=True, slots=True)
class PreTokenizerRule:
    """One llama.cpp byte-level pre-tokenizer: its name and the BPE options it implies."""

    pre: str
    ignore_merges: bool  # llama.cpp hard-codes this per pre-tokenizer


# Every split the pre-tokenizer makes, in order (a Digits(individual_digits) step splits like r"\p{N}").
DIGITS_REGEX = r"\p{N}"
BYTE_LEVEL_SPLITS: dict[tuple[str, ...], PreTokenizerRule] = {
    (LLAMA3_REGEX,): PreTokenizerRule(pre="llama-bpe", ignore_merges=True),
    (QWEN2_REGEX,): PreTokenizerRule(pre="qwen2", ignore_merges=False),
    (GPT2_REGEX,): PreTokenizerRule(pre="gpt-2", ignore_merges=False),
    # SmolLM / SmolLM2: every digit its own piece, then GPT-2's regex (llama.cpp's "smollm" splits the same).
    (DIGITS_REGEX, GPT2_REGEX): PreTokenizerRule(pre="smollm", ignore_merges=False),
}


def flatten_steps(node: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """Flatten a Sequence normalizer / pre-tokenizer / processor into its steps."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get(key) or [] for s in flatten_steps(child, key)]
    return [node]


def step_pattern(step: Mapping[str, Any]) -> tuple[str, str] | None:
    """("string" | "regex", pattern) of a Split / Replace step, or None."""
    pattern = step.get("pattern") or {}
    if "String" in pattern:
        return "string", pattern["String"]
    if "Regex" in pattern:
        return "regex", pattern["Regex"]
    return None


def metaspace_split(step: Mapping[str, Any]) -> bool:
    """Whether a Metaspace pre-tokenizer splits words at '▁' before merging (its default)."""
    return bool(step.get("split", True))


def _metaspace_scheme(step: Mapping[str, Any]) -> str:
    if "prepend_scheme" in step:
        return str(step["prepend_scheme"]).lower()
    return "always" if step.get("add_prefix_space", True) else "never"


def spm_style(
    normalizer: Mapping[str, Any] | None,
    pre_tokenizer: Mapping[str, Any] | None,
    model: Mapping[str, Any],
    where: str,
) -> tuple[bool, Callable[[Sequence[str]], DivergenceRule] | None] | None:
    """(add_space_prefix, divergence rule factory) if this is a SentencePiece-style pipeline, else None."""
    norm = flatten_steps(normalizer, "normalizers")
    pre = flatten_steps(pre_tokenizer, "pretokenizers")
    replaces_space = any(
        s.get("type") == "Replace" and step_pattern(s) == ("string", " ") and s.get("content") == SPIECE for s in norm
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
            elif kind == "Replace" and step_pattern(s) == ("string", " ") and s.get("content") == SPIECE:
                continue
            else:
                raise ConversionError(
                    f"{where}: normalizer step {kind!r} in a SentencePiece-style tokenizer is not supported by "
                    "llama.cpp (supported: Prepend('▁'), Replace(' ', '▁'))"
                )
        for s in pre:
            # Splitting on " " after every space became "▁" is a no-op (Gemma ships one).
            if s.get("type") == "Split" and step_pattern(s) == ("string", " "):
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


def _metaspace_prefix_rule(added: Sequence[str], *, first_only: bool) -> DivergenceRule:
    """Where Metaspace's '▁' prefix differs from llama.cpp's add_space_prefix.

    Metaspace adds the prefix only to text that does not already start with a space, and with
    prepend_scheme "first" only to the text at the very start. llama.cpp prefixes every text fragment at the
    start or after a special token, whatever it starts with.
    """

    def applies(text: str) -> bool:
        for i, (seg, is_token) in enumerate(split_on_added(text, added)):
            if is_token or not seg:
                continue
            if seg[0] in (" ", SPIECE) or (first_only and i > 0):
                return True
        return False

    scope = "only at the start of the text (prepend_scheme 'first')" if first_only else "to every text fragment"
    return DivergenceRule(
        rule="metaspace-prefix",
        description=f"the source adds the '▁' word prefix {scope} and only where the text does not already start "
        "with a space; llama.cpp adds it to every fragment at the start or after a special token",
        applies=applies,
    )


def byte_level_rule(
    normalizer: Mapping[str, Any] | None, pre_tokenizer: Mapping[str, Any] | None, where: str
) -> PreTokenizerRule:
    """The llama.cpp pre-tokenizer that runs this byte-level pipeline, or a ConversionError saying why none."""
    for s in flatten_steps(normalizer, "normalizers"):
        if s.get("type") != "NFC":
            raise ConversionError(
                f"{where}: normalizer {s.get('type')!r} is not supported by llama.cpp's BPE tokenizer "
                "(only NFC is accepted, as a documented divergence)"
            )
    steps = flatten_steps(pre_tokenizer, "pretokenizers")
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
        if s.get("type") == "Digits" and s.get("individual_digits") is True:
            regexes.append(DIGITS_REGEX)
            continue
        pattern = step_pattern(s)
        if s.get("type") != "Split" or pattern is None or pattern[0] != "regex":
            raise ConversionError(
                f"{where}: pre-tokenizer step {s.get('type')!r} is not supported by llama.cpp "
                "(supported: one Split regex, or Digits(individual_digits), followed by ByteLevel)"
            )
        if s.get("behavior") != "Isolated" or s.get("invert"):
            raise ConversionError(
                f"{where}: Split behavior {s.get('behavior')!r} (invert={s.get('invert')}) is not supported; "
                "llama.cpp splits 'Isolated'"
            )
        regexes.append(pattern[1])
    if final.get("use_regex", True):
        regexes.append(GPT2_REGEX)
    rule = BYTE_LEVEL_SPLITS.get(tuple(regexes))
    if rule is None:
        known = ", ".join(r.pre for r in BYTE_LEVEL_SPLITS.values())
        shown = " then ".join(repr(r) for r in regexes) or "none"
        raise ConversionError(
            f"{where}: the pre-tokenizer splits ({shown}) are not one llama.cpp implements; "
            f"llama.cpp cannot express this tokenizer (supported: {known})"
        )
    return rule
