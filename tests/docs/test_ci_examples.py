"""The CI examples in docs/ci/ stay runnable: each is parsed as its CI system would and its commands are run here.

Against a real Distribution registry on loopback with TLS (a private CA, trusted the standard way through
``SSL_CERT_FILE``) and htpasswd auth (credentials through ``SOVPACK_REGISTRY_USERNAME``/``_PASSWORD``, as the
examples pass them), every job is run in dependency order, each in its own fresh workspace as a runner would
be, with its matrix entries one after another. Skipped: installing sovpack and downloading the checkpoint
(network); the committed llama3 fixture stands in for the checkpoint, and because its random weights fail
4-bit parity by nature, each 4-bit target is built at the float precision of its format instead (the only
substitution). The examples' own last step verifies the assembled release; the test checks it too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sovpack.attest.dsse import VerifyingKey, generate_key_pair
from sovpack.transport import Reference, RegistryLayout, RegistryOptions
from sovpack.verify import verify_bundle
from tests.transport.registry_harness import CHECKPOINT, bcrypt_hash, make_ca, running_registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "ci"
FIXTURE_TARGETS = {"onnx:int4": "onnx:fp32", "gguf:q4_k_m": "gguf:f16", "openvino:int4": "openvino:fp32"}
NETWORK_STEPS = {"install", "checkpoint"}
USER, PASSWORD = "ci", "release-pipeline"
EXPRESSION = re.compile(r"\$\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("docker-registry") is None and shutil.which("registry") is None:
        pytest.skip("needs docker-registry")
    root = tmp_path_factory.mktemp("ci-examples")
    ca = make_ca(root / "ca")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
    keys = generate_key_pair(root / "keys")
    with running_registry(root / "registry", tls=ca, htpasswd=htpasswd) as registry:
        yield {"root": root, "registry": registry, "keys": keys, "ca": ca.ca_cert}


def _base_env(site: Mapping[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOVPACK_REGISTRY_", "GITHUB_", "CI_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `sovpack` command
    env["SSL_CERT_FILE"] = str(site["ca"])
    return env


def _workspace(site: Mapping[str, Any], name: str) -> Path:
    """A fresh runner workspace: the repository's committed public key and the fetched checkpoint."""
    workspace = site["root"] / "runs" / name
    (workspace / "keys").mkdir(parents=True)
    shutil.copyfile(site["keys"].public_key, workspace / "keys" / "public.pem")
    shutil.copytree(CHECKPOINT, workspace / "checkpoint")
    return workspace


def _run(script: str, env: Mapping[str, str], cwd: Path, where: str) -> None:
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=cwd, env=dict(env), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{where}: {script}\n{done.stdout}\n{done.stderr}"


def _in_order(jobs: Mapping[str, Any], needs: Any) -> list[str]:
    """Job names so every job comes after the jobs it needs."""
    ordered: list[str] = []
    while len(ordered) < len(jobs):
        ready = [name for name in jobs if name not in ordered and all(n in ordered for n in needs(name))]
        assert ready, f"a cycle in needs among {sorted(set(jobs) - set(ordered))}"
        ordered.extend(ready)
    return ordered


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _assembled_release_verifies(site: Mapping[str, Any], bundle: str) -> None:
    options = RegistryOptions(ca_file=site["ca"], creds=f"{USER}:{PASSWORD}")
    report = verify_bundle(RegistryLayout(Reference.parse(f"docker://{bundle}"), options),
                           keys=[VerifyingKey.load(site["keys"].public_key)])
    assert report.ok, report.failures
    assert [t.name for t in report.targets] == ["onnx:fp32", "gguf:f16", "openvino:fp32"]
    assert report.release is not None and {t.part.tag for t in report.release.targets if t.part} == {
        "1.0-onnx", "1.0-gguf", "1.0-openvino"}


# ------------------------------------------------------------------------------------------- GitHub Actions


def test_github_actions_example(site: dict[str, Any]) -> None:
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    jobs = workflow["jobs"]
    assert set(jobs) == {"reference", "parts", "assemble"}
    repository = f"{site['registry'].host}/models/gh"
    context = {
        "inputs.version": "1.0",
        "secrets.SOVPACK_SIGNING_KEY": site["keys"].private_key.read_text(),
        "secrets.REGISTRY_USERNAME": USER,
        "secrets.REGISTRY_PASSWORD": PASSWORD,
    }

    def evaluate(value: Any, matrix: Mapping[str, str]) -> str:
        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("matrix."):
                return matrix[name.removeprefix("matrix.")]
            assert name in context, f"the example uses ${{{{ {name} }}}}, which this test does not provide"
            return context[name]

        return EXPRESSION.sub(lookup, str(value))

    for name in _in_order(jobs, lambda n: _listed(jobs[n].get("needs"))):
        job = jobs[name]
        entries = job.get("strategy", {}).get("matrix", {}).get("include") or [{}]
        for entry in entries:
            matrix = {k: str(v) for k, v in entry.items()}
            env = _base_env(site)
            env.update({k: evaluate(v, matrix) for k, v in workflow["env"].items()})
            env["BUNDLE"] = repository  # "set this to your registry"
            env.update({k: evaluate(v, matrix) for k, v in (job.get("env") or {}).items()})
            if "TARGET" in env:
                env["TARGET"] = FIXTURE_TARGETS[env["TARGET"]]
            workspace = _workspace(site, f"gh-{name}-{matrix.get('part', 'main')}")
            for step in job["steps"]:
                if "run" not in step or step.get("id") in NETWORK_STEPS:
                    continue
                _run(evaluate(step["run"], matrix), {**env, **(step.get("env") or {})}, workspace,
                     f"job {name} {matrix} step {step.get('id')}")
    _assembled_release_verifies(site, f"{repository}:1.0")


# ------------------------------------------------------------------------------------------------ GitLab CI


def test_gitlab_ci_example(site: dict[str, Any]) -> None:
    pipeline = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    stages = pipeline["stages"]
    jobs = {k: v for k, v in pipeline.items() if isinstance(v, dict) and "script" in v and not k.startswith(".")}
    assert set(jobs) == {"reference", "parts", "assemble"}
    predefined = {
        "CI_REGISTRY_IMAGE": f"{site['registry'].host}/group/project",
        "CI_COMMIT_TAG": "1.0",
        "CI_REGISTRY_USER": USER,
        "CI_REGISTRY_PASSWORD": PASSWORD,
        "SOVPACK_SIGNING_KEY": str(site["keys"].private_key),  # a "File" variable: the path of its contents
    }

    def needs(name: str) -> list[str]:
        earlier = [n for n in jobs if stages.index(jobs[n]["stage"]) < stages.index(jobs[name]["stage"])]
        return _listed(jobs[name].get("needs")) or earlier

    for name in _in_order(jobs, needs):
        job = jobs[name]
        entries = (job.get("parallel") or {}).get("matrix") or [{}]
        for entry in entries:
            assert all(isinstance(v, str) for v in entry.values()), "only scalar matrix values are run here"
            variables = {**pipeline["variables"], **(job.get("variables") or {}), **entry}
            # GitLab expands $VARIABLES inside variable values: bash does the same, in definition order
            exports = "".join(f'export {k}="{v}"\n' for k, v in variables.items())
            exports += f'export TARGET="{FIXTURE_TARGETS[variables["TARGET"]]}"\n' if "TARGET" in variables else ""
            workspace = _workspace(site, f"gl-{name}-{entry.get('PART', 'main')}")
            env = {**_base_env(site), **predefined}
            for line in job["script"]:
                _run(exports + line, env, workspace, f"job {name} {entry}")
    _assembled_release_verifies(site, f"{predefined['CI_REGISTRY_IMAGE']}/llama-3-8b-instruct:1.0")
