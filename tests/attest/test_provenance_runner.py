"""Provenance says which runner checked a part: host, OS, CPU model and the CPU features numerics depend on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovpack.attest.provenance import runner_facts

X86 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 amx_tile amx_bf16 hypervisor
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes asimdhp asimddp i8mm bf16 sve
CPU implementer\t: 0x41
"""


def test_x86_features_are_the_numeric_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86 + X86)  # every core repeats them
    monkeypatch.setenv("RUNNER_NAME", "gh-runner-7")
    facts = runner_facts(cpuinfo)
    assert facts["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert facts["cpuFeatures"] == ["amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512f", "f16c", "fma",
                                    "sse4_2"]
    assert facts["ciRunner"] == "gh-runner-7" and facts["host"] and facts["cpuCount"] >= 1


def test_arm_features_and_a_missing_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUNNER_NAME", "CI_RUNNER_DESCRIPTION", "SOVPACK_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(ARM)
    assert runner_facts(cpuinfo)["cpuFeatures"] == ["asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve"]
    facts = runner_facts(tmp_path / "absent")  # e.g. macOS: no /proc
    assert facts["cpuFeatures"] == [] and facts["cpu"] and "ciRunner" not in facts
