#!/usr/bin/env bash
# The CPU main job: FIPO RL on a tiny Qwen2-shaped model, through the real loop (Ray, Megatron
# actor, HF rollout engine, weight resharding, math reward), on one 2-core machine.
#
#   bash launch/train_tiny_cpu.sh [key.sub=value ...]     (overrides go to fipo-train)
#
# 1. sets up .venv if needed;
# 2. writes the synthetic arithmetic task and trains its tokenizer (cached);
# 3. supervised warm start of the model (cached: a second run goes straight to RL);
# 4. FIPO RL with configs/tiny-cpu.yaml (the warm start is converted to Megatron on the way);
# 5. prints held-out accuracy before and after RL (greedy and sampled) and plots the curves.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_venv.sh
PY=.venv/bin/python
OUT=outputs/tiny-cpu
RUN="$OUT/rl"
start=$(date +%s)
"$PY" -m megatron_fipo.data.synthetic --out "$OUT"
"$PY" -m megatron_fipo.warm_start --config configs/tiny-cpu.yaml --out "$OUT/warm_start"
rm -rf "$RUN"  # a fresh RL run each time (the warm start above is what is cached)
"$PY" -m megatron_fipo.cli --config configs/tiny-cpu.yaml "$@"
"$PY" tools/plot_metrics.py "$RUN/metrics.jsonl" --labels FIPO --out "$RUN/curves.png" \
  --title "tiny CPU FIPO run" >/dev/null
"$PY" - "$RUN/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
evals = [r for r in rows if "eval/greedy_accuracy" in r]
first, last = evals[0], evals[-1]
print(f"\nheld-out accuracy (step {first['step']} -> step {last['step']}):")
for kind in ("greedy", "sampled"):
    key = f"eval/{kind}_accuracy"
    print(f"  {kind:8s} {first[key]:.3f} -> {last[key]:.3f}  ({last[key] - first[key]:+.3f})")
PY
echo "curves: $RUN/curves.png   metrics: $RUN/metrics.jsonl   took $(( $(date +%s) - start )) s"
