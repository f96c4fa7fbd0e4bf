"""The FIPO RL loop: generate -> score -> advantages -> old log-probs -> mini-batch updates ->
sync weights -> eval / checkpoint / log.

One rollout step (``Trainer.step_once``):

1. draw ``gen_batch_size`` prompts, sample ``n`` responses each on the rollout engines; with
   dynamic sampling keep only groups whose rewards are not all equal and repeat (at most
   ``max_num_gen_batches`` times) until ``train_batch_size`` groups are held; the surplus waits
   in a buffer for the next step;
2. rewards (+ DAPO overlong penalty), GRPO group-normalised advantages;
3. ``old_log_probs`` recomputed by the Megatron actor (not the engine's numbers);
4. ``train_batch_size / ppo_mini_batch_size`` optimizer steps (FIPO acts from the 2nd on);
5. weights resharded into the engines (a new weights version).

Placement (Ray), engines, rewards and bookkeeping live in the components this module calls.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_fipo.algorithms import advantages as adv_lib
from megatron_fipo.batch import ActorBatch
from megatron_fipo.config import FipoConfig, to_dict, to_yaml
from megatron_fipo.data.sampler import GroupBuffer
from megatron_fipo.metrics_log import MetricsLogger
from megatron_fipo.rollout.engine import GenerationRequest, GenerationSample, SamplingParams
from megatron_fipo.run_state import (
    StopRequest,
    atomic_write_text,
    begin_checkpoint,
    finish_checkpoint,
    rng_state,
    save_torch,
    select_checkpoint,
    set_rng_state,
)


@dataclass(slots=True)
class ResponseGroup:
    """One prompt and its ``n`` scored responses."""

    prompt_ids: tuple[int, ...]
    ground_truth: str
    prompt_id: str
    samples: list[GenerationSample]
    rewards: list[float]
    correct: list[bool]


class Trainer:
    """Drives the components; see the module docstring for one step."""

    def __init__(self, config: FipoConfig, components: Any) -> None:
        self.config = config
        self.parts = components  # RunComponents: workers, engines, reward, data, tokenizer
        self.output_dir = Path(config.trainer.output_dir)
        self.logger = MetricsLogger(self.output_dir, config.logging, to_dict(config))
        self.buffer: GroupBuffer[ResponseGroup] = GroupBuffer()
        self.step = 0
        self.version = 0
        self.last_saved_step = -1
        self.stop = StopRequest()
        self.progress = tqdm(disable=True)  # replaced by fit()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Runs to ``total_training_steps`` (or epochs), or until SIGTERM / SIGINT: then the
        current step ends, a checkpoint is saved and ``self.stop.signal_name`` says why."""
        with self.stop.installed():
            self.maybe_resume()
            self.logger.start_wandb()
            return self._run()

    def _run(self) -> dict[str, float]:
        # Fresh engines: push the actor's weights (a resumed run re-sends its current version).
        self.sync_weights(bump=self.version == 0)
        if self.step == 0 and self.config.trainer.eval_before_train and self.parts.eval_prompts:
            before = self.evaluate()
            self.logger.log(0, before)
            self.parts.report(0, before)
        metrics: dict[str, float] = {}
        self.progress = tqdm(
            total=self.config.trainer.total_training_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            # Bars redraw with carriage returns: only on a terminal, never into a log file.
            disable=not (self.config.logging.progress_bar and sys.stderr.isatty())
            or self.parts.quiet,
        )
        while not self.done() and not self.stop.requested:
            metrics = self.step_once()
            self.step += 1
            trainer_cfg = self.config.trainer
            if self.parts.eval_prompts and _every(trainer_cfg.eval_freq, self.step):
                metrics.update(self.evaluate())
            # The step's line goes out first; the checkpoint then commits it (metrics_log).
            self.logger.log(self.step, metrics)
            self.parts.report(self.step, metrics)
            # Every save_freq steps, at the end (save_freq None: only then), and when stopped.
            if _every(trainer_cfg.save_freq, self.step) or self.done() or self.stop.requested:
                self.save_checkpoint()
            self.progress.update(1)
        self.progress.close()
        self.logger.close()
        return metrics

    def step_once(self) -> dict[str, float]:
        timer = _PhaseTimer(
            lambda phase: self.progress.set_description(f"step {self.step + 1}: {phase}")
        )
        cut_off = self.parts.budget_timeouts
        with timer("generate"):
            groups, metrics = self.collect_groups()
        # Samples scored as timeouts because a batch ran out of reward.batch_budget_s.
        metrics["reward/budget_timeouts"] = float(self.parts.budget_timeouts - cut_off)
        batch = self.actor_batch(groups)
        self.parts.lifecycle.release_engines()  # colocated: the device is training's now
        with timer("train"):  # old log-probs and the optimizer steps, on the training ranks
            metrics.update(self.train(batch, len(groups[0].samples)))
        with timer("sync_weights"):
            self.sync_weights()  # engines take back their memory around the new weights
        metrics.update(timer.metrics())
        metrics.update(self.parts.lifecycle.take_memory_metrics())
        tokens = float(sum(len(ids) for ids in batch.input_ids))
        metrics["perf/tokens_per_s"] = tokens / max(timer.total(), 1e-9)
        metrics["perf/train_tokens_per_s"] = tokens / max(timer.seconds["train"], 1e-9)
        return metrics

    def done(self) -> bool:
        total = self.config.trainer.total_training_steps
        if total is not None:
            return self.step >= total
        return self.parts.train_loader.epoch >= self.config.trainer.total_epochs

    # ------------------------------------------------------------------ phases
    def collect_groups(self) -> tuple[list[ResponseGroup], dict[str, float]]:
        """Generation with dynamic sampling; returns ``train_batch_size`` groups (or fewer
        when ``max_num_gen_batches`` ran out) and rollout metrics."""
        data, algo = self.config.data, self.config.algorithm
        dynamic = algo.dynamic_sampling.enable
        generated: list[ResponseGroup] = []
        num_batches = 0
        while not self.buffer.has(data.train_batch_size):
            if dynamic and num_batches >= algo.dynamic_sampling.max_num_gen_batches:
                break
            prompts = self.parts.train_loader.next_batch()
            groups = self.rollout(
                prompts,
                self.train_sampling(),
                self.config.rollout.n_samples_per_prompt,
                f"train{self.step}.{num_batches}",
            )
            num_batches += 1
            generated.extend(groups)
            self.buffer.add([g for g in groups if not dynamic or len(set(g.rewards)) > 1])
        if not len(self.buffer):
            raise RuntimeError(
                f"step {self.step}: {num_batches} generation batches gave no group with differing "
                "rewards (all correct or all wrong): check the data, the reward or the model"
            )
        taken = self.buffer.take(min(len(self.buffer), data.train_batch_size))
        # With enough surplus held, a step may generate nothing: describe what it trains on.
        metrics = _rollout_metrics(generated or taken)
        metrics["rollout/num_gen_batches"] = float(num_batches)
        metrics["rollout/kept_groups"] = float(len(taken))
        metrics["rollout/weights_version"] = float(self.version)
        # Surplus groups carried over from an earlier step were sampled with older weights.
        trained = [s.weights_version for g in taken for s in g.samples]
        stale = sum(v != self.version for v in trained) / max(len(trained), 1)
        metrics["rollout/stale_sample_fraction"] = float(stale)
        if generated:  # which weights the engines sampled with (all equal to the version above)
            versions = [s.weights_version for g in generated for s in g.samples]
            metrics["rollout/engine_weights_version_min"] = float(min(versions))
            metrics["rollout/engine_weights_version_max"] = float(max(versions))
        return taken, metrics

    def train_sampling(self) -> SamplingParams:
        rollout = self.config.rollout
        return SamplingParams(
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=rollout.max_response_length,
            stop_token_ids=self.parts.stop_token_ids,
        )

    def rollout(
        self, prompts: list, sampling: SamplingParams, n: int, tag: str
    ) -> list[ResponseGroup]:
        """``n`` responses for each prompt, scored. Seeds depend only on (seed, tag, prompt,
        sample), so a resumed run regenerates exactly what an uninterrupted one would."""
        requests = [
            GenerationRequest(
                prompt_token_ids=list(prompt.token_ids),
                sampling=_with_seed(sampling, self.config.trainer.seed, tag, index, j),
                request_id=f"{prompt.example.id}/{j}",
            )
            for index, prompt in enumerate(prompts)
            for j in range(n)
        ]
        samples = self.parts.generate(requests)
        results = self.parts.score(samples, [p.example for p in prompts for _ in range(n)])
        groups = []
        for index, prompt in enumerate(prompts):
            chunk = slice(index * n, (index + 1) * n)
            groups.append(
                ResponseGroup(
                    prompt_ids=tuple(prompt.token_ids),
                    ground_truth=prompt.example.ground_truth,
                    prompt_id=prompt.example.id,
                    samples=samples[chunk],
                    rewards=[r.reward for r in results[chunk]],
                    correct=[r.correct for r in results[chunk]],
                )
            )
        return groups

    def actor_batch(self, groups: list[ResponseGroup]) -> Any:
        """Sequences, lengths and GRPO advantages (+ overlong shaping) of ``groups``."""
        rollout, algo = self.config.rollout, self.config.algorithm
        samples = [s for g in groups for s in g.samples]
        rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
        lengths = torch.tensor([len(s.response_token_ids) for s in samples])
        if algo.overlong_buffer.enable:
            rewards = rewards + adv_lib.overlong_penalty(
                lengths,
                rollout.max_response_length,
                algo.overlong_buffer.len,
                algo.overlong_buffer.penalty_factor,
            )
        group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])
        advantages = adv_lib.grpo_advantages(
            rewards, group_ids, norm_by_std=algo.norm_adv_by_std, eps=algo.adv_epsilon
        )
        engine_log_probs = torch.zeros(len(samples), int(lengths.max()))
        for row, sample in enumerate(samples):
            engine_log_probs[row, : len(sample.log_probs)] = torch.tensor(sample.log_probs)
        return ActorBatch(
            input_ids=[torch.tensor(s.prompt_token_ids + s.response_token_ids) for s in samples],
            prompt_lengths=torch.tensor([len(s.prompt_token_ids) for s in samples]),
            response_lengths=lengths,
            advantages=advantages,
            rollout_log_probs=engine_log_probs,
            fresh=torch.tensor([s.weights_version == self.version for s in samples]),
        )

    def train(self, batch: Any, group_size: int) -> dict[str, float]:
        """Hand the batch over once; the training ranks compute old log-probs, cut the
        ``ppo_mini_batch_size``-prompt mini-batches and run ``ppo_epochs`` passes of optimizer
        steps themselves (``TrainWorker.train_rollout``); only metrics come back."""
        rows = self.config.data.ppo_mini_batch_size * group_size
        shared = self.parts.put(batch)
        epochs = self.config.algorithm.ppo_epochs
        return self.parts.workers.run_all("train_rollout", shared, rows, epochs)[0]

    def sync_weights(self, bump: bool = True) -> None:
        self.version += int(bump)
        self.parts.lifecycle.sync_weights(self.version)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy: greedy (one response) and sampled (avg@n)."""
        eval_cfg = self.config.rollout.eval_sampling
        common = {
            "max_new_tokens": self.config.rollout.max_response_length,
            "stop_token_ids": self.parts.stop_token_ids,
        }
        greedy = SamplingParams(temperature=0.0, **common)
        sampled = SamplingParams(
            temperature=eval_cfg.temperature, top_p=eval_cfg.top_p, top_k=eval_cfg.top_k, **common
        )
        metrics: dict[str, float] = {}
        runs = (("greedy", greedy, 1), ("sampled", sampled, eval_cfg.n_samples_per_prompt))
        for name, sampling, n in runs:
            groups = self.rollout(self.parts.eval_prompts, sampling, n, f"eval{self.step}.{name}")
            correct = [c for g in groups for c in g.correct]
            lengths = [len(s.response_token_ids) for g in groups for s in g.samples]
            metrics[f"eval/{name}_accuracy"] = sum(correct) / len(correct)
            metrics[f"eval/{name}_response_length"] = sum(lengths) / len(lengths)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        if self.last_saved_step == self.step:
            return self.output_dir / "checkpoints" / f"step_{self.step:06d}"
        partial, final = begin_checkpoint(self.output_dir, self.step)
        self.parts.workers.run_all("save", str(partial / "actor"))
        state = {
            "step": self.step,
            "version": self.version,
            "train_loader": self.parts.train_loader.state_dict(),
            "buffer": self.buffer.state_dict(),
            "rng": rng_state(),
        }
        save_torch(state, partial / "trainer_state.pt")
        self.logger.snapshot(partial)
        atomic_write_text(partial / "config.yaml", to_yaml(self.config))
        finish_checkpoint(
            partial, final, self.config.trainer.max_checkpoints_to_keep, self.parts.digest_files
        )
        self.last_saved_step = self.step
        return final

    def maybe_resume(self) -> None:
        """Resume from the newest intact checkpoint (``trainer.resume``): its files are hashed
        by the training ranks against the manifest; a damaged one is named, set aside and the
        previous one used."""
        path = select_checkpoint(
            self.output_dir, self.config.trainer.resume, self.parts.digest_files, self._say
        )
        if path is None:
            return
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.parts.workers.run_all("load", str(path / "actor"))
        self.step, self.version = int(state["step"]), int(state["version"])
        self.last_saved_step = self.step
        self.parts.train_loader.load_state_dict(state["train_loader"])
        self.buffer.load_state_dict(state["buffer"])
        set_rng_state(state["rng"])
        note = self.logger.restore(path, self.step)
        self._say(f"resumed from {path} (step {self.step}, weights version {self.version}); {note}")

    def _say(self, message: str) -> None:
        tqdm.write(f"fipo-train: {message}", file=sys.stderr)


def _every(frequency: int | None, step: int) -> bool:
    return bool(frequency) and step % frequency == 0


class _PhaseTimer:
    """Times the phases of a step; ``on_phase`` shows the current one (the progress bar)."""

    def __init__(self, on_phase: Any = None) -> None:
        self.seconds: dict[str, float] = {}
        self._on_phase = on_phase

    def __call__(self, name: str) -> _PhaseTimer:
        self._name = name
        if self._on_phase is not None:
            self._on_phase(name)
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self._name] = time.perf_counter() - self._start

    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": value for name, value in self.seconds.items()}


def _with_seed(sampling: SamplingParams, seed: int, tag: str, index: int, j: int) -> SamplingParams:
    key = f"{seed}/{tag}/{index}/{j}".encode()
    return dataclasses.replace(sampling, seed=zlib.crc32(key))


def _rollout_metrics(groups: list[ResponseGroup]) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    lengths = [len(s.response_token_ids) for s in samples]
    rewards = [r for g in groups for r in g.rewards]
    correct = [c for g in groups for c in g.correct]
    return {
        "reward/mean": sum(rewards) / len(rewards),
        "accuracy": sum(correct) / len(correct),
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": float(max(lengths)),
        "response_length/clip_ratio": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
        "rollout/solve_none": sum(not any(g.correct) for g in groups) / len(groups),
        "rollout/solve_all": sum(all(g.correct) for g in groups) / len(groups),
    }
