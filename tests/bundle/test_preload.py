"""A build opens its first target on its runtime while the other writers finish, and never leaks that runner."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sovpack.attest.dsse import SigningKey, generate_key_pair
from sovpack.bundle import build_bundle
from sovpack.bundle.config import BuildConfig
from sovpack.bundle.preload import RunnerPreload
from sovpack.errors import ConversionError, ParityError
from sovpack.source.model import open_model
from sovpack.targets.base import BASE_MEMORY_BYTES, MEMORY_SHARE, TargetRef
from sovpack.targets.gguf.target import GgufTarget
from sovpack.targets.onnx.target import OnnxTarget

TARGETS = ("onnx:fp16", "gguf:q8_0")


def _build(checkpoint: Path, tmp_path: Path) -> Any:
    pair = generate_key_pair(tmp_path / "keys")
    config = BuildConfig(checkpoint=checkpoint, output=tmp_path / "bundle", targets=TARGETS, tag="v1")
    return build_bundle(config, key=SigningKey.load(pair.private_key))


def test_the_first_target_opens_while_a_slower_writer_still_runs(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    open_runner, write = OnnxTarget.open_runner, GgufTarget.write

    def opening(self: OnnxTarget, *args: Any) -> Any:
        events.append(("onnx opened", threading.current_thread().name))
        return open_runner(self, *args)

    def slow_write(self: GgufTarget, *args: Any, **kwargs: Any) -> Any:
        written = write(self, *args, **kwargs)
        time.sleep(2.0)  # the disk-bound tail of a large writer
        events.append(("gguf written", threading.current_thread().name))
        return written

    monkeypatch.setattr(OnnxTarget, "open_runner", opening)
    monkeypatch.setattr(GgufTarget, "write", slow_write)
    result = _build(checkpoints["llama3"], tmp_path)
    assert [t.parity for t in result.targets] == ["PASSED", "PASSED"]
    assert [event for event, _ in events] == ["onnx opened", "gguf written"]
    assert events[0][1] == "sovpack-preload"


def test_a_runtime_that_cannot_open_fails_the_build_with_nothing_written(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: OnnxTarget, *args: Any) -> Any:
        raise ParityError("model.onnx: onnxruntime cannot load it")

    monkeypatch.setattr(OnnxTarget, "open_runner", broken)
    with pytest.raises(ParityError, match="cannot load it"):
        _build(checkpoints["llama3"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]  # no bundle, no scratch


def test_an_opened_runner_is_closed_when_another_writer_fails(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []
    open_runner = OnnxTarget.open_runner

    def tracked(self: OnnxTarget, *args: Any) -> Any:
        runner = open_runner(self, *args)
        close = runner.close

        def closing() -> None:
            closed.append("onnx")
            close()

        runner.close = closing  # type: ignore[method-assign]
        return runner

    def failing(self: GgufTarget, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)  # the ONNX writer finishes first and its runtime opens
        raise ConversionError("disk full")

    monkeypatch.setattr(OnnxTarget, "open_runner", tracked)
    monkeypatch.setattr(GgufTarget, "write", failing)
    with pytest.raises(ConversionError, match="disk full"):
        _build(checkpoints["llama3"], tmp_path)
    assert closed == ["onnx"]


def test_a_preload_only_where_it_fits_and_helps(
    checkpoints: dict[str, Path], encoder_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = open_model(checkpoints["llama3"])
    together = [TargetRef.parse(t) for t in TARGETS]
    assert RunnerPreload.beside(model, together, together[0]) is not None
    assert RunnerPreload.beside(model, together, TargetRef.parse("onnx:int4")) is None  # written in its turn
    encoder = open_model(next(iter(encoder_checkpoints.values())))
    assert RunnerPreload.beside(encoder, together, together[0]) is None
    monkeypatch.setattr("sovpack.bundle.preload.machine_memory", lambda: 2 << 30)  # the runtime would not fit
    assert RunnerPreload.beside(model, together, together[0]) is None


def test_a_slow_load_lets_another_target_be_judged_first_and_the_bundle_keeps_its_order(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = generate_key_pair(tmp_path / "keys")
    key = SigningKey.load(pair.private_key)

    def build(out: str) -> Any:
        config = BuildConfig(checkpoint=checkpoints["llama3"], output=tmp_path / out, targets=TARGETS, tag="v1")
        return build_bundle(config, key=key, progress=lambda stage, done, total: judged.append(stage)
                            if stage.endswith(": parity") and done == 0 else None)

    judged: list[str] = []
    in_order = build("in-order")  # judged in the build's order unless onnxruntime's load is slow here too
    assert sorted(judged) == ["gguf:q8_0: parity", "onnx:fp16: parity"]

    open_runner = OnnxTarget.open_runner

    def slow_open(self: OnnxTarget, *args: Any) -> Any:
        time.sleep(3.0)  # onnxruntime's single-threaded load outlasting the writers
        return open_runner(self, *args)

    monkeypatch.setattr(OnnxTarget, "open_runner", slow_open)
    judged.clear()
    reordered = build("reordered")
    assert judged == ["gguf:q8_0: parity", "onnx:fp16: parity"]
    assert [(t.target, t.manifest_digest, t.parity) for t in reordered.targets] == [
        (t.target, t.manifest_digest, t.parity) for t in in_order.targets]
    assert [t.target for t in reordered.targets] == list(TARGETS)


def test_nothing_is_judged_beside_a_loading_runtime_where_both_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    first, other = TargetRef.parse("onnx:fp16"), TargetRef.parse("openvino:fp16")  # llama.cpp maps its file
    parameters = 8_000_000_000  # an 8B model: each runtime alone fits the machine below, not both at once
    preload = RunnerPreload(first, parameters)
    alone = max(ref.info.runtime_memory(parameters) for ref in (first, other)) + BASE_MEMORY_BYTES
    both = first.info.runtime_memory(parameters) + other.info.runtime_memory(parameters) + BASE_MEMORY_BYTES
    assert alone < both
    monkeypatch.setattr("sovpack.bundle.preload.machine_memory", lambda: int(both / MEMORY_SHARE) + 1)
    assert preload.fits_beside(other)
    monkeypatch.setattr("sovpack.bundle.preload.machine_memory", lambda: int(alone / MEMORY_SHARE) + 1)
    assert not preload.fits_beside(other)
