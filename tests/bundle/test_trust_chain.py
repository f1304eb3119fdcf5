"""The trust chain against an attacker with write access to a mirror but no signing key (issues 11 and 12).

Every attack re-chains digests (edited manifests are stored under their new digests, the bundle index and
index.json are rewritten to point at them), so only signatures can catch it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fixtures.generate import make_checkpoint
from sovpack.attest.dsse import SigningKey, VerifyingKey, generate_key_pair
from sovpack.bundle import BuildConfig, BundleMetadata, build_bundle
from sovpack.cli import cli
from sovpack.errors import UsageError, VerificationError
from sovpack.verify import Policy, extract_target, inspect_bundle, recheck_parity, verify_bundle, verify_with_policy

TARGETS = ("onnx:fp32", "gguf:f16")


class Tamper:
    """Raw access to a bundle copy: blobs by digest, the bundle index, index.json."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def json(self, digest: str) -> Any:
        return json.loads(self.blob(digest).read_bytes())

    def put(self, doc: Any) -> tuple[str, int]:
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    @property
    def top(self) -> dict[str, Any]:
        return dict(json.loads((self.root / "index.json").read_text()))

    @property
    def index(self) -> dict[str, Any]:
        return dict(self.json(self.top["manifests"][0]["digest"]))

    def set_index(self, doc: dict[str, Any], tag: str | None = None) -> None:
        digest, size = self.put(doc)
        top = self.top
        top["manifests"][0].update(digest=digest, size=size)
        if tag is not None:
            top["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = tag
        (self.root / "index.json").write_text(json.dumps(top))

    def entries_of(self, target: str) -> list[dict[str, Any]]:
        """A target's manifest entry and its attestation entries in the bundle index."""
        return [e for e in self.index["manifests"] if e.get("annotations", {}).get("dev.sovpack.target") == target]

    def import_blobs(self, other: Path) -> None:
        for blob in (other / "blobs" / "sha256").iterdir():
            dest = self.root / "blobs" / "sha256" / blob.name
            if not dest.exists():
                shutil.copyfile(blob, dest)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trust-keys")
    pairs = {name: generate_key_pair(root / name) for name in ("release", "second", "third")}
    return {
        **{f"{n}_signing": SigningKey.load(p.private_key) for n, p in pairs.items()},
        **{f"{n}_public": p.public_key for n, p in pairs.items()},
        **{f"{n}_private": p.private_key for n, p in pairs.items()},
        "verifying": VerifyingKey.load(pairs["release"].public_key),
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> dict[str, Path]:
    """current: tag 1.0, sequence 2; old: an earlier revision (other chat template, same weights), tag 0.9,
    sequence 1, with an extra looser experimental gguf:q4_0."""
    root = tmp_path_factory.mktemp("trust")
    current = make_checkpoint("llama3", root / "ckpt-current")
    old = make_checkpoint("llama3", root / "ckpt-old")
    (old / "chat_template.jinja").write_text("{{ 'OLD TEMPLATE' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    out = {}
    for name, ckpt, tag, sequence, targets, target_thresholds in (
        ("current", current, "1.0", 2, TARGETS, {}),
        ("old", old, "0.9", 1, (*TARGETS, "gguf:q4_0"),
         {"gguf:q4_0": {"mean_kl": 5.0, "max_rel": None, "min_top1": 0.0, "min_greedy": 0.0}}),
    ):
        config = BuildConfig(
            checkpoint=ckpt, output=root / name, tag=tag, sequence=sequence, targets=targets,
            target_thresholds=target_thresholds, metadata=BundleMetadata(name="tiny", licenses=("Apache-2.0",)),
        )
        build_bundle(config, key=keys["release_signing"])
        out[name] = root / name
    return out


def _copy(bundles: dict[str, Path], name: str, dest: Path) -> Tamper:
    shutil.copytree(bundles[name], dest)
    return Tamper(dest)


def _failures(path: Path, keys: dict[str, Any], **kwargs: Any) -> str:
    report = verify_bundle(path, keys=[keys["verifying"]], **kwargs)
    assert not report.ok, "verification unexpectedly passed"
    return "\n".join(report.failures)


def test_the_untouched_bundles_verify(bundles: dict[str, Path], keys: dict[str, Any]) -> None:
    report = verify_bundle(bundles["current"], keys=[keys["verifying"]])
    assert report.ok, report.failures
    assert report.release is not None and (report.release.tag, report.release.sequence) == ("1.0", 2)
    lenient = Policy(parity_limits={"q4_0": {"mean_kl": 5.0, "max_rel": None, "min_top1": 0.0, "min_greedy": 0.0}})
    assert verify_bundle(bundles["old"], keys=[keys["verifying"]], policy=lenient).ok


def test_chimera_target_spliced_from_another_signed_build_is_refused(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    """The old build's gguf:f16 (old chat template) with its three valid attestations replaces the current one."""
    bundle = _copy(bundles, "current", tmp_path / "chimera")
    bundle.import_blobs(bundles["old"])
    old_entries = Tamper(bundles["old"]).entries_of("gguf:f16")
    index = bundle.index
    index["manifests"] = [
        e for e in index["manifests"] if e.get("annotations", {}).get("dev.sovpack.target") != "gguf:f16"
    ] + old_entries
    bundle.set_index(index)
    message = _failures(bundle.root, keys)
    assert "target gguf:f16" in message and "is not part of the signed release" in message
    assert "not the one the release signed" in message
    with pytest.raises(VerificationError, match="verification failed"):
        extract_target(bundle.root, "gguf:f16", tmp_path / "out", keys=[keys["verifying"]])
    assert not (tmp_path / "out").exists()


def test_added_target_from_another_build_is_refused(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    bundle = _copy(bundles, "current", tmp_path / "added")
    bundle.import_blobs(bundles["old"])
    index = bundle.index
    index["manifests"] += Tamper(bundles["old"]).entries_of("gguf:q4_0")
    index["annotations"]["dev.sovpack.targets"] += ",gguf:q4_0"
    bundle.set_index(index)
    message = _failures(bundle.root, keys)
    assert "target gguf:q4_0" in message and "not part of the signed release" in message
    assert "dev.sovpack.targets says" in message


def test_removed_target_is_refused(bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path) -> None:
    bundle = _copy(bundles, "current", tmp_path / "removed")
    index = bundle.index
    index["manifests"] = [
        e for e in index["manifests"] if e.get("annotations", {}).get("dev.sovpack.target") != "gguf:f16"
    ]
    bundle.set_index(index)
    assert "target gguf:f16 of the signed release is missing" in _failures(bundle.root, keys)


def test_forged_bundle_metadata_is_refused_and_never_reported_as_signed(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    bundle = _copy(bundles, "current", tmp_path / "forged")
    index = bundle.index
    index["annotations"].update({
        "org.opencontainers.image.title": "trusted-model",
        "org.opencontainers.image.licenses": "MIT",
        "org.opencontainers.image.version": "9.9",
    })
    bundle.set_index(index)
    message = _failures(bundle.root, keys)
    assert "org.opencontainers.image.title says 'trusted-model'" in message
    assert "org.opencontainers.image.licenses says 'MIT'" in message
    info = inspect_bundle(bundle.root, keys=[keys["verifying"]])
    assert info["signed"]["name"] == "tiny" and info["signed"]["licenses"] == ["Apache-2.0"]
    assert info["unsigned"]["name"] == "trusted-model" and not info["signatures_verified"]
    unsigned = inspect_bundle(bundle.root)
    assert unsigned["name"] is None and unsigned["signed"] is None  # nothing unverified is reported as a fact


def test_old_release_retagged_as_new_is_refused(bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path) -> None:
    """Freeze/rollback: the 0.9 bundle with only index.json's tag edited to 1.0 (and 2.0)."""
    bundle = _copy(bundles, "old", tmp_path / "rollback")
    top = bundle.top
    top["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "2.0"
    (bundle.root / "index.json").write_text(json.dumps(top))
    policy = Policy.from_dict({"tag": "2.0"})
    report = verify_with_policy(bundle.root, key_paths=[keys["release_public"]], policy=policy)
    message = "\n".join(report.failures)
    assert "tagged '2.0' here but was signed as '0.9'" in message
    assert "the signed tag is '0.9', the policy requires '2.0'" in message


def test_minimum_sequence_index_pin_and_trust_state(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    key = [keys["release_public"]]
    lenient = {"parity_limits": {"q4_0": {"mean_kl": 5.0, "max_rel": None, "min_top1": 0.0, "min_greedy": 0.0}}}
    minimum = Policy.from_dict({**lenient, "min_sequence": 2})
    old_report = verify_with_policy(bundles["old"], key_paths=key, policy=minimum)
    assert "sequence 1 is older than the policy's minimum 2" in "\n".join(old_report.failures)
    current = verify_with_policy(bundles["current"], key_paths=key)
    pinned = Policy.from_dict({**lenient, "index_digest": current.index_digest})
    assert verify_with_policy(bundles["current"], key_paths=key, policy=pinned).ok
    assert "the policy pins" in "\n".join(verify_with_policy(bundles["old"], key_paths=key, policy=pinned).failures)

    state = tmp_path / "trust.json"
    assert verify_with_policy(bundles["current"], key_paths=key, trust_state=state).ok
    assert json.loads(state.read_text())["bundles"]["tiny"]["sequence"] == 2
    rolled_back = verify_with_policy(bundles["old"], key_paths=key, policy=Policy.from_dict(lenient), trust_state=state)
    assert "rollback: release sequence 1 of 'tiny' is older than sequence 2" in "\n".join(rolled_back.failures)
    assert json.loads(state.read_text())["bundles"]["tiny"]["sequence"] == 2  # a refused release is not recorded


def test_attestations_by_different_keys_and_key_roles(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    """Three trusted keys each signing one attestation of a target is 'signed by none'; roles restrict kinds."""
    from sovpack.attest.dsse import SigstoreBundle

    bundle = _copy(bundles, "current", tmp_path / "mixed")
    index = bundle.index
    resigned = {"provenance": keys["second_signing"], "parity": keys["third_signing"]}
    for entry in index["manifests"]:
        ann = entry.get("annotations", {})
        if ann.get("dev.sovpack.target") != "onnx:fp32" or ann.get("dev.sovpack.attestation") not in resigned:
            continue
        manifest = bundle.json(entry["digest"])
        statement = SigstoreBundle.from_bytes(bundle.blob(manifest["layers"][0]["digest"]).read_bytes())
        signed = SigstoreBundle.sign(statement.envelope.statement(), resigned[ann["dev.sovpack.attestation"]])
        data = signed.to_bytes()
        layer_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        bundle.blob(layer_digest).write_bytes(data)
        manifest["layers"][0].update(digest=layer_digest, size=len(data))
        entry["digest"], entry["size"] = bundle.put(manifest)
    bundle.set_index(index)
    all_keys = [VerifyingKey.load(keys[f"{n}_public"]) for n in ("release", "second", "third")]
    report = verify_bundle(bundle.root, keys=all_keys)
    message = "\n".join(report.failures)
    assert "target onnx:fp32: no single trusted key signed all of its attestations" in message
    roles = Policy.from_dict({"key_roles": {"parity": [str(keys["release_public"])]}})
    untouched = verify_bundle(bundles["current"], keys=all_keys, policy=roles)
    assert untouched.ok, untouched.failures
    strict = Policy.from_dict({"key_roles": {"release": [str(keys["second_public"])]}})
    refused = verify_bundle(bundles["current"], keys=all_keys, policy=strict)
    assert "does not allow to sign release statements" in "\n".join(refused.failures)


def test_loosened_parity_limits_are_not_the_policys_passed(bundles: dict[str, Path], keys: dict[str, Any]) -> None:
    report = verify_bundle(bundles["old"], keys=[keys["verifying"]])
    message = "\n".join(report.failures)
    assert "target gguf:q4_0: parity was judged with looser limits than the policy allows" in message
    assert "mean_kl 5.0 (allowed at most 0.2)" in message


def test_flags_only_narrow_a_policy_and_private_keys_are_refused(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"keys": [str(keys["release_public"])], "tag": "1.0"}))
    runner = CliRunner()
    widen = runner.invoke(cli, ["verify", str(bundles["current"]), "--policy", str(policy_file),
                                "--key", str(keys["second_public"])])
    assert widen.exit_code == 2 and "not among the policy's keys" in widen.output
    retag = runner.invoke(cli, ["verify", str(bundles["current"]), "--policy", str(policy_file), "--tag", "0.9"])
    assert retag.exit_code == 2 and "contradicts the policy's tag" in retag.output
    ok = runner.invoke(cli, ["verify", str(bundles["current"]), "--policy", str(policy_file)])
    assert ok.exit_code == 0, ok.output
    private = runner.invoke(cli, ["verify", str(bundles["current"]), "--key", str(keys["release_private"])])
    assert private.exit_code == 2 and "is a private key" in private.output


def test_parity_without_a_key_refuses_or_says_nothing_was_verified(
    bundles: dict[str, Path], keys: dict[str, Any]
) -> None:
    with pytest.raises(UsageError, match=r"pass --key PUB\.pem to verify it first"):
        recheck_parity(bundles["current"], targets=["onnx:fp32"])
    runner = CliRunner()
    result = runner.invoke(cli, ["parity", str(bundles["current"]), "-t", "onnx:fp32", "--insecure", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (target,) = data["targets"]
    assert target["signature_verified"] is False and target["signed_status"] is None
    text = runner.invoke(cli, ["parity", str(bundles["current"]), "-t", "onnx:fp32", "--insecure"])
    assert "UNVERIFIED" in text.output and "(signed" not in text.output


def test_reference_blobs_swapped_after_verification_are_never_used(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time-of-check/time-of-use: reference logits replaced right after verification are caught, not loaded."""
    import sovpack.verify.extract as extract_module

    bundle = _copy(bundles, "current", tmp_path / "toctou")
    real = extract_module.verify_view

    def verify_then_swap(*args: Any, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)
        for blob in (bundle.root / "blobs" / "sha256").iterdir():
            if blob.read_bytes()[:6] == b"\x93NUMPY":  # every stored logits array
                data = bytearray(blob.read_bytes())
                data[-4:] = b"\x00\x00\x80\x7f"  # the last logit becomes +inf
                blob.write_bytes(bytes(data))
        return report

    monkeypatch.setattr(extract_module, "verify_view", verify_then_swap)
    with pytest.raises(VerificationError, match="changed while copying"):
        recheck_parity(bundle.root, targets=["onnx:fp32"], keys=[keys["verifying"]])


def test_run_on_a_signed_directory_verifies_before_loading(
    bundles: dict[str, Path], keys: dict[str, Any], tmp_path: Path
) -> None:
    from sovpack.run import run

    out = extract_target(bundles["current"], "gguf:f16", tmp_path / "deploy", keys=[keys["verifying"]]).out_dir
    verified = run(out, ids=[1, 2, 3], max_new_tokens=2, keys=[keys["verifying"]])
    assert verified.verified is True and len(verified.generated_ids) == 2
    gguf = next(out.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"does not match model\.sig"):
        run(out, ids=[1, 2, 3], max_new_tokens=2, keys=[keys["verifying"]])
    unverified = run(out, ids=[1, 2, 3], max_new_tokens=2)  # no key: runs, and says so
    assert unverified.verified is False
    with pytest.raises(UsageError, match="--insecure"):
        run(bundles["current"], target="onnx:fp32", ids=[1, 2], max_new_tokens=1)
    assert run(bundles["current"], target="onnx:fp32", ids=[1, 2], max_new_tokens=1, insecure=True).verified is False
