"""sovpack next to the peer converters, on the same synthetic float16 checkpoint and the same measurement.

Pairs (peer first, then sovpack with parity off, each in a fresh process measured by ``_common.measure``):

- llama.cpp's ``convert_hf_to_gguf.py`` at f16 and q8_0 vs ``sovpack convert -t gguf:f16`` / ``gguf:q8_0``.
  The script comes from the llama-cpp-python source distribution of the installed version, downloaded with
  pip at run time and unpacked into the work directory (never into this repository). llama.cpp identifies a
  BPE tokenizer by hashing how it splits a test text; the synthetic checkpoint carries the llama3 fixture's
  small tokenizer, which no table knows, so the run patches that lookup to answer ``llama-bpe`` (the fixture
  uses Llama 3's pre-tokenizer), and the table says so.
- ``optimum-cli export onnx`` (optimum-onnx, float32, with KV cache) vs ``sovpack convert -t onnx:fp32``.
  optimum-cli always validates the export on ONNX Runtime afterwards; it has no switch to skip that, so a
  second row calls its ``main_export(..., do_validation=False)``.
- ``optimum-cli export openvino --weight-format fp16`` (optimum-intel) vs ``sovpack convert -t openvino:fp16``.

Columns: wall time of the whole process, its peak RSS (``os.wait4``; this counts the touched pages of a
memory-mapped checkpoint, which are reclaimable page cache), its peak anonymous RSS (sampled) and the size of
what it wrote. The checkpoint is in the page cache for every run.

The peers need transformers 4 while this venv has transformers 5, so they are installed into a venv of
their own (``--peer-env``, created on first use and reused), with torch, numpy, onnx, onnxruntime, openvino,
openvino-tokenizers and nncf pinned to this venv's versions. A peer that cannot be installed or fails gets
a row saying why, never a number.

Usage: python benchmarks/peers.py [--size-gb 1.0] [--peer-env DIR] [--only gguf --only onnx ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from _common import add_checkpoint_args, checkpoint_from_args, dir_size, measure, mib, print_table, work_dir

DEFAULT_PEER_ENV = Path.home() / ".cache" / "sovpack-benchmarks" / "peer-venv"
# Packages both sides use, pinned in the peer venv to the versions this venv has.
SHARED = ("torch", "numpy", "onnx", "onnxruntime", "openvino", "openvino-tokenizers", "nncf")
# What each peer needs, installed together in one pip resolve (separately, optimum-intel's newest release
# would pull torchvision and optimum versions that break optimum-onnx). llama.cpp's own requirements pin
# transformers 4.57 (and torch 2.11, not used here so that both sides run the same torch); gguf-py comes from
# the sdist itself.
PEER_REQUIREMENTS = {
    "llama.cpp": ("torch", "numpy", "sentencepiece", "transformers>=4.57,<5", "pyyaml", "tqdm", "requests"),
    "optimum-onnx": ("torch", "numpy", "onnx", "onnxruntime", "optimum-onnx"),
    "optimum-intel": ("torch", "numpy", "openvino", "openvino-tokenizers", "nncf", "optimum-intel[openvino]"),
}
PEER_FORMATS = {"llama.cpp": "gguf", "optimum-onnx": "onnx", "optimum-intel": "openvino"}
LLAMA_CPP_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_shim(pre_tokenizer: str) -> str:
    """Code that runs convert_hf_to_gguf.py (argv[1]) with its remaining arguments, its tokenizer lookup
    answering ``pre_tokenizer`` (a name of llama.cpp's pre-tokenizer table, e.g. llama-bpe or qwen2)."""
    return f"""\
import runpy, sys
from pathlib import Path
script = sys.argv[1]
sys.path.insert(0, str(Path(script).parent))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre_tokenizer!r}
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


LLAMA_CPP_SHIM = llama_cpp_shim("llama-bpe")
# optimum-cli export onnx without the validation it always runs (its Python API has the switch).
OPTIMUM_NO_VALIDATION = """\
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", do_validation=False)
"""
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
SOVPACK = "sovpack convert"
HEADER = ("tool", "target", "wall s", "peak RSS MiB", "peak anon MiB", "output MiB", "notes")


@dataclass
class Job:
    """One row: a command to measure, or the reason there is none."""

    tool: str
    target: str
    out: Path
    argv: list[str] = field(default_factory=list)
    unavailable: str = ""
    note: str = ""


def cmd(*parts: str | Path) -> list[str]:
    """An argv of strings."""
    return [str(p) for p in parts]


def pinned(requirement: str) -> str:
    """``name==<this venv's version>`` for a SHARED package this venv has, the requirement unchanged otherwise."""
    try:
        return f"{requirement}=={metadata.version(requirement)}" if requirement in SHARED else requirement
    except metadata.PackageNotFoundError:
        return requirement


def run_logged(argv: Sequence[str | Path], log: Path) -> str:
    """Run a setup command; returns "" or a one-line reason it failed (its output is in ``log``)."""
    with log.open("ab") as out:
        proc = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == 0:
        return ""
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    command = " ".join([Path(argv[0]).name, *map(str, argv[1:3])])
    return f"{command} failed: {lines[-1].strip() if lines else '(no output)'}"


def peer_env(env: Path, log: Path) -> tuple[Path, str]:
    """The peer venv's python, after creating it and installing every peer in one resolve; or why not.

    A stamp file records what was installed, so later runs skip pip; a venv this script made for other
    versions (stale stamp) is rebuilt from scratch rather than upgraded in place.
    """
    python = env / "bin" / "python"
    requirements = sorted({pinned(r) for reqs in PEER_REQUIREMENTS.values() for r in reqs})
    stamp = env / "sovpack-peers.txt"
    wanted = "\n".join(requirements) + "\n"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return python, ""
    if stamp.is_file():
        shutil.rmtree(env)
    if not python.is_file():
        print(f"creating the peer venv {env} ...", flush=True)
        env.parent.mkdir(parents=True, exist_ok=True)
        if why := run_logged([sys.executable, "-m", "venv", env], log):
            return python, f"no peer venv: {why}"
    print(f"installing the peers into {env} ...", flush=True)
    if why := run_logged([python, "-m", "pip", "install", "--quiet", *requirements], log):
        return python, f"could not install the peers: {why}"
    stamp.write_text(wanted, encoding="utf-8")
    return python, ""


def fetch_llama_cpp(work: Path, log: Path) -> tuple[Path | None, str]:
    """convert_hf_to_gguf.py (+ its package and gguf-py) from the installed llama-cpp-python's sdist."""
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None, "llama-cpp-python is not installed, so there is no version to fetch"
    dest = work / "llama-cpp-sdist"
    print(f"downloading the llama-cpp-python {version} sdist ...", flush=True)
    if why := run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                          f"llama-cpp-python=={version}", "-d", dest], log):
        return None, why
    sdist = next(dest.glob("*.tar.gz"), None)
    if sdist is None:
        return None, f"pip download left no .tar.gz in {dest}"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rel = m.name.partition("/vendor/llama.cpp/")
            if rel.startswith(LLAMA_CPP_FILES):
                m.name = rel
                members.append(m)
        tar.extractall(dest / "llama.cpp", members=members, filter="data")
    script = dest / "llama.cpp" / "convert_hf_to_gguf.py"
    if not (script.is_file() and (script.parent / "conversion" / "base.py").is_file()):
        return None, f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py with its conversion package"
    return script, ""


def plan(ckpt: Path, work: Path, formats: Sequence[str], peer_python: Path, problems: dict[str, str],
         llama_script: Path | None) -> list[Job]:
    """Every row in order: each peer run followed by the sovpack run it is compared with."""
    optimum_cli = peer_python.parent / "optimum-cli"
    jobs: list[Job] = []

    def sovpack(target: str) -> Job:
        out = work / f"sovpack-{target.replace(':', '-')}"
        argv = cmd(sys.executable, "-m", "sovpack", "convert", ckpt, "-t", target, "-o", out, "--no-parity", "--force")
        return Job(SOVPACK, target, out, argv, note="parity off")

    def peer(name: str, tool: str, target: str, argv: list[str], out: Path, note: str = "") -> Job:
        if name in problems:
            return Job(tool, target, out, unavailable=problems[name])
        return Job(tool, target, out, argv, note=note)

    if "gguf" in formats:
        for outtype in ("f16", "q8_0"):
            out = work / f"llama.cpp-gguf-{outtype}"
            argv = cmd(peer_python, "-c", LLAMA_CPP_SHIM, str(llama_script), ckpt, "--outtype", outtype,
                       "--outfile", out / f"model-{outtype}.gguf")
            jobs += [peer("llama.cpp", "llama.cpp convert_hf_to_gguf.py", f"gguf:{outtype}", argv, out,
                          note="pre-tokenizer lookup patched to llama-bpe"), sovpack(f"gguf:{outtype}")]
    if "onnx" in formats:
        out = work / "optimum-onnx-fp32"
        argv = cmd(optimum_cli, "export", "onnx", "--model", ckpt, "--task", "text-generation-with-past", out)
        jobs.append(peer("optimum-onnx", "optimum-cli export onnx", "onnx:fp32", argv, out,
                         note="includes optimum's ONNX Runtime validation"))
        out = work / "optimum-onnx-fp32-no-validation"
        argv = cmd(peer_python, "-c", OPTIMUM_NO_VALIDATION, ckpt, out)
        jobs += [peer("optimum-onnx", "optimum main_export", "onnx:fp32", argv, out, note="do_validation=False"),
                 sovpack("onnx:fp32")]
    if "openvino" in formats:
        out = work / "optimum-openvino-fp16"
        argv = cmd(optimum_cli, "export", "openvino", "--model", ckpt, "--task", "text-generation-with-past",
                   "--weight-format", "fp16", out)
        jobs += [peer("optimum-intel", "optimum-cli export openvino", "openvino:fp16", argv, out),
                 sovpack("openvino:fp16")]
    return jobs


def run(job: Job, *, discard: bool = False) -> list[str]:
    """Measure one job; its table row (``discard``: remove what it wrote once measured)."""
    if job.unavailable:
        return [job.tool, job.target, "-", "-", "-", "-", f"not run: {job.unavailable}"]
    print(f"{job.tool} -> {job.target} ...", flush=True)
    shutil.rmtree(job.out, ignore_errors=True)
    job.out.mkdir(parents=True)
    result = measure(job.argv, job.out.with_name(job.out.name + ".log"), env={**os.environ, **OFFLINE})
    if not result.ok:
        print("\n".join(result.tail()), file=sys.stderr)
        return [job.tool, job.target, "-", "-", "-", "-", f"failed, {result.failure(120)}"]
    row = [job.tool, job.target, f"{result.wall_s:.1f}", mib(result.peak_rss), mib(result.peak_anon),
           mib(dir_size(job.out)), job.note]
    if discard:
        shutil.rmtree(job.out, ignore_errors=True)  # measured: the next job needs the disk (8B outputs are 8-16 GB)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(PEER_FORMATS.values()), help="formats to compare")
    parser.add_argument("--peer-env", type=Path, default=DEFAULT_PEER_ENV, help=f"default: {DEFAULT_PEER_ENV}")
    parser.add_argument("--checkpoint", type=Path,
                        help="an existing checkpoint to convert instead of a synthetic one (e.g. the 8B one "
                             "benchmarks/release_size.py --keep DIR leaves in DIR/checkpoint-8b)")
    add_checkpoint_args(parser)
    args = parser.parse_args()
    formats = args.only or list(PEER_FORMATS.values())
    peers = [peer for peer, fmt in PEER_FORMATS.items() if fmt in formats]

    with work_dir(args.keep, "sovpack-peers-") as work:
        setup_log = work / "setup.log"
        peer_python, why = peer_env(args.peer_env.expanduser().absolute(), setup_log)
        problems = dict.fromkeys(peers, why) if why else {}
        llama_script = None
        if "llama.cpp" in peers and "llama.cpp" not in problems:
            llama_script, why = fetch_llama_cpp(work, setup_log)
            if why:
                problems["llama.cpp"] = why
        for peer, why in problems.items():
            print(f"{peer}: {why} (see {setup_log})", file=sys.stderr)
        if args.checkpoint is not None:
            path, described = args.checkpoint, f"{args.checkpoint} ({mib(dir_size(args.checkpoint))} MiB)"
        else:
            ckpt = checkpoint_from_args(args, work)
            path, described = ckpt.path, ckpt.describe()
        jobs = plan(path, work, formats, peer_python, problems, llama_script)
        rows = [run(job, discard=args.checkpoint is not None) for job in jobs]
        print()
        print(described)
        print()
        print_table(HEADER, rows)
    # A peer that could not run is a result; sovpack failing is not.
    return 1 if any(r[0] == SOVPACK and r[-1].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
