"""Ray placement and actor groups on local Ray (2 CPUs): gloo group, errors, colocated engines;
every port of a one-machine run on loopback; what a worker start prints."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from megatron_fipo.cluster import (
    RayActorGroup,
    WorkerError,
    WorkerSlot,
    create_placement,
    init_ray,
    plan_placement,
)
from megatron_fipo.cluster.actor_group import _distributed_env, rendezvous_address
from megatron_fipo.config import load_config
from megatron_fipo.megatron.cpu_compat import KNOWN_WARNINGS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny-cpu.yaml"


class SumWorker:
    """A worker that uses the process group the group formed for it."""

    def __init__(self, scale: float) -> None:
        import torch.distributed as dist

        self.scale = scale
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def environment(self) -> dict:
        import torch.distributed as dist

        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {
            "backend": dist.get_backend(),
            "visible": visible,
            **{k: os.environ[k] for k in keys},
        }

    def all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values) * self.scale * (self.rank + 1)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def echo(self, value):
        return (self.rank, value)

    def pid(self) -> int:
        return os.getpid()

    def explode(self, bad_rank: int) -> int:
        if self.rank == bad_rank:
            return _inner_failure(self.rank)
        return self.rank


def _inner_failure(rank: int) -> int:
    raise ValueError(f"boom on rank {rank}")


class EngineStub:
    """Stands in for a rollout engine actor: reports the process it lives in."""

    def where(self) -> tuple[int, str]:
        return os.getpid(), os.environ.get("RANK", "")

    def gpus(self) -> tuple[str | None, str | None]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("FIPO_GPU_IDS")

    def die(self) -> None:
        os._exit(3)


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test classes travel by value
    # Two logical GPUs: Ray schedules and assigns them like real ones (CUDA_VISIBLE_DEVICES, GPU
    # ids), so the GPU placement path runs here; the workers themselves only use gloo.
    init_ray(num_cpus=2, num_gpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def gpu_placement(ray_session):
    overrides = ["trainer.gpus_per_node=2", "rollout.engine_tensor_parallel_size=2"]
    plan = plan_placement(load_config(TINY, overrides), cpus_per_gpu=0.25)
    placement = create_placement(plan, timeout_s=60)
    yield placement
    ray_session.util.remove_placement_group(placement.placement_group)


@pytest.fixture(scope="module")
def group(gpu_placement):
    workers = RayActorGroup.training(SumWorker, gpu_placement, worker_kwargs={"scale": 2.0})
    yield workers
    workers.shutdown()


def test_two_workers_form_a_gloo_group_and_all_reduce(group):
    # rank r contributes [1, 2] * 2 * (r + 1): the sum over ranks 0 and 1 is [1, 2] * 2 * 3.
    assert group.run_all("all_reduce", [1.0, 2.0]) == [[6.0, 12.0], [6.0, 12.0]]
    env = group.run_all("environment")
    assert [e["RANK"] for e in env] == ["0", "1"] and {e["WORLD_SIZE"] for e in env} == {"2"}
    assert [e["LOCAL_RANK"] for e in env] == ["0", "1"]  # both on this node
    import ray

    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"  # a local start stays on loopback
    assert env[0]["MASTER_ADDR"] == env[1]["MASTER_ADDR"] == "127.0.0.1"
    assert env[0]["backend"] == "gloo"
    assert sorted(e["visible"] for e in env) == ["0", "1"]  # Ray gave each rank its own GPU
    assert group.run_each("echo", [("a",), ("b",)]) == [(0, "a"), (1, "b")]
    assert group.run_rank(1, "echo", "c") == (1, "c")


def test_worker_failure_surfaces_with_its_traceback(group):
    with pytest.raises(WorkerError) as caught:
        group.run_all("explode", 1)
    text = str(caught.value)
    assert "rank 1 failed in explode: ValueError: boom on rank 1" in text
    assert "_inner_failure" in text and "traceback of rank 1" in text
    with pytest.raises(WorkerError, match="SumWorker has no method 'missing'"):
        group.run_all("missing")
    assert group.run_all("echo", 5) == [(0, 5), (1, 5)]  # the group still works afterwards


def test_a_failing_constructor_is_reported(ray_session):
    slots = [WorkerSlot(bundle_index=0, num_cpus=0.5, num_gpus=0.0)]
    with pytest.raises(WorkerError, match=r"rank 0 failed in SumWorker.__init__: TypeError"):
        RayActorGroup(SumWorker, 1, slots, backend="gloo")  # missing `scale`


def test_a_dead_worker_is_reported(ray_session):
    slots = [WorkerSlot(bundle_index=0, num_cpus=0.25, num_gpus=0.0)]
    engines = RayActorGroup(EngineStub, 1, slots, backend=None, name="engine")
    assert engines.run_rank(0, "where")[1] == "0"  # RANK is set even without a process group
    with pytest.raises(WorkerError, match="engine rank 0 died during die"):
        engines.run_all("die")


def test_gpu_placement_orders_bundles_and_shares_them_with_engines(gpu_placement, group):
    train = gpu_placement.train_slots()
    (engine,) = gpu_placement.engine_slots()
    assert [slot.gpu_ids for slot in train] == [(0,), (1,)]  # rank order follows GPU order
    assert engine.gpu_ids == (0, 1) and engine.bundle_index == train[0].bundle_index
    assert [slot.num_gpus for slot in (*train, engine)] == [0.5, 0.5, 0.5]  # colocated halves
    visible = [e["visible"] for e in group.run_all("environment")]
    assert visible == ["0", "1"]
    engines = RayActorGroup.engines(EngineStub, gpu_placement)
    try:
        # The engine sees every GPU of its node (Ray does not narrow it) and is told its TP group.
        assert engines.run_all("gpus") == [(None, "0,1")]
    finally:
        engines.kill()


def test_colocated_placement_from_the_tiny_config(ray_session):
    config = load_config(TINY, ["trainer.cpus_per_node=1"])
    plan = plan_placement(config)
    assert plan.colocated and plan.train_bundles == (0,) and plan.engine_bundles == ((0,),)
    placement = create_placement(plan, timeout_s=30)
    try:
        (train_slot,), (engine_slot,) = placement.train_slots(), placement.engine_slots()
        assert train_slot.bundle_index == engine_slot.bundle_index == placement.bundle_order[0]
        trainer = RayActorGroup.training(SumWorker, placement, worker_kwargs={"scale": 1.0})
        engines = RayActorGroup.engines(EngineStub, placement)
        assert trainer.run_all("all_reduce", [3.0]) == [[3.0]]  # a world of one
        ((engine_pid, _),) = engines.run_all("where")
        assert engine_pid != os.getpid()
        trainer.shutdown()
        engines.kill()
    finally:
        ray_session.util.remove_placement_group(placement.placement_group)


def test_plans_for_gpu_clusters():
    big = load_config(CONFIGS / "qwen2.5-32b-fipo.yaml")
    plan = plan_placement(big)
    assert plan.use_gpu and plan.num_bundles == 128 and plan.colocated
    assert len(plan.engine_bundles) == 32 and plan.engine_bundles[1] == (4, 5, 6, 7)
    assert plan.train_fraction + plan.engine_fraction == pytest.approx(1.0)
    split = load_config(
        CONFIGS / "qwen2.5-32b-fipo.yaml",
        ["rollout.colocate=false", "rollout.num_gpus=64", "trainer.nnodes=24"],
    )
    plan = plan_placement(split)
    assert not plan.colocated and plan.num_bundles == 192
    assert plan.train_bundles == tuple(range(128))
    assert plan.engine_bundles[0] == (128, 129, 130, 131) and len(plan.engine_bundles) == 16
    assert (plan.train_fraction, plan.engine_fraction) == (1.0, 1.0)


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _listening_sockets(processes) -> dict[int, list[str]]:
    """``{pid: ["ip:port", ...]}`` of the TCP sockets each process listens on."""
    found: dict[int, list[str]] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(process.pid, []).append(f"{conn.laddr.ip}:{conn.laddr.port}")
    return found


def test_every_port_of_a_one_machine_run_listens_on_loopback(group):
    # The driver (this process), Ray's processes and the two gloo ranks of `group`.
    me = psutil.Process()
    tree = [me, *me.children(recursive=True)]
    listening = _listening_sockets(tree)
    names = {p.pid: p.name() for p in tree if p.pid in listening}
    public = {
        f"{names[pid]} ({pid})": [a for a in addresses if not _is_loopback(a.rsplit(":", 1)[0])]
        for pid, addresses in listening.items()
    }
    assert not {k: v for k, v in public.items() if v}, public
    # The check saw the parts that matter: Ray's servers and rank 0's rendezvous store.
    assert {"gcs_server", "raylet"} <= set(names.values()), names
    env = group.run_all("environment")
    rank0 = next(p for p in tree if p.pid == group.run_rank(0, "pid"))
    store = f"127.0.0.1:{env[0]['MASTER_PORT']}"
    assert store in listening[rank0.pid], listening[rank0.pid]


def test_rendezvous_is_on_loopback_unless_the_ranks_span_machines(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert rendezvous_address(["10.1.0.5"] * 4) == "127.0.0.1"
    assert rendezvous_address(["10.1.0.5", "10.1.0.5", "10.1.0.6"]) == "10.1.0.5"
    local = _distributed_env(["10.1.0.5"] * 2, "127.0.0.1", 29500, use_gpu=False)
    assert {e["GLOO_SOCKET_IFNAME"] for e in local} == {"lo"}  # gloo on the loopback device
    spread = _distributed_env(["10.1.0.5", "10.1.0.6"], "10.1.0.5", 29500, use_gpu=True)
    assert [e["MASTER_ADDR"] for e in spread] == ["10.1.0.5", "10.1.0.5"]
    assert not any("GLOO_SOCKET_IFNAME" in e for e in spread)  # multi-node: gloo's own choice
    no_group = _distributed_env(["10.1.0.5"], "127.0.0.1", None, use_gpu=False)
    assert "MASTER_PORT" not in no_group[0] and no_group[0]["RANK"] == "0"


def _harness_listeners(rank: int, world_size: int) -> list[str]:
    connections = psutil.Process().net_connections(kind="tcp")
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in connections if c.status == psutil.CONN_LISTEN]


def test_a_harness_world_listens_on_loopback_only():
    from megatron_harness import WorkerWorld

    with WorkerWorld(2) as world:
        listeners = world.run(_harness_listeners)
    assert listeners[0], "rank 0 serves the rendezvous store"
    assert all(_is_loopback(a.rsplit(":", 1)[0]) for ranks in listeners for a in ranks), listeners


class MegatronStep:
    """Builds, saves, loads and trains a one-layer actor (check_parallel's layout body, which
    reaches every known warning), with this process's stderr captured."""

    def run(self) -> str:
        from megatron_fipo.megatron import check_parallel

        settings = check_parallel.CheckSettings(num_layers=1)
        with tempfile.TemporaryFile(mode="w+") as sink, tempfile.TemporaryDirectory() as work:
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
            try:
                check_parallel.run_layout(check_parallel.layout(), settings, work, True)  # saves
                check_parallel.run_layout(check_parallel.layout(), settings, work, False)  # loads
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            return sink.read()


def test_a_worker_start_prints_one_fallback_line_and_no_known_warning(ray_session):
    slots = [WorkerSlot(bundle_index=0, num_cpus=0.25, num_gpus=0.0)]
    worker = RayActorGroup(MegatronStep, 1, slots, backend="gloo")
    try:
        (printed,) = worker.run_all("run")
    finally:
        worker.kill()
    assert printed.count("CPU fallbacks in use:") == 1, printed[-3000:]
    assert "torch norms (no Apex)" in printed
    assert not [k.message for k in KNOWN_WARNINGS if k.message in printed], printed[-3000:]


def test_every_filtered_warning_is_real():
    """Without the filters, the same work shows every entry of KNOWN_WARNINGS: none is stale."""
    code = (
        "import tempfile\n"
        "from megatron_fipo.megatron import cpu_compat\n"
        "cpu_compat.filter_known_warnings = lambda: None  # what follows runs unfiltered\n"
        "from megatron_fipo.megatron import check_parallel as cp\n"
        "from megatron_fipo.megatron.distributed import free_port, set_local_world_env\n"
        "set_local_world_env(0, 1, free_port())\n"
        "work, settings = tempfile.mkdtemp(), cp.CheckSettings(num_layers=1)\n"
        "cp.run_layout(cp.layout(), settings, work, True)\n"
        "cp.run_layout(cp.layout(), settings, work, False)\n"
    )
    # -W default: DeprecationWarnings show too, as they do under pytest.
    command = [sys.executable, "-W", "default", "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    missing = [k.message for k in KNOWN_WARNINGS if k.message not in done.stderr]
    assert not missing, f"never raised, so not needed: {missing}"
