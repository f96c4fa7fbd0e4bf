"""Launch dry run: layouts of the shipped configs, rejected layouts, memory estimate magnitudes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fipo.cluster.layout import (
    GIB,
    compute_placement,
    count_parameters,
    describe,
    estimate_memory,
    main,
    resize_world,
)
from megatron_fipo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FIPO_32B = CONFIGS / "qwen2.5-32b-fipo.yaml"


@pytest.mark.parametrize(
    "name,ranks,sizes,engines",
    [
        ("qwen2.5-32b-fipo.yaml", 128, (8, 2, 2, 4), 32),
        ("qwen2.5-32b-dapo.yaml", 128, (8, 2, 2, 4), 32),
        ("qwen2.5-7b-fipo.yaml", 32, (4, 1, 2, 4), 16),
        ("tiny-cpu.yaml", 1, (1, 1, 1, 1), 1),
        ("tiny-cpu-2node.yaml", 2, (2, 1, 1, 1), 2),
    ],
)
def test_shipped_configs_are_accepted(name, ranks, sizes, engines):
    placement = compute_placement(load_config(CONFIGS / name))
    got = (
        placement.tensor_parallel,
        placement.pipeline_parallel,
        placement.context_parallel,
        placement.data_parallel,
    )
    assert (placement.training_ranks, got, placement.num_engines) == (ranks, sizes, engines)
    assert placement.colocate


BROKEN = [
    (["parallelism.tensor_model_parallel_size=16"], {}, r"num_attention_heads \(40\) must be divisible by parallelism.tensor_model_parallel_size \(16\)"),
    (["model.architecture.num_hidden_layers=63"], {}, r"num_hidden_layers \(63\) must be divisible by parallelism.pipeline_model_parallel_size"),
    (["rollout.max_response_length=20001"], {}, r"rollout.max_prompt_length \+ rollout.max_response_length \(22049\) must be divisible by 2 \* parallelism.context_parallel_size \* tensor_model_parallel_size \(32\)"),
    ([], {"nnodes": 15}, r"world size 120 must be divisible by parallelism.tensor_model_parallel_size"),
    ([], {"gpus_per_node": 4}, r"tensor_model_parallel_size \(8\) must fit in one node"),
    ([], {"nnodes": 48}, r"data.ppo_mini_batch_size \* rollout.n_samples_per_prompt \(1024 sequences\) must be divisible by the data-parallel size 12"),
    (["rollout.colocate=false", "rollout.num_gpus=6"], {"nnodes": 17}, r"rollout.num_gpus \(6\) must be divisible by rollout.engine_tensor_parallel_size \(4\)"),
]  # fmt: skip


@pytest.mark.parametrize("overrides,world,message", BROKEN)
def test_impossible_layouts_are_rejected_naming_the_field(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        config = resize_world(
            load_config(FIPO_32B, overrides), world.get("nnodes"), world.get("gpus_per_node")
        )
        compute_placement(config)


def test_disaggregated_placement_takes_engine_gpus_out_of_training():
    overrides = ["rollout.colocate=false", "rollout.num_gpus=64"]
    config = resize_world(load_config(FIPO_32B, overrides), 24, None)  # 192 GPUs
    placement = compute_placement(config)
    assert (placement.training_ranks, placement.rollout_gpus, placement.num_engines) == (
        128,
        64,
        16,
    )
    report, summary = describe(config)
    assert "disaggregated, GPUs 0..127 train, GPUs 128..191 serve the engines" in report
    assert summary["placement"]["data_parallel"] == 4


def test_parameter_count_matches_qwen25_sizes():
    big, small = load_config(FIPO_32B), load_config(CONFIGS / "qwen2.5-7b-fipo.yaml")
    total_32b, _ = count_parameters(big.model.architecture, 1, 1)
    total_7b, _ = count_parameters(small.model.architecture, 1, 1)
    assert 32.5e9 < total_32b < 33.0e9  # Qwen2.5-32B: 32.8 B with the padded vocabulary
    assert 7.5e9 < total_7b < 7.7e9  # Qwen2.5-7B: 7.6 B


def test_memory_estimate_magnitudes_for_the_32b_recipe():
    config = load_config(FIPO_32B)
    memory = estimate_memory(config, config.model.architecture, compute_placement(config))
    share = memory.params_total * 2 / (8 * 2)  # bf16 weights / (TP * PP)
    assert 0.95 * share < memory.weights < 1.1 * share  # the stage with the embedding is largest
    assert 3.5 * GIB < memory.weights < 4.5 * GIB
    assert memory.gradients == pytest.approx(2 * memory.weights)  # fp32 grads of bf16 weights
    assert memory.optimizer == pytest.approx(memory.weights * 6 / 8)  # 12 B/param over DP*CP = 8
    assert 0.3 * GIB < memory.activations < 8 * GIB  # full recompute keeps layer inputs only
    assert 10 * GIB < memory.training_total < 40 * GIB
    assert memory.engine_weights == pytest.approx(memory.params_total * 2 / 4)  # engine TP 4


def test_memory_estimate_responds_to_the_knobs():
    def estimate(*overrides):
        config = load_config(FIPO_32B, list(overrides))
        return estimate_memory(config, config.model.architecture, compute_placement(config))

    base = estimate()
    no_recompute = estimate(
        "model.recompute_granularity=null",
        "model.recompute_method=null",
        "model.recompute_num_layers=null",
    )
    replicated = estimate(
        "parallelism.use_distributed_optimizer=false", "parallelism.overlap_param_gather=false"
    )
    assert no_recompute.activations > 10 * base.activations
    assert replicated.optimizer == pytest.approx(8 * base.optimizer)
    assert replicated.weights == base.weights


def test_layout_cli_prints_layout_and_memory(capsys):
    assert main(["--config", str(FIPO_32B), "--nnodes", "16", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "training ranks: 128 = TP 8 x PP 2 x CP 2 x DP 4" in out
    assert "32 sglang engine(s) x TP 4" in out and "colocated" in out
    for name in (
        "weights (bfloat16)",
        "gradients",
        "optimizer (Adam, 8 shard(s))",
        "activations",
        "total",
    ):
        assert name in out
    assert main(["--config", str(FIPO_32B), "--nnodes", "3"]) == 1
    assert "layout rejected: world size 24" in capsys.readouterr().err


def test_train_32b_dry_run_without_gpus():
    env = {**os.environ, "NNODES": "16", "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    env.pop("GPUS_PER_NODE", None)
    ok = subprocess.run(
        ["bash", str(ROOT / "launch/train_32b.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "cluster: 16 node(s) x 8 GPUs" in ok.stdout and "layout OK" in ok.stdout
    assert "total per training GPU" in ok.stdout
    bad = subprocess.run(
        ["bash", str(ROOT / "launch/train_32b.sh"), "--dry-run", "model.architecture.num_hidden_layers=63"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "num_hidden_layers (63) must be divisible" in bad.stderr
    no_gpu = subprocess.run(
        ["bash", str(ROOT / "launch/train_32b.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_gpu.returncode == 2 and "no GPUs visible (set GPUS_PER_NODE" in no_gpu.stderr
    assert "GPUS_PER_NODE=0 runs CPU ranks" in no_gpu.stderr


def test_train_32b_dry_run_of_cpu_ranks_prints_the_placement_by_node():
    """GPUS_PER_NODE=0 selects CPU training ranks; the dry run says what each node holds, in
    the words the driver uses once Ray has placed them (tests/test_multinode.py compares)."""
    env = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "0", "PYTHON": sys.executable}
    config = str(CONFIGS / "tiny-cpu-2node.yaml")  # an absolute --config works too
    ok = subprocess.run(
        ["bash", str(ROOT / "launch/train_32b.sh"), "--dry-run", "--config", config,
         "--resume", "auto"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "cluster: 2 node(s) x 1 CPU ranks" in ok.stdout
    assert "training ranks: 2 = TP 2 x PP 1 x CP 1 x DP 1" in ok.stdout
    assert (
        "placement by node:\n  node 0: train ranks 0, engines 0\n  node 1: train ranks 1, engines 1"
        in ok.stdout
    )
    one_node = subprocess.run(
        ["bash", str(ROOT / "launch/train_32b.sh"), "--dry-run", "--config", config],
        env={**env, "NNODES": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert one_node.returncode == 1  # TP 2 needs two CPU ranks
    assert "world size 1 must be divisible" in one_node.stderr


def test_layout_prints_every_node_of_the_32b_recipe(capsys):
    assert main(["--config", str(FIPO_32B), "--nnodes", "16", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "  node 0: train ranks 0-7, engines 0-1\n" in out
    assert "  node 15: train ranks 120-127, engines 30-31\n" in out


def test_dry_run_models_the_colocated_lifecycle():
    """Per phase of a colocated step: the engine's pool while generating, Megatron's training
    footprint while the engine is released, weights and a bucket while syncing; offloading
    Adam state and gradients shrinks the generate phase by exactly their size; without a
    release both budgets would add up."""
    config = load_config(FIPO_32B)
    report, summary = describe(config)
    phases = summary["lifecycle_gib"]
    memory = summary["memory_gib"]
    pool = config.rollout.mem_fraction_static * 80
    assert phases["train"] == pytest.approx(memory["training_total"])
    assert phases["no_release"] == pytest.approx(memory["training_total"] + pool)
    assert max(phases["generate"], phases["train"], phases["sync"]) < phases["no_release"]
    peak = max(("generate", "train", "sync"), key=phases.__getitem__)
    assert f"{peak:<10} {phases[peak]:8.2f} GiB  <- peak" in report
    _, offloaded = describe(load_config(FIPO_32B, ["optimizer.offload_during_rollout=true"]))
    saved = phases["generate"] - offloaded["lifecycle_gib"]["generate"]
    assert saved == pytest.approx(memory["gradients"] + memory["optimizer"])
