#!/usr/bin/env bash
# The CPU main job: FIPO RL on a tiny Qwen2-shaped model, through the real loop (Ray, Megatron
# actor, HF rollout engine, weight resharding, math reward), on one 2-core machine.
#
#   bash launch/train_tiny_cpu.sh [--resume auto|CHECKPOINT_DIR] [key.sub=value ...]
#
# 1. sets up .venv if needed;
# 2. writes the synthetic arithmetic task and trains its tokenizer (cached);
# 3. supervised warm start of the model (cached: a second run goes straight to RL);
# 4. FIPO RL with configs/tiny-cpu.yaml (the warm start is converted to Megatron on the way);
# 5. prints held-out accuracy before and after RL (greedy and sampled) and plots the curves.
#
# Each run gets its own directory, $TINY_OUT/rl/<date-time>, unless trainer.output_dir=... is
# given; --resume auto continues the newest run there (or the given trainer.output_dir). Nothing
# is ever deleted. Environment: TINY_OUT [outputs/tiny-cpu] holds data, tokenizer, warm start and
# runs; WARM_START_STEPS [the warm start's default] sets the supervised steps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY=.venv/bin/python
OUT="${TINY_OUT:-outputs/tiny-cpu}"

resume=""
run=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --resume) resume="${2:?--resume needs auto or a checkpoint directory}"; shift 2 ;;
    --resume=*) resume="${1#--resume=}"; shift ;;
    trainer.output_dir=*) run="${1#trainer.output_dir=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -z "$run" && -n "$resume" && "$resume" != auto && "$resume" != disable ]]; then
  run="$(dirname "$(dirname "$resume")")"  # <run>/checkpoints/step_N
fi
if [[ -z "$run" && "$resume" == auto ]]; then
  run="$(find "$OUT/rl" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort | tail -n 1)"
  [[ -n "$run" ]] || echo "train_tiny_cpu.sh: no earlier run under $OUT/rl; starting a new one" >&2
fi
[[ -n "$run" ]] || run="$OUT/rl/$(date +%Y%m%d-%H%M%S)"
[[ -z "$resume" ]] || args+=(--resume "$resume")

start=$(date +%s)
"$PY" -m megatron_fipo.data.synthetic --out "$OUT"
data=(
  "model.tokenizer_path=$OUT/tokenizer/tokenizer.model"
  "model.hf_model_path=$OUT/warm_start"
  "data.train_files=[$OUT/data/train.jsonl]"
  "data.eval_files=[$OUT/data/eval.jsonl]"
)
warm=()
[[ -z "${WARM_START_STEPS:-}" ]] || warm=(--steps "$WARM_START_STEPS")
"$PY" -m megatron_fipo.warm_start --config configs/tiny-cpu.yaml --out "$OUT/warm_start" \
  "${warm[@]}" "${data[@]}"
echo "train_tiny_cpu.sh: run directory $run" >&2
"$PY" -m megatron_fipo.cli --config configs/tiny-cpu.yaml "${data[@]}" \
  "trainer.output_dir=$run" "${args[@]}"
"$PY" tools/plot_metrics.py "$run/metrics.jsonl" --labels FIPO --out "$run/curves.png" \
  --title "tiny CPU FIPO run" >/dev/null
"$PY" - "$run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
evals = [r for r in rows if "eval/greedy_accuracy" in r]
if not evals:
    print("\nno held-out evaluation in this run (trainer.eval_freq / eval_before_train are off)")
    sys.exit(0)
first, last = evals[0], evals[-1]
print(f"\nheld-out accuracy (step {first['step']} -> step {last['step']}):")
for kind in ("greedy", "sampled"):
    key = f"eval/{kind}_accuracy"
    print(f"  {kind:8s} {first[key]:.3f} -> {last[key]:.3f}  ({last[key] - first[key]:+.3f})")
PY
echo "curves: $run/curves.png   metrics: $run/metrics.jsonl   took $(( $(date +%s) - start )) s"
