"""Benchmark: the per-device weight sync of a run (Ray, TP = 2, two HF engines) vs memcpy.

Local Ray with two CPU training ranks (Megatron TP = 2, fp32) and one HF engine on each rank's
bundle, colocated: the real ``EngineLifecycle.sync_weights`` of the loop (engines resume, every
rank gathers each bucket over TP, converts it to HF names, packs it into a shared-memory buffer,
and the engine beside it copies it in; engines resume the rest). Reported: model bytes divided
by the best-of-N sync time, next to a plain ``dst.copy_(src)`` of the same bytes timed in the
training ranks of the same run -- by every rank at once, as the sync has each rank write the
model into its own engine, and by one rank alone -- their ratios (target >= 0.5), and what one
sync moved through the driver (its TCP bytes, from ``ss``) and the Ray object store (the
raylet's cumulative created bytes).

Usage: python tools/bench/weight_routes.py [--hidden 1024] [--layers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_fipo.cluster.workers import EngineWorker, TrainWorker

ROOT = Path(__file__).resolve().parents[2]


class BenchTrainWorker(TrainWorker):
    def memcpy_seconds(self, num_bytes: int, repeats: int) -> float:
        src = torch.empty(num_bytes, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in once
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return best

    def hf_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.weight_sync.iter_hf_tensors())


def driver_tcp_bytes() -> int:
    """Bytes this process sent plus received over TCP so far (``ss``: per-socket counters)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    total, ours = 0, False
    for line in out.splitlines():
        if "users:(" in line:
            ours = f"pid={os.getpid()}," in line
        elif ours:
            total += sum(int(v) for v in re.findall(r"bytes_(?:sent|received):(\d+)", line))
    return total


def object_store_created_bytes(ray) -> int:
    """Bytes ever created in the Ray object store (the raylet's cumulative counter)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.cumulative_created_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from ray import cloudpickle

    from megatron_fipo.cluster import RayActorGroup, create_placement, init_ray, plan_placement
    from megatron_fipo.cluster.colocation import EngineLifecycle
    from megatron_fipo.cluster.workers import hf_config_of
    from megatron_fipo.components import engine_routes
    from megatron_fipo.config import load_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            "model.hf_model_path=null",
            f"model.architecture.hidden_size={args.hidden}",
            f"model.architecture.intermediate_size={args.hidden * 3}",
            f"model.architecture.num_hidden_layers={args.layers}",
            "model.architecture.num_attention_heads=16",
            "model.architecture.num_key_value_heads=4",
            f"model.architecture.vocab_size={args.vocab}",
            "parallelism.tensor_model_parallel_size=2",
            "trainer.cpu_ranks_per_node=2",
            "trainer.eval_freq=null",
            "trainer.eval_before_train=false",
            f"rollout.weight_sync_bucket_bytes={args.bucket_mb * 2**20}",
        ],
    )
    init_ray(num_cpus=2)
    plan = plan_placement(config)
    placement = create_placement(plan)
    env = {"OMP_NUM_THREADS": "1"}
    engines = RayActorGroup.engines(
        EngineWorker, placement, worker_args=(config, hf_config_of(config).to_dict()), env=env
    )
    engines.run_all("release_memory")
    workers = RayActorGroup.training(
        BenchTrainWorker, placement, worker_args=(config, None), backend="gloo", env=env
    )
    workers.run_all("connect_engines", engine_routes(config, plan, engines))
    lifecycle = EngineLifecycle(workers, engines, colocated=True, use_gpu=False)
    try:
        model_bytes = workers.run_all("hf_bytes")[0]
        lifecycle.sync_weights(1)  # warm-up: buffers, shared-memory segments
        best, tcp, store = float("inf"), 0, 0
        for version in range(2, 2 + args.repeats):
            engines.run_all("release_memory")
            tcp_before, store_before = driver_tcp_bytes(), object_store_created_bytes(ray)
            start = time.perf_counter()
            lifecycle.sync_weights(version)
            best = min(best, time.perf_counter() - start)
            tcp = max(tcp, driver_tcp_bytes() - tcp_before)
            store = max(store, object_store_created_bytes(ray) - store_before)
        # The baseline both ways: one rank alone, and every rank at once (as in the sync, where
        # each rank writes the model's bytes into its own engine: the memory system is shared).
        alone = workers.run_rank(0, "memcpy_seconds", model_bytes, args.repeats)
        memcpy = max(workers.run_all("memcpy_seconds", model_bytes, args.repeats))
    finally:
        engines.run_all("shutdown")
        workers.kill()
        engines.kill()
    gb = model_bytes / 1e9
    result = dict(
        model_gb=round(gb, 3),
        tensor_parallel=2,
        engines=2,
        sync_s=round(best, 3),
        sync_gb_per_s=round(gb / best, 3),
        memcpy_gb_per_s=round(gb / memcpy, 3),
        ratio=round(memcpy / best, 3),
        memcpy_alone_gb_per_s=round(gb / alone, 3),
        ratio_to_memcpy_alone=round(alone / best, 3),
        driver_tcp_bytes_per_sync=tcp,
        object_store_bytes_per_sync=store,
    )
    print(json.dumps(result))
    print(
        f"weight sync of {result['model_gb']} GB into 2 colocated engines at TP=2: "
        f"{result['sync_gb_per_s']} GB/s; memcpy of the same bytes by every rank at once: "
        f"{result['memcpy_gb_per_s']} GB/s, ratio {result['ratio']} (one rank alone: "
        f"{result['memcpy_alone_gb_per_s']} GB/s, ratio {result['ratio_to_memcpy_alone']}); "
        f"through the driver {tcp} B, the object store {store} B"
    )


if __name__ == "__main__":
    main()
