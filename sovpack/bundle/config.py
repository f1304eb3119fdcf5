"""``sovpack.toml``: a release pipeline's build options in one reviewed file instead of a long command line.

Example (every key optional; command-line flags win over the file; relative paths are relative to the
file's directory)::

    checkpoint = "fixtures/tiny-llama3"
    output = "dist/tiny-llama3.oci"
    tag = "v0.1.0"
    sequence = 7                            # release sequence number: verify policies refuse older ones
    expires = "2027-12-31T00:00:00Z"        # optional: verify refuses the release after this time
    targets = ["onnx:fp16", "gguf:q8_0", "openvino:fp16"]

    [signing]
    key = "keys/private.pem"
    password_env = "SOVPACK_KEY_PASSWORD"   # or password_file = "..."

    [metadata]
    name = "tiny-llama3"
    version = "0.1.0"
    licenses = ["Apache-2.0"]               # or license = "Apache-2.0"

    [quantization]                          # options of every 4-bit target (see `sovpack convert --help`)
    method = "gptq"                         # auto (default), rtn, weighted, gptq, awq
    calibration = "calibration/domain.txt"  # UTF-8 text; default: the built-in corpus
    int8_share = 0.25

    [quantization.targets."gguf:int4"]     # one target's options, on top of the above
    method = "weighted"                     # llama.cpp's quantizer takes an importance matrix, not GPTQ

    [parity]
    prompts = ["The capital of France is"]  # replaces the built-in prompts
    thresholds = { mean_kl = 0.004 }        # overrides for every target ("none" switches a metric off)

    [parity.targets."gguf:q8_0"]            # overrides for one target, on top of the above
    min_greedy = 0.6

The JSON form of the file is described by ``schemas/bundle-config.schema.json``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovpack._io import read_capped
from sovpack.errors import UsageError
from sovpack.quantize.options import QuantOptions

DEFAULT_TAG = "latest"
MAX_CONFIG_BYTES = 1024 * 1024
METADATA_KEYS = (
    "name",
    "version",
    "licenses",
    "authors",
    "vendor",
    "title",
    "description",
    "doc_url",
    "source_url",
    "revision",
)

Overrides = dict[str, float | bool | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class BundleMetadata:
    """Descriptive metadata; it lands in the ModelPack config ``descriptor`` of every target."""

    name: str | None = None
    version: str | None = None
    licenses: tuple[str, ...] = ()
    authors: tuple[str, ...] = ()
    vendor: str | None = None
    title: str | None = None
    description: str | None = None
    doc_url: str | None = None
    source_url: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key in METADATA_KEYS:
            value = getattr(self, key)
            if value:
                data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BundleMetadata:
        values = dict(data)
        license_ = values.pop("license", None)
        if license_ is not None:
            values["licenses"] = [license_, *values.get("licenses", [])]
        for key in ("licenses", "authors"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key])
        return cls(**values)

    def merged(self, other: BundleMetadata) -> BundleMetadata:
        """``other``'s set fields win."""
        updates = {k: getattr(other, k) for k in METADATA_KEYS if getattr(other, k)}
        return dataclasses.replace(self, **updates)


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildConfig:
    """Build options, from a sovpack.toml and/or the command line."""

    checkpoint: Path | None = None
    output: Path | None = None
    tag: str = DEFAULT_TAG
    sequence: int = 0
    expires: str | None = None
    targets: tuple[str, ...] = ()
    key: Path | None = None
    password_file: Path | None = None
    password_env: str | None = None
    prompts: tuple[str, ...] = ()
    thresholds: Mapping[str, float | bool | None] = field(default_factory=dict)
    target_thresholds: Mapping[str, Mapping[str, float | bool | None]] = field(default_factory=dict)
    allow_nonfinite: bool = False
    metadata: BundleMetadata = field(default_factory=BundleMetadata)
    quantization: QuantOptions | None = None  # None: the defaults of ``-t FORMAT:int4``
    target_quantization: Mapping[str, QuantOptions] = field(default_factory=dict)

    def overrides_for(self, target: str) -> Overrides:
        """Threshold overrides for one target: the global ones, then the target's own."""
        return {**self.thresholds, **self.target_thresholds.get(target, {})}

    def quantization_for(self, target: str) -> QuantOptions | None:
        """One target's 4-bit options: its own table over the build's (None: the defaults)."""
        return self.target_quantization.get(target, self.quantization)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-equivalent document (the schema's shape); None fields are left out."""
        doc: dict[str, Any] = {"tag": self.tag, "targets": list(self.targets)}
        if self.sequence:
            doc["sequence"] = self.sequence
        if self.expires is not None:
            doc["expires"] = self.expires
        if self.checkpoint is not None:
            doc["checkpoint"] = str(self.checkpoint)
        if self.output is not None:
            doc["output"] = str(self.output)
        if self.allow_nonfinite:
            doc["allow_nonfinite"] = True
        signing = {
            k: str(v)
            for k, v in (("key", self.key), ("password_file", self.password_file), ("password_env", self.password_env))
            if v is not None
        }
        if signing:
            doc["signing"] = signing
        metadata = self.metadata.to_dict()
        if metadata:
            doc["metadata"] = metadata
        if self.quantization is not None or self.target_quantization:
            quant = _quantization_to_doc(self.quantization)
            if self.target_quantization:
                quant["targets"] = {t: _quantization_to_doc(q) for t, q in self.target_quantization.items()}
            doc["quantization"] = quant
        parity: dict[str, Any] = {}
        if self.prompts:
            parity["prompts"] = list(self.prompts)
        if self.thresholds:
            parity["thresholds"] = _thresholds_to_doc(self.thresholds)
        if self.target_thresholds:
            parity["targets"] = {t: _thresholds_to_doc(v) for t, v in self.target_thresholds.items()}
        if parity:
            doc["parity"] = parity
        return doc

    @classmethod
    def from_dict(
        cls, doc: Mapping[str, Any], base_dir: Path | None = None, source: str = "build config"
    ) -> BuildConfig:
        """Build from the JSON-equivalent document (validated first); relative paths join ``base_dir``."""
        from jsonschema import ValidationError

        from sovpack._schemas import validate

        try:
            validate(dict(doc), "bundle-config")
        except ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise UsageError(f"{source}: invalid at {path}: {e.message}") from None

        def resolve(value: str | None) -> Path | None:
            if value is None:
                return None
            path = Path(value)
            return path if path.is_absolute() or base_dir is None else base_dir / path

        signing = doc.get("signing", {})
        parity = doc.get("parity", {})
        quantization = doc.get("quantization", {})
        return cls(
            checkpoint=resolve(doc.get("checkpoint")),
            output=resolve(doc.get("output")),
            tag=str(doc.get("tag", DEFAULT_TAG)),
            sequence=int(doc.get("sequence", 0)),
            expires=doc.get("expires"),
            targets=tuple(doc.get("targets", ())),
            key=resolve(signing.get("key")),
            password_file=resolve(signing.get("password_file")),
            password_env=signing.get("password_env"),
            prompts=tuple(parity.get("prompts", ())),
            thresholds=_thresholds_from_doc(parity.get("thresholds", {})),
            target_thresholds={t: _thresholds_from_doc(v) for t, v in parity.get("targets", {}).items()},
            allow_nonfinite=bool(doc.get("allow_nonfinite", False)),
            metadata=BundleMetadata.from_dict(doc.get("metadata", {})),
            quantization=(_quantization_from_doc(quantization, None, resolve)
                          if set(quantization) - {"targets"} else None),
            target_quantization={
                target: _quantization_from_doc(quantization, table, resolve)
                for target, table in quantization.get("targets", {}).items()
            },
        )


def _quantization_from_doc(common: Mapping[str, Any], own: Mapping[str, Any] | None,
                           resolve: Callable[[str | None], Path | None]) -> QuantOptions:
    """QuantOptions from the [quantization] table and (for one target) its own table on top."""
    values = {k: v for k, v in common.items() if k != "targets"}
    values.update(own or {})
    if "calibration" in values:
        values["calibration"] = resolve(values["calibration"])
    return QuantOptions(**values)


def _quantization_to_doc(options: QuantOptions | None) -> dict[str, Any]:
    if options is None:
        return {}
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()
            if v is not None}


def _thresholds_from_doc(doc: Mapping[str, Any]) -> Overrides:
    """TOML has no null: the strings "none"/"off" switch a metric off."""
    return {k: None if isinstance(v, str) else v for k, v in doc.items()}


def _thresholds_to_doc(values: Mapping[str, float | bool | None]) -> dict[str, Any]:
    return {k: "none" if v is None else v for k, v in values.items()}


def load_build_config(path: str | Path) -> BuildConfig:
    """Read and validate a sovpack.toml."""
    path = Path(path)
    text = read_capped(path, MAX_CONFIG_BYTES, error=UsageError)
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from e
    return BuildConfig.from_dict(doc, base_dir=path.parent, source=str(path))
