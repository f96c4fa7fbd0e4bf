#!/usr/bin/env bash
# FIPO across a multi-node Ray cluster: Qwen2.5-32B on 16 nodes x 8 GPUs in the recipe, or CPU
# training ranks (GPUS_PER_NODE=0) for a tiny config such as configs/tiny-cpu-2node.yaml.
#
# Run the same command on every node (e.g. from your scheduler). Node 0 checks the layout,
# starts the Ray head, waits until NNODES nodes have joined, then runs fipo-train as the Ray
# driver (RAY_ADDRESS points it at the cluster) and streams its log to the terminal and LOG_DIR.
# The other nodes join the head and stay until their Ray node ends (the head went away):
#
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 address> bash launch/train_32b.sh \
#       [--config configs/qwen2.5-32b-fipo.yaml] [--dry-run] [--resume auto|DIR] [key.sub=value ...]
#
# --dry-run needs no GPU and no Ray: it validates the layout (world size, heads by TP, layers
# by PP, sequence length by 2*CP*TP, batch by DP) and prints the placement by node and an
# estimate of memory per GPU, then exits (non-zero when the layout is impossible).
#
# Environment (defaults in brackets):
#   NNODES [16]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]: node 0's address, reachable from all
#   NODE_ADDR [MASTER_ADDR on node 0, else Ray's choice]: the address of this node; its Ray
#     services, its training ranks' collectives and (on rank 0's node) the rendezvous use it
#   GPUS_PER_NODE [GPUs nvidia-smi sees]: 0 selects CPU training ranks (the config's
#     trainer.cpu_ranks_per_node on each node)
#   CPUS_PER_NODE [nproc]: CPUs this node gives Ray (CPU ranks: trainer.cpus_per_node too)
#   RAY_PORT [6379]  RAY_START_ARGS: more `ray start` options for this node, e.g. --temp-dir
#     and ports, to run several nodes on one host (tests/test_multinode.py does)
#   RAY_AUTH_MODE [token when a Ray token is found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
#     ~/.ray/auth_token), else disabled]: every node and the driver use the same mode
#   LOG_DIR [logs]  PYTHON [.venv/bin/python]  NODE_WAIT_S [900]  GPU_MEMORY_GIB [80]
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME / NCCL_IB_HCA: passed through when set.
# The repository (and the model / data paths of the config) must be at the same path on every
# node, e.g. on a shared filesystem; checkpoints are written there by the ranks of every node.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CONFIG="configs/qwen2.5-32b-fipo.yaml"
DRY_RUN=0
RESUME=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    --resume) RESUME=(--resume "${2:?--resume needs auto, disable or a checkpoint}"); shift 2 ;;
    --resume=*) RESUME=(--resume "${1#--resume=}"); shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
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
GPUS_GIVEN="${GPUS_PER_NODE:+yes}"  # an explicit 0 selects CPU ranks; none found refuses
if [[ -z "$GPUS_GIVEN" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
[[ -f "$CONFIG" ]] || { echo "train_32b.sh: config $CONFIG not found" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"

layout_check() {
  local world=(--nnodes "$NNODES")
  # Without visible GPUs (a dry run on a laptop) the config's own trainer.gpus_per_node is used.
  [[ "$GPUS_PER_NODE" -gt 0 || -n "$GPUS_GIVEN" ]] && world+=(--gpus-per-node "$GPUS_PER_NODE")
  "$PYTHON" -m megatron_fipo.cluster.layout --config "$CONFIG" "${world[@]}" \
    --gpu-memory-gib "$GPU_MEMORY_GIB" "${OVERRIDES[@]}"
}

if [[ "$DRY_RUN" == 1 ]]; then
  layout_check
  exit $?
fi

if [[ "$GPUS_PER_NODE" -eq 0 && -z "$GPUS_GIVEN" ]]; then
  echo "train_32b.sh: no GPUs visible (set GPUS_PER_NODE; GPUS_PER_NODE=0 runs CPU ranks)" >&2
  exit 2
fi

# NCCL / CUDA settings for Megatron TP+SP+CP over NVLink within a node and IB across nodes.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP/SP comm-compute order
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # NVLS buffers compete with the colocated engines
export NCCL_CUMEM_ENABLE="${NCCL_CUMEM_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONUNBUFFERED=1
export RAY_DEDUP_LOGS=0
# `ray start --head` turns token authentication on when it finds a token, but a joining node or
# a driver uses it only when told: without one mode everywhere the head refuses them.
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  RAY_AUTH_MODE=disabled
  if [[ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" || -f "$HOME/.ray/auth_token" ]]; then
    RAY_AUTH_MODE=token
  fi
fi
export RAY_AUTH_MODE

RAY="$(dirname "$PYTHON")/ray"
[[ -x "$RAY" ]] || RAY="ray"
[[ "$NODE_RANK" == 0 ]] && NODE_ADDR="${NODE_ADDR:-$MASTER_ADDR}"
# Each node carries a resource naming its NODE_RANK, so the driver's placement says which node
# is which. `--block` keeps Ray's processes children of this script's `ray start`: they end
# with it, and nothing here runs `ray stop`, which would end every Ray on the machine.
RAY_ARGS=(--block --disable-usage-stats --resources "{\"fipo_node_rank_$NODE_RANK\": 1}")
[[ -n "${NODE_ADDR:-}" ]] && RAY_ARGS+=(--node-ip-address "$NODE_ADDR")
if [[ "$GPUS_PER_NODE" -gt 0 ]]; then
  RAY_ARGS+=(--num-gpus "$GPUS_PER_NODE")
  [[ -n "${CPUS_PER_NODE:-}" ]] && RAY_ARGS+=(--num-cpus "$CPUS_PER_NODE")
else
  CPUS_PER_NODE="${CPUS_PER_NODE:-$(nproc)}"
  RAY_ARGS+=(--num-cpus "$CPUS_PER_NODE")
fi
read -r -a EXTRA_RAY_ARGS <<<"${RAY_START_ARGS:-}"
RAY_ARGS+=("${EXTRA_RAY_ARGS[@]}")

RAY_PID=""
stop_ray() {
  [[ -n "$RAY_PID" ]] || return 0
  kill -TERM "$RAY_PID" 2>/dev/null || true
  wait "$RAY_PID" 2>/dev/null || true
}
trap stop_ray EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

if [[ "$NODE_RANK" != 0 ]]; then
  # Wait for the head's port, join, and stay until this Ray node ends.
  deadline=$((SECONDS + NODE_WAIT_S))
  until (exec 3<>"/dev/tcp/$MASTER_ADDR/$RAY_PORT") 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "train_32b.sh: node $NODE_RANK: no Ray head at $MASTER_ADDR:$RAY_PORT within $NODE_WAIT_S s" >&2
      exit 1
    fi
    sleep 2
  done
  "$RAY" start --address "$MASTER_ADDR:$RAY_PORT" "${RAY_ARGS[@]}" &
  RAY_PID=$!
  status=0
  wait "$RAY_PID" || status=$?
  RAY_PID=""
  if ! (exec 3<>"/dev/tcp/$MASTER_ADDR/$RAY_PORT") 2>/dev/null; then
    echo "train_32b.sh: node $NODE_RANK: the head has ended; leaving" >&2
    exit 0
  fi
  echo "train_32b.sh: node $NODE_RANK left the cluster while the head runs (ray start exited with status $status)" >&2
  exit "$status"
fi

layout_check  # fail before starting anything when the layout cannot work

"$RAY" start --head --port "$RAY_PORT" --include-dashboard=false "${RAY_ARGS[@]}" &
RAY_PID=$!

"$PYTHON" - "$MASTER_ADDR" "$RAY_PORT" "$NNODES" "$NODE_WAIT_S" "$RAY_PID" <<'EOF'
import os, socket, sys, time

host, port, nnodes, wait_s, head_pid = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:])
deadline = time.monotonic() + wait_s


def give_up(why):
    sys.exit(f"train_32b.sh: {why}")


while True:  # the head's GCS port first: ray.init on a closed port blocks for minutes
    try:
        os.kill(head_pid, 0)
    except ProcessLookupError:
        give_up(f"the Ray head did not start on {host}:{port} (its output is above)")
    try:
        socket.create_connection((host, port), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            give_up(f"the Ray head did not open {host}:{port} within {wait_s} s")
        time.sleep(1)

import ray

ray.init(address=f"{host}:{port}", logging_level="ERROR")
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < nnodes:
    if time.monotonic() > deadline:
        give_up(f"only {len(alive)} of {nnodes} nodes joined within {wait_s} s")
    time.sleep(2)


def rank_of(node):
    names = [r for r in node["Resources"] if r.startswith("fipo_node_rank_")]
    return int(names[0].rsplit("_", 1)[1]) if names else -1


print(f"train_32b.sh: all {nnodes} nodes joined:")
for node in sorted(alive, key=rank_of):
    rank = rank_of(node)
    resources = node["Resources"]
    print(
        f"  NODE_RANK {rank if rank >= 0 else '?'}: {node['NodeManagerAddress']} "
        f"(Ray node {node['NodeID']}), {resources.get('CPU', 0):g} CPU, "
        f"{resources.get('GPU', 0):g} GPU"
    )
EOF

FIPO_TRAIN="$(dirname "$PYTHON")/fipo-train"
[[ -x "$FIPO_TRAIN" ]] || FIPO_TRAIN="fipo-train"
mkdir -p "$LOG_DIR"
LOG_FILE="$LOG_DIR/train_32b-$(date +%Y%m%d-%H%M%S).log"
echo "train_32b.sh: starting fipo-train as the Ray driver; log: $LOG_FILE"
WORLD=("trainer.nnodes=$NNODES" "trainer.gpus_per_node=$GPUS_PER_NODE")
[[ "$GPUS_PER_NODE" -gt 0 ]] || WORLD+=("trainer.cpus_per_node=$CPUS_PER_NODE")

# The driver runs here on node 0 and joins the cluster through RAY_ADDRESS; its output and the
# workers' (forwarded by Ray) go to the terminal and the log file.
set +e
RAY_ADDRESS="$MASTER_ADDR:$RAY_PORT" "$FIPO_TRAIN" --config "$CONFIG" "${RESUME[@]}" \
  "${WORLD[@]}" "${OVERRIDES[@]}" 2>&1 | tee "$LOG_FILE"
status="${PIPESTATUS[0]}"
set -e
echo "train_32b.sh: fipo-train exited with status $status"
exit "$status"
