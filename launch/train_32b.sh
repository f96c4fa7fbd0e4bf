#!/usr/bin/env bash
# FIPO on Qwen2.5-32B across a multi-node GPU cluster (16 nodes x 8 GPUs in the recipe), on Ray.
#
# Run the same command on every node (e.g. from your scheduler); node 0 checks the layout,
# starts the Ray head, waits for the others to join, then runs fipo-train as the Ray driver
# (RAY_ADDRESS points it at the cluster) and streams its log to the terminal and LOG_DIR:
#
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 address> bash launch/train_32b.sh \
#       [--config configs/qwen2.5-32b-fipo.yaml] [--dry-run] [key.sub=value ...]
#
# --dry-run needs no GPU and no Ray: it validates the layout (world size, heads by TP, layers
# by PP, sequence length by 2*CP*TP, batch by DP) and prints the placement and an estimate of
# memory per GPU, then exits (non-zero when the layout is impossible).
#
# Environment (defaults in brackets):
#   NNODES [16]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  GPUS_PER_NODE [GPUs nvidia-smi sees;
#   the config's trainer.gpus_per_node when none]  RAY_PORT [6379]  LOG_DIR [logs]
#   PYTHON [.venv/bin/python]  NODE_WAIT_S [900]  GPU_MEMORY_GIB [80]
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / NCCL_IB_HCA: passed through when set.
# The repository (and the model / data paths of the config) must be at the same path on every
# node, e.g. on a shared filesystem.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONFIG="configs/qwen2.5-32b-fipo.yaml"
DRY_RUN=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    --*) echo "train_32b.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "train_32b.sh: expected key.sub=value, got '$1'" >&2; exit 2 ;;
  esac
done

NNODES="${NNODES:-16}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
RAY_PORT="${RAY_PORT:-6379}"
LOG_DIR="${LOG_DIR:-$ROOT/logs}"
NODE_WAIT_S="${NODE_WAIT_S:-900}"
GPU_MEMORY_GIB="${GPU_MEMORY_GIB:-80}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
if [[ -z "${GPUS_PER_NODE:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
[[ -f "$CONFIG" ]] || { echo "train_32b.sh: config $CONFIG not found" >&2; exit 2; }

layout_check() {
  local world=(--nnodes "$NNODES")
  # Without visible GPUs (a dry run on a laptop) the config's own trainer.gpus_per_node is used.
  [[ "$GPUS_PER_NODE" -gt 0 ]] && world+=(--gpus-per-node "$GPUS_PER_NODE")
  "$PYTHON" -m megatron_fipo.cluster.layout --config "$CONFIG" "${world[@]}" \
    --gpu-memory-gib "$GPU_MEMORY_GIB" "${OVERRIDES[@]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  layout_check
  exit $?
fi

[[ "$GPUS_PER_NODE" -gt 0 ]] || { echo "train_32b.sh: no GPUs visible (set GPUS_PER_NODE)" >&2; exit 2; }

# NCCL / CUDA settings for Megatron TP+SP+CP over NVLink within a node and IB across nodes.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP/SP comm-compute order
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # NVLS buffers compete with the colocated engines
export NCCL_CUMEM_ENABLE="${NCCL_CUMEM_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONUNBUFFERED=1
export RAY_DEDUP_LOGS=0

RAY="$(dirname "$PYTHON")/ray"
[[ -x "$RAY" ]] || RAY="ray"

if [[ "$NODE_RANK" != 0 ]]; then
  # Workers join the head and stay until it goes away (the job ended or failed).
  for _ in $(seq 1 60); do
    "$RAY" start --address "$MASTER_ADDR:$RAY_PORT" --num-gpus "$GPUS_PER_NODE" --block && exit 0
    echo "train_32b.sh: node $NODE_RANK could not join $MASTER_ADDR:$RAY_PORT yet; retrying" >&2
    sleep 10
  done
  exit 1
fi

layout_check  # fail before starting anything when the layout cannot work

"$RAY" start --head --node-ip-address "$MASTER_ADDR" --port "$RAY_PORT" \
  --num-gpus "$GPUS_PER_NODE" --include-dashboard=false
trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT

"$PYTHON" - "$MASTER_ADDR:$RAY_PORT" "$NNODES" "$NODE_WAIT_S" <<'EOF'
import sys, time
import ray

address, nnodes, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR")
deadline = time.monotonic() + wait_s
while (alive := sum(node["Alive"] for node in ray.nodes())) < nnodes:
    if time.monotonic() > deadline:
        sys.exit(f"train_32b.sh: only {alive} of {nnodes} nodes joined within {wait_s:.0f} s")
    time.sleep(5)
print(f"train_32b.sh: all {nnodes} nodes joined")
EOF

FIPO_TRAIN="$(dirname "$PYTHON")/fipo-train"
[[ -x "$FIPO_TRAIN" ]] || FIPO_TRAIN="fipo-train"
mkdir -p "$LOG_DIR"
LOG_FILE="$LOG_DIR/train_32b-$(date +%Y%m%d-%H%M%S).log"
echo "train_32b.sh: starting fipo-train as the Ray driver; log: $LOG_FILE"

# The driver runs here on node 0 and joins the cluster through RAY_ADDRESS; its output and the
# workers' (forwarded by Ray) go to the terminal and the log file.
set +e
RAY_ADDRESS="$MASTER_ADDR:$RAY_PORT" "$FIPO_TRAIN" --config "$ROOT/$CONFIG" \
  "trainer.nnodes=$NNODES" "trainer.gpus_per_node=$GPUS_PER_NODE" "${OVERRIDES[@]}" 2>&1 |
  tee "$LOG_FILE"
status="${PIPESTATUS[0]}"
set -e
echo "train_32b.sh: fipo-train exited with status $status"
exit "$status"
