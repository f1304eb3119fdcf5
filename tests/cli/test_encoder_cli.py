"""``sovpack run --text`` and ``sovpack inspect`` on embedding encoders: checkpoint, artifact directory, bundle.

The cosine matrix a user sees is checked against the numpy reference's own embeddings of the same texts (exact on
the checkpoint, within the precision's tolerance on a runtime); kind mix-ups (--text on a decoder, --prompt on an
encoder) are usage errors naming what the model is. Everything runs on the real runtimes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.cli import cli
from sovpack.convert import convert
from sovpack.encoder_reference import EncoderReference
from sovpack.run import cosine_matrix
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer

TEXTS = ("A man is eating food.", "A man is eating pasta.", "The new movie is awesome.", "ok")
# How far a runtime's cosine matrix may be from the reference's: fp32 is the same arithmetic up to summation
# order; 16-bit weights move each embedding by < 1e-3 in cosine, so a pair's similarity by a few 1e-3 at most.
MATRIX_ATOL = {"onnx:fp32": 1e-5, "gguf:f16": 5e-3, "openvino:fp16": 5e-3}
RUNTIMES = {"onnx:fp32": "onnxruntime", "gguf:f16": "llama.cpp", "openvino:fp16": "openvino"}


def sovpack(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process: exit codes and stderr exactly as a user gets them."""
    return subprocess.run([sys.executable, "-m", "sovpack", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def text_args(texts: tuple[str, ...] = TEXTS) -> list[str]:
    return [arg for text in texts for arg in ("--text", text)]


def reference(ckpt: Path, texts: tuple[str, ...] = TEXTS) -> tuple[np.ndarray, np.ndarray]:
    """The numpy reference's embeddings of ``texts`` (tokenized as sentence-transformers does) and their cosines."""
    model = open_model(ckpt)
    assert model.spec.encoder is not None
    tokenizer = SourceTokenizer(ckpt / "tokenizer.json", max_length=model.spec.encoder.pooling.max_seq_length)
    embeddings = EncoderReference(model).encode([tokenizer.encode(t) for t in texts]).embeddings
    return embeddings, cosine_matrix(embeddings)


def run_json(*args: str | Path) -> dict[str, Any]:
    result = sovpack("run", *args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-cli")


@pytest.fixture(scope="module")
def bert(encoder_checkpoints: dict[str, Path]) -> Path:
    return encoder_checkpoints["bert"]


@pytest.fixture(scope="module")
def onnx_artifact(bert: Path, work: Path) -> Path:
    out = work / "bert-onnx"
    convert(bert, "onnx:fp32", out)
    return out


@pytest.fixture(scope="module")
def keys(work: Path) -> dict[str, Path]:
    pair = generate_key_pair(work / "keys")
    return {"private": pair.private_key, "public": pair.public_key}


@pytest.fixture(scope="module")
def encoder_bundle(bert: Path, work: Path, keys: dict[str, Path]) -> Path:
    """The bert fixture as a signed bundle of all three targets."""
    out = work / "bert.oci"
    config = BuildConfig(checkpoint=bert, output=out, targets=tuple(MATRIX_ATOL))
    build_bundle(config, key=SigningKey.load(keys["private"]))
    return out


# ------------------------------------------------------------------------------------------------ checkpoint


def test_run_text_on_checkpoint_json_is_the_reference(bert: Path) -> None:
    data = run_json(bert, *text_args())
    embeddings, cosine = reference(bert)
    assert data["shape"] == [len(TEXTS), 32] and data["texts"] == list(TEXTS)
    assert data["runtime"] == "numpy-reference" and data["verified"] is None and data["family"] == "bert"
    assert (data["model"], data["pooling"], data["normalize"], data["max_seq_length"]) == (
        "embedding encoder", "mean", True, 48)
    tokenizer = SourceTokenizer(bert / "tokenizer.json", max_length=48)
    assert data["tokens"] == [len(tokenizer.encode(t)) for t in TEXTS]
    np.testing.assert_allclose(np.array(data["cosine"]), cosine, atol=1e-6)  # rounded to 6 decimals
    assert "embeddings" not in data  # the vectors only on request
    with_vectors = run_json(bert, *text_args(), "--vectors")
    np.testing.assert_array_equal(np.array(with_vectors["embeddings"], dtype=np.float32), embeddings)


def test_run_text_on_checkpoint_table(encoder_checkpoints: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["run", str(encoder_checkpoints["bert"]), *text_args()])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == ("bert embeddings: 4 x 32 (mean pooling, L2-normalised, max 48 tokens) on numpy-reference")
    tokens = len(SourceTokenizer(encoder_checkpoints["bert"] / "tokenizer.json").encode("ok"))
    assert lines[1].startswith("  [1] A man is eating food. (") and lines[4] == f"  [4] ok ({tokens} tokens)"
    assert lines[5] == "cosine similarity"
    _, cosine = reference(encoder_checkpoints["bert"])
    rows = [[float(v) for v in line.split()[1:]] for line in lines[7:11]]
    np.testing.assert_allclose(np.array(rows), cosine, atol=5e-5)  # printed to 4 decimals
    xlmr = CliRunner().invoke(cli, ["run", str(encoder_checkpoints["xlmr"]), "--text", "a", "--text", "b"])
    assert xlmr.exit_code == 0, xlmr.output
    assert "xlm_roberta embeddings: 2 x 32 (cls pooling, not normalised, max 48 tokens)" in xlmr.stdout


def test_real_minilm_similarities(minilm: Path) -> None:
    """The model card's example on the real weights: eating food ~ eating pasta, neither ~ a movie."""
    data = run_json(minilm, *text_args(TEXTS[:3]))
    cosine = np.array(data["cosine"])
    assert data["shape"] == [3, 384] and data["max_seq_length"] == 256
    assert cosine[0, 1] > 0.6 and abs(cosine[0, 2]) < 0.1 and abs(cosine[1, 2]) < 0.1
    np.testing.assert_allclose(cosine, reference(minilm, TEXTS[:3])[1], atol=1e-6)


# ------------------------------------------------------------------------------------------------ artifact


def test_run_text_on_onnx_artifact(bert: Path, onnx_artifact: Path) -> None:
    result = sovpack("run", onnx_artifact, *text_args(), "--json")
    assert result.returncode == 0, result.stderr
    assert "nothing was verified (no --key)" in result.stderr
    data = json.loads(result.stdout)
    assert data["runtime"] == "onnxruntime" and data["verified"] is False and data["shape"] == [len(TEXTS), 32]
    np.testing.assert_allclose(np.array(data["cosine"]), reference(bert)[1], atol=MATRIX_ATOL["onnx:fp32"])
    table = sovpack("run", onnx_artifact, *text_args())
    assert table.returncode == 0 and "on onnxruntime, unverified" in table.stdout


# ------------------------------------------------------------------------------------------------ usage errors


def test_kind_mixups_and_option_clashes_are_usage_errors(
    bert: Path, onnx_artifact: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    cases: list[tuple[list[str | Path], str]] = [
        ([bert, "--prompt", "hi"], f"error: {bert}: an embedding encoder (bert): embed texts with --text"),
        ([bert, "--ids", "1,2"], f"error: {bert}: an embedding encoder (bert)"),
        ([onnx_artifact, "--prompt", "hi"], f"error: {onnx_artifact}: an embedding encoder (bert)"),
        ([checkpoints["llama3"], "--text", "hi"],
         f"error: {checkpoints['llama3']}: a decoder (llama): generate with --prompt or --ids"),
        ([bert, "--text", "a", "--prompt", "b"], "error: --text embeds with an embedding encoder, --prompt/--ids"),
        ([bert, "--text", "a", "--vectors"], "error: --vectors adds the embedding vectors to the JSON"),
        ([bert, "--text", "a", "--logits-out", tmp_path / "x.npy"], "error: --logits-out saves a decoder's logits"),
        ([bert], "error: give --prompt or --ids (a decoder generates), or --text"),
        ([bert, "--text", "a", "-t", "onnx:fp32"], f"error: {bert}: -t/--target selects a target of a bundle"),
    ]
    for args, message in cases:
        result = sovpack("run", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not (tmp_path / "x.npy").exists()


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_encoder_checkpoint_and_artifact(bert: Path, onnx_artifact: Path, checkpoints: dict[str, Path]
                                                 ) -> None:
    facts = {"pooling": "mean", "normalize": True, "max_seq_length": 48, "max_input_tokens": 48, "dimension": 32}
    for path in (bert, onnx_artifact):
        result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert (info["family"], info["model"], info["encoder"]) == ("bert", "embedding encoder", facts)
        table = CliRunner().invoke(cli, ["inspect", str(path)])
        assert table.exit_code == 0, table.output
        rows = {" ".join(line.split()[:-1]): line.split()[-1] for line in table.stdout.splitlines() if line.strip()}
        assert rows["model embedding"] == "encoder" and rows["embedding 32"] == "dimensions"
        assert (rows["pooling"], rows["normalize"], rows["max_seq_length"]) == ("mean", "True", "48")
    decoder = json.loads(CliRunner().invoke(cli, ["inspect", str(checkpoints["llama3"]), "--json"]).stdout)
    assert decoder["model"] == "decoder" and decoder["encoder"] is None


def test_inspect_encoder_bundle(encoder_bundle: Path, keys: dict[str, Path]) -> None:
    result = sovpack("inspect", encoder_bundle, "--key", keys["public"], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["problems"] == [] and {t["name"] for t in info["targets"]} == set(MATRIX_ATOL)
    for target in info["targets"]:
        assert (target["family"], target["model"]) == ("bert", "embedding encoder")
        assert target["encoder"]["pooling"] == "mean" and target["encoder"]["dimension"] == 32
    table = sovpack("inspect", encoder_bundle, "--key", keys["public"])
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("embedding encoder (bert), 32 dimensions, mean pooling, normalize True, "
                              "max_seq_length 48") == len(MATRIX_ATOL)


# ------------------------------------------------------------------------------------------------ bundle


def test_run_text_on_each_bundle_target(bert: Path, encoder_bundle: Path, keys: dict[str, Path]) -> None:
    _, cosine = reference(bert)
    for target, atol in MATRIX_ATOL.items():  # each in a fresh process, as a user runs it
        data = run_json(encoder_bundle, "-t", target, "--key", keys["public"], *text_args())
        assert data["runtime"] == RUNTIMES[target] and data["verified"] is True, target
        assert data["shape"] == [len(TEXTS), 32] and data["pooling"] == "mean"
        np.testing.assert_allclose(np.array(data["cosine"]), cosine, atol=atol, err_msg=target)


def test_bundle_refusals(encoder_bundle: Path, keys: dict[str, Path], work: Path) -> None:
    unverified = sovpack("run", encoder_bundle, "-t", "onnx:fp32", "--text", "a")
    assert unverified.returncode == 2 and "pass --key PUB.pem (or --insecure" in unverified.stderr
    generate = sovpack("run", encoder_bundle, "-t", "onnx:fp32", "--key", keys["public"], "--prompt", "hi")
    assert generate.returncode == 2 and "target onnx:fp32 is an embedding encoder (bert)" in generate.stderr
    several = sovpack("run", encoder_bundle, "--key", keys["public"], "--text", "a")
    assert several.returncode == 2 and "choose one with -t" in several.stderr
    decoder = work / "llama3.oci"
    build_bundle(BuildConfig(checkpoint=make_checkpoint("llama3", work / "llama3"), output=decoder,
                             targets=("onnx:fp32",)), key=SigningKey.load(keys["private"]))
    embed = sovpack("run", decoder, "--key", keys["public"], "--text", "hi")
    assert embed.returncode == 2 and "target onnx:fp32 is a text generator (llama)" in embed.stderr


def test_run_text_on_extracted_target_checks_model_sig(bert: Path, encoder_bundle: Path, keys: dict[str, Path],
                                                       work: Path) -> None:
    deploy = work / "deploy"
    extracted = sovpack("extract", encoder_bundle, "-t", "gguf:f16", "-o", deploy, "--key", keys["public"])
    assert extracted.returncode == 0, extracted.stderr
    data = run_json(deploy, "--key", keys["public"], *text_args())
    assert data["runtime"] == "llama.cpp" and data["verified"] is True
    np.testing.assert_allclose(np.array(data["cosine"]), reference(bert)[1], atol=MATRIX_ATOL["gguf:f16"])
    other = generate_key_pair(work / "other-keys")
    refused = sovpack("run", deploy, "--key", other.public_key, "--text", "a")
    assert refused.returncode == 1 and "not signed by a trusted key" in refused.stderr and refused.stdout == ""
