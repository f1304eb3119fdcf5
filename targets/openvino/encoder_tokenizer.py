"""The OpenVINO tokenizer of an embedding encoder: BERT's WordPiece, XLM-R's Unigram and ModernBERT's byte-level
BPE tokenizer.json files.

It extends the decoder's tokenizer.json conversion (``tokenizer``) with what encoders use: WordPiece and Unigram
models, the BertNormalizer and BertPreTokenizer, and an encoder's post-processing, which differs from a decoder's
in two ways:

- truncation is *on* by default, at the sentence-transformers ``max_seq_length`` (special tokens included), so
  the tokenizer IR alone (and TextEmbeddingPipeline, which turns truncation on and leaves the length to the IR's
  default) truncates as sentence-transformers does;
- batches are padded on the right, as BERT-style tokenizers pad (the encoder graph does not depend on the side,
  see ``encoder``, but right padding is what every other consumer of these ids expects).

Only the tokenizer IR is written: an embedding pipeline never decodes.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sovpack.errors import ConversionError, SourceError
from sovpack.targets.openvino.tokenizer import TokenizerConversion

__all__ = ["EncoderTokenizerConversion", "convert_encoder_tokenizer"]

_MODELS = ("WordPiece", "Unigram", "BPE")


class EncoderTokenizerConversion(TokenizerConversion):
    """tokenizer.json -> openvino_tokenizers pipeline for an encoder, truncating at ``max_length`` tokens."""

    def __init__(self, tokenizer_json: Path, tokenizer_config: Mapping[str, Any] | None, *, max_length: int,
                 pad_token_id: int | None) -> None:
        # NOTE: the base class's reader (sovpack.source.tokenizer.read_tokenizer_json) shape-checks the vocab as
        # an object, which a Unigram vocab (a list of [piece, score]) is not; read and check it here instead.
        from openvino_tokenizers import tokenizer_pipeline as tp

        self.tp = tp
        self.path = Path(tokenizer_json)
        self.data = _read_encoder_tokenizer_json(self.path)
        self.config = dict(tokenizer_config or {})
        self.pipeline = tp.TokenizerPipeline()
        self.added = {int(t["id"]): t for t in self.data.get("added_tokens") or []}
        vocab = self.data["model"].get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: ids are list positions
            self.vocab = {str(entry[0]): i for i, entry in enumerate(vocab)}
        else:
            self.vocab = dict(vocab)
        for token_id, token in self.added.items():
            self.vocab.setdefault(token["content"], token_id)
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def build(self) -> Any:
        tp = self.tp
        model = self.data["model"]
        kind = model.get("type")
        if kind not in _MODELS:
            raise self.fail(f"an encoder tokenizer model of type {kind!r} (supported: {', '.join(_MODELS)})")
        self.special_tokens_split()
        self.normalizer(self.data.get("normalizer"))
        self.pre_tokenizer(self.data.get("pre_tokenizer"))
        # NOTE: a deep copy: UnigramModelStep.from_hf_json writes the added tokens into the vocab it is given.
        data = copy.deepcopy(self.data)
        if kind == "WordPiece":
            if model.get("unk_token") is None or model.get("continuing_subword_prefix") is None:
                raise self.fail("a WordPiece model without unk_token / continuing_subword_prefix")
            step = tp.WordPieceTokenizationStep.from_hf_json(data)
            step.max_bytes_per_word = int(model.get("max_input_chars_per_word") or 100)
        elif kind == "BPE":  # ModernBERT: byte-level BPE (GPT-NeoX style) with BERT's specials and template
            if model.get("dropout"):
                raise self.fail("BPE dropout")
            if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
                raise self.fail("BPE continuing_subword_prefix / end_of_word_suffix")
            step = tp.BPETokenizationStep.from_hf_json(data)
        else:
            if model.get("unk_id") is None:
                raise self.fail("a Unigram model without unk_id")
            step = tp.UnigramModelStep.from_hf_json(data)
        self.pipeline.add_steps(step)
        self.pipeline.vocab = step.vocab
        self.post_processor()
        return self.pipeline

    def normalizer(self, spec: Mapping[str, Any] | None) -> None:
        if spec is None or spec.get("type") != "BertNormalizer":
            super().normalizer(spec)
            return
        tp = self.tp
        steps = self.pipeline
        if spec.get("clean_text", True):  # drop control characters, every whitespace character becomes a space
            steps.add_steps(tp.RegexNormalizationStep.del_control_chars_regex())
            steps.add_steps(tp.RegexNormalizationStep.replace_whitespace_regex())
        if spec.get("handle_chinese_chars", True):
            steps.add_steps(tp.RegexNormalizationStep.handle_chinese_chars_regex())
        lowercase = bool(spec.get("lowercase", True))
        # NOTE: strip_accents None means "as lowercase" (tokenizers' BertNormalizer); an explicit false keeps them.
        strip = spec.get("strip_accents")
        if (lowercase if strip is None else bool(strip)):
            steps.add_steps(tp.NormalizeUnicode("NFD"))
            steps.add_steps(tp.RegexNormalizationStep.strip_accents_regex())
        if lowercase:
            steps.add_steps(tp.CaseFoldStep())

    def pre_tokenizer(self, spec: Mapping[str, Any] | None) -> None:
        tp = self.tp
        if spec is not None and spec.get("type") == "BertPreTokenizer":
            self.pipeline.add_steps(tp.RegexSplitStep.bert_splitter())
            return
        kinds = [item.get("type") for item in (spec or {}).get("pretokenizers", []) if isinstance(item, dict)]
        if "WhitespaceSplit" in kinds and "Metaspace" in kinds[kinds.index("WhitespaceSplit"):]:
            # NOTE: openvino_tokenizers runs every normalization step (Metaspace's space -> "▁" among them) before
            # any split, so WhitespaceSplit would see no spaces, and tabs, newlines, runs of spaces and trailing
            # spaces would reach the model. XLM-R's WhitespaceSplit-then-Metaspace equals: strip, collapse each
            # whitespace run to one space, then Metaspace; those two normalizations come first.
            self.pipeline.add_steps(tp.RegexNormalizationStep.strip_regex(True, True))
            self.pipeline.add_steps(tp.RegexNormalizationStep(r"\s+", " "))
        super().pre_tokenizer(spec)

    def post_processor(self) -> None:
        tp = self.tp
        template = self._template(self.data.get("post_processor"))
        if template is not None:
            combine = tp.CombineSegmentsStep.from_hf_json_template_postprocessor(template, 1, True)
        else:
            combine = tp.CombineSegmentsStep([tp.Sequence(token_type_id=0)], add_special_tokens=True)
        added = combine.number_of_added_tokens
        if self.max_length <= added:
            raise ConversionError(f"{self.path}: max_seq_length {self.max_length} leaves no room beside the "
                                  f"{added} special tokens")
        self.pipeline.add_steps(tp.TruncationStep(max_length=self.max_length - added, truncation=True))
        self.pipeline.add_steps(combine)
        pad_id = self.special_id("pad_token")
        pad_id = pad_id if pad_id is not None else self.pad_token_id
        self.pipeline.add_steps(
            tp.PaddingStep(token=self._token_text(self.config.get("pad_token")), _token_id=pad_id, pad_right=True)
        )


def _read_encoder_tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json, size-capped and shape-checked (SourceError), a Unigram's list vocab included."""
    from sovpack._io import read_json_file
    from sovpack.source.checkpoint import MAX_TOKENIZER_BYTES
    from sovpack.source.tokenizer import check_tokenizer_json

    data = read_json_file(path, MAX_TOKENIZER_BYTES, where=str(path))
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(model, dict) and isinstance(vocab, list):
        for entry in vocab:
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], (int, float))):
                raise SourceError(f"{path}: malformed tokenizer.json: each Unigram vocab entry must be "
                                  f"[piece, score] (got {str(entry)[:60]})")
        check_tokenizer_json({**data, "model": {k: v for k, v in model.items() if k != "vocab"}}, str(path))
        return dict(data)
    return check_tokenizer_json(data, str(path))


def convert_encoder_tokenizer(tokenizer_json: Path, tokenizer_config: Mapping[str, Any] | None, *,
                              max_length: int, pad_token_id: int | None) -> Any:
    """The tokenizer ``ov.Model`` (string in; ``input_ids``, ``attention_mask`` i64 out) of an encoder."""
    import openvino as ov
    import openvino_tokenizers
    from openvino_tokenizers.utils import change_outputs_type

    from sovpack.targets.openvino.names import canonicalize_names

    conversion = EncoderTokenizerConversion(tokenizer_json, tokenizer_config, max_length=max_length,
                                            pad_token_id=pad_token_id)
    pipeline = conversion.build()
    try:
        full = pipeline.get_tokenizer_ov_subgraph()
    except Exception as e:  # broad: openvino_tokenizers raises assorted types; re-raised as ConversionError
        raise ConversionError(f"{tokenizer_json}: building the OpenVINO tokenizer failed: {e}") from e
    outputs = [out for name in ("input_ids", "attention_mask") for out in full.outputs if name in out.names]
    if len(outputs) != 2:
        raise ConversionError(f"{tokenizer_json}: the tokenizer pipeline did not produce input_ids/attention_mask")
    tokenizer = ov.Model(outputs, full.get_parameters(), "tokenizer")
    tokenizer.add_sinks(full.get_sinks())
    tokenizer = change_outputs_type(tokenizer, ov.Type.i64)
    canonicalize_names(tokenizer, "tokenizer")
    pad = conversion.special_id("pad_token")
    pad = pad if pad is not None else pad_token_id
    info: dict[str, Any] = {
        "original_tokenizer_class": "tokenizer.json (converted by sovpack)",
        "add_special_tokens": "True",
        "skip_special_tokens": "True",
        "number_of_inputs": 1,
        "with_detokenizer": "False",
        "use_max_padding": "False",
        "truncation": "True",
        "max_length": int(max_length),
        "padding_side": "right",
        "tokenizer_output_type": "i64",
        "openvino_tokenizers_version": openvino_tokenizers.__version__,
        "openvino_version": ov.get_version(),
        "processed_post_processor_template": json.dumps(conversion.processed_template()),
    }
    template = conversion.data.get("post_processor")
    if template is not None:
        info["original_post_processor_template"] = json.dumps(template)
    if pad is not None:
        info["pad_token_id"] = int(pad)
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):  # provenance only
        info["tokenizers_version"] = version("tokenizers")
    for key, value in info.items():
        tokenizer.set_rt_info(value, key)
    return tokenizer
