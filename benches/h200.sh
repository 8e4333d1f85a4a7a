#!/bin/bash
# GPU speed on the lent H200: this build against the previous release, llama.cpp CUDA and
# transformers, in one session (ratios, not absolute figures: the machine is shared). Run from
# the repo root there, after the recipe in ../shared/GPU.md has joined the model into
# /tmp/model.gguf and unpacked into /tmp:
#   arbor   this build's stripped release binary
#   base    the previous release's, for the same commands
#   bench   `cargo bench --no-run --bench backends`'s binary (target/release/deps/backends-*)
# and, for the baselines, /tmp/llama.tar.xz (../shared/gpu/llamacpp-src.sh) and the gguf wheel
# installed into /tmp/site. A call carries at most 64 MiB with the tracked tree (8.1 MB), so the
# model went in ten 50 MB chunks (`split -b 50000000 -d -a 2 MODEL .gpu/q/q`), one a call, the
# binaries, wheel and tarball beside the first four; with the start, about 3 minutes.
# label SECONDS: labelling for SECONDS, then up to 4 min of fits (keep SECONDS <= 340).
# 2026-12-05: speed ~2.5 min, bench ~1 min, hf ~2.5 min (1 min of it loading), llama ~10 s
# after a ~5 min background build.
# usage: h200.sh quick [STEPS] | speed | bench [STEPS] | llama-build | llama | hf
#        | label [SECONDS] | eval SECONDS [ARGS...] | tune SECONDS [ARGS...]
#        | arbor SECONDS SUBCOMMAND [ARGS...]
set -u
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export XDG_RUNTIME_DIR=/tmp
here=$(cd "$(dirname "$0")" && pwd)
Q="Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
M="--model /tmp/model.gguf"
case "${1:-}" in
speed)
  # Single-sequence decode (generate prints tokens/s) and best-of-n at 16 / 64 / 256 samples
  # (generated tokens over wall time, the search's own work included), each binary in turn.
  for b in arbor base; do
    [ -x /tmp/$b ] || { echo "== no /tmp/$b: skipped"; continue; }
    echo "== $b generate, 256 tokens"
    /tmp/$b generate $M --device gpu --chat --max-tokens 256 --temperature 0 --prompt "$Q" 2>&1 >/dev/null | tail -1
    for n in 16 64 256; do
      s=$(date +%s.%N)
      /tmp/$b search $M --device gpu --strategy best-of-n --n $n --budget-tokens 1000000 \
        --json "$Q" > /tmp/bon.json 2>/tmp/bon.err || tail -3 /tmp/bon.err
      e=$(date +%s.%N)
      python3 -c "import json; c=json.load(open('/tmp/bon.json'))['costs']; w=$e-$s; \
print('== $b best-of-n $n: %d tokens in %.2f s = %.0f tok/s' % (c['generated_tokens'], w, c['generated_tokens']/w))"
    done
  done
  echo "== greedy parity, 48 tokens, real model"
  /tmp/arbor generate $M --device gpu --chat --max-tokens 48 --temperature 0 --prompt "$Q" > /tmp/g.txt 2>/dev/null
  /tmp/arbor generate $M --device cpu --chat --max-tokens 48 --temperature 0 --prompt "$Q" > /tmp/c.txt 2>/dev/null
  if cmp -s /tmp/g.txt /tmp/c.txt; then echo "GPU == CPU"; else echo "GPU != CPU"; diff /tmp/g.txt /tmp/c.txt; fi
  ;;
quick)
  # Needs no model (call 1 can run it): the backends bench on synthetic weights of the default
  # model's shapes and storage types, its variants against the defaults, then where a pass's
  # time goes, kernel by kernel (the whole log in /tmp/profile.log).
  export ARBOR_BENCH_SKIP_CPU=1
  ARBOR_BENCH_LANES=16,32 ARBOR_BENCH_STEPS=${2:-32} timeout 300 /tmp/bench --bench 2>&1 |
    grep --line-buffered -v '^$' | grep --line-buffered -E 'lanes|dispatch floor|logits|GB/s|with |###|^\|'
  ARBOR_BENCH_VARIANTS=0 ARBOR_BENCH_PROFILE=1 ARBOR_BENCH_STEPS=16 timeout 200 /tmp/bench --bench \
    > /tmp/profile.log 2>&1
  grep -A12 'profile' /tmp/profile.log | grep -v '^--$' | head -150
  ;;
bench)
  # The dispatch floor, then the backends bench on the real model: decode at 1..256 sequences
  # with device picks, and the host-pick rows (every logit read back) for the ratio; then
  # where the time goes.
  export ARBOR_BENCH_SHAPES=model ARBOR_BENCH_MODEL=/tmp/model.gguf ARBOR_BENCH_SKIP_CPU=1
  ARBOR_BENCH_LANES=8,16,32,64 ARBOR_BENCH_STEPS=${2:-32} timeout 240 /tmp/bench --bench 2>&1 |
    grep -v '^$' | grep -E 'lanes|dispatch floor|logits|GB/s|with |###|^\|'
  # Host phases and each kernel's GPU time, per measurement (the whole log in /tmp/profile.log).
  ARBOR_BENCH_VARIANTS=0 ARBOR_BENCH_PROFILE=1 ARBOR_BENCH_STEPS=16 timeout 240 /tmp/bench --bench \
    > /tmp/profile.log 2>&1
  grep -A12 'profile' /tmp/profile.log | grep -v '^--$' | head -200
  ;;
llama-build)
  # llama.cpp with CUDA from its own source (about five minutes, niced, on 12 of 16 cores); in the
  # background, so the next calls can go on. Log: /tmp/llama-build.log.
  cd /tmp && rm -rf llama.cpp && tar xJf /tmp/llama.tar.xz && cd llama.cpp &&
    setsid nohup nice -n 19 bash -c "cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF && \
      cmake --build build -j12 --target llama-bench llama-batched-bench && echo BUILT" \
      > /tmp/llama-build.log 2>&1 < /dev/null &
  echo "llama.cpp build started"
  ;;
llama)
  # llama.cpp CUDA on the same file: prefill (pp512) and one sequence (tg128), then 1 / 16 /
  # 64 / 256 sequences decoding 128 tokens after a 128-token prompt.
  b=/tmp/llama.cpp/build/bin
  [ -x $b/llama-bench ] || { tail -5 /tmp/llama-build.log; exit 1; }
  $b/llama-bench -m /tmp/model.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 3 2>&1 | grep -E '^\|'
  $b/llama-batched-bench -m /tmp/model.gguf -ngl 99 -fa on -c 70000 -b 2048 -ub 512 \
    -npp 128 -ntg 128 -npl 1,16,64,256 2>&1 | grep -E '^\|'
  ;;
hf)
  # transformers eager bf16 on the same file (benches/transformers_baseline.py).
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 300 python3 "$here/transformers_baseline.py" \
    /tmp/model.gguf --batches "${2:-1,32,128,512}" 2>&1 | grep -v Warning | tail -12
  ;;
label)
  # Verifier labels on the GPU (issue 17): `prm train` on training questions from 1000 (never
  # the development split) for SECONDS, resuming /tmp/lab/v1 (hidden states of the default
  # `--layers auto`), then heads fitted on the CPU to what is labelled so far, one per target
  # and penalty, in parallel. Heads, reports, plots and their labelled steps come back as one
  # file, $OUT/heads.tar.xz (the device returns only a few files a call).
  L=/tmp/lab/v1; H=/tmp/heads; mkdir -p /tmp/lab; rm -rf $H; mkdir -p $H
  C="--dataset /tmp/train.jsonl --offset 1000 --samples 8 --rollouts 2 --steps-per-solution 1 $M --labels $L"
  s=$(date +%s)
  timeout "${2:-300}" /tmp/arbor prm train $C --questions 5000 --in-flight 128 --kv-blocks 98304 \
    --device gpu --out /tmp/lab/first.safetensors > /tmp/label.log 2>&1
  echo "labelling: exit $? after $(( $(date +%s) - s )) s"; tail -c 400 /tmp/label.log; echo
  # Heads are fitted on the questions labelled without a gap, so none is labelled again.
  K=$(python3 -c "
import json
q = {json.loads(l).get('question') for l in open('$L.steps.jsonl')}
k = 0
while 1000 + k in q: k += 1
print(k)")
  echo "questions labelled from 1000 without a gap: $K"
  fit() { n=$1; shift; timeout 240 /tmp/arbor prm train $C --questions "$K" --device cpu \
    --epochs 3000 --out $H/$n.safetensors "$@" > $H/$n.log 2>&1; }
  fit hard-l01 --target hard --l2 0.1 & fit hard-l003 --target hard --l2 0.03 &
  fit hard-l03 --target hard --l2 0.3 & fit outcome-l01 --target outcome --l2 0.1 &
  fit hard-l01-h64 --target hard --l2 0.1 --hidden 64 --epochs 600 &
  # With the ranking loss among each question's samples (best-of-N selection; choose the
  # weight by the validation `selection` figures).
  fit hard-l01-pw3 --target hard --l2 0.1 --pairwise 3 & fit hard-l01-pw10 --target hard --l2 0.1 --pairwise 10 &
  wait
  for f in $H/*.log; do echo "== $f"; grep -E '^(held out|validation)' "$f"; done
  for f in $H/*.json; do python3 -c "
import json, sys
r = json.load(open('$f'))
for s in ('validation', 'held_out'):
    print('$f', s, json.dumps(r[s].get('selection')))" 2>/dev/null; done
  (cd $H && tar cf - *.safetensors *.json *.svg *.labels.jsonl *.log 2>/dev/null) | xz -T8 > "$OUT/heads.tar.xz"
  ;;
eval|tune|arbor)
  # `arbor eval ARGS` (or `arbor ARGS`: any subcommand, e.g. `prm train`) on the GPU, timed
  # and stopped after SECONDS; eval and prm train resume, so several calls can finish one run.
  # `tune`: eval on 300 training questions from 4000 (the tuning split: neither the head's
  # training questions, 1000-1937, nor the development split, 6973 on) into /tmp/tune, where
  # search settings may be chosen; the traces' `candidates` show which answer rule would win.
  what=$1; secs=$2; shift 2
  [ "$what" = eval ] && set -- eval $M --device gpu "$@"
  [ "$what" = tune ] && set -- eval $M --device gpu --dataset /tmp/train.jsonl --offset 4000 \
    --limit 300 --out /tmp/tune "$@"
  s=$(date +%s)
  timeout "$secs" /tmp/arbor "$@" > /tmp/$what.log 2>&1
  echo "$what: exit $? after $(( $(date +%s) - s )) s"
  tail -c 1500 /tmp/$what.log
  ;;
*)
  echo "usage: $0 quick [STEPS] | speed | bench [STEPS] | llama-build | llama | hf | label [SECONDS] | eval SECONDS [ARGS...] | tune SECONDS [ARGS...] | arbor SECONDS SUBCOMMAND [ARGS...]" >&2
  exit 2
  ;;
esac
