"""OpenVINO tokenizer and detokenizer models from a tokenizer.json, without transformers.

``openvino_tokenizers.convert_tokenizer`` only accepts a transformers tokenizer object: it refuses to run
unless ``transformers`` is imported, and its Hugging Face parser (``openvino_tokenizers.hf_parser``) imports
transformers at module level. The building blocks it assembles, though — the pipeline steps in
``openvino_tokenizers.tokenizer_pipeline`` — need only OpenVINO. This module reads tokenizer.json itself and
maps each component onto those steps, so sovpack converts tokenizers with the ``tokenizers``-free,
transformers-free install of the ``openvino`` extra.

Supported (what decoder LLM tokenizers use): BPE models, byte-level or SentencePiece-style with byte
fallback; normalizers NFC/NFD/NFKC/NFKD, Prepend, Replace, Lowercase, Strip, StripAccents, Precompiled;
pre-tokenizers Split, ByteLevel, Metaspace, Digits, Punctuation, Whitespace(Split); TemplateProcessing and
ByteLevel post-processors; decoders ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace. Anything else
raises ConversionError naming the component, rather than producing a tokenizer that silently differs.
Encodings are checked against tokenizer.json on sovpack's tokenizer corpus by the parity harness.

Node names: the nodes openvino_tokenizers creates carry OpenVINO's generated names, numbered by a
process-wide counter; they are replaced by positional ones (``tokenizer/Constant_12``) so that converting the
same checkpoint twice in one process writes identical files (``canonicalize_names``).

The rt_info that openvino-genai reads from the tokenizer model (special token ids, chat template,
add/skip-special-tokens flags, the post-processor template) is written here too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sovpack.errors import ConversionError
from sovpack.source.tokenizer import read_tokenizer_json

_BEHAVIOURS = {
    "Isolated": "isolate",
    "Removed": "remove",
    "MergedWithPrevious": "mergedwithprevious",
    "MergedWithNext": "mergedwithnext",
    "Contiguous": "contiguous",
}
_MAX_LENGTH = 2**31 - 1


class TokenizerConversion:
    """Builds the tokenizer pipeline of one tokenizer.json."""

    def __init__(self, tokenizer_json: Path, tokenizer_config: Mapping[str, Any] | None) -> None:
        from openvino_tokenizers import tokenizer_pipeline as tp

        self.tp = tp
        self.path = Path(tokenizer_json)
        self.data: dict[str, Any] = _read_tokenizer_json(self.path)
        self.config = dict(tokenizer_config or {})
        self.pipeline = tp.TokenizerPipeline()
        self.added = {int(t["id"]): t for t in self.data.get("added_tokens") or []}
        self.vocab: dict[str, int] = dict(self.data["model"].get("vocab") or {})
        for token_id, token in self.added.items():
            self.vocab.setdefault(token["content"], token_id)

    def fail(self, what: str) -> ConversionError:
        return ConversionError(f"{self.path}: {what} is not supported by the OpenVINO tokenizer conversion")

    # -- the pipeline ----------------------------------------------------------------------------------
    def build(self) -> Any:
        model = self.data["model"]
        if model.get("type") != "BPE":
            raise self.fail(f"tokenizer model type {model.get('type')!r}")
        if model.get("dropout"):
            raise self.fail("BPE dropout")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise self.fail("BPE continuing_subword_prefix / end_of_word_suffix")
        self.special_tokens_split()
        self.normalizer(self.data.get("normalizer"))
        self.pre_tokenizer(self.data.get("pre_tokenizer"))
        bpe = self.tp.BPETokenizationStep.from_hf_json(self.data)
        self.pipeline.add_steps(bpe)
        self.pipeline.vocab = bpe.vocab
        self.post_processor()
        self.decoder()
        return self.pipeline

    def special_tokens_split(self) -> None:
        tp = self.tp
        tokens = [
            tp.SpecialToken(text=t["content"], strip_left=bool(t.get("lstrip")), strip_right=bool(t.get("rstrip")))
            for t in self.added.values()
        ]
        if tokens:
            self.pipeline.add_steps(tp.SpecialTokensSplit(special_tokens=tokens))

    def normalizer(self, spec: Mapping[str, Any] | None) -> None:
        if spec is None:
            return
        tp = self.tp
        kind = spec.get("type")
        if kind == "Sequence":
            for item in spec.get("normalizers", []):
                self.normalizer(item)
        elif kind in ("NFC", "NFD", "NFKC", "NFKD"):
            self.pipeline.add_steps(tp.NormalizeUnicode(kind))
        elif kind == "Lowercase":
            self.pipeline.add_steps(tp.CaseFoldStep())
        elif kind == "Prepend":
            self.pipeline.add_steps(tp.RegexNormalizationStep.prepend_regex(spec.get("prepend", "")))
        elif kind == "Replace":
            pattern = self._pattern(spec.get("pattern", {}), "Replace normalizer")
            self.pipeline.add_steps(tp.RegexNormalizationStep(pattern, _replacement(spec.get("content", ""))))
        elif kind == "Strip":
            left, right = bool(spec.get("strip_left")), bool(spec.get("strip_right"))
            if left or right:
                self.pipeline.add_steps(tp.RegexNormalizationStep.strip_regex(left, right))
        elif kind == "StripAccents":
            self.pipeline.add_steps(tp.RegexNormalizationStep.strip_accents_regex())
        elif kind == "Precompiled":
            self.pipeline.add_steps(tp.CharsmapStep.from_hf_step_json(spec))
        else:
            raise self.fail(f"normalizer {kind!r}")

    def pre_tokenizer(self, spec: Mapping[str, Any] | None) -> None:
        if spec is None:
            return
        tp = self.tp
        kind = spec.get("type")
        if kind == "Sequence":
            for item in spec.get("pretokenizers", []):
                self.pre_tokenizer(item)
        elif kind == "Split":
            behaviour = _BEHAVIOURS.get(spec.get("behavior", ""))
            if behaviour is None:
                raise self.fail(f"Split behavior {spec.get('behavior')!r}")
            pattern = self._pattern(spec.get("pattern", {}), "Split pre-tokenizer")
            if pattern == "":
                self.pipeline.add_steps(tp.RegexSplitStep.split_by_chars())
            else:
                self.pipeline.add_steps(
                    tp.RegexSplitStep(pattern, invert=bool(spec.get("invert")), behaviour=behaviour)
                )
        elif kind == "ByteLevel":
            if spec.get("add_prefix_space"):
                self.pipeline.add_steps(tp.RegexNormalizationStep.add_prefix_whitespace_regex())
            if spec.get("use_regex", True):
                self.pipeline.add_steps(tp.RegexSplitStep.byte_level_splitter())
            self.pipeline.add_steps(tp.BytesToCharsStep())
        elif kind == "Metaspace":
            self.metaspace(spec)
        elif kind == "Digits":
            behaviour = "isolate" if spec.get("individual_digits") else "contiguous"
            self.pipeline.add_steps(tp.RegexSplitStep.digits_splitter(behaviour))
        elif kind == "Punctuation":
            behaviour = _BEHAVIOURS.get(spec.get("behavior", "Isolated"))
            if behaviour is None:
                raise self.fail(f"Punctuation behavior {spec.get('behavior')!r}")
            self.pipeline.add_steps(tp.RegexSplitStep.punctuation_splitter(behaviour))
        elif kind == "Whitespace":
            self.pipeline.add_steps(tp.RegexSplitStep.whitespace_splitter())
        elif kind == "WhitespaceSplit":
            self.pipeline.add_steps(tp.WhitespaceSplitStep())
        else:
            raise self.fail(f"pre-tokenizer {kind!r}")

    def metaspace(self, spec: Mapping[str, Any]) -> None:
        """Spaces become the replacement character; a replacement is prepended per ``prepend_scheme``."""
        tp = self.tp
        replacement = spec.get("replacement", "\u2581")
        scheme = spec.get("prepend_scheme")
        if scheme is None:  # the older dialect
            scheme = "always" if spec.get("add_prefix_space", True) else "never"
        self.pipeline.add_steps(tp.RegexNormalizationStep.replace_spaces_metaspace(replacement))
        if scheme == "always":
            self.pipeline.add_steps(tp.RegexNormalizationStep.prepend_with_check_regex(replacement, replacement))
        elif scheme == "first":
            # Only the very start of the text, and not when it begins with an added token or a space (which
            # becomes the replacement anyway). The pipeline applies a regex normalization in first position to
            # the whole text before the added tokens are split off.
            tokens = "|".join(tp.quote_meta(t["content"]) for t in self.added.values())
            avoid = f"{tokens}| |$" if tokens else " |$"
            first = tp.RegexNormalizationStep(
                regex_search_pattern=rf"(^)((?!{avoid})|(?=[\r\n\t\f\v]))",
                replace_term=replacement,
                global_replace=False,
            )
            self.pipeline.steps.insert(0, first)
            first.set_pipeline(self.pipeline)
        elif scheme != "never":
            raise self.fail(f"Metaspace prepend_scheme {scheme!r}")
        if spec.get("split", False):
            self.pipeline.add_steps(tp.RegexSplitStep.metaspace_splitter(replacement))

    def post_processor(self) -> None:
        tp = self.tp
        spec = self.data.get("post_processor")
        template = self._template(spec)
        if template is not None:
            combine = tp.CombineSegmentsStep.from_hf_json_template_postprocessor(template, 1, True)
        else:
            combine = tp.CombineSegmentsStep([tp.Sequence(token_type_id=0)], add_special_tokens=True)
        added = combine.number_of_added_tokens
        max_length = self.config.get("model_max_length")
        if not isinstance(max_length, int) or max_length <= 0 or max_length > _MAX_LENGTH:
            max_length = _MAX_LENGTH
        right = self.config.get("truncation_side", "right") != "left"
        self.pipeline.add_steps(
            tp.TruncationStep(max_length=min(max_length, _MAX_LENGTH) - added, truncate_right=right)
        )
        self.pipeline.add_steps(combine)
        # Batches are padded on the left whatever tokenizer_config.json says: the only correct side for
        # decoder generation, and what genai's stateful (SDPA) pipeline needs, since it continues each row
        # from the last column (right-padded rows then continue from a pad token). Single texts are unaffected.
        pad_id = self.special_id("pad_token")
        self.pipeline.add_steps(
            tp.PaddingStep(token=self._token_text(self.config.get("pad_token")), _token_id=pad_id, pad_right=False)
        )

    def _template(self, spec: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The TemplateProcessing post-processor (possibly inside a Sequence), or None for pass-through ones."""
        if spec is None:
            return None
        kind = spec.get("type")
        if kind == "TemplateProcessing":
            return spec
        if kind == "ByteLevel":
            return None
        if kind == "Sequence":
            found = None
            for item in spec.get("processors", []):
                inner = self._template(item)
                if inner is not None:
                    if found is not None:
                        raise self.fail("a post-processor Sequence with two templates")
                    found = inner
            return found
        raise self.fail(f"post-processor {kind!r}")

    def decoder(self) -> None:
        tp = self.tp
        skip = {i: t["content"] for i, t in self.added.items() if t.get("special")}
        added = {i: t["content"] for i, t in self.added.items()}
        self.pipeline.add_steps(
            tp.VocabDecoderStep.from_hf_json(
                tokenizer_json=self.data,
                pipeline_vocab=self.pipeline.vocab,
                added_tokens=added,
                skip_tokens=skip,
                do_skip_tokens=True,
                is_byte_level=self.pipeline.is_byte_level,
            )
        )
        spec = self.data.get("decoder")
        if spec is None:
            self.pipeline.add_steps(tp.FuseStep())
        elif spec.get("type") == "Sequence":
            for item in spec.get("decoders", []):
                self.decoder_step(item)
        else:
            self.decoder_step(spec)
        from openvino_tokenizers.constants import UTF8ReplaceMode

        self.pipeline.add_steps(tp.UTF8ValidateStep(mode=UTF8ReplaceMode.REPLACE))

    def decoder_step(self, spec: Mapping[str, Any]) -> None:
        tp = self.tp
        kind = spec.get("type")
        if kind == "ByteLevel":
            self.pipeline.add_steps(tp.CharsToBytesStep())
        elif kind == "Replace":
            pattern = self._pattern(spec.get("pattern", {}), "Replace decoder")
            self.pipeline.add_steps(tp.RegexDecodingStep(pattern, _replacement(spec.get("content", ""))))
        elif kind == "ByteFallback":
            self.pipeline.add_steps(tp.ByteFallbackStep())
        elif kind == "Fuse":
            self.pipeline.add_steps(tp.FuseStep())
        elif kind == "Strip":
            content = tp.quote_meta(spec.get("content", " "))
            start, stop = int(spec.get("start", 0)), int(spec.get("stop", 0))
            if start:
                self.pipeline.add_steps(tp.RegexDecodingStep(f"^(?:{content}){{0,{start}}}", ""))
            if stop:
                self.pipeline.add_steps(tp.RegexDecodingStep(f"(?:{content}){{0,{stop}}}$", ""))
        elif kind == "Metaspace":
            replacement = spec.get("replacement", "\u2581")
            self.pipeline.add_steps(tp.RegexDecodingStep(tp.quote_meta(replacement), " "))
            self.pipeline.add_steps(tp.FuseStep())
            scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
            if scheme != "never":
                self.pipeline.add_steps(tp.RegexDecodingStep("^ ", ""))
        else:
            raise self.fail(f"decoder {kind!r}")

    # -- helpers ---------------------------------------------------------------------------------------
    def _pattern(self, pattern: Mapping[str, Any], where: str) -> str:
        if "String" in pattern:
            return str(self.tp.quote_meta(pattern["String"]))
        if "Regex" in pattern:
            return str(pattern["Regex"])
        raise self.fail(f"{where} pattern {dict(pattern)!r}")

    @staticmethod
    def _token_text(value: Any) -> str | None:
        if isinstance(value, dict):  # the older tokenizer_config form {"content": ...}
            value = value.get("content")
        return value if isinstance(value, str) else None

    def special_id(self, key: str) -> int | None:
        text = self._token_text(self.config.get(key))
        return self.vocab.get(text) if text is not None else None

    def processed_template(self) -> dict[str, Any]:
        """The post-processor as genai reads it: token ids, with -1 / -2 standing for the input texts."""
        template = self._template(self.data.get("post_processor"))
        if template is None:
            return {"single": {"ids": [-1], "type_ids": [0]}, "pair": {"ids": [-1, -2], "type_ids": [0, 0]}}

        def one(items: list[Mapping[str, Any]]) -> dict[str, list[int]]:
            ids, type_ids = [], []
            sequence = -1
            for item in items:
                ((kind, body),) = item.items()
                type_ids.append(int(body.get("type_id", 0)))
                if kind == "Sequence":
                    ids.append(sequence)
                    sequence -= 1
                else:
                    special = (template.get("special_tokens") or {}).get(body["id"], {})
                    token_ids = special.get("ids") or [self.vocab.get(body["id"], 0)]
                    ids.append(int(token_ids[0]))
            return {"ids": ids, "type_ids": type_ids}

        return {"single": one(template.get("single", [])), "pair": one(template.get("pair", []))}


def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json as a dict with a ``model`` object: size-capped, standard JSON, shape-checked (SourceError)."""
    return read_tokenizer_json(path)


def _replacement(content: str) -> str:
    """A literal replacement string for the RegexNormalization op, where ``$`` introduces a group."""
    return content.replace("$", "$$")


def convert_tokenizer(
    tokenizer_json: Path,
    tokenizer_config: Mapping[str, Any] | None,
    *,
    chat_template: str | None,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
) -> tuple[Any, Any]:
    """(tokenizer, detokenizer) ``ov.Model`` s for a tokenizer.json; ids are i64 on both sides, like optimum's."""
    import openvino as ov
    import openvino_tokenizers
    from openvino_tokenizers.utils import change_inputs_type, change_outputs_type

    from sovpack.targets.openvino.names import canonicalize_names

    conversion = TokenizerConversion(tokenizer_json, tokenizer_config)
    pipeline = conversion.build()
    try:
        full = pipeline.get_tokenizer_ov_subgraph()
        detokenizer = pipeline.get_detokenizer_ov_subgraph()
    except Exception as e:  # broad: openvino_tokenizers raises assorted types; re-raised as ConversionError
        raise ConversionError(f"{tokenizer_json}: building the OpenVINO tokenizer failed: {e}") from e
    outputs = [out for name in ("input_ids", "attention_mask") for out in full.outputs if name in out.names]
    if len(outputs) != 2:
        raise ConversionError(f"{tokenizer_json}: the tokenizer pipeline did not produce input_ids/attention_mask")
    tokenizer = ov.Model(outputs, full.get_parameters(), "tokenizer")
    tokenizer.add_sinks(full.get_sinks())
    tokenizer = change_outputs_type(tokenizer, ov.Type.i64)
    detokenizer = change_inputs_type(detokenizer, ov.Type.i64)
    # openvino_tokenizers leaves OpenVINO's generated names (Constant_4711, from a process-wide counter) on the
    # nodes it makes; name them from their position instead, so the saved IR is the same in every process.
    canonicalize_names(tokenizer, "tokenizer")
    canonicalize_names(detokenizer, "detokenizer")

    bos = bos_token_id if bos_token_id is not None else conversion.special_id("bos_token")
    eos = conversion.special_id("eos_token")
    eos = eos if eos is not None else eos_token_id
    pad = conversion.special_id("pad_token")
    pad = pad if pad is not None else pad_token_id
    template = conversion.data.get("post_processor")
    info: dict[str, Any] = {
        "original_tokenizer_class": "tokenizer.json (converted by sovpack)",
        "add_special_tokens": "True",
        "skip_special_tokens": "True",
        "clean_up_tokenization_spaces": "False",
        "number_of_inputs": 1,
        "with_detokenizer": "True",
        "streaming_detokenizer": "False",
        "use_max_padding": "False",
        "truncation": "False",
        "utf8_replace_mode": "replace",
        "tokenizer_output_type": "i64",
        "detokenizer_input_type": "i64",
        "openvino_tokenizers_version": openvino_tokenizers.__version__,
        "openvino_version": ov.get_version(),
        "processed_post_processor_template": json.dumps(conversion.processed_template()),
    }
    if template is not None:
        info["original_post_processor_template"] = json.dumps(template)
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None:
            info[key] = int(value)
    if chat_template:
        info["chat_template"] = chat_template
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):  # provenance only
        info["tokenizers_version"] = version("tokenizers")
    for model in (tokenizer, detokenizer):
        for key, value in info.items():
            model.set_rt_info(value, key)
    return tokenizer, detokenizer
