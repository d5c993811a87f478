#!/usr/bin/env bash
# The whole GPU check in one run, inside 8 minutes on one H100/H200, with a summary table printed last.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # from the repository root
#
# Parts, each its own process under its own time limit (a part that fails or runs out of time prints FAIL and
# the run goes on); times from run E on an H200 (238 s in all, docs/gpu.md):
#   1. kernels   attention backends against the torch reference (bf16 tolerances)        16 s
#   2. parity    engine greedy output against the PEFT-forward referee, Llama and Qwen2,
#                fp32 / TF32 off, eager, with CUDA-graph decode, with decode runs, and
#                without the fused layers                                                 26 s
#   -  gputests  the tests marked gpu (CUDA-graph replay = eager; backends and fused-layer kernels on
#                CUDA), if pytest is there                                                26 s
#   3. setup     random 1.1B-parameter Llama (bf16) and 256 random P=32 prefixes         16 s
#   4. ours      copy bandwidth, a warm-up of the whole workload, then 1,024 requests over
#                256 prefixes (decode runs of up to 16 forwards, the CUDA default), step
#                timings, a kernel profile                                                21 s
#   -  ours_async  ours with async scheduling (step k+1 sent before step k is read), which decides
#                whether it should be on by default on GPUs (never run yet)                ~20 s
#   5. peft      PEFT generate, one prefix, batch 256                                      21 s
#   6. cb        transformers generate_batch, 512 requests, no prefix                     35 s
#   -  scale     10,000 registered prefixes (hard links to the 256): the workload on one prefix, then
#                uniform, then Zipf, 2 rounds in one engine with a KV cache too small for all the
#                prefixes in use; rate against one prefix, prefix wait p99 (never run; ~60 s estimated)
#   7. ours1     ours with decode_steps=1 (one forward per engine step), for the runs' gain  18 s
#   8. ours_plain  decode_steps=1 and Hugging Face's layers (--fused-layers off): the engine of the
#                earlier runs, for the fused layers' gain; with its own kernel profile       21 s
#   9. ours512   ours again with max_num_seqs=512                                          18 s
#  10. ours8     ours with decode runs of up to 8 forwards (the default is 16)             20 s
# Parts 7-10 run only while time is left.
# Environment: GPU_CHECK_BUDGET_S (default 450: the hard end of the last part), GPU_CHECK_OUT (results folder),
# GPU_BENCH_LAYERS (the benchmark model's layer count, default 16), GPU_CHECK_PARTS (a rerun of some parts on a
# warm machine, e.g. "ours ours8": only those run, other parts' results in GPU_CHECK_OUT are kept for the
# summary; setup runs too when its model is missing).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
export PYTHONPATH="${PYTHONPATH:-.}"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${GPU_CHECK_OUT:-/tmp/prefix_serve_gpu_check}
WORK=/tmp/prefix_serve_gpu_bench
if [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 8000000 ] 2>/dev/null; then
  WORK=/dev/shm/prefix_serve_gpu_bench  # 2 GB of weights and 512 MB of prefixes: memory is faster than disk
fi
START=$(date +%s)
PARTS=${GPU_CHECK_PARTS:-}
LAYERS=${GPU_BENCH_LAYERS:-16}
if [ -n "$PARTS" ] && [ "$(cat "$WORK/setup.done" 2>/dev/null)" != "$LAYERS" ]; then PARTS="$PARTS setup"; fi
mkdir -p "$OUT"
if [ -z "$PARTS" ]; then rm -f "$OUT"/*.json "$OUT"/*.log; fi
PY=${PYTHON:-python3}

elapsed() { echo $(( $(date +%s) - START )); }
wanted() { [ -z "$PARTS" ] || [[ " $PARTS " == *" $1 "* ]]; }

# run_part NAME CAP_SECONDS COMMAND...: run under min(CAP, time left - 15 s for the summary)
run_part() {
  local name=$1 cap=$2
  shift 2
  if ! wanted "$name"; then return 0; fi
  local left=$(( BUDGET - $(elapsed) - 15 ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    echo "SKIP $name: out of time ($(elapsed) s used of $BUDGET)"
    return 1
  fi
  rm -f "$OUT/$name.log" "$OUT/$name.json"
  if [ "$name" = parity ]; then rm -f "$OUT/engine.json"; fi
  echo "=== $name (limit ${limit} s, at $(elapsed) s) ==="
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "Warning|warnings.warn|^\s*$|forward_call|warn\(" | cut -c1-400
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAIL $name: killed at its time limit of ${limit} s (partial results kept)"
  elif [ "$rc" -ne 0 ]; then
    echo "FAIL $name: exit code $rc (log: $OUT/$name.log)"
  fi
  echo "=== $name done in $(( $(date +%s) - t0 )) s (total $(elapsed) s) ==="
  return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
# Which code ran, without trusting git (a copied tree may carry a stale .git): a digest of the Python sources.
# The same command on a checkout gives the digest to compare with.
TREE=$(find engine scheduler workers benchmarks -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)
echo "source digest $TREE"

run_part kernels 60 "$PY" -m benchmarks.gpu_parity kernels --out "$OUT/kernels.json"
run_part parity 160 "$PY" -m benchmarks.gpu_parity engine --out "$OUT/engine.json" --budget-s 120
if "$PY" -c "import pytest" 2>/dev/null; then
  run_part gputests 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_graphs.py \
    tests/test_attention_backends.py tests/test_fused.py
else
  echo "SKIP gputests: pytest is not installed"
fi
if wanted setup; then
  rm -f "$WORK/setup.done"
  run_part setup 70 "$PY" -m benchmarks.gpu_bench setup --dir "$WORK" --out "$OUT/setup.json" \
    ${GPU_BENCH_LAYERS:+--num-layers "$GPU_BENCH_LAYERS"} && mkdir -p "$WORK" && echo "$LAYERS" > "$WORK/setup.done"
fi
run_part ours 150 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours.json" --max-num-seqs 256
run_part ours_async 90 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours_async.json" \
  --max-num-seqs 256 --async-scheduling --no-profile
run_part peft 70 "$PY" -m benchmarks.gpu_bench peft --dir "$WORK" --out "$OUT/peft.json"
CB_REQUESTS=512
if [ $(( BUDGET - $(elapsed) )) -lt 150 ]; then CB_REQUESTS=256; fi
run_part cb 120 "$PY" -m benchmarks.gpu_bench cb --dir "$WORK" --out "$OUT/cb.json" --cb-requests "$CB_REQUESTS"
run_part scale 120 "$PY" -m benchmarks.gpu_bench scale --dir "$WORK" --out "$OUT/scale.json" --max-num-seqs 256
if [ $(( BUDGET - $(elapsed) )) -gt 100 ]; then
  run_part ours1 90 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours1.json" --max-num-seqs 256 \
    --decode-steps 1 --no-profile
fi
if [ $(( BUDGET - $(elapsed) )) -gt 100 ]; then
  run_part ours_plain 90 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours_plain.json" \
    --max-num-seqs 256 --decode-steps 1 --fused-layers off
fi
if [ $(( BUDGET - $(elapsed) )) -gt 100 ]; then
  run_part ours512 90 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours512.json" --max-num-seqs 512 \
    --no-profile
fi
if [ $(( BUDGET - $(elapsed) )) -gt 100 ]; then
  run_part ours8 90 "$PY" -m benchmarks.gpu_bench ours --dir "$WORK" --out "$OUT/ours8.json" --max-num-seqs 256 \
    --decode-steps 8 --no-profile
fi

echo "total $(elapsed) s; logs and JSON in $OUT; source digest $TREE"
if ! timeout 30 "$PY" -m benchmarks.gpu_bench summary --results "$OUT"; then
  echo "FAIL summary; raw results:"
  for f in "$OUT"/*.json; do echo "--- $f"; head -c 3000 "$f"; echo; done
fi
