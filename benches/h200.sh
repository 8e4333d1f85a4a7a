#!/bin/bash
# GPU speed on the lent H200, this build against a baseline build, in one run (ratios, not
# absolute figures: the machine is shared). Run from /tmp there, after the recipe in
# ../shared/GPU.md has joined the model into /tmp/model.gguf and unpacked, into /tmp:
#   arbor   this build's stripped release binary
#   base    the baseline's (the previous release), for the same commands
#   bench   `cargo bench --no-run --bench backends`'s binary (target/release/deps/backends-*)
# usage: h200.sh speed | bench [STEPS]
set -u
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export XDG_RUNTIME_DIR=/tmp
cd /tmp
Q="Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
M="--model /tmp/model.gguf"
case "${1:-}" in
speed)
  # Single-sequence decode (generate prints tokens/s) and best-of-n at 16 / 64 / 256 samples
  # (generated tokens over wall time, the search's own work included), each binary in turn.
  for b in arbor base; do
    echo "== $b generate, 256 tokens"
    /tmp/$b generate $M --device gpu --chat --max-tokens 256 --temperature 0 --prompt "$Q" 2>&1 | tail -1
    for n in 16 64 256; do
      s=$(date +%s.%N)
      /tmp/$b search $M --device gpu --strategy best-of-n --n $n --budget-tokens 1000000 \
        --json "$Q" > /tmp/bon.json 2>/tmp/bon.err || tail -3 /tmp/bon.err
      e=$(date +%s.%N)
      python3 -c "import json; c=json.load(open('/tmp/bon.json'))['costs']; w=$e-$s; \
print('== $b best-of-n $n: %d tokens in %.2f s = %.0f tok/s' % (c['generated_tokens'], w, c['generated_tokens']/w))"
    done
  done
  echo "== greedy parity, 48 tokens"
  /tmp/arbor generate $M --device gpu --chat --max-tokens 48 --temperature 0 --prompt "$Q" > /tmp/g.txt 2>/dev/null
  /tmp/arbor generate $M --device cpu --chat --max-tokens 48 --temperature 0 --prompt "$Q" > /tmp/c.txt 2>/dev/null
  if cmp -s /tmp/g.txt /tmp/c.txt; then echo "GPU == CPU"; else echo "GPU != CPU"; diff /tmp/g.txt /tmp/c.txt; fi
  ;;
bench)
  # The backends bench on the real model: decode at 1..256 sequences with device picks, and
  # the host-pick rows (every logit read back) for the ratio; then where the time goes.
  export ARBOR_BENCH_SHAPES=model ARBOR_BENCH_MODEL=/tmp/model.gguf ARBOR_BENCH_SKIP_CPU=1
  ARBOR_BENCH_STEPS=${2:-32} timeout 240 /tmp/bench --bench 2>&1 | tail -30
  ARBOR_BENCH_PROFILE=1 ARBOR_BENCH_STEPS=16 timeout 240 /tmp/bench --bench 2>&1 | grep profile
  ;;
*)
  echo "usage: $0 speed | bench [STEPS]" >&2
  exit 2
  ;;
esac
