"""Benchmark: weight resharding throughput (Megatron TP shards -> HF-named full tensors) vs memcpy.

Two spawned processes (gloo, TP = 2) each hold their TP shards of a Qwen2.5-0.5B-shaped model
(494 M parameters, bf16: about 1 GB; random values, tied embeddings, vocab padded for TP). Rank 0
runs :meth:`megatron_fipo.rollout.weight_sync.WeightSync.iter_hf_tensors` (TP shards sent point-to-point
into the bucket, QKV / gate-up split, vocab strip) and, with
``--copy-into-engine``, copies every yielded tensor into preallocated HF-shaped destination
tensors the way an engine loads them. Reported: the full model bytes divided by the slowest
rank's best-of-N time, next to a plain ``dst.copy_(src)`` of the same number of bytes measured in
the same process, and their ratio (target: at least 0.5). Also reported: the time to just send
half the bytes from rank 1 to rank 0 (the transport floor of any TP=2 gather; on CPU gloo this
is loopback TCP, far below memcpy speed) and resharding's ratio to it.
Usage: python tools/bench/weight_sync.py [--bucket-mb 256] [--repeats 3] [--copy-into-engine]
       [--reuse-buffers]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from checkpoint_convert.adapters import adapter_for
from megatron_fipo.megatron.distributed import (
    free_port,
    init_process_group_from_env,
    set_local_world_env,
)
from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig
from tools.bench.timing import slowest_rank_best_time

QWEN25_05B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TP = 2


class Shard:
    """The fields of the actor's ParamShard that WeightSync reads."""

    def __init__(self, name, tensor, partition_dim, tp_rank):
        self.name, self.tensor, self.partition_dim = name, tensor, partition_dim
        self.tensor_parallel = partition_dim is not None
        self.tp_size, self.tp_rank = (TP if self.tensor_parallel else 1), tp_rank
        self.gated = name.endswith("linear_fc1.weight")


def build_shards(tp_rank: int, dtype: torch.dtype) -> list[Shard]:
    """This TP rank's shards, in Megatron's layout (vocab padded to 128 * TP)."""
    adapter = adapter_for(QWEN25_05B)
    vocab_pad = -(-QWEN25_05B["vocab_size"] // (128 * TP)) * (128 * TP)
    dims = {"linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0}
    dims |= {"linear_proj.weight": 1, "linear_fc2.weight": 1, "word_embeddings.weight": 0}
    generator = torch.Generator().manual_seed(tp_rank)
    shards = []
    for spec in adapter.megatron_specs():
        shape = list(spec.shape)
        if spec.key.startswith("embedding"):
            shape[0] = vocab_pad
        dim = next((d for suffix, d in dims.items() if spec.key.endswith(suffix)), None)
        if dim is not None:
            shape[dim] //= TP
        layers = range(adapter.dims.num_layers) if spec.per_layer else [None]
        for layer in layers:
            name = spec.key if layer is None else spec.key.replace("layers.", f"layers.{layer}.")
            tensor = torch.empty(shape, dtype=dtype).normal_(generator=generator)
            shards.append(Shard(name, tensor, dim, tp_rank))
    return shards


def _rank_main(rank: int, port: int, args, results) -> None:
    set_local_world_env(rank, TP, port)
    torch.set_num_threads(1)
    init_process_group_from_env("gloo")
    dtype = getattr(torch, args.dtype)
    shards = build_shards(rank, dtype)
    world = dist.group.WORLD
    pp_group = dist.new_group([rank], use_local_synchronization=True)  # one stage per TP rank
    config = WeightSyncConfig(
        bucket_bytes=args.bucket_mb * 1024**2, reuse_buffers=args.reuse_buffers
    )
    sync = WeightSync(lambda: shards, QWEN25_05B, config, tp_group=world, pp_group=pp_group)
    engine_params = {}
    if rank == 0 and args.copy_into_engine:
        shapes = adapter_for(QWEN25_05B).hf_shapes()
        engine_params = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}

    def reshard():
        for name, tensor in sync.iter_hf_tensors(convert=rank == 0):
            if engine_params:
                engine_params[name].copy_(tensor)

    reshard_s = slowest_rank_best_time(reshard, args.repeats, warmup=False)
    model_bytes = sync.stats.num_bytes if rank == 0 else 0
    total = torch.tensor([model_bytes], dtype=torch.float64)
    dist.all_reduce(total)
    src = torch.empty(int(total.item()), dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    copy_s = slowest_rank_best_time(lambda: dst.copy_(src), args.repeats, warmup=False)
    # The transport floor: rank 1 sends its half of the bytes to rank 0, nothing else.
    half = src[: src.numel() // 2]
    chunk = args.bucket_mb * 1024**2

    def transfer():
        for start in range(0, half.numel(), chunk):
            piece = half[start : start + chunk]
            (dist.send(piece, dst=0) if rank == 1 else dist.recv(piece, src=1))

    p2p_s = slowest_rank_best_time(transfer, args.repeats, warmup=False)
    if rank == 0:
        gb = total.item() / 1e9
        results.put(
            dict(
                model_gb=round(gb, 3),
                bucket_mb=args.bucket_mb,
                num_buckets=sync.stats.num_buckets,
                copy_into_engine=args.copy_into_engine,
                reuse_buffers=args.reuse_buffers,
                reshard_s=round(reshard_s, 3),
                reshard_gb_per_s=round(gb / reshard_s, 3),
                memcpy_s=round(copy_s, 3),
                memcpy_gb_per_s=round(gb / copy_s, 3),
                ratio=round(copy_s / reshard_s, 3),
                p2p_half_s=round(p2p_s, 3),
                ratio_to_p2p_floor=round(p2p_s / reshard_s, 3),
            )
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--copy-into-engine", action="store_true")
    parser.add_argument(
        "--reuse-buffers", action="store_true", help="WeightSyncConfig.reuse_buffers"
    )
    args = parser.parse_args()
    port = free_port()
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_rank_main, args=(r, port, args, results)) for r in range(TP)
    ]
    for process in processes:
        process.start()
    result = results.get(timeout=1800)
    for process in processes:
        process.join()
    print(json.dumps(result))
    print(
        f"resharding {result['model_gb']} GB at TP={TP}: {result['reshard_gb_per_s']} GB/s; "
        f"memcpy of the same bytes: {result['memcpy_gb_per_s']} GB/s; ratio {result['ratio']}; "
        f"time of the bare TP transfer / resharding time: {result['ratio_to_p2p_floor']}"
    )


if __name__ == "__main__":
    main()
