"""The plug-in contract, parametrised over everything registered: families x targets x precisions.

A family or format added halfway (no fixture, no precision row, a target that neither writes a family nor
refuses it by name) fails here instead of silently defaulting somewhere downstream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.encoders import ENCODER_VARIANTS
from fixtures.variants import VARIANTS
from sovpack._protocols import Precision
from sovpack.bundle.modelpack import modelpack_precision
from sovpack.convert import convert
from sovpack.converters import FAMILIES, load_families
from sovpack.errors import ConversionError
from sovpack.parity.thresholds import Thresholds
from sovpack.source.model import open_model
from sovpack.targets import TARGETS, TargetRef, load_targets

load_families()
load_targets()

FAMILY_NAMES = FAMILIES.names()
TARGET_NAMES = TARGETS.names()
# ModelPack's precision vocabulary for weights (model-spec config.precision), plus the integer widths of K-quants.
MODELPACK_WEIGHTS = {"float32", "float16", "bfloat16", "int8", "int6", "int5", "int4"}


def _variant_for(family: str) -> str:
    """The first fixture variant of a family (decoder or encoder): every registered family must have one."""
    every = {**VARIANTS, **ENCODER_VARIANTS}
    names = sorted(name for name, v in every.items() if v.family == family)
    if not names:
        pytest.fail(f"family {family!r} is registered but fixtures/ has no variant for it")
    return names[0]


@pytest.fixture(scope="module")
def family_checkpoints(checkpoints: dict[str, Path], encoder_checkpoints: dict[str, Path]) -> dict[str, Path]:
    """Fixture checkpoints of decoders and encoders by variant name."""
    return {**checkpoints, **encoder_checkpoints}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_has_a_fixture_that_opens_as_itself(family: str, family_checkpoints: dict[str, Path]) -> None:
    model = open_model(family_checkpoints[_variant_for(family)])
    assert model.spec.family == family
    assert FAMILIES.get(family).architectures, f"{family} names no architectures"


@pytest.mark.parametrize("fmt", TARGET_NAMES)
def test_target_declares_its_contract(fmt: str) -> None:
    target = TARGETS.get(fmt)
    assert target.name == fmt
    assert target.default_precision in target.precisions
    assert target.runtime_packages, f"{fmt} lists no runtime packages for provenance"
    assert target.families <= set(FAMILY_NAMES), f"{fmt} claims unknown families"
    assert target.families, f"{fmt} writes no family"
    names = [alias for row in target.precisions.values() for alias in (row.name, *row.aliases)]
    assert len(names) == len(set(names)), f"{fmt}: a precision name or alias is listed twice"


@pytest.mark.parametrize(
    ("fmt", "precision"), [(t, p) for t in TARGET_NAMES for p in TARGETS.get(t).precisions]
)
def test_every_precision_row_is_complete(fmt: str, precision: str) -> None:
    row = TARGETS.get(fmt).precisions[precision]
    assert isinstance(row, Precision) and row.name == precision
    assert isinstance(row.thresholds, Thresholds)
    assert row.weights in MODELPACK_WEIGHTS
    assert row.quantized == row.weights.startswith("int")
    if row.quantized:
        assert row.thresholds.max_abs is None  # quantized weights are judged by distributions, not max |d|
    ref = TargetRef.parse(f"{fmt}:{precision}")
    assert ref.info is row and ref.thresholds() == row.thresholds
    for alias in row.aliases:
        assert TargetRef.parse(f"{fmt}:{alias}") == ref
    stored = "uint8" if row.weights == "int4" else row.weights  # ModelPack's table has no 4-bit type
    assert modelpack_precision(row) == (stored, precision if row.quantized else None)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "family"), [(t, f) for t in TARGET_NAMES for f in FAMILY_NAMES])
def test_every_target_writes_or_refuses_every_family(
    fmt: str, family: str, family_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """At its default precision each target writes each family with parity PASSED, or refuses it by name."""
    target = TARGETS.get(fmt)
    model = open_model(family_checkpoints[_variant_for(family)])
    ref = TargetRef(format=fmt, precision=target.default_precision)
    if family not in target.families:
        with pytest.raises(ConversionError, match=f"cannot write model family '{family}'"):
            convert(model, ref, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    result = convert(model, ref, tmp_path / "out")
    assert result.parity is not None and result.parity.status in ("PASSED", "WARNED"), result.parity
    assert result.metadata.spec.family == family
