"""sovpack next to the peer converters on the real all-MiniLM-L6-v2 encoder: speed, memory and embeddings.

The checkpoint is sentence-transformers' all-MiniLM-L6-v2 (BertModel, 22.7 M parameters, mean pooling + L2
normalisation), so the table shows speed and correctness side by side.

Pairs (peer first, then sovpack with parity off and with parity on; each run a fresh process measured by
``_common.measure``; the median of ``--repeat`` runs, interleaved so drift hits every row alike):

- ``optimum-cli export onnx --task feature-extraction`` (optimum-onnx) vs ``sovpack convert -t onnx:fp32``;
- ``optimum-cli export openvino --task feature-extraction --weight-format fp16`` / ``int8`` (optimum-intel,
  NNCF weight compression) vs ``sovpack convert -t openvino:fp16`` / ``openvino:int8``;
- llama.cpp's ``convert_hf_to_gguf.py`` (its BERT path; script from the installed llama-cpp-python's sdist,
  as ``peers.py`` fetches it) at f16 / q8_0 vs ``sovpack convert -t gguf:f16`` / ``gguf:q8_0``.

Correctness. After the timed runs every artifact embeds the three sentences of the model card ("A man is
eating food.", "... pasta.", "The new movie is awesome.") on its own runtime and with its own tokenizer:
onnxruntime (tokenizer.json), OpenVINO (the artifact's openvino_tokenizer.xml), llama-cpp-python (the GGUF's
vocabulary), one text at a time so no padding is involved. sovpack's artifacts are read at their pooled
``sentence_embedding`` output; optimum's exports only have ``last_hidden_state``, so the benchmark applies the
checkpoint's mean pooling and normalisation to it; llama.cpp pools as the GGUF says. Each is compared with
sentence-transformers' fp32 embeddings of the checkpoint (``SentenceTransformer.encode``): "max cos gap" is
the largest ``1 - cosine`` over the three sentences, and the similarity column shows that the semantics
survive (food ~ pasta high, food ~ movie low).

Columns as in ``peers.py``: wall time of the whole process, its peak RSS (``os.wait4``), its peak anonymous
RSS (sampled) and the size of what it wrote. A peer that cannot be installed or fails gets a row saying why,
never a number. The peers run in ``peers.py``'s peer venv (transformers 4, torch / onnx / onnxruntime /
openvino / nncf pinned to this venv's versions), created on first use.

Disk: the checkpoint is 87 MiB (fetched from PyPI once, cached by ``fixtures/real_weights.py``), the work
directory needs about 750 MiB (15 artifacts of 24-87 MiB and the 76 MiB llama-cpp-python sdist), the peer venv
about 1.7 GiB when it does not exist yet (shared with ``peers.py``).

Usage: python benchmarks/encoders.py [--repeat 3] [--only onnx --only openvino --only gguf] [--peer-env DIR]
       [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from _common import ROOT, Measurement, dir_size, measure, mib, print_table, work_dir
from peers import DEFAULT_PEER_ENV, OFFLINE, SOVPACK, cmd, fetch_llama_cpp, peer_env

if TYPE_CHECKING:
    import numpy as np

# The model card's sentences (the same labels as sovpack's encoder parity corpus).
LABELS = ("food", "pasta", "movie")
EMBED = "--embed"  # internal: run as the child that reads one artifact
FORMATS = ("onnx", "openvino", "gguf")
PEERS = {"onnx": "optimum-onnx", "openvino": "optimum-intel", "gguf": "llama.cpp"}
HEADER = ("tool", "target", "wall s", "peak RSS MiB", "peak anon MiB", "output MiB", "max cos gap",
          "cos food~pasta / food~movie", "notes")


@dataclass
class Job:
    """One row: a command to measure and the runtime that reads its output, or the reason there is none."""

    tool: str
    target: str
    out: Path
    runtime: str  # "onnx", "openvino" or "gguf": how the artifact is checked
    argv: list[str] = field(default_factory=list)
    unavailable: str = ""
    note: str = ""
    runs: list[Measurement] = field(default_factory=list)

    @property
    def sovpack(self) -> bool:
        return self.tool == SOVPACK

    @property
    def failed(self) -> Measurement | None:
        return next((m for m in self.runs if not m.ok), None)


# --------------------------------------------------------------------------------------------------------------
# the rows


def plan(ckpt: Path, work: Path, formats: Sequence[str], peer_python: Path, problems: dict[str, str],
         llama_script: Path | None, *, int8: bool) -> list[Job]:
    """Every row in order: each peer run, then the sovpack runs it is compared with."""
    optimum_cli = str(peer_python.parent / "optimum-cli")
    jobs: list[Job] = []

    def sovpack(target: str, runtime: str) -> list[Job]:
        rows = []
        for parity in (False, True):
            out = work / f"sovpack-{target.replace(':', '-')}{'-parity' if parity else ''}"
            argv = cmd(sys.executable, "-m", "sovpack", "convert", ckpt, "-t", target, "-o", out, "--force",
                       *([] if parity else ["--no-parity"]))
            rows.append(Job(SOVPACK, target, out, runtime, argv,
                            note="parity on (graph, pipeline, tokenizer)" if parity else "parity off"))
        return rows

    def peer(fmt: str, tool: str, target: str, out: Path, argv: list[str], note: str = "") -> Job:
        name = PEERS[fmt]
        if name in problems:
            return Job(tool, target, out, fmt, unavailable=problems[name])
        return Job(tool, target, out, fmt, argv, note=note)

    # NOTE: the library is named on optimum's command line: left to inference, optimum picks sentence-transformers
    # when that package is installed (pooled outputs) and transformers otherwise, so the row would depend on the
    # peer venv. transformers is what the brief compares against: last_hidden_state, pooled by this benchmark.
    if "onnx" in formats:
        out = work / "optimum-onnx-fp32"
        argv = cmd(optimum_cli, "export", "onnx", "--model", ckpt, "--task", "feature-extraction",
                   "--library-name", "transformers", out)
        jobs += [peer("onnx", "optimum-cli export onnx", "onnx:fp32", out, argv,
                      note="last_hidden_state only; includes optimum's ONNX Runtime validation"),
                 *sovpack("onnx:fp32", "onnx")]
    if "openvino" in formats:
        for weights in ("fp16", "int8") if int8 else ("fp16",):
            out = work / f"optimum-openvino-{weights}"
            argv = cmd(optimum_cli, "export", "openvino", "--model", ckpt, "--task", "feature-extraction",
                       "--library", "transformers", "--weight-format", weights, out)
            jobs += [peer("openvino", "optimum-cli export openvino", f"openvino:{weights}", out, argv,
                          note="last_hidden_state only; with tokenizer IR"),
                     *sovpack(f"openvino:{weights}", "openvino")]
    if "gguf" in formats:
        for outtype in ("f16", "q8_0") if int8 else ("f16",):
            out = work / f"llama.cpp-gguf-{outtype}"
            argv = cmd(peer_python, llama_script or "convert_hf_to_gguf.py", ckpt, "--outtype", outtype,
                       "--outfile", out / f"model-{outtype}.gguf")
            jobs += [peer("gguf", "llama.cpp convert_hf_to_gguf.py", f"gguf:{outtype}", out, argv,
                          note="BERT path, no patches"),
                     *sovpack(f"gguf:{outtype}", "gguf")]
    return jobs


def run_once(job: Job) -> None:
    """Measure one run of ``job`` (skipped once one of its runs failed: its row says why)."""
    if job.unavailable or job.failed:
        return
    print(f"{job.tool} -> {job.target} ({job.note}) ...", flush=True)
    shutil.rmtree(job.out, ignore_errors=True)
    job.out.mkdir(parents=True)
    result = measure(job.argv, job.out.with_name(job.out.name + ".log"), env={**os.environ, **OFFLINE})
    if not result.ok:
        print("\n".join(result.tail()), file=sys.stderr)
    job.runs.append(result)


# --------------------------------------------------------------------------------------------------------------
# what each artifact gives


def _normalized(rows: np.ndarray) -> np.ndarray:
    import numpy as np

    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The checkpoint's pooling (1_Pooling: mean over unmasked tokens), for exports without a pooled output."""
    import numpy as np

    weights = mask.astype(np.float32)[..., None]
    return (hidden * weights).sum(axis=-2) / np.maximum(weights.sum(axis=-2), 1e-9)


def onnx_embeddings(out: Path, texts: Sequence[str]) -> np.ndarray:
    """onnxruntime on ``model.onnx`` with the artifact's tokenizer.json, one text at a time."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    rows = []
    for text in texts:
        enc = tokenizer.encode(text)
        feed = {"input_ids": np.array([enc.ids], np.int64), "attention_mask": np.array([enc.attention_mask], np.int64),
                "token_type_ids": np.array([enc.type_ids], np.int64)}
        result = dict(zip(outputs, session.run(None, {k: v for k, v in feed.items() if k in inputs}), strict=True))
        if "sentence_embedding" in result:
            rows.append(result["sentence_embedding"][0])
        else:
            rows.append(_mean_pool(result["last_hidden_state"][0], feed["attention_mask"][0]))
    return np.stack(rows)


def openvino_embeddings(out: Path, texts: Sequence[str]) -> np.ndarray:
    """OpenVINO (CPU) on ``openvino_model.xml`` with the artifact's tokenizer IR, one text at a time."""
    import numpy as np
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer IR's operations)

    core = ov.Core()
    tokenizer = core.compile_model(out / "openvino_tokenizer.xml", "CPU")
    model = core.compile_model(out / "openvino_model.xml", "CPU")
    pooled = next((o for o in model.outputs if "sentence_embedding" in o.get_names()), None)
    rows = []
    for text in texts:
        tokens = tokenizer([text])
        by_name = {name: np.asarray(tokens[o], np.int64) for o in tokenizer.outputs for name in o.get_names()}
        ids = by_name["input_ids"]
        feed = {}
        for port in model.inputs:
            name = port.get_any_name()
            feed[name] = by_name.get(name, np.zeros_like(ids))  # token types: 0 for one sentence
        result = model(feed)
        if pooled is not None:
            rows.append(np.asarray(result[pooled]).reshape(-1))
        else:
            hidden = np.asarray(result[model.output("last_hidden_state")])[0]
            rows.append(_mean_pool(hidden, by_name["attention_mask"][0]))
    return np.stack(rows)


def gguf_embeddings(out: Path, texts: Sequence[str]) -> np.ndarray:
    """llama-cpp-python's embedding API on the artifact's .gguf (pooling as the GGUF declares it)."""
    import numpy as np
    from llama_cpp import Llama

    from sovpack.targets.gguf.runtime import extra_buffers_allowed, model_params

    (path,) = sorted(out.glob("*.gguf"))
    # NOTE: on AMX CPUs llama.cpp 0.3.36's AMX kernels die (SIGILL / SIGSEGV) on q8_0 weights; both converters'
    # files are read with the extra buffer types off there, as sovpack's own runner does.
    with model_params(extra_buffers=extra_buffers_allowed()):
        llm = Llama(model_path=str(path), embedding=True, n_ctx=512, n_threads=2, verbose=False)
    try:
        rows = []
        for text in texts:
            vec = np.asarray(llm.embed(text), np.float32)
            rows.append(vec.mean(axis=0) if vec.ndim == 2 else vec)  # per-token states when the GGUF has no pooling
        return np.stack(rows)
    finally:
        llm.close()


EMBEDDERS: dict[str, Callable[[Path, Sequence[str]], np.ndarray]] = {
    "onnx": onnx_embeddings, "openvino": openvino_embeddings, "gguf": gguf_embeddings}


def reference_embeddings(ckpt: Path, texts: Sequence[str]) -> tuple[np.ndarray, str]:
    """sentence-transformers' fp32 embeddings of the checkpoint, and which version gave them."""
    import numpy as np
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(ckpt), device="cpu")
    made_by = f"sentence-transformers {sentence_transformers.__version__}"
    return np.asarray(model.encode(list(texts)), np.float32), made_by


@dataclass(frozen=True)
class Check:
    """One artifact's embeddings of the three sentences against the reference."""

    max_gap: float  # max over texts of 1 - cosine(artifact, reference)
    food_pasta: float
    food_movie: float

    @classmethod
    def of(cls, got: np.ndarray, reference: np.ndarray) -> Check:
        got, ref = _normalized(got.astype("float64")), _normalized(reference.astype("float64"))
        gaps = 1.0 - (got * ref).sum(axis=-1)
        sims = got @ got.T
        return cls(max_gap=float(gaps.max()), food_pasta=float(sims[0, 1]), food_movie=float(sims[0, 2]))

    def cells(self) -> list[str]:
        return [f"{max(self.max_gap, 0.0):.1e}", f"{self.food_pasta:.3f} / {self.food_movie:.3f}"]


def check(job: Job, texts: Sequence[str], reference: np.ndarray) -> Check | str:
    """The artifact's check, or why it could not be made. Each artifact is read in a child process: a runtime
    that dies on a file (native crashes happen) costs that row, not the table."""
    import numpy as np

    proc = subprocess.run([sys.executable, __file__, EMBED, job.runtime, str(job.out), *texts], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        return f"unreadable, exit {proc.returncode}: {lines[-1][:100] if lines else '(no output)'}"
    return Check.of(np.asarray(json.loads(proc.stdout.splitlines()[-1]), np.float32), reference)


def embed_main(argv: Sequence[str]) -> int:
    """The child of ``check``: RUNTIME DIR TEXT... -> one JSON line, the texts' embeddings."""
    runtime, out, *texts = argv
    print(json.dumps(EMBEDDERS[runtime](Path(out), texts).tolist()))
    return 0


# --------------------------------------------------------------------------------------------------------------
# the table


def row(job: Job, result: Check | str | None) -> list[str]:
    """The job's table row: median numbers and its check, or why there are none."""
    if job.unavailable:
        return [job.tool, job.target, "-", "-", "-", "-", "-", "-", f"not run: {job.unavailable}"]
    if (failed := job.failed) is not None:
        return [job.tool, job.target, "-", "-", "-", "-", "-", "-", f"failed, {failed.failure(120)}"]
    numbers = [f"{statistics.median(m.wall_s for m in job.runs):.1f}",
               mib(statistics.median(m.peak_rss for m in job.runs)),
               mib(statistics.median(m.peak_anon for m in job.runs)), mib(dir_size(job.out))]
    if isinstance(result, Check):
        return [job.tool, job.target, *numbers, *result.cells(), job.note]
    return [job.tool, job.target, *numbers, "-", "-", "; ".join(filter(None, [job.note, result]))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=FORMATS, help="formats to compare (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the table shows medians (default 3)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the openvino:int8 and gguf:q8_0 rows")
    parser.add_argument("--peer-env", type=Path, default=DEFAULT_PEER_ENV, help=f"default: {DEFAULT_PEER_ENV}")
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse (default: a temporary one)")
    args = parser.parse_args()
    formats = args.only or list(FORMATS)

    sys.path.insert(0, str(ROOT))
    from fixtures.real_weights import MINILM, fetch
    from sovpack.parity.embeddings import LABELED_TEXTS

    texts = [LABELED_TEXTS[label] for label in LABELS]
    ckpt = fetch(MINILM)
    with work_dir(args.keep, "sovpack-encoders-") as work:
        setup_log = work / "setup.log"
        peers = [PEERS[fmt] for fmt in formats]
        peer_python, why = peer_env(args.peer_env.expanduser().absolute(), setup_log)
        problems = dict.fromkeys(peers, why) if why else {}
        llama_script = None
        if "llama.cpp" in peers and "llama.cpp" not in problems:
            llama_script, why = fetch_llama_cpp(work, setup_log)
            if why:
                problems["llama.cpp"] = why
        for peer, why in problems.items():
            print(f"{peer}: {why} (see {setup_log})", file=sys.stderr)
        jobs = plan(ckpt, work, formats, peer_python, problems, llama_script, int8=args.int8)
        for _ in range(max(1, args.repeat)):
            for job in jobs:
                run_once(job)
        print("embedding the three sentences with every artifact ...", flush=True)
        reference, made_by = reference_embeddings(ckpt, texts)
        checks = {id(job): check(job, texts, reference) for job in jobs if job.runs and not job.failed}
        rows = [row(job, checks.get(id(job))) for job in jobs]
        ref = Check.of(reference, reference)
    print()
    print(f"checkpoint: {MINILM.name} ({MINILM.package} {MINILM.version} on PyPI), {mib(dir_size(ckpt))} MiB; "
          f"median of {max(1, args.repeat)} runs per row")
    print(f"reference: {made_by} fp32, cos food~pasta {ref.food_pasta:.3f}, food~movie {ref.food_movie:.3f}")
    print()
    print_table(HEADER, rows)
    # A peer that could not run is a result; a sovpack artifact that fails or drifts is not.
    bad = [j for j in jobs if j.sovpack and (j.failed or not isinstance(checks.get(id(j)), Check))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(embed_main(sys.argv[2:]) if sys.argv[1:2] == [EMBED] else main())
