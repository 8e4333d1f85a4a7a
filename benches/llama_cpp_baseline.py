#!/usr/bin/env python3
"""llama.cpp CPU speed baseline for Arbor (via llama-cpp-python's low-level API).

Usage:
    pip install llama-cpp-python numpy
    python3 benches/llama_cpp_baseline.py \
        [--model ~/.cache/arbor/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf] [--threads 2]

Measures, on one model:
  prefill          tokens/s for one batched eval of a --prompt-tokens (128) token prompt
                   (median of --prefill-reps runs, after one untimed warm-up run);
  decode_1         single-sequence greedy decode tokens/s over --decode-steps (64) tokens
                   after the prompt (one llama_decode per token);
  decode_N         for each N in --parallel (8, 32): the prompt is prefilled once into
                   sequence 0 and its KV copied to sequences 1..N-1 with
                   llama_memory_seq_cp (llama_kv_self_seq_cp on older builds); then
                   --parallel-steps (32) steps each decode one llama_batch holding one
                   token for each of the N sequences. Sequence s starts from the s-th best
                   token after the prompt (so the branches differ, as in tree search) and
                   continues greedily. Reported: aggregate tokens/s = N*steps/time.
Run it on an otherwise idle machine: ggml's worker threads spin-wait, so competing
processes (e.g. a cargo build) can slow it several-fold; the 1-minute load average
before and after is recorded in the output for that reason.
Greedy argmax (numpy) is included in decode timings; it is ~0.1 ms per token, small
next to the forward pass.  Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp as lc

DEFAULT_MODEL = Path.home() / ".cache/arbor/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

PROMPT_SEED_TEXT = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and "
    "bakes muffins for her friends every day with four. She sells the remainder at the "
    "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
    "every day at the farmers' market? Let's think step by step. First, we count the eggs "
    "that are left after breakfast and baking, then multiply by the price of one egg. "
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memory_seq_cp(ctx, src: int, dst: int) -> str:
    """Copy all KV cells of sequence src to dst; returns the API name that was used."""
    if hasattr(lc, "llama_memory_seq_cp") and hasattr(lc, "llama_get_memory"):
        lc.llama_memory_seq_cp(lc.llama_get_memory(ctx), src, dst, -1, -1)
        return "llama_memory_seq_cp"
    lc.llama_kv_self_seq_cp(ctx, src, dst, -1, -1)
    return "llama_kv_self_seq_cp"


def memory_clear(ctx) -> None:
    if hasattr(lc, "llama_memory_clear") and hasattr(lc, "llama_get_memory"):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    else:
        lc.llama_kv_self_clear(ctx)


class Batch:
    """Thin wrapper over llama_batch (token input, one seq id per token)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.b = lc.llama_batch_init(capacity, 0, 1)

    def clear(self) -> None:
        self.b.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> None:
        i = self.b.n_tokens
        assert i < self.capacity
        self.b.token[i] = token
        self.b.pos[i] = pos
        self.b.n_seq_id[i] = 1
        self.b.seq_id[i][0] = seq_id
        self.b.logits[i] = 1 if logits else 0
        self.b.n_tokens = i + 1

    def free(self) -> None:
        lc.llama_batch_free(self.b)


class Bench:
    def __init__(self, model_path: Path, threads: int):
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"failed to load {model_path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.threads = threads

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (lc.llama_token * (len(data) + 16))()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[:n])

    def new_context(self, n_ctx: int, n_seq_max: int, kv_unified: bool):
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq_max
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = kv_unified
        ctx = lc.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("failed to create context")
        return ctx

    def logits_row(self, ctx, i: int) -> np.ndarray:
        ptr = lc.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    @staticmethod
    def decode(ctx, batch: Batch) -> None:
        rc = lc.llama_decode(ctx, batch.b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, ctx, batch: Batch, prompt: list[int], seq_id: int = 0) -> float:
        batch.clear()
        for p, t in enumerate(prompt):
            batch.add(t, p, seq_id, p == len(prompt) - 1)
        t0 = time.perf_counter()
        self.decode(ctx, batch)
        lc.llama_synchronize(ctx)
        return time.perf_counter() - t0

    def run_single(self, prompt: list[int], steps: int, reps: int) -> dict:
        ctx = self.new_context(n_ctx=len(prompt) + steps + 64, n_seq_max=1, kv_unified=True)
        batch = Batch(max(len(prompt), 1))
        try:
            memory_clear(ctx)
            self.prefill(ctx, batch, prompt)  # warm-up: page in weights, size buffers
            times = []
            for _ in range(reps):
                memory_clear(ctx)
                times.append(self.prefill(ctx, batch, prompt))
            t_prefill = statistics.median(times)

            # single-sequence greedy decode on top of the last prefill
            tok = int(np.argmax(self.logits_row(ctx, -1)))
            pos = len(prompt)
            t0 = time.perf_counter()
            for _ in range(steps):
                batch.clear()
                batch.add(tok, pos, 0, True)
                self.decode(ctx, batch)
                tok = int(np.argmax(self.logits_row(ctx, 0)))
                pos += 1
            t_decode = time.perf_counter() - t0
        finally:
            batch.free()
            lc.llama_free(ctx)
        return {
            "prefill": {
                "prompt_tokens": len(prompt),
                "reps": reps,
                "seconds_median": round(t_prefill, 5),
                "seconds_all": [round(t, 5) for t in times],
                "tokens_per_s": round(len(prompt) / t_prefill, 2),
            },
            "decode_1": {
                "steps": steps,
                "seconds": round(t_decode, 4),
                "ms_per_token": round(1000 * t_decode / steps, 3),
                "tokens_per_s": round(steps / t_decode, 2),
            },
        }

    def run_parallel(self, prompt: list[int], n_seq: int, steps: int, kv_unified: bool) -> dict:
        if kv_unified:
            n_ctx = len(prompt) + n_seq * (steps + 1) + 64
        else:  # each sequence gets its own n_ctx / n_seq_max slice
            n_ctx = n_seq * (len(prompt) + steps + 64)
        n_ctx = (n_ctx + 255) // 256 * 256
        ctx = self.new_context(n_ctx=n_ctx, n_seq_max=n_seq, kv_unified=kv_unified)
        batch = Batch(max(len(prompt), n_seq))
        try:
            t_prefill = self.prefill(ctx, batch, prompt, seq_id=0)
            last = self.logits_row(ctx, -1)
            first = np.argsort(-last, kind="stable")[:n_seq]  # branch s starts at s-th best
            api = None
            t0 = time.perf_counter()
            for s in range(1, n_seq):
                api = memory_seq_cp(ctx, 0, s)
            t_copy = time.perf_counter() - t0
            toks = [int(t) for t in first]
            pos = len(prompt)
            t0 = time.perf_counter()
            for _ in range(steps):
                batch.clear()
                for s in range(n_seq):
                    batch.add(toks[s], pos, s, True)
                self.decode(ctx, batch)
                for s in range(n_seq):
                    toks[s] = int(np.argmax(self.logits_row(ctx, s)))
                pos += 1
            t_decode = time.perf_counter() - t0
        finally:
            batch.free()
            lc.llama_free(ctx)
        return {
            "n_seq": n_seq,
            "steps": steps,
            "kv_unified": kv_unified,
            "n_ctx": n_ctx,
            "kv_copy_api": api,
            "prefill_seconds": round(t_prefill, 5),
            "kv_copy_seconds": round(t_copy, 6),
            "decode_seconds": round(t_decode, 4),
            "ms_per_step": round(1000 * t_decode / steps, 3),
            "aggregate_tokens_per_s": round(n_seq * steps / t_decode, 2),
        }

    def close(self) -> None:
        lc.llama_model_free(self.model)
        lc.llama_backend_free()


def build_prompt(bench: Bench, n_tokens: int) -> list[int]:
    text = PROMPT_SEED_TEXT
    while len(bench.tokenize(text)) < n_tokens:
        text += PROMPT_SEED_TEXT
    return bench.tokenize(text)[:n_tokens]


def main() -> int:
    ap = argparse.ArgumentParser(description="llama.cpp CPU baseline (JSON on stdout)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--parallel", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--parallel-steps", type=int, default=32)
    ap.add_argument("--no-kv-unified", action="store_true",
                    help="per-sequence KV streams instead of one unified KV buffer")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    args = ap.parse_args()

    try:  # llama-cpp-python routes llama.cpp's log through this module
        from llama_cpp._logger import set_verbose
        set_verbose(args.verbose)
    except ImportError:
        pass

    model_path = args.model.expanduser()
    bench = Bench(model_path, args.threads)
    prompt = build_prompt(bench, args.prompt_tokens)

    result = {
        "engine": "llama.cpp",
        "llama_cpp_python": lc.__version__,
        "model": model_path.name,
        "model_bytes": os.path.getsize(model_path),
        "threads": args.threads,
        "system_info": lc.llama_print_system_info().decode(errors="replace").strip(),
        "cpu_count": os.cpu_count(),
        # other load on the machine skews these figures badly (ggml's threads spin-wait)
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }
    log(f"prefill + single decode ({args.prompt_tokens} prompt tokens) ...")
    result.update(bench.run_single(prompt, args.decode_steps, args.prefill_reps))
    log(json.dumps(result["prefill"]) + "\n" + json.dumps(result["decode_1"]))
    result["decode_parallel"] = []
    for n in args.parallel:
        log(f"parallel decode n_seq={n} ...")
        r = bench.run_parallel(prompt, n, args.parallel_steps, not args.no_kv_unified)
        log(json.dumps(r))
        result["decode_parallel"].append(r)
    bench.close()
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
