"""A GGUF file run in llama.cpp through llama-cpp-python: the parity/run ``Runner``.

n_threads=2, fixed seed, logits for every position (``logits_all``), greedy decoding through llama.cpp's own KV
cache. llama.cpp keeps its KV cache in f16 by default; an f32 artifact is run with an f32 KV cache so its
parity check measures the weights and kernels alone (f16 K/V rounding, about 5e-4 relative, would otherwise
dominate the 1e-4 f32 threshold); every other precision keeps llama.cpp's default f16 cache -- what users of
the file get -- whose rounding is far below those precisions' own error. Two runtime workarounds, both measured
here: llama.cpp's OpenMP threads wait passively (busy-waiting threads make each decode ~300x slower on an
oversubscribed machine), and llama.cpp's extra CPU buffer types are off on AMX machines (its AMX kernels crash
on q8_0 / q4_0 weights in this release).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._digests import known_digest
from sovpack._io import sha256_file
from sovpack._protocols import PromptRun, RunnerTraits
from sovpack.errors import UsageError
from sovpack.source.spec import ModelSpec
from sovpack.targets.batching import decode_in_lockstep
from sovpack.targets.gguf.arch import ARCHES
from sovpack.targets.gguf.batch import prefill_tokens, sequence_batch
from sovpack.targets.gguf.runtime import (
    N_THREADS,
    extra_buffers_allowed,
    import_llama_cpp,
    load_errors,
    model_params,
    quiet_llama,
    runtime_errors,
)

SEED = 1234
MIN_CONTEXT = 512
MAX_CONTEXT = 8192
LLAMA_CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of this (llama_context's constructor)


def applies_window(spec: ModelSpec) -> bool:
    """Whether llama.cpp's architecture for the spec's family applies its sliding windows (gemma2, gemma3)."""
    plan = ARCHES.get(spec.family)
    return plan is not None and plan.swa_period is not None


def kv_cache_type(precision: str) -> str:
    """The KV-cache type the runner uses for an artifact precision (see the module docstring)."""
    return "f32" if precision == "f32" else "f16"


class LlamaCppRunner:
    """A GGUF file in llama.cpp (llama-cpp-python), opened lazily: the model when logits are first asked for
    (and again, larger, when a longer context is needed), the vocabulary alone for tokenizing."""

    name = "llama.cpp"

    def __init__(
        self,
        path: Path,
        *,
        spec: ModelSpec | None = None,
        kv_cache: str = "f16",
        n_threads: int = N_THREADS,
        seed: int = SEED,
        traits: RunnerTraits | None = None,
    ) -> None:
        self.path = Path(path)
        # Corpus texts llama.cpp is known to tokenize differently, and parity limits its kernels cannot meet
        # (see target.parity_limits): both come from the writer, via the artifact metadata.
        self.traits = traits if traits is not None else RunnerTraits()
        self.spec = spec
        self.kv_cache = kv_cache
        self.n_threads = n_threads
        self.seed = seed
        self._llm: Any = None
        self._n_ctx = 0
        self._vocab: Any = None
        self.extra_buffers: bool | None = None
        limit = spec.max_position_embeddings if spec is not None else MAX_CONTEXT
        if spec is not None and spec.sliding_window is not None and not applies_window(spec):
            limit = min(limit, spec.sliding_window)
        if spec is not None and spec.rope_scaling.kind == "longrope":
            # llama.cpp picks LongRoPE's factors by its context size, the source by the positions a pass sees:
            # they agree on the short factors while the context stays within original_max_position_embeddings.
            limit = min(limit, spec.rope_scaling.original_max_position_embeddings or limit)
        self.context_limit = min(limit, MAX_CONTEXT)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _open(self, positions: int) -> Any:
        if positions > self.context_limit:
            window = self.spec.sliding_window if self.spec is not None else None
            scaling = self.spec.rope_scaling if self.spec is not None else None
            if window is not None and window == self.context_limit:
                why = (
                    f"llama.cpp does not apply the model's {window}-token sliding window, so the runner stops where "
                    "both agree"
                )
            elif scaling is not None and scaling.original_max_position_embeddings == self.context_limit:
                why = (
                    "llama.cpp picks LongRoPE's long factors from its context size, the source from the positions "
                    "a pass sees: the runner stays in the short-factor regime, where both agree"
                )
            else:
                why = "the model's context length"
            raise UsageError(
                f"{self.path.name}: {positions} positions exceed the {self.context_limit} the runner allows ({why})"
            )
        if self._llm is not None and positions <= self._n_ctx:
            return self._llm
        llama_cpp = import_llama_cpp()
        n_ctx = min(self.context_limit, max(MIN_CONTEXT, 1 << (positions - 1).bit_length()))
        scaling = self.spec.rope_scaling if self.spec is not None else None
        if scaling is not None and scaling.kind == "longrope":
            original = scaling.original_max_position_embeddings or 0
            if -(-n_ctx // LLAMA_CTX_PAD) * LLAMA_CTX_PAD > original:
                raise UsageError(
                    f"{self.path.name}: llama.cpp pads its context to a multiple of {LLAMA_CTX_PAD}, beyond this "
                    f"model's LongRoPE switch at {original} positions, so it would rotate every pass with the long "
                    "factors where the source uses the short ones"
                )
        self.close_model()
        ggml_type = llama_cpp.GGML_TYPE_F32 if self.kv_cache == "f32" else llama_cpp.GGML_TYPE_F16
        kwargs: dict[str, Any] = {}
        scaling = self.spec.rope_scaling if self.spec is not None else None
        if scaling is not None and scaling.kind == "yarn":
            # llama-cpp-python passes its own beta defaults (32, 1), which override the file: pass the model's.
            kwargs.update(yarn_beta_fast=scaling.beta_fast or 32.0, yarn_beta_slow=scaling.beta_slow or 1.0)
        self.extra_buffers = extra_buffers_allowed()
        with quiet_llama() as log, model_params(extra_buffers=self.extra_buffers), load_errors(self.path, log):
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_ubatch=min(n_ctx, 512),
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed,
                logits_all=True,
                type_k=ggml_type,
                type_v=ggml_type,
                flash_attn=False,
                verbose=False,
                **kwargs,
            )
        self._n_ctx = n_ctx
        return self._llm

    def close_model(self) -> None:
        """Free the model and its context (the vocabulary stays open); the next call reopens it."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._n_ctx = 0

    def close(self) -> None:
        """Free the model and the vocabulary; safe to call more than once."""
        # NOTE: no __del__ here: llama-cpp-python's Llama frees itself when collected; close() makes it prompt.
        self.close_model()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    # -- Runner protocol ---------------------------------------------------------------------------------
    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("prefill needs at least one token")
        llm = self._open(len(ids))
        with runtime_errors(self.path, "evaluate the prompt"):
            llm.reset()
            llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("greedy decoding needs at least one prompt token")
        llm = self._open(len(ids) + max_new_tokens)
        stop = {int(s) for s in stop_ids}
        generated: list[int] = []
        with runtime_errors(self.path, "decode"):
            llm.reset()
            llm.eval(ids)
            for _ in range(max_new_tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                generated.append(token)
                if token in stop or len(generated) == max_new_tokens:
                    break
                llm.eval([token])
        return generated

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """All prompts as sequences of one batch (see targets/gguf/batch.py): prefilled together, then decoded
        in lockstep, one token of every sequence per llama_decode."""
        batch = [[int(i) for i in ids] for ids in prompts]
        if not batch:
            return []
        if not all(batch):
            raise UsageError("greedy decoding needs at least one prompt token")
        lengths = [len(ids) for ids in batch]
        llm = self._open(max(lengths) + max_new_tokens)
        with runtime_errors(self.path, "decode"), sequence_batch(self.path, llm, len(batch), self._n_ctx) as run:
            rows = run.decode(prefill_tokens(batch))
            ends = np.cumsum(lengths)
            prefill = [rows[end - n : end] for end, n in zip(ends.tolist(), lengths, strict=True)]

            def step(tokens: np.ndarray, k: int) -> np.ndarray:
                return run.decode([(b, n + k, int(t)) for b, (n, t) in enumerate(zip(lengths, tokens, strict=True))])

            last = np.stack([logits[-1] for logits in prefill])
            tokens = decode_in_lockstep(last, step, max_new_tokens, stop_ids)
        return [PromptRun(logits=logits, tokens=t) for logits, t in zip(prefill, tokens, strict=True)]

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer from the GGUF file (vocab only), adding the special tokens the file asks for."""
        return self.encode(text)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenization of ``text``: BOS/EOS as the file's add_bos/add_eos say (``add_special``),
        special-token texts matched as tokens (``parse_special``)."""
        if self._vocab is None:
            llama_cpp = import_llama_cpp()
            with quiet_llama() as log, load_errors(self.path, log):
                self._vocab = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        with runtime_errors(self.path, "tokenize"):
            tokens = self._vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        return [int(t) for t in tokens]

    def runtime_info(self) -> dict[str, str]:
        llama_cpp = import_llama_cpp()
        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": str(llama_cpp.__version__),
            "gguf_file": self.path.name,
            "gguf_sha256": (known_digest(self.path) or sha256_file(self.path)).removeprefix("sha256:"),
            "kv_cache_type": self.kv_cache,
            "extra_buffer_types": {None: "not loaded", True: "on", False: "off (AMX crashes)"}[self.extra_buffers],
            "n_threads": str(self.n_threads),
            "seed": str(self.seed),
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
