"""Colocation parts of the GPU check (:mod:`tools.bench.gpu_check` runs them; ``--smoke``
runs them on CPU at tiny sizes, in fp32):

- ``colocation``: a training actor (this process) and an HF engine (a spawned process, as the
  engine worker is beside a training rank in a run) on one device, ``--colocation-steps``
  RL-like steps in the loop's order: generate -> release the engine (every tag) -> restore the
  train state -> old log-probs -> train step -> offload the train state -> resume the engine's
  weights -> weight sync -> resume the rest -> generate ... The free device memory
  (``torch.cuda.mem_get_info``, every process on the device counted; None on CPU) is recorded
  at each boundary. ``engine_released_gain_gib``: free after a release minus before it, at the
  start (nothing maps the engine's weights yet) and in each step (``EngineWeightsLink`` drops a
  CUDA IPC mapping at the end of each update, so it should match the start). The engine's log-probs of its sampled
  tokens are compared with the actor's after every sync (``logprob_diff_*``; in fp32 against
  the rounding tolerance of :mod:`megatron_fipo.numerics`), beside how far each train step
  moved the log-probs of the batch it trained on (the scale of a stale engine's error). At
  the end, the engine released, the training side drops its mapping and the engine frees the
  CUDA IPC blocks it kept for it: ``unmapped_gain_gib`` is memory the release alone did not
  hand back (expected about 0; the weights' size if a mapping outlived its update).
- ``ipc_sync``: the full weights from this process's actor into the engine process's weights
  through the run's in-place route, timed (best of ``--ipc-repeats`` after a warm-up; each
  write includes asking for the engine's payload, ``payload_s``) beside a plain same-device
  ``copy_`` of as many bytes in the same run. The engine process checks its weights bit for
  bit against the HF tensors made by the other conversion route (``WeightSync.iter_hf_tensors``)
  before the first write (its own initialisation: most differ) and after the last.

Weights take the run's route in both: ``WeightSync.push`` into an ``EngineWeightsLink``, whose
payload (``HFRolloutEngine.weights_payload``: CUDA IPC handles on GPU, named shared memory on
CPU) is asked for over a pipe, as the training worker asks the engine worker's Ray actor (the
device has no Ray).
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from typing import Any

import torch

from megatron_fipo.rollout.engine import WEIGHTS_TAG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--colocation-steps", type=int, default=2)
    parser.add_argument("--colocation-lr", type=float, default=1e-4)
    parser.add_argument("--ipc-repeats", type=int, default=5)


def _base():
    from tools.bench import gpu_check

    return gpu_check


def _dtype() -> str:
    return "bfloat16" if _base().DEVICE == "cuda" else "float32"


def _free_gib() -> float | None:
    """Free device memory, every process on the device counted (None on CPU)."""
    if _base().DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def _gain(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


# ---------------------------------------------------------------- the engine process
def _serve_engine(conn, hf: dict, config: Any, parent_pid: int, num_threads: int) -> None:
    """An HFRolloutEngine answering ``(method, args)`` requests on ``conn`` until "stop"."""
    from megatron_fipo import lifetime
    from megatron_fipo.rollout.hf_engine import HFRolloutEngine

    lifetime.die_with_parent(parent_pid)
    torch.set_num_threads(num_threads)
    engine = HFRolloutEngine(config, hf_config=hf)
    handlers = {
        "generate": engine.generate,
        "pause": engine.pause,
        "resume": engine.resume,
        "weights_payload": engine.weights_payload,
        "end_update": engine.end_external_update,
        "weights_gib": lambda: (
            sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30
        ),
        "compare": lambda payload: _compare_weights(engine, payload),
        "collect": _collect,
    }
    while True:
        method, args = conn.recv()
        if method == "stop":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", handlers[method](*args)))
        except Exception:  # noqa: BLE001 - the caller raises it with this traceback
            conn.send(("error", traceback.format_exc()))


def _collect() -> None:
    """Free the blocks other processes no longer map (CUDA IPC), then the cache."""
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()


@torch.no_grad()
def _compare_weights(engine: Any, payload: str) -> dict:
    """The engine's own weights against the tensors ``payload`` maps from the other process,
    bit for bit. ``unwritten``: engine tensors the payload does not name and that share no
    storage with one it does (a tied head shares the embedding's)."""
    from megatron_fipo.rollout.flat_bucket import open_named

    theirs = dict(open_named(payload))
    own = engine.model.state_dict()
    compared = [name for name in theirs if name in own]
    mismatched = [name for name in compared if not torch.equal(own[name], theirs[name])]
    written = {own[name].untyped_storage().data_ptr() for name in compared}
    unwritten = [
        name
        for name, tensor in own.items()
        if name not in theirs and tensor.untyped_storage().data_ptr() not in written
    ]
    unknown = sorted(set(theirs) - set(own))
    del theirs  # the sender's memory stays theirs: drop the mapping before answering
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "compared": len(compared),
        "mismatched": len(mismatched),
        "first_mismatched": mismatched[:3],
        "unwritten": unwritten,
        "unknown": unknown,
    }


class EngineProcess:
    """An :class:`HFRolloutEngine` in a spawned process on this device; :meth:`call` runs one
    of its methods there (a failure there is raised here with its traceback)."""

    def __init__(self, hf: dict, config: Any, timeout_s: float = 600.0) -> None:
        context = torch.multiprocessing.get_context("spawn")
        self.timeout_s = timeout_s
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_engine,
            args=(child, hf, config, os.getpid(), torch.get_num_threads()),
            daemon=True,
        )
        self._process.start()
        child.close()

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        deadline = time.monotonic() + self.timeout_s
        while not self._conn.poll(0.5):
            if self._process.exitcode is not None:
                raise RuntimeError(
                    f"engine process died during {method} (exit code {self._process.exitcode})"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine process: {method} gave no answer in {self.timeout_s}s")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"engine process: {method} failed:\n{value}")
        return value

    def close(self) -> None:
        if self._process.exitcode is None:
            try:
                self.call("stop")
            except (OSError, RuntimeError, TimeoutError):
                pass
        # Polled, not joined: the engine's shared-memory manager (file_system sharing, CPU)
        # inherits the end of the pipe that process.join waits on and outlives the engine.
        deadline = time.monotonic() + 30
        while self._process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join(timeout=10)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _engine_config(dtype: str):
    from megatron_fipo.rollout.hf_engine import HFEngineConfig

    device = _base().DEVICE
    attention = "sdpa" if device == "cuda" else "eager"  # eager: exact on CPU (fp32 check)
    return HFEngineConfig(dtype=dtype, device=device, attn_implementation=attention)


# ---------------------------------------------------------------- the training side
def _actor(hf: dict, dtype: str, lr: float):
    """A one-process actor with the local spec (no TE on the device), AdamW at ``lr``."""
    from megatron_fipo.config import OptimizerConfig
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.check_parallel import layout, model_section

    return MegatronActor(
        hf,
        model_section(hf, dtype=dtype),
        layout(micro_batch_size=1),
        OptimizerConfig(lr=lr, lr_warmup_steps=0),
    )


def _weight_sync(actor, hf: dict, dtype: str):
    from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

    return WeightSync(actor.named_parameters_for_sync, hf, WeightSyncConfig(dtype=dtype))


def _link(engine: EngineProcess):
    from megatron_fipo.cluster.engine_links import EngineWeightsLink

    return EngineWeightsLink(lambda: engine.call("weights_payload"))


def _push(sync, link, engine: EngineProcess, version: int) -> float:
    """The weights into the engine's own (the run's route); the seconds the write took."""
    base = _base()
    base._sync()
    start = time.perf_counter()
    sync.push(link, version)
    base._sync()
    seconds = time.perf_counter() - start
    engine.call("end_update", version, True)
    return seconds


class _Timeline:
    """Free device memory and seconds since the previous boundary, per named boundary."""

    def __init__(self) -> None:
        self.free_gib: dict[str, float | None] = {}
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, boundary: str) -> None:
        self.free_gib[boundary] = _free_gib()
        now = time.perf_counter()
        self.seconds[boundary] = round(now - self._last, 4)
        self._last = now


def _requests(hf: dict, count: int, new_tokens: int, step: int):
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(100 + step)
    return [
        GenerationRequest(
            prompt_token_ids=torch.randint(0, hf["vocab_size"], (64,), generator=gen).tolist(),
            sampling=SamplingParams(
                temperature=1.0, max_new_tokens=new_tokens, seed=step * 1000 + i
            ),
            request_id=f"{step}-{i}",
        )
        for i in range(count)
    ]


def _batch(samples, step: int):
    from megatron_fipo.batch import ActorBatch

    width = max(len(s.log_probs) for s in samples)
    rollout = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        rollout[row, : len(sample.log_probs)] = torch.tensor(sample.log_probs)
    return ActorBatch(
        input_ids=[torch.tensor(s.prompt_token_ids + s.response_token_ids) for s in samples],
        prompt_lengths=torch.tensor([len(s.prompt_token_ids) for s in samples]),
        response_lengths=torch.tensor([len(s.response_token_ids) for s in samples]),
        advantages=torch.randn(len(samples), generator=torch.Generator().manual_seed(step)),
        rollout_log_probs=rollout,
    )


def _responses(batch, values: torch.Tensor) -> torch.Tensor:
    """The response-token entries of ``values`` [B, T_resp], every row's, as one 1-D tensor."""
    values = values.float().cpu()
    return torch.cat([values[row, :n] for row, n in enumerate(batch.response_lengths.tolist())])


def _logprob_tolerance(hf: dict, dtype: str, batch, log_probs: torch.Tensor) -> float | None:
    """The fp32 rounding tolerance of this model's log-probs on ``batch`` (None in bf16)."""
    from megatron_fipo import numerics

    if dtype != "float32":
        return None
    depth = numerics.transformer_depth(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        seq_length=int(batch.lengths.max()),
        vocab_size=hf["vocab_size"],
    )
    return numerics.rounding_tolerance(numerics.max_abs(_responses(batch, log_probs)), depth)


class _Colocated:
    """The actor (here) and the engine (its process) of the ``colocation`` part, and what
    its steps measured."""

    def __init__(self, args, engine: EngineProcess, hf: dict, dtype: str) -> None:
        self.args, self.engine, self.hf, self.dtype = args, engine, hf, dtype
        self.actor = _actor(hf, dtype, args.colocation_lr)
        self.sync, self.link = _weight_sync(self.actor, hf, dtype), _link(engine)
        self.sync_s: list[float] = []
        self.diffs: list[torch.Tensor] = []
        self.tolerances: list[float | None] = []
        self.shifts: list[torch.Tensor] = []

    def update_engine(self, version: int, timeline: _Timeline) -> None:
        """Resume the engine's weights, write the actor's into them, resume the rest."""
        self.engine.call("resume", [WEIGHTS_TAG])
        timeline.mark("weights_resumed")
        self.sync_s.append(_push(self.sync, self.link, self.engine, version))
        timeline.mark("weights_synced")
        self.engine.call("resume", None)
        timeline.mark("engines_resumed")

    def step(self, step: int, train: bool) -> _Timeline:
        """Generate, release the engine, old log-probs (compared with the engine's), and
        with ``train`` a train step and the weight update; else unmap the engine's weights."""
        timeline, args, actor = _Timeline(), self.args, self.actor
        requests = _requests(self.hf, args.num_sequences, args.rollout_tokens, step)
        samples = self.engine.call("generate", requests)
        timeline.mark("generated")
        self.engine.call("pause", None)
        timeline.mark("engine_released")
        actor.restore_train_state()
        timeline.mark("train_state_restored")
        batch = _batch(samples, step)
        batch.old_log_probs = actor.compute_log_probs(batch)
        timeline.mark("old_log_probs")
        engine_lp = _responses(batch, batch.rollout_log_probs)
        self.diffs.append((_responses(batch, batch.old_log_probs) - engine_lp).abs())
        self.tolerances.append(_logprob_tolerance(self.hf, self.dtype, batch, batch.old_log_probs))
        if not train:
            self.link.targets = None  # the mapping of the engine's weights dropped ...
            self.engine.call("collect")  # ... the engine frees what it had kept for it
            timeline.mark("engine_unmapped")
            return timeline
        actor.train_step(batch)
        timeline.mark("trained")
        new = _responses(batch, actor.compute_log_probs(batch))
        self.shifts.append((new - _responses(batch, batch.old_log_probs)).abs())
        actor.offload_train_state()
        timeline.mark("train_state_offloaded")
        self.update_engine(step, timeline)
        return timeline


def colocation(args) -> dict:
    """RL-like steps of a colocated actor and HF engine; free memory per boundary."""
    base, dtype = _base(), _dtype()
    _fresh_start()
    hf = base.model_config(args.num_layers)
    start = _Timeline()
    with EngineProcess(hf, _engine_config(dtype)) as engine:
        engine_weights_gib = engine.call("weights_gib")  # answered once the engine is built
        start.mark("engine_started")
        engine.call("pause", None)  # as in a run: the engines start first, then release
        start.mark("engine_released")
        run = _Colocated(args, engine, hf, dtype)
        start.mark("actor_built")
        run.update_engine(0, start)
        run.actor.offload_train_state()  # the engine generates while the train state is away
        start.mark("train_state_offloaded")
        steps = {f"step{i}": run.step(i, train=True) for i in range(1, args.colocation_steps + 1)}
        steps["final"] = run.step(args.colocation_steps + 1, train=False)
    phases = {"start": start, **steps}
    return {
        "part": "colocation",
        "dtype": dtype,
        "engine_weights_gib": engine_weights_gib,
        "free_gib": {name: t.free_gib for name, t in phases.items()},
        "phase_s": {name: t.seconds for name, t in phases.items()},
        "engine_released_gain_gib": {  # at the start nothing maps the engine's weights yet
            "start": _gain(start.free_gib["engine_released"], start.free_gib["engine_started"]),
            **{
                name: _gain(t.free_gib["engine_released"], t.free_gib["generated"])
                for name, t in steps.items()
            },
        },
        "train_state_offload_gain_gib": {
            name: _gain(t.free_gib["train_state_offloaded"], t.free_gib["trained"])
            for name, t in steps.items()
            if "trained" in t.free_gib
        },
        "unmapped_gain_gib": _gain(
            steps["final"].free_gib["engine_unmapped"], steps["final"].free_gib["old_log_probs"]
        ),
        "sync_gb": run.sync.stats.num_bytes / 1e9,
        "sync_s": run.sync_s,
        "generated_tokens": [int(d.numel()) for d in run.diffs],
        "logprob_diff_mean": [float(d.mean()) for d in run.diffs],
        "logprob_diff_max": [float(d.max()) for d in run.diffs],
        "logprob_tolerance": run.tolerances,
        "train_logprob_shift_mean": [float(s.mean()) for s in run.shifts],
    }


def ipc_sync(args) -> dict:
    """The full weights into another process's engine weights (the run's in-place route) vs a
    same-device copy of as many bytes; bit-for-bit check in the engine process."""
    from megatron_fipo.cluster.engine_links import EngineWeightsLink
    from megatron_fipo.rollout.flat_bucket import serialize_named

    base, dtype = _base(), _dtype()
    _fresh_start()
    hf = base.model_config(args.num_layers)
    with EngineProcess(hf, _engine_config(dtype)) as engine:  # starts while the actor builds
        actor = _actor(hf, dtype, 1e-6)
        sync = _weight_sync(actor, hf, dtype)
        expected = _expected_weights(sync)
        before = engine.call("compare", serialize_named(expected))
        payload_s = []

        def payload() -> str:  # the link asks for it once per update (a pipe round trip)
            start = time.perf_counter()
            text = engine.call("weights_payload")
            payload_s.append(time.perf_counter() - start)
            return text

        link = EngineWeightsLink(payload)
        times = [_push(sync, link, engine, version) for version in range(args.ipc_repeats + 1)]
        after = engine.call("compare", serialize_named(expected))
        link.targets = None  # the engine's memory: unmapped before the engine goes
    num_bytes = sync.stats.num_bytes
    copy_s = _copy_seconds(num_bytes, args.ipc_repeats)
    best = min(range(1, len(times)), key=times.__getitem__)
    bit_for_bit = after["mismatched"] == 0 and after["compared"] == len(expected)
    return {
        "part": "ipc_sync",
        "dtype": dtype,
        "sync_gb": num_bytes / 1e9,
        "num_tensors": len(expected),
        "first_push_s": times[0],
        "push_s": times[best],
        "payload_s": payload_s[best],
        "push_gb_per_s": num_bytes / 1e9 / times[best],
        "copy_s": copy_s,
        "copy_gb_per_s": num_bytes / 1e9 / copy_s,
        "ratio_vs_copy": copy_s / times[best],
        "mismatched_before": before["mismatched"],
        "mismatched_after": after["mismatched"],
        "unwritten": after["unwritten"] + after["unknown"],
        "bit_for_bit": bit_for_bit and not after["unwritten"] and not after["unknown"],
    }


def _expected_weights(sync) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors the engine must end up with, by the other conversion route (TP gather +
    ``Adapter.megatron_to_hf``), each in storage of its own (shared memory on CPU)."""
    expected = [
        (name, tensor.clone(memory_format=torch.contiguous_format))
        for name, tensor in sync.iter_hf_tensors()
    ]
    if _base().DEVICE == "cpu":
        for _, tensor in expected:
            tensor.share_memory_()
    return expected


def _fresh_start() -> None:
    """Earlier parts' memory returned (the free-memory readings count this process's cache);
    tensors shared by segment name (CPU: the engine process maps them)."""
    import gc

    from megatron_fipo.rollout.flat_bucket import use_file_system_sharing

    gc.collect()
    _base()._reset_memory()
    use_file_system_sharing()


def _copy_seconds(num_bytes: int, repeats: int) -> float:
    """Best of ``repeats`` same-device copies of ``num_bytes`` (after a warm-up)."""
    base = _base()
    source = torch.ones(num_bytes, dtype=torch.uint8, device=base.DEVICE)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        base._sync()
        start = time.perf_counter()
        target.copy_(source)
        base._sync()
        times.append(time.perf_counter() - start)
    return min(times[1:])
