#!/usr/bin/env python3
"""Hugging Face transformers on the GPU, the same GGUF file Arbor runs: the baseline a
researcher would write in Python (eager PyTorch, bf16, SDPA attention, sampling).

Loads the model through transformers' GGUF reader (needs the `gguf` package), then for each
batch size generates exactly NEW tokens per sequence from the same chat prompt and prints
generated tokens over wall time, one JSON line per batch and a Markdown table at the end.

usage: python3 benches/transformers_baseline.py MODEL.gguf [--batches 1,32,128,512] [--new 128]
On the GPU machine: carry the gguf wheel (.whl), install it to /tmp/site, PYTHONPATH=/tmp/site.
"""
import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", help="the GGUF file (Arbor's default model)")
    ap.add_argument("--batches", default="1,32,128,512", help="comma-separated batch sizes")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    folder, name = os.path.split(os.path.abspath(args.gguf))
    t = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).cuda().eval()
    print(f"loaded in {time.time() - t:.1f}s on {torch.cuda.get_device_name()}", file=sys.stderr)
    question = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?"
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def run(batch: int, new: int) -> float:
        enc = tok([text] * batch, return_tensors="pt", padding=True).to("cuda")
        torch.cuda.synchronize()
        t = time.time()
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=args.temperature,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tok.pad_token_id,
            )
        torch.cuda.synchronize()
        wall = time.time() - t
        generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        return generated / wall

    run(2, 8)  # warm-up: kernels, allocator
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        rate = run(b, args.new)
        rows.append((b, rate))
        print(json.dumps({"batch": b, "new_tokens": args.new, "tok_per_s": round(rate, 1)}), flush=True)
    print("\n| batch | transformers eager bf16, tok/s |\n|---|---|")
    for b, rate in rows:
        print(f"| {b} | {rate:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
