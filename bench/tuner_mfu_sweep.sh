#!/usr/bin/env bash
# A prepared MFU sweep for a short loan of one GPU (about 10 minutes of runs): the measured best
# (13B LoRA, batch 3, every other layer recomputed) as the baseline, then the memory-lean options
# (LlavaTuner's memory.lora_dropout_recompute, memory.compile) spending their memory on larger
# batches or no recompute. Each run is capped, so one that hangs or runs out of memory costs its
# cap only; results go to $OUT (or bench/results) as JSON lines, failures with their last lines.
#   bash bench/tuner_mfu_sweep.sh h100        # or h200, a100
#   RUNS="1 3" CAP=150 bash bench/tuner_mfu_sweep.sh h100   # some runs only, 150 s each at most
# Run 0 measures what bf16 GEMMs of the 13B layer shapes reach on the card (bench/gemm_peak.py,
# a few seconds; to gemm_peak.jsonl beside the sweep's file), to read the MFU figures against.
# Compiled runs spend about a minute compiling in their warmup steps. SWEEP_EXTRA is appended to
# every run (later flags win): the tests smoke-run the sweep on CPU with
#   SWEEP_EXTRA="--size tiny --device cpu --seq-len 640 --steps 1 --warmup 1"
# and GEMM_EXTRA="--device cpu --tokens 64 --hidden 64 --intermediate 128 --iters 2".
set -u
gpu=${1:-h100}
out=${OUT:-bench/results}/tuner_mfu_sweep.jsonl
cap=${CAP:-120}
runs=" ${RUNS:-0 1 2 3 4 5 6} "
n=0
mkdir -p "$(dirname "$out")"
if [[ $runs == *" 0 "* ]]; then
  # shellcheck disable=SC2086  # GEMM_EXTRA is a list of flags
  timeout 120 python bench/gemm_peak.py --gpu "$gpu" ${GEMM_EXTRA:-} >>"$(dirname "$out")/gemm_peak.jsonl"
  tail -n 1 "$(dirname "$out")/gemm_peak.jsonl"
fi
run() {
  n=$((n + 1))
  [[ $runs == *" $n "* ]] || return 0
  local log
  # shellcheck disable=SC2086  # SWEEP_EXTRA is a list of flags
  log=$(timeout "$cap" python bench/tuner_mfu.py --size 13b --gpu "$gpu" --steps 6 "$@" ${SWEEP_EXTRA:-} 2>&1)
  local rc=$?
  if [ $rc -eq 0 ]; then
    python -c 'import json,re,sys; t=re.findall(r"(?ms)^\{$.*?^\}$", sys.stdin.read())[-1]; print(json.dumps(json.loads(t)))' <<<"$log" >>"$out"
  else
    python -c 'import json,sys; print(json.dumps({"args": sys.argv[2:], "rc": int(sys.argv[1]), "tail": sys.stdin.read()[-600:]}))' "$rc" "$@" <<<"$log" >>"$out"
  fi
  tail -n 1 "$out"
}
ac=(--activation-checkpointing --checkpoint-every 2)
run --batch-size 3 "${ac[@]}" --loss hf                                # the measured 38.5 %
run --batch-size 3 "${ac[@]}"                                           # + supervised logits only
run --batch-size 4 "${ac[@]}" --lora-dropout-recompute
run --batch-size 4 "${ac[@]}" --lora-dropout-recompute --compile
run --batch-size 2 --lora-dropout-recompute --compile                  # no recompute at all
run --batch-size 8 "${ac[@]}" --lora-dropout-recompute --compile
