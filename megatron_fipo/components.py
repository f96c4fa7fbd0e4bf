"""Builds what the loop drives from a :class:`FipoConfig`, in two stages:

1. :func:`prepare_inputs` (no Ray): the tokenizer, the prompt data, the reward pool and the
   initial Megatron checkpoint. Every user mistake these can reveal (a missing file, a malformed
   dataset, a reward path that does not import, a checkpoint the converter refuses) surfaces
   here, in seconds, before anything is placed;
2. :func:`build_components`: Ray placement, the Megatron training ranks, the rollout engines.

``RunComponents`` is also the loop's narrow interface to them: ``generate`` spreads requests over
the engine actors, ``score`` decodes responses and runs the reward pool, ``put`` shares one
batch with every training rank through the Ray object store, ``digest_files`` hashes checkpoint
files on the training ranks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_fipo.cluster.colocation import EngineLifecycle
from megatron_fipo.cluster.engine_links import broadcast_routes, colocated_routes
from megatron_fipo.cluster.workers import (
    SERVERS_ON_NODE_ADDRESS,
    EngineWorker,
    TrainWorker,
    hf_config_of,
    servers_reached_from_other_nodes,
)
from megatron_fipo.config import FipoConfig
from megatron_fipo.data.prompts import load_from_config
from megatron_fipo.data.sampler import PromptDataLoader
from megatron_fipo.data.templates import load_tokenizer, tokenize_prompts
from megatron_fipo.rollout.engine import GenerationRequest, GenerationSample
from megatron_fipo.run_state import FileDigest


@dataclass(kw_only=True)
class RunComponents:
    config: FipoConfig
    tokenizer: Any
    train_loader: PromptDataLoader
    eval_prompts: list
    workers: Any  # RayActorGroup of TrainWorker
    engines: Any  # RayActorGroup of EngineWorker
    lifecycle: Any  # EngineLifecycle: memory hand-over and weight updates
    placement: Any = None  # RayPlacement: its bundles are returned on close
    reward: Any
    stop_token_ids: tuple[int, ...]
    quiet: bool = False
    budget_timeouts: int = 0
    """Samples the reward pool's per-batch budget cut off so far (scored as timeouts)."""

    def digest_files(self, root: Path, names: Sequence[str]) -> dict[str, FileDigest]:
        """Size and sha256 (and fsync) of ``root/name`` for every name, shared round-robin over
        the training ranks (they see the checkpoint directory: one machine, or a shared file
        system across nodes)."""
        count = self.workers.num_workers
        shares = [(str(root), list(names[rank::count])) for rank in range(count)]
        merged: dict[str, FileDigest] = {}
        for part in self.workers.run_each("digest_files", shares):
            merged.update(part)
        return merged

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationSample]:
        """Contiguous shares of ``requests`` per engine actor; results in request order."""
        count = self.engines.num_workers
        share = -(-len(requests) // count)
        parts = [(requests[i * share : (i + 1) * share],) for i in range(count)]
        results = self.engines.run_each("generate", parts)
        if any(part is None for part in results):
            # A server was restarted and waits for the weights (the engine cannot resync it
            # itself: the training ranks hold them). Send the current version, then retry.
            self.lifecycle.sync_weights(self.lifecycle.version)
            retry = [i for i, part in enumerate(results) if part is None]
            again = self.engines.run_each(
                "generate", [parts[i] if i in retry else ([],) for i in range(count)]
            )
            for i in retry:
                if again[i] is None:
                    raise RuntimeError(f"engine {i} still has no weights after a weight sync")
                results[i] = again[i]
        return [sample for part in results for sample in part]

    def score(self, samples: list[GenerationSample], examples: list) -> list[Any]:
        texts = [
            self.tokenizer.decode(s.response_token_ids, skip_special_tokens=True) for s in samples
        ]
        extras = [{"data_source": e.data_source} for e in examples]
        results = self.reward.score_batch(texts, [e.ground_truth for e in examples], extras)
        self.budget_timeouts += self.reward.last_budget_timeouts
        return results

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """One progress line per step on stderr."""
        if self.quiet:
            return
        keys = (
            "accuracy",
            "reward/mean",
            "response_length/mean",
            "fipo/weight_mean",
            "actor/grad_norm",
            "eval/greedy_accuracy",
            "eval/sampled_accuracy",
            "perf/tokens_per_s",
        )
        shown = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
        # tqdm.write keeps the trainer's progress bar intact below the line.
        tqdm.write(f"[{time.strftime('%H:%M:%S')}] step {step}: {shown}", file=sys.stderr)

    def close(self) -> None:
        """Stop the reward workers, the engines' servers (their whole process trees: they run in
        sessions of their own, so killing the engine actors would not end them) and the actors."""
        self.reward.close()
        try:
            self.engines.run_all("shutdown")
        finally:
            for group in (self.engines, self.workers):
                group.kill()
            if self.placement is not None:
                import ray

                ray.util.remove_placement_group(self.placement.placement_group)


@dataclass(kw_only=True)
class RunInputs:
    """What :func:`prepare_inputs` makes before Ray starts."""

    tokenizer: Any
    train_loader: PromptDataLoader
    eval_prompts: list
    reward: Any
    stop_token_ids: tuple[int, ...]
    init_checkpoint: str | None


def _prompts(config: FipoConfig, tokenizer: Any, split: str) -> list:
    report = load_from_config(config.data, split)
    if report.malformed:
        more = f" (and {len(report.malformed) - 1} more)" if len(report.malformed) > 1 else ""
        print(
            f"data: skipped {len(report.malformed)} malformed {split} rows "
            f"(data.on_malformed_row=skip): {report.malformed[0]}{more}",
            file=sys.stderr,
        )
    kept, too_long = tokenize_prompts(
        report.examples,
        tokenizer,
        max_prompt_length=config.rollout.max_prompt_length,
        apply_chat_template=config.data.apply_chat_template,
    )
    if too_long:
        print(
            f"data: dropped {len(too_long)} {split} prompts longer than "
            f"rollout.max_prompt_length={config.rollout.max_prompt_length}",
            file=sys.stderr,
        )
    return kept


def initial_checkpoint(config: FipoConfig) -> str | None:
    """The Megatron checkpoint the actor starts from: the configured one, or the HF checkpoint
    converted into ``<output_dir>/init_megatron/<fingerprint of its contents>``."""
    if config.model.megatron_checkpoint_path:
        return config.model.megatron_checkpoint_path
    if not config.model.hf_model_path:
        return None
    from megatron_fipo.init_checkpoint import converted_initial_checkpoint

    return str(converted_initial_checkpoint(config.model.hf_model_path, config.trainer.output_dir))


def engine_routes(config: FipoConfig, plan: Any, engines: Any) -> list:
    """Each training rank's :class:`EngineRoute`. The engines say how they take weights
    (``EngineWorker.weight_transport``): colocated, every rank feeds the engine process on its
    own bundle; with ``nccl``, TP rank 0 of replica 0 of each pipeline stage broadcasts. In
    Megatron's default rank order (TP fastest, then CP, DP, PP) that rank is
    ``stage * world / PP``; the worker checks it is."""
    transports = set(engines.run_all("weight_transport"))
    if len(transports) != 1:
        raise RuntimeError(f"engines disagree on how they take weights: {sorted(transports)}")
    transport = transports.pop()
    if transport == "sglang_nccl":
        world, stages = config.training_world_size, config.parallelism.pipeline_model_parallel_size
        return broadcast_routes(world, {s * (world // stages): s for s in range(stages)})
    return colocated_routes(plan.train_bundles, plan.engine_bundles, transport, engines.actors)


def prepare_inputs(config: FipoConfig) -> RunInputs:
    """Tokenizer, prompts, reward pool and initial checkpoint: everything that reads user input,
    so its errors come before Ray starts (the caller closes ``reward`` on failure later)."""
    from megatron_fipo.rewards import build_reward

    tokenizer = load_tokenizer(config.model.tokenizer_path or config.model.hf_model_path)
    train = _prompts(config, tokenizer, "train")
    if not train:
        raise ValueError(f"data.train_files {config.data.train_files}: no usable prompt")
    data = config.data
    loader = PromptDataLoader(
        train, data.gen_batch_size or data.train_batch_size, shuffle=data.shuffle, seed=data.seed
    )
    eval_prompts = _prompts(config, tokenizer, "eval") if data.eval_files else []
    init = initial_checkpoint(config)
    return RunInputs(
        tokenizer=tokenizer,
        train_loader=loader,
        eval_prompts=eval_prompts,
        reward=build_reward(config.reward),
        stop_token_ids=tuple(i for i in (tokenizer.eos_token_id,) if i is not None),
        init_checkpoint=init,
    )


def build_components(
    config: FipoConfig,
    inputs: RunInputs,
    *,
    quiet: bool = False,
    engine_worker: type = EngineWorker,
    train_worker: type = TrainWorker,
) -> RunComponents:
    """Start Ray, place the engines and the training ranks, connect each training rank to where
    its weights go, and bundle them with ``inputs``. ``engine_worker`` / ``train_worker``: the
    actor classes (tests run the SGLang engine against its test double and observe the
    training ranks through subclasses)."""
    from megatron_fipo.cluster.actor_group import RayActorGroup, init_ray
    from megatron_fipo.cluster.placement import create_placement, node_lines, plan_placement

    plan = plan_placement(config)
    use_gpu = plan.use_gpu
    init_ray(num_cpus=None if use_gpu else int(config.trainer.cpus_per_node or 2))
    placement = create_placement(plan)
    lines = node_lines(placement.by_node())
    print("fipo-train: placement by node:", *lines, sep="\n  ", file=sys.stderr, flush=True)
    threads = {} if use_gpu else {"OMP_NUM_THREADS": str(int(config.trainer.cpus_per_node or 2))}
    # Engines first: SGLang sizes its KV cache from the memory free when it starts. Colocated,
    # they then release all of it until the first weight sync, so the training ranks build
    # their model and optimizer on a free device.
    hf_config = hf_config_of(config).to_dict()
    engine_env = dict(threads)
    if servers_reached_from_other_nodes(config, [share.address for share in placement.by_node()]):
        engine_env[SERVERS_ON_NODE_ADDRESS] = "1"
        print(
            "fipo-train: the SGLang servers listen on their node's address (rollout.weight_sync="
            "nccl: the sending training ranks on other nodes post the updates)",
            file=sys.stderr,
            flush=True,
        )
    engines = RayActorGroup.engines(
        engine_worker, placement, worker_args=(config, hf_config), env=engine_env
    )
    if config.rollout.colocate:
        engines.run_all("release_memory")
    workers = RayActorGroup.training(
        train_worker,
        placement,
        worker_args=(config, inputs.init_checkpoint),
        backend=config.trainer.distributed_backend,
        env=threads,
        name="train",
    )
    workers.run_all("connect_engines", engine_routes(config, plan, engines))
    lifecycle = EngineLifecycle(
        workers, engines, colocated=config.rollout.colocate, use_gpu=use_gpu
    )
    return RunComponents(
        config=config,
        tokenizer=inputs.tokenizer,
        train_loader=inputs.train_loader,
        eval_prompts=inputs.eval_prompts,
        workers=workers,
        engines=engines,
        lifecycle=lifecycle,
        placement=placement,
        reward=inputs.reward,
        stop_token_ids=inputs.stop_token_ids,
        quiet=quiet,
    )
