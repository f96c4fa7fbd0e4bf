"""Per-device weight sync on local Ray (gloo, CPU): at TP = 2 and PP = 2, every training rank hands
the full weights to the HF engine on its own bundle through shared memory. Afterwards each
engine's weights equal the actor's bit for bit, and the driver and the Ray object store carried
no weight bytes: both are measured (the driver's TCP bytes with ``ss``, the object store's
cumulative created bytes from the raylet), not assumed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_fipo.cluster import RayActorGroup, create_placement, init_ray, plan_placement
from megatron_fipo.cluster.colocation import EngineLifecycle
from megatron_fipo.cluster.workers import EngineWorker, TrainWorker, hf_config_of
from megatron_fipo.components import engine_routes
from megatron_fipo.config import load_config
from tools.bench.weight_routes import driver_tcp_bytes, object_store_created_bytes

TINY = Path(__file__).resolve().parent.parent / "configs/tiny-cpu.yaml"


class InspectedTrainWorker(TrainWorker):
    def full_weights(self) -> dict:
        """The actor's weights as HF tensors (rank 0 of the model-parallel group)."""
        return {name: t.clone() for name, t in self.weight_sync.iter_hf_tensors()}

    def change_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(
            seed + self.actor.parallelism.tensor_model_parallel_size
        )
        for shard in self.actor.named_parameters_for_sync():
            shard.tensor.data.add_(torch.randn(shard.tensor.shape, generator=generator) * 0.01)


class InspectedEngineWorker(EngineWorker):
    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.engine.model.state_dict().items()}


@pytest.fixture(scope="module")
def ray_cpu():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _config(tp: int, pp: int):
    return load_config(
        TINY,
        [
            "model.hf_model_path=null",
            f"parallelism.tensor_model_parallel_size={tp}",
            f"parallelism.pipeline_model_parallel_size={pp}",
            "trainer.cpu_ranks_per_node=2",
            "trainer.eval_freq=null",
            "trainer.eval_before_train=false",
            "rollout.weight_sync_bucket_bytes=200000",  # several buckets
        ],
    )


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_rank_feeds_its_own_engine_bit_for_bit_and_nothing_crosses_the_driver(
    ray_cpu, tp, pp
):
    config = _config(tp, pp)
    plan = plan_placement(config)
    placement = create_placement(plan, timeout_s=60)
    env = {"OMP_NUM_THREADS": "1"}
    workers = RayActorGroup.training(
        InspectedTrainWorker, placement, worker_args=(config, None), backend="gloo", env=env
    )
    engines = RayActorGroup.engines(
        InspectedEngineWorker,
        placement,
        worker_args=(config, hf_config_of(config).to_dict()),
        env=env,
    )
    try:
        routes = engine_routes(config, plan, engines)
        assert [(r.kind, r.engine, r.tp_index) for r in routes] == [
            ("engine_weights", 0, 0),
            ("engine_weights", 1, 0),
        ]
        workers.run_all("connect_engines", routes)
        lifecycle = EngineLifecycle(workers, engines, colocated=True, use_gpu=False)
        engines.run_all("release_memory")
        for version, seed in ((1, 0), (2, 1)):  # a second sync after the weights changed
            workers.run_all("change_weights", seed)
            store_before, tcp_before = object_store_created_bytes(ray_cpu), driver_tcp_bytes()
            lifecycle.sync_weights(version)  # resume weights, sync, resume the rest
            tcp = driver_tcp_bytes() - tcp_before
            store = object_store_created_bytes(ray_cpu) - store_before
            expected = workers.run_all("full_weights")[0]
            model_bytes = sum(t.numel() * t.element_size() for t in expected.values())
            assert store == 0, store
            assert tcp < 64 * 1024 < model_bytes, (tcp, model_bytes)  # calls, not weights
            engines.run_all("release_memory")
            for weights in engines.run_all("weights"):
                assert sorted(weights) == sorted(expected)
                bad = [n for n in expected if not torch.equal(weights[n], expected[n])]
                assert not bad, [(n, float((weights[n] - expected[n]).abs().max())) for n in bad][
                    :6
                ]
            assert {h.weights_version for h in engines.run_all("health")} == {version}
    finally:
        workers.kill()
        engines.kill()
        ray_cpu.util.remove_placement_group(placement.placement_group)


def test_a_cuda_mapping_of_the_engines_weights_ends_with_its_update():
    """On CPU the training rank keeps the engine's shared-memory weights mapped between updates
    (faster next sync); over CUDA IPC it must not: the engine could not free mapped blocks when
    it releases memory for training. The rule is read from the mapped tensors' device."""
    from megatron_fipo.cluster.engine_links import EngineWeightsLink, keeps_mapping
    from megatron_fipo.rollout.flat_bucket import serialize_named

    weights = [("w", torch.zeros(4).share_memory_())]
    link = EngineWeightsLink(lambda: serialize_named(weights))
    with link.update(1):
        link.targets["w"].fill_(3.0)
    assert torch.equal(weights[0][1], torch.full((4,), 3.0))  # written in place
    assert keeps_mapping(link.targets)  # shared memory: kept for the next update

    class _CudaView:  # what a tensor opened from a CUDA IPC handle reports
        is_cuda = True

    assert not keeps_mapping({"w": _CudaView()}) and not keeps_mapping(None)
