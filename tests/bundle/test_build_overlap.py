"""One read, several writers: a build writes its non-4-bit targets at the same time, then judges each in turn."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import sovpack.oci.store as store_module
from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.convert import TargetJob, convert, overlapped_targets, write_targets
from sovpack.errors import ParityError
from sovpack.source.model import open_model
from sovpack.targets.base import TargetRef
from sovpack.verify.check import verify_bundle

TOGETHER = ("onnx:fp16", "gguf:q8_0", "openvino:fp16")


def _refs(*targets: str) -> list[TargetRef]:
    return [TargetRef.parse(t) for t in targets]


def test_writing_at_once_gives_the_bytes_of_one_at_a_time(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Deterministic whatever the schedule: every file of every artifact written by concurrent writers equals
    the same target converted alone."""
    model = open_model(checkpoints["llama3"])
    jobs = [TargetJob(ref, tmp_path / "together" / ref.format) for ref in _refs(*TOGETHER)]
    for job in jobs:
        job.directory.mkdir(parents=True)
    written = write_targets(model, jobs)
    assert [m.target for m in written] == list(TOGETHER)
    for job in jobs:
        alone = convert(checkpoints["llama3"], job.ref, tmp_path / "alone" / job.ref.format, parity=False).out_dir
        files = sorted(p.name for p in job.directory.iterdir())
        assert files == sorted(p.name for p in alone.iterdir()) and len(files) > 2
        for name in files:
            assert (job.directory / name).read_bytes() == (alone / name).read_bytes(), f"{job.ref}: {name}"


def test_which_targets_overlap(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit targets are written in their turn (they share calibration and codes through the model); one
    target alone, or writers whose tensors would not fit a quarter of the memory, do not overlap."""
    model = open_model(checkpoints["llama3"])
    mixed = _refs("onnx:int4", "onnx:fp16", "gguf:q4_k_m", "gguf:q8_0", "openvino:int8")
    assert overlapped_targets(model, mixed) == _refs("onnx:fp16", "gguf:q8_0", "openvino:int8")
    assert overlapped_targets(model, _refs("onnx:fp16", "openvino:int4")) == []
    monkeypatch.setattr("sovpack.convert.machine_memory", lambda: 1 << 20)  # 1 MiB: too little
    assert overlapped_targets(model, _refs(*TOGETHER)) == []


def test_build_writes_at_once_then_judges_each_in_turn(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    pair = generate_key_pair(tmp_path / "keys")
    stages: list[str] = []

    def progress(description: str, completed: int, total: int) -> None:
        if completed == 0 and description.startswith("["):
            stages.append(description)

    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle",
                         targets=(*TOGETHER, "onnx:int4"), tag="v1", target_thresholds={"onnx:int4": {"mean_kl": 0.6}})
    result = build_bundle(config, key=SigningKey.load(pair.private_key), progress=progress)
    assert [t.parity for t in result.targets] == ["PASSED"] * 4
    assert stages[0] == "[1+2+3/4] onnx:fp16, gguf:q8_0, openvino:fp16: write at once"
    # each written target judged then stored, in the build's order unless onnxruntime (opened beside the other
    # writers) is still loading when judging starts: then gguf:q8_0 is judged first (test_preload.py)
    judged = [(stages[i], stages[i + 1]) for i in range(1, 7, 2)]
    assert sorted(judged) == [("[1/4] onnx:fp16: parity check", "[1/4] onnx:fp16: store + sign"),
                              ("[2/4] gguf:q8_0: parity check", "[2/4] gguf:q8_0: store + sign"),
                              ("[3/4] openvino:fp16: parity check", "[3/4] openvino:fp16: store + sign")]
    assert judged[2][0] == "[3/4] openvino:fp16: parity check"
    assert stages[7:] == ["[4/4] onnx:int4: convert + parity", "[4/4] onnx:int4: store + sign"]


def test_build_stores_streamed_artifacts_without_reading_them_again(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hash while writing: the ONNX external data and the GGUF file are hashed as their writers stream them, and
    OpenVINO's weights (written by its own save_model) in the background while parity runs, so storing them is
    a rename; the bundle still verifies (every blob hashed against its digest)."""
    read_again: list[str] = []
    hashing_copy = store_module.hashing_copy

    def recording(source: Path, dest: Path | None) -> tuple[str, int]:
        read_again.append(Path(source).name)
        return hashing_copy(source, dest)

    monkeypatch.setattr(store_module, "hashing_copy", recording)
    pair = generate_key_pair(tmp_path / "keys")
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle",
                         targets=("onnx:fp32", "gguf:f16", "openvino:fp16"), tag="v1")
    build_bundle(config, key=SigningKey.load(pair.private_key))
    assert "model.onnx.data" not in read_again and not any(name.endswith(".gguf") for name in read_again)
    assert "openvino_model.bin" not in read_again
    assert "model.onnx" in read_again  # written whole by onnx's serializer: hashed when stored, as before
    assert verify_bundle(tmp_path / "bundle", keys=[VerifyingKey.load(pair.public_key)]).ok


def test_the_checkpoint_hashed_beside_a_failing_reference_leaves_no_thread(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source digests are computed on a thread while the reference runs; a build that fails meanwhile waits
    for it, so nothing keeps reading the checkpoint after build_bundle returns."""
    pair = generate_key_pair(tmp_path / "keys")

    def failing(*_args: object, **_kwargs: object) -> None:
        raise ParityError("the reference failed")

    monkeypatch.setattr("sovpack.bundle.build.record_reference", failing)
    config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / "bundle", targets=TOGETHER, tag="v1")
    with pytest.raises(ParityError, match="the reference failed"):
        build_bundle(config, key=SigningKey.load(pair.private_key))
    assert not [t for t in threading.enumerate() if t.name.startswith("sovpack-source-hash")]
    assert not (tmp_path / "bundle").exists()
