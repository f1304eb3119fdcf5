"""The onnx target's embedding-encoder artifacts (BERT, XLM-RoBERTa, ModernBERT) on real onnxruntime, against the
numpy reference.

Each fixture encoder (tests/conftest.py: ``encoder_checkpoints``, plus ModernBERT with attention/MLP/norm biases)
is written at fp32, fp16 and int8 and run on batches of mixed lengths: per-text cosine similarity of the graph's
``sentence_embedding`` to the reference's embedding meets the precision's default limit, and at fp32 the token
states (``last_hidden_state``) match too. ModernBERT's fixture texts run past its local window (4 either side),
so the window, both rope bases and the padding mask are all exercised. The real all-MiniLM-L6-v2 (``minilm``)
reproduces the reference's embeddings and its semantic ordering.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.encoders import make_encoder_checkpoint
from sovpack import __version__
from sovpack._io import no_progress
from sovpack.artifact import ArtifactMetadata
from sovpack.cli import cli
from sovpack.convert import convert
from sovpack.encoder_reference import EncoderOutput, EncoderReference
from sovpack.errors import ConversionError, ParityError, UsageError
from sovpack.parity.thresholds import encoder_thresholds
from sovpack.source.model import open_model
from sovpack.source.sentence_transformers import read_pooling
from sovpack.source.tokenizer import SourceTokenizer
from sovpack.targets import TARGETS, load_targets
from sovpack.targets.onnx.encoder import ENCODER_OUTPUTS
from sovpack.targets.onnx.encoder_runner import OnnxEmbeddingRunner
from sovpack.targets.onnx.external_data import DATA_FILE
from sovpack.targets.onnx.graph import MODEL_FILE
from sovpack.targets.onnx.target import OnnxTarget
from tests.targets.shared import ENCODER_TEXTS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TEXTS = ENCODER_TEXTS
# The default per-text cosine limits for encoders, by precision.
MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99}
PRECISIONS = tuple(MIN_COSINE)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
# Every encoder variant judged here: the session fixtures plus ModernBERT with linear and norm biases.
VARIANTS = ("bert", "xlmr", "modernbert", "modernbert-biases")


def write(ckpt: Path, precision: str, out: Path) -> ArtifactMetadata:
    """Write ``ckpt`` as an onnx encoder artifact in ``out`` and return its metadata (as convert records it)."""
    model = open_model(ckpt)
    out.mkdir(parents=True)
    written = OnnxTarget().write(model, precision, out, no_progress)
    return ArtifactMetadata(
        sovpack_version=__version__, target=f"onnx:{precision}", format="onnx", precision=precision,
        name=model.name, files=written.files, spec=model.spec, source=model.checkpoint.source_files,
        format_metadata=written.format_metadata, traits=written.traits,
    )


@pytest.fixture(scope="module")
def checkpoints(encoder_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's encoder checkpoints and ``modernbert-biases`` (attention_bias, mlp_bias, norm_bias true)."""
    biased = make_encoder_checkpoint("modernbert", tmp_path_factory.mktemp("modernbert-biases") / "ckpt", biases=True)
    return {**encoder_checkpoints, "modernbert-biases": biased}


@pytest.fixture(scope="module")
def artifact(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str, str], tuple[Path, ArtifactMetadata]]:
    """(variant, precision) -> (artifact dir, metadata), written once per module."""
    root = tmp_path_factory.mktemp("onnx-encoders")
    cache: dict[tuple[str, str], tuple[Path, ArtifactMetadata]] = {}

    def make(variant: str, precision: str) -> tuple[Path, ArtifactMetadata]:
        if (variant, precision) not in cache:
            out = root / f"{variant}-{precision}"
            cache[(variant, precision)] = (out, write(checkpoints[variant], precision, out))
        return cache[(variant, precision)]

    return make


def reference(ckpt: Path, texts: list[str] = TEXTS) -> tuple[list[list[int]], EncoderOutput]:
    model = open_model(ckpt)
    assert model.spec.encoder is not None
    tokenizer = SourceTokenizer(ckpt / "tokenizer.json", max_length=model.spec.encoder.pooling.max_seq_length)
    ids = [tokenizer.encode(t) for t in texts]
    return ids, EncoderReference(model).encode(ids)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / np.linalg.norm(a64, axis=-1) / np.linalg.norm(b64, axis=-1)


def open_runner(out: Path, metadata: ArtifactMetadata) -> OnnxEmbeddingRunner:
    load_targets()
    runner = TARGETS.get("onnx").open_embedding_runner(out, metadata)
    assert isinstance(runner, OnnxEmbeddingRunner)
    return runner


# -------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_embeddings_match_the_reference_on_a_mixed_length_batch(
    checkpoints: dict[str, Path], artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]],
    variant: str, precision: str,
) -> None:
    ids, ref = reference(checkpoints[variant])
    assert len({len(x) for x in ids}) > 2  # padding is exercised
    runner = open_runner(*artifact(variant, precision))
    out = runner.embed_ids(ids)
    assert out.embeddings.shape == ref.embeddings.shape and out.hidden is not None
    assert out.hidden.shape == ref.hidden.shape
    assert cosines(out.embeddings, ref.embeddings).min() >= MIN_COSINE[precision]
    hidden_error = float(np.abs(out.hidden - ref.hidden)[ref.mask].max())
    if precision == "fp32":
        assert hidden_error <= 1e-4
        assert np.abs(out.embeddings - ref.embeddings).max() <= 1e-5
    else:  # weight rounding only: the token states stay close (measured: fp16 <= 3.3e-3, int8 <= 0.068)
        assert hidden_error <= 0.1
    runner.close()


@pytest.mark.parametrize("variant", ["xlmr", "modernbert"])
def test_an_embedding_does_not_depend_on_its_batch(
    checkpoints: dict[str, Path], artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]], variant: str,
) -> None:
    """Padding (XLM-R's position ids, ModernBERT's local windows over padded keys) changes no real token."""
    ids, _ = reference(checkpoints[variant])
    runner = open_runner(*artifact(variant, "fp32"))
    batched = runner.embed_ids(ids).embeddings
    alone = np.concatenate([runner.embed_ids([x]).embeddings for x in ids])
    assert np.abs(batched - alone).max() <= 1e-5


@pytest.mark.parametrize(("pooling", "normalize"), [("max", False), ("mean_sqrt_len", True), ("lasttoken", True),
                                                    ("cls", True), ("mean", False)])
def test_every_pooling_mode_is_computed_in_the_graph(tmp_path: Path, pooling: str, normalize: bool) -> None:
    ckpt = make_encoder_checkpoint("bert", tmp_path / "ckpt", pooling=pooling, normalize=normalize)
    ids, ref = reference(ckpt)
    metadata = write(ckpt, "fp32", tmp_path / "out")
    assert metadata.format_metadata["pooling"]["normalize"] is normalize
    out = open_runner(tmp_path / "out", metadata).embed_ids(ids)
    assert np.abs(out.embeddings - ref.embeddings).max() <= 1e-5
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=-1), 1.0, atol=1e-6)


def test_the_text_path_uses_the_artifacts_tokenizer_and_truncation(
    encoder_checkpoints: dict[str, Path], artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]],
) -> None:
    ckpt = encoder_checkpoints["bert"]
    long_text = " ".join(["the quick brown fox"] * 40)
    ids, ref = reference(ckpt, [*TEXTS, long_text])
    out, metadata = artifact("bert", "fp32")
    runner = open_runner(out, metadata)
    assert [runner.tokenize(t) for t in [*TEXTS, long_text]] == ids
    limit = metadata.spec.encoder.pooling.max_seq_length if metadata.spec.encoder else None
    assert limit == 48 and len(ids[-1]) == limit  # sentence_bert_config.json's max_seq_length
    embedded = runner.embed_texts([*TEXTS, long_text])
    assert embedded is not None and np.abs(embedded - ref.embeddings).max() <= 1e-5


# ----------------------------------------------------------------------------------------- the artifact


@pytest.mark.parametrize(("variant", "inputs"), [("bert", ["input_ids", "attention_mask", "token_type_ids"]),
                                                 ("xlmr", ["input_ids", "attention_mask"]),
                                                 ("modernbert", ["input_ids", "attention_mask"])])
def test_graph_has_optimum_feature_extraction_io(
    artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]], variant: str, inputs: list[str],
) -> None:
    """BERT takes token_type_ids and XLM-R (one token type) and ModernBERT (none) do not, as ``optimum-cli export
    onnx`` exports them."""
    out, metadata = artifact(variant, "fp32")
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    hidden = metadata.spec.hidden_size

    def dims(value: object) -> list[str | int]:
        shape = value.type.tensor_type.shape.dim  # type: ignore[attr-defined]
        return [d.dim_param or d.dim_value for d in shape]

    assert [i.name for i in graph.input] == inputs
    for i in graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert dims(i) == ["batch_size", "sequence_length"]
    assert [o.name for o in graph.output] == list(ENCODER_OUTPUTS)
    assert dims(graph.output[0]) == ["batch_size", "sequence_length", hidden]
    assert dims(graph.output[1]) == ["batch_size", hidden]
    # onnxruntime sees the same I/O
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == list(ENCODER_OUTPUTS)
    fmt = metadata.format_metadata
    assert fmt["io"]["inputs"] == inputs and fmt["io"]["outputs"] == list(ENCODER_OUTPUTS)
    assert fmt["model_kind"] == "encoder" and fmt["embedding_dimension"] == hidden
    assert metadata.spec.encoder is not None and fmt["pooling"] == metadata.spec.encoder.pooling.to_dict()


@pytest.mark.parametrize("variant", ["bert", "xlmr", "modernbert"])
def test_artifact_carries_tokenizer_config_and_sentence_transformers_files(
    encoder_checkpoints: dict[str, Path], artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]],
    variant: str,
) -> None:
    out, metadata = artifact(variant, "fp32")
    wanted = (MODEL_FILE, DATA_FILE, "tokenizer.json", "tokenizer_config.json", "config.json",
              *SENTENCE_TRANSFORMERS_FILES)
    assert set(wanted) <= set(metadata.files)
    for name in metadata.files:
        assert (out / name).is_file(), name
    for name in ("tokenizer.json", "config.json", *SENTENCE_TRANSFORMERS_FILES):
        assert (out / name).read_bytes() == (encoder_checkpoints[variant] / name).read_bytes()
    # the pooling the graph computes is read back from the copied files, as sentence-transformers would read it
    assert metadata.spec.encoder is not None and read_pooling(out) == metadata.spec.encoder.pooling


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_storage_and_quantization_metadata(
    artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]], precision: str,
) -> None:
    out, metadata = artifact("bert", precision)
    fmt = metadata.format_metadata
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "LayerNormalization" in ops and fmt["compute_dtype"] == "float32"
    if precision == "int8":
        assert fmt["quantization"]["bits"] == 8 and "MatMulNBits" in ops
        assert fmt["min_onnxruntime"] == "1.17" and fmt["opset_imports"]["com.microsoft"] == 1
        # every 8-bit projection as two 4-bit MatMulNBits (high and low nibbles, summed)
        assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 2 * 6 * metadata.spec.num_layers
        assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {4}
    else:
        assert fmt["quantization"] is None and "MatMulNBits" not in ops and "com.microsoft" not in fmt["opset_imports"]
        stored = {t.name: t.data_type for t in graph.initializer}
        want = onnx.TensorProto.FLOAT if precision == "fp32" else onnx.TensorProto.FLOAT16
        assert stored["layers.0.q"] == want and stored["embed"] == want
        assert stored["layers.0.q_bias"] == onnx.TensorProto.FLOAT  # 1-D parameters stay float32


def test_int4_is_refused_for_encoders_by_name(encoder_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = open_model(encoder_checkpoints["bert"])
    with pytest.raises(ConversionError, match=r"onnx:int4 is not offered for embedding encoders"):
        OnnxTarget().write(model, "int4", tmp_path, no_progress)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", ["modernbert", "modernbert-biases"])
def test_modernbert_graph_is_pre_ln_with_rope_local_windows_and_geglu(
    artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]], variant: str, precision: str,
) -> None:
    out, metadata = artifact(variant, precision)
    fmt, spec = metadata.format_metadata, metadata.spec
    encoder = spec.encoder
    assert encoder is not None and encoder.layout == "pre_ln" and encoder.local_layers == (1, 2)
    biases = variant.endswith("biases")
    assert (encoder.linear_bias, encoder.norm_bias) == (biases, biases)
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    stored = {t.name: t.data_type for t in graph.initializer}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    # embed_norm, attn_norm on layers 1.. only, mlp_norm on each, final_norm; a bias input only with norm_bias
    assert len(norms) == 1 + (spec.num_layers - 1) + spec.num_layers + 1
    assert {len(n.input) for n in norms} == {3 if biases else 2}
    assert "layers.0.attn_norm" not in stored and "final_norm" in stored and "pos_embed" not in stored
    assert any(name.endswith("_bias") for name in stored) is biases
    ops = [n.op_type for n in graph.node]
    # one cos/sin pair per rope base (global 160000, local 10000), one window bias shared by the local layers
    assert ops.count("Cos") == ops.count("Sin") == 2 and ops.count("LessOrEqual") == 1
    assert sum(n.name.endswith("mlp/geglu") for n in graph.node) == spec.num_layers
    assert fmt["local_attention"] == {"layers": [1, 2], "window": encoder.local_window,
                                      "rule": "a query sees real keys with |i - j| <= window"}
    assert "base 160000 on global layers, 10000 on local layers" in fmt["rope"]
    assert fmt["layer_norm"].endswith("no bias input") is not biases
    if precision == "int8":
        assert sum(op == "MatMulNBits" for op in ops) == 2 * 7 * spec.num_layers  # q k v o up gate down, 2 nibbles
        assert "gate" in fmt["quantization"]["quantized"]
        assert fmt["quantization"]["not_quantized"].startswith("word embedding table (float16)")
    else:
        want = onnx.TensorProto.FLOAT if precision == "fp32" else onnx.TensorProto.FLOAT16
        assert stored["layers.0.gate"] == want and stored["embed"] == want
        assert stored["final_norm"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("precision", PRECISIONS)
def test_modernbert_converts_end_to_end_with_default_thresholds(
    checkpoints: dict[str, Path], tmp_path: Path, precision: str,
) -> None:
    """``convert`` (the CLI's library call) writes the artifact and judges it PASSED at the default limits."""
    result = convert(checkpoints["modernbert"], f"onnx:{precision}", tmp_path / "out")
    report = result.parity
    assert report is not None and report.status == "PASSED", report and report.reasons
    assert report.thresholds == encoder_thresholds(OnnxTarget.precisions[precision].weights)  # no overrides
    assert report.embeddings is not None and report.embeddings.min_cosine >= MIN_COSINE[precision]


def test_modernbert_cli_convert_prints_passed(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(checkpoints["modernbert"]), "-t", "onnx:int8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnx:int8: wrote" in result.output and "parity PASSED" in result.output
    assert (out / MODEL_FILE).is_file()


def test_encoder_families_are_declared() -> None:
    load_targets()
    assert {"bert", "xlm_roberta", "modernbert"} <= TARGETS.get("onnx").families


# --------------------------------------------------------------------------------------------- the runner


def test_runner_refuses_what_the_model_cannot_take(artifact: Callable[[str, str], tuple[Path, ArtifactMetadata]]
                                                   ) -> None:
    out, metadata = artifact("xlmr", "fp32")
    runner = open_runner(out, metadata)
    positions = metadata.spec.max_position_embeddings - 2  # XLM-R positions start after the padding id (1)
    runner.embed_ids([[0] * positions])
    with pytest.raises(UsageError, match="exceeds the model's 64 positions"):
        runner.embed_ids([[0] * (positions + 1)])
    with pytest.raises(UsageError, match="non-empty"):
        runner.embed_ids([])
    with pytest.raises(UsageError, match="token ids must be in"):
        runner.embed_ids([[metadata.spec.vocab_size]])
    info = runner.runtime_info()
    assert info["runtime"] == "onnxruntime" and info["onnxruntime"] == ort.__version__
    runner.close()
    runner.close()
    with pytest.raises(ParityError, match="closed"):
        runner.embed_ids([[0, 2]])


# -------------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_real_minilm_reproduces_the_reference_and_its_semantics(minilm: Path, tmp_path: Path) -> None:
    ids, ref = reference(minilm)
    metadata = write(minilm, "fp32", tmp_path / "fp32")
    runner = open_runner(tmp_path / "fp32", metadata)
    out = runner.embed_ids(ids)
    assert cosines(out.embeddings, ref.embeddings).min() >= MIN_COSINE["fp32"]
    assert out.hidden is not None and np.abs(out.hidden - ref.hidden)[ref.mask].max() <= 1e-4
    texts = runner.embed_texts(TEXTS)
    assert texts is not None
    sim = texts @ texts.T  # normalised: cosine similarities
    # reference: food~pasta 0.70, food~movie -0.05
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.1 and sim[0, 1] > sim[0, 2] + 0.5
    # int8 keeps the embedding space
    int8 = write(minilm, "int8", tmp_path / "int8")
    quantized = open_runner(tmp_path / "int8", int8).embed_ids(ids).embeddings
    assert cosines(quantized, ref.embeddings).min() >= MIN_COSINE["int8"]
