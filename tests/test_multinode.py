"""The multi-node launch for real, on one machine: ``launch/train_32b.sh`` runs twice, as NODE_RANK
0 (the Ray head and the driver) on 127.0.0.2 and NODE_RANK 1 on 127.0.0.3, two Ray nodes of one
CPU each (own ports, temp dirs and node-rank resources) with configs/tiny-cpu-2node.yaml: TP 2
with one training rank and one HF engine per node.

- the driver's placement by node is the dry run's, on the two nodes' own addresses;
- both engines sample every step with the newest weights version, and their log-probs agree
  with the actor's; two steps and their checkpoints complete;
- every listening socket of the ranks and engines of a node is on that node's address (the
  rendezvous on rank 0's node, gloo on each rank's own), never on 127.0.0.1;
- the worker node's raylet killed in the middle of step 2: the driver stops within a minute with
  one line naming the lost node; both nodes restarted with --resume auto continue from
  step_000001 (a ``.partial`` directory is never picked) and end with the uninterrupted run's
  metrics.

The three two-node runs take about 4 minutes on 2 cores: they are marked ``multinode`` and run
by ``make test-multinode`` (CI runs it after ``make test``); the quick checks of the pieces
(placement lines, the rank environment, gloo bound to a node address) run in ``make test``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from megatron_fipo.data.synthetic import SyntheticTaskConfig, prepare_synthetic
from megatron_fipo.megatron.distributed import free_port
from megatron_fipo.run_state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch/train_32b.sh"
CONFIG = "configs/tiny-cpu-2node.yaml"
ADDRESSES = ("127.0.0.2", "127.0.0.3")  # both loopback on Linux, one per simulated node
STEPS = 2
LOST_NODE_LIMIT_S = 60.0
RAY_WORKER_PORTS = range(10002, 20000)  # ray start's default --min/--max-worker-port
# Engine and actor compute the same fp32 log-softmax in different orders (TP 2 splits the
# vocabulary and the heads): rounding of u = 2^-24 per operation, accumulated over dot
# products of up to 64 terms (the MLP width), on log-probs of size up to ~32 (ln 512 = 6.2 for
# a uniform token; a sampled token far below that is rare at temperature 1).
LOGPROB_TOLERANCE = 64 * 2.0**-24 * 32
NODE_LINE = re.compile(
    r"node (\d+)(?: \((\S+), Ray node (\w+)\))?: train ranks (\S+), engines (\S+)"
)


@dataclass
class Cluster:
    """Ports, temp dir and environment shared by the runs of one test module."""

    temp: Path
    env: dict[str, str]
    ports: dict[str, int]
    overrides: list[str]
    started: list[subprocess.Popen]

    def node_env(self, rank: int, log_dir: Path) -> dict[str, str]:
        ray_args = [
            f"--temp-dir {self.temp / f'n{rank}'}",
            "--object-store-memory 100000000",
            f"--dashboard-agent-listen-port {self.ports[f'agent{rank}']}",
        ]
        if rank == 0:
            ray_args.append(f"--ray-client-server-port {self.ports['client']}")
        return {
            **self.env,
            "NODE_RANK": str(rank),
            "NODE_ADDR": ADDRESSES[rank],
            "RAY_START_ARGS": " ".join(ray_args),
            "LOG_DIR": str(log_dir),
        }

    def start(self, rank: int, output: Path, *args: str) -> subprocess.Popen:
        """``launch/train_32b.sh`` as node ``rank``; its output goes to ``output/node<rank>.log``."""
        output.mkdir(parents=True, exist_ok=True)
        log = (output / f"node{rank}.log").open("a")
        process = subprocess.Popen(
            ["bash", str(SCRIPT), "--config", CONFIG, *args, *self.overrides,
             f"trainer.output_dir={output / 'run'}"],
            cwd=ROOT, env=self.node_env(rank, output / "logs"), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.started.append(process)
        return process

    def run(self, output: Path, *args: str, during=None) -> tuple[int, str]:
        """Both nodes; the head's exit status and output once it ends (the worker is then
        stopped: its Ray node would wait a minute for the gone head)."""
        worker = self.start(1, output, *args)
        head = self.start(0, output, *args)
        try:
            if during is not None:
                during(head, worker)
            head.wait(timeout=600)
        finally:  # a failed check stops both nodes: the next run reuses the ports
            stop(head)
            stop(worker)
        return head.returncode, (output / "node0.log").read_text()


def stop(process: subprocess.Popen, grace_s: float = 45.0) -> None:
    """End a launch script and what it started: SIGTERM to its group (``ray start --block``
    stops its Ray node), SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    paths = prepare_synthetic(base / "data", SyntheticTaskConfig(num_train=32, num_eval=4))
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's.
    temp = Path(tempfile.mkdtemp(prefix="fipo-mn-", dir="/tmp"))
    ports = {name: free_port(ADDRESSES[0]) for name in ("gcs", "client", "agent0", "agent1")}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GPUS_PER_NODE")}
    env.update(
        NNODES="2",
        MASTER_ADDR=ADDRESSES[0],
        RAY_PORT=str(ports["gcs"]),
        GPUS_PER_NODE="0",
        CPUS_PER_NODE="1",
        NODE_WAIT_S="300",
        PYTHON=sys.executable,
        PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}",
    )
    overrides = [
        f"data.train_files=[{paths.train_file}]",
        f"model.tokenizer_path={paths.tokenizer_dir}",
        "reward.function=trainer_reward_fns:flaky_length_reward",  # random model: varied rewards
    ]
    started: list[subprocess.Popen] = []
    yield Cluster(temp, env, ports, overrides, started)
    for process in started:
        stop(process)
    shutil.rmtree(temp, ignore_errors=True)


def _nodes(text: str) -> dict[int, tuple]:
    """{node: (address, ranks, engines)} from placement-by-node lines."""
    return {int(m[1]): (m[2], m[4], m[5]) for m in NODE_LINE.finditer(text)}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}


def _sockets(root: psutil.Process) -> dict[str, dict[str, list[str]]]:
    """{process: {"listen": [address:port], "connect": [peer address:port]}} for every process
    under ``root`` (Ray's daemons, the ranks and engines, the driver on the head); "connect"
    holds the peers of the connections the process opened (its local port is not one it
    listens on)."""
    names = {}
    for process in root.children(recursive=True):
        try:
            names[process.pid] = f"{(process.cmdline() or [process.name()])[0]} (pid {process.pid})"
        except psutil.Error:
            continue
    found: dict[str, dict[str, list[str]]] = {}
    listening: dict[int, set[str]] = {}
    established = []
    out = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        for pid in map(int, re.findall(r"pid=(\d+),", line)):
            if pid not in names:
                continue
            if fields[0] == "LISTEN":
                listening.setdefault(pid, set()).add(fields[3].rsplit(":", 1)[1])
                found.setdefault(names[pid], {"listen": [], "connect": []})["listen"].append(
                    fields[3]
                )
            elif fields[0] == "ESTAB":
                established.append((pid, fields[3], fields[4]))
    for pid, local, peer in established:
        if local.rsplit(":", 1)[1] not in listening.get(pid, set()):
            found.setdefault(names[pid], {"listen": [], "connect": []})["connect"].append(peer)
    return found


def _wait_for(
    path: Path, process: subprocess.Popen, timeout: float = 400, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the head ended before {path}"
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """One uninterrupted two-node run; the listening sockets of each node sampled mid-run."""
    output = tmp_path_factory.mktemp("straight")
    sockets = {}

    def sample(head, worker):
        _wait_for(output / "run/checkpoints/step_000001/COMPLETE", head)
        for rank, process in enumerate((head, worker)):
            sockets[rank] = _sockets(psutil.Process(process.pid))

    started = time.monotonic()
    status, log = cluster.run(output, during=sample)
    print(f"two-node run of {STEPS} steps: {time.monotonic() - started:.0f} s")
    assert status == 0, log[-4000:]
    return output, log, sockets


@pytest.mark.multinode
def test_two_nodes_train_as_the_dry_run_planned(cluster, straight):
    output, log, _ = straight
    dry = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--config", CONFIG],
        cwd=ROOT, env=cluster.node_env(0, output / "logs"), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    planned = _nodes(dry.stdout)
    assert planned == {0: (None, "0", "0"), 1: (None, "1", "1")}

    assert "train_32b.sh: all 2 nodes joined:" in log
    for rank, address in enumerate(ADDRESSES):
        assert f"NODE_RANK {rank}: {address} (Ray node " in log
    placed = _nodes(log[log.index("fipo-train: placement by node:") :])
    assert {n: (r, e) for n, (_, r, e) in placed.items()} == {
        n: (r, e) for n, (_, r, e) in planned.items()
    }
    assert [placed[n][0] for n in (0, 1)] == list(ADDRESSES)  # node k on its own address

    records = _metrics(output / "run")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        # Step k samples with version k (one sync before step 1, one after each step) on both
        # engines, one per node; their log-probs are the actor's up to fp32 rounding.
        version = record["step"]
        assert record["rollout/weights_version"] == version
        assert record["rollout/engine_weights_version_min"] == version
        assert record["rollout/engine_weights_version_max"] == version
        assert record["rollout/logprob_diff_max"] <= LOGPROB_TOLERANCE, record
        assert record["actor/grad_norm"] > 0  # the weights did change between versions
    assert latest_checkpoint(output / "run").name == f"step_{STEPS:06d}"


@pytest.mark.multinode
def test_each_node_uses_its_own_address_and_no_one_connects_to_loopback(straight):
    """Node k's ranks and engines listen on ADDRESSES[k] (the rendezvous store on rank 0's
    node, gloo on each rank's own), and no process of either node connects to 127.0.0.1: the
    address another node would be told when an endpoint follows the host name (here "vm",
    which /etc/hosts maps to 127.0.0.1)."""
    _, _, sockets = straight
    training = []  # per node: the rank (it listens for gloo on the node address)
    for rank, address in enumerate(ADDRESSES):
        seen = sockets[rank]
        hosts = [p for p in seen if p.startswith("ray::_WorkerHost")]  # ranks and engines
        for process in hosts:
            for local in seen[process]["listen"]:
                host, port = local.rsplit(":", 1)
                # Ray's own gRPC server of each worker: all interfaces, in its worker ports.
                ray_server = host == "*" and int(port) in RAY_WORKER_PORTS
                assert _host(local) == address or ray_server, (rank, process, local)
        for process, found in seen.items():
            assert {_host(peer) for peer in found["connect"]} <= set(ADDRESSES), (process, found)
        ranks = [p for p in hosts if any(_host(a) == address for a in seen[p]["listen"])]
        assert len(ranks) == 1, seen
        training.append(seen[ranks[0]])
    # Rank 1 reached rank 0's rendezvous and gloo sockets on node 0's address.
    reached = {_endpoint(a) for a in training[1]["connect"]}
    assert reached & {_endpoint(a) for a in training[0]["listen"]}, training


def _host(address: str) -> str:
    """``[::ffff:127.0.0.2]:80`` / ``127.0.0.2:80`` -> ``127.0.0.2``."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:")


def _endpoint(address: str) -> str:
    return f"{_host(address)}:{address.rsplit(':', 1)[1]}"


@pytest.mark.multinode
def test_lost_worker_node_stops_the_driver_and_resume_matches(cluster, straight, tmp_path):
    output = tmp_path / "fault"
    killed: dict[str, float] = {}

    def kill_worker_raylet(head, worker):
        _wait_for(output / "run/checkpoints/step_000001/COMPLETE", head, poll_s=0.05)
        time.sleep(1.0)  # into step 2: generation and training take several seconds
        raylets = [p for p in psutil.Process(worker.pid).children(recursive=True)
                   if p.name() == "raylet"]  # fmt: skip
        assert len(raylets) == 1, raylets
        raylets[0].kill()
        killed["at"] = time.monotonic()
        killed["steps_logged"] = len(_metrics(output / "run"))
        head.wait(timeout=120)
        killed["stopped_after"] = time.monotonic() - killed["at"]

    status, log = cluster.run(output, during=kill_worker_raylet)
    print(f"driver stopped {killed['stopped_after']:.1f} s after the raylet was killed")
    assert killed["steps_logged"] == 1, "the raylet was killed after step 2, not during it"
    assert status == 1, log[-4000:]
    assert killed["stopped_after"] < LOST_NODE_LIMIT_S
    lost = [line for line in log.splitlines() if "left the cluster" in line]
    assert len(lost) == 1, log[-4000:]
    assert lost[0].startswith(f"fipo-train: node {ADDRESSES[1]} (NODE_RANK 1, Ray node ")
    assert "resume from step_000001 with --resume auto" in lost[0]
    assert "Traceback" not in log
    worker_log = (output / "node1.log").read_text()
    assert "node 1 left the cluster while the head runs" in worker_log  # it exited by itself
    # Step 2 never completed its checkpoint (at most a step_000002.partial, never picked).
    assert not (output / "run/checkpoints/step_000002").exists()
    assert latest_checkpoint(output / "run").name == "step_000001"

    status, log = cluster.run(output, "--resume", "auto")
    assert status == 0, log[-4000:]
    assert f"resumed from {output / 'run/checkpoints/step_000001'}" in log
    records, resumed = _metrics(straight[0] / "run"), _metrics(output / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in records]
    for mine, theirs in zip(resumed, records):
        assert _stable(mine) == pytest.approx(_stable(theirs), rel=1e-6, abs=1e-9), mine["step"]


# ---------------------------------------------------------------- quick checks (make test)


def test_node_lines_name_ranks_and_engines_per_node():
    from megatron_fipo.cluster.placement import node_lines, plan_by_node, plan_placement
    from megatron_fipo.config import load_config

    config = load_config(ROOT / "configs/qwen2.5-32b-fipo.yaml", ["rollout.colocate=false",
                         "rollout.num_gpus=64", "trainer.nnodes=24"])  # fmt: skip
    lines = node_lines(plan_by_node(plan_placement(config), 8))
    assert lines[0] == "node 0: train ranks 0-7, engines none"
    assert lines[16] == "node 16: train ranks none, engines 0-1"  # engine TP 4: two per node
    assert len(lines) == 24
    tiny = load_config(ROOT / CONFIG)
    assert node_lines(plan_by_node(plan_placement(tiny), 1)) == [
        "node 0: train ranks 0, engines 0",
        "node 1: train ranks 1, engines 1",
    ]


def test_ranks_get_their_node_address_only_when_the_world_spans_machines(monkeypatch):
    from megatron_fipo.cluster.actor_group import NODE_ADDRESS_ENV, _distributed_env

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    two = _distributed_env(["10.0.0.1", "10.0.0.2"], "10.0.0.1", 29500, use_gpu=False)
    assert [env[NODE_ADDRESS_ENV] for env in two] == ["10.0.0.1", "10.0.0.2"]
    assert {env["MASTER_ADDR"] for env in two} == {"10.0.0.1"}
    one = _distributed_env(["10.0.0.1", "10.0.0.1"], "127.0.0.1", 29500, use_gpu=False)
    assert not any(NODE_ADDRESS_ENV in env for env in one)
    assert {env["GLOO_SOCKET_IFNAME"] for env in one} == {"lo"}  # loopback world: on lo


GLOO_RANK = """
import os, subprocess, sys, datetime
import torch, torch.distributed as dist
from megatron_fipo.cluster.actor_group import bind_gloo_to
from megatron_fipo.megatron.distributed import rendezvous_store
rank, port, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
bind_gloo_to(address)
store = rendezvous_store("127.0.0.2", port, rank, 2, datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
group = dist.new_group([0, 1])  # a subgroup, as Megatron makes them, binds the same way
total = torch.ones(1)
dist.all_reduce(total, group=group)
out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
mine = [line.split()[3] for line in out.splitlines() if f"pid={os.getpid()}," in line]
print(int(total), " ".join(sorted({m.rsplit(":", 1)[0] for m in mine})), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_gloo_listens_on_the_node_address_it_is_bound_to():
    """Without the binding gloo listens where the host name resolves, 127.0.0.1 on this
    machine (/etc/hosts), whatever the node's address."""
    port = free_port(ADDRESSES[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", GLOO_RANK, str(rank), str(port), address],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, address in enumerate(ADDRESSES)
    ]
    outputs = [rank.communicate(timeout=120)[0].split() for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert outputs == [["2", ADDRESSES[0]], ["2", ADDRESSES[1]]]  # the store is rank 0's too


# ---------------------------------------------------------------------------- SGLang servers
def test_servers_listen_on_the_node_address_only_when_other_nodes_post_to_them(monkeypatch):
    """With ``rollout.weight_sync=nccl`` over several machines, each stage's sending training
    rank posts the update requests to every server: servers on 127.0.0.1 would be unreachable
    from another node (it would connect to its own loopback). Colocated, or on one machine,
    they stay on loopback."""
    from megatron_fipo.cluster import workers
    from megatron_fipo.config import load_config

    big = ROOT / "configs/qwen2.5-32b-fipo.yaml"
    separate = load_config(big, ["rollout.colocate=false", "rollout.num_gpus=16"])
    colocated = load_config(big)
    two_nodes, one_node = ["10.0.0.1", "10.0.0.2"], ["10.0.0.1", "10.0.0.1"]
    assert workers.servers_reached_from_other_nodes(separate, two_nodes)
    assert not workers.servers_reached_from_other_nodes(separate, one_node)
    assert not workers.servers_reached_from_other_nodes(colocated, two_nodes)

    assert workers.server_host("127.0.0.1", "10.0.0.2") == "10.0.0.2"
    assert workers.server_host("10.9.9.9", "10.0.0.2") == "10.9.9.9"  # a chosen address stays

    monkeypatch.setattr(workers, "_node_address", lambda: "10.0.0.2")
    monkeypatch.delenv(workers.SERVERS_ON_NODE_ADDRESS, raising=False)
    assert workers._sglang_engine_config(separate, "/model").host == "127.0.0.1"
    monkeypatch.setenv(workers.SERVERS_ON_NODE_ADDRESS, "1")
    settings = workers._sglang_engine_config(separate, "/model")
    assert settings.host == "10.0.0.2" and settings.rollout.weight_sync_mode == "nccl"
