"""Colocated training and rollout: the actor's training state leaves the device between steps
and comes back unchanged; the engines release and retake memory in the loop's order."""

from __future__ import annotations

import json
import pathlib
import sys
import time
import urllib.request

import pytest
import torch
from megatron_harness import WorkerWorld

from megatron_fipo.cluster.workers import EngineWorker, TrainWorker
from megatron_fipo.megatron.check_parallel import CheckSettings, fixed_batch, tiny_hf_config

ADAM = CheckSettings(optimizer="adam", num_layers=2)


@pytest.fixture(scope="module")
def world1():
    with WorkerWorld(1) as world:
        yield world


def _two_steps(rank, world_size, offload_between):
    from megatron_fipo.megatron import checkpoint
    from megatron_fipo.megatron.actor import MegatronActor
    from megatron_fipo.megatron.distributed import destroy

    actor = MegatronActor(tiny_hf_config(ADAM.num_layers), *ADAM.sections(), seed=ADAM.seed)
    try:
        sizes = []
        for _ in range(2):
            batch = fixed_batch(ADAM)
            current = actor.compute_log_probs(batch)
            batch.old_log_probs = current + batch.old_log_probs[:, : current.shape[1]]  # noise
            actor.train_step(batch)
            if offload_between:
                actor.offload_train_state()
                sizes.append(
                    sum(
                        b.grad_data.untyped_storage().size() for c in actor.model for b in c.buffers
                    )
                )
                with pytest.raises(RuntimeError, match="offloaded"):
                    actor.train_step(batch)
                actor.restore_train_state()
        params = checkpoint.gather_full_parameters(actor.model, vocab_size=actor.vocab_size)
        return params, sizes
    finally:
        destroy()


def test_offloaded_training_state_comes_back_unchanged(world1):
    """Two Adam steps with the optimizer state and gradient buffers offloaded and restored
    between them land on exactly the weights of two steps without."""
    plain, _ = world1.run(_two_steps, False)[0]
    offloaded, sizes = world1.run(_two_steps, True)[0]
    assert sizes == [0, 0]  # the gradient buffers' storage really was released
    assert plain.keys() == offloaded.keys()
    assert all(torch.equal(plain[name], offloaded[name]) for name in plain)


# ---------------------------------------------------------------------------------------------
# The loop against the SGLang test double, on Ray with logical GPUs (gloo, CPU tensors)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests/rollout_fake_sglang.py"
ALL_TAGS = {"kv_cache", "weights", "cuda_graph"}


def _fake_launch(config, spec):
    """The engine's own `sglang.launch_server` flags, the double in its place."""
    from megatron_fipo.rollout.sglang_engine import default_launch_command

    real = default_launch_command(config, spec)
    return [sys.executable, str(FAKE), *real[3:], "--generate-delay", "0.0"]


class DoubleEngineWorker(EngineWorker):
    """The real engine worker around an SGLang engine whose servers are the test double."""

    def __init__(self, config, hf_config, model_path=None):
        from megatron_fipo.cluster.workers import _sglang_engine_config
        from megatron_fipo.rollout.sglang_engine import SGLangRolloutEngine

        self.config = config
        settings = _sglang_engine_config(config, model_path or "served-by-the-double")
        self.engine = SGLangRolloutEngine(settings, launch_command=_fake_launch).start()

    def journal(self):
        server = self.engine.servers[0]
        with urllib.request.urlopen(server.url + "/fake/journal", timeout=10) as response:
            return json.loads(response.read())

    def weights(self, names):
        server = self.engine.servers[0]
        body = {"truncate_size": 1 << 30}
        return {n: server.post_ok("/get_weights_by_name", {"name": n, **body}, 30) for n in names}


class TimedTrainWorker(TrainWorker):
    def __init__(self, *args, **kwargs):
        import torch.distributed as dist

        self.build_started = time.time()
        super().__init__(*args, **kwargs)
        self.phases = []
        self.results = []
        self.object_gathers = 0
        gather = dist.all_gather_object

        def counted(*a, **k):  # the old path gathered every rank's log-probs this way
            self.object_gathers += 1
            return gather(*a, **k)

        dist.all_gather_object = counted

    def train_rollout(self, *args, **kwargs):
        start, gathers = time.time(), self.object_gathers
        try:
            result = super().train_rollout(*args, **kwargs)
            self.results.append(result)
            return result
        finally:
            self.phases.append((start, time.time()))
            self.training_gathers = getattr(self, "training_gathers", 0)
            self.training_gathers += self.object_gathers - gathers  # (weight sync has its own)

    def train_phases(self):
        return self.phases

    def training_record(self):
        return {
            "build_started": self.build_started,
            "results": self.results,
            "object_gathers": self.training_gathers,
        }

    def full_weights(self):
        return {name: t.clone() for name, t in self.weight_sync.iter_hf_tensors()}


@pytest.fixture(scope="module")
def ray_gpus():
    """Local Ray with three logical GPUs: placement, bundles and engine TP groups run as on a
    GPU node, the workers themselves compute on the CPU (gloo)."""
    import ray
    from ray import cloudpickle

    from megatron_fipo.cluster.actor_group import init_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(num_cpus=2, num_gpus=3)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_fipo.data.synthetic import SyntheticTaskConfig, prepare_synthetic

    return prepare_synthetic(
        tmp_path_factory.mktemp("task"), SyntheticTaskConfig(num_train=32, num_eval=4)
    )


def _config(task, output_dir, *overrides):
    from megatron_fipo.config import load_config

    return load_config(
        ROOT / "configs/tiny-cpu.yaml",
        [
            f"data.train_files=[{task.train_file}]",
            f"model.tokenizer_path={task.tokenizer_dir}",
            "model.hf_model_path=null",
            "data.eval_files=[]",
            "trainer.eval_freq=null",
            "trainer.eval_before_train=false",
            "data.train_batch_size=2",
            "data.gen_batch_size=4",
            "data.ppo_mini_batch_size=1",
            "rollout.n_samples_per_prompt=2",
            "parallelism.micro_batch_size=1",
            "rollout.max_response_length=8",
            "algorithm.overlong_buffer.len=4",
            "model.architecture.hidden_size=32",
            "model.architecture.intermediate_size=64",
            "model.architecture.num_hidden_layers=2",
            "model.architecture.num_attention_heads=2",
            "model.architecture.num_key_value_heads=2",
            "rollout.engine=sglang",
            "trainer.distributed_backend=gloo",
            "reward.function=trainer_reward_fns:flaky_length_reward",
            "reward.num_workers=1",
            "rollout.weight_sync_bucket_bytes=60000",  # several buckets per update
            f"trainer.output_dir={output_dir}",
            *overrides,
        ],
    )


def _memory_state(entries):
    """Replays the journal: (time, event, released tags after it) for each entry."""
    released, out = set(), []
    for entry in entries:
        path, body = entry.get("path"), entry.get("body") or {}
        if path == "/release_memory_occupation":
            released |= set(body.get("tags") or ALL_TAGS)
        elif path == "/resume_memory_occupation":
            released -= set(body.get("tags") or ALL_TAGS)
        out.append((entry["time"], path or entry.get("event"), frozenset(released), body))
    return out


def test_colocated_loop_hands_memory_over_in_order(ray_gpus, task, tmp_path):
    """Two steps of the real loop, colocated on two logical GPUs: Megatron TP2 and one SGLang
    engine with TP2 (the double) on the same two bundles. The engine releases everything before
    the training phase (old log-probs and updates), resumes its weights before each update, its
    KV cache only after it, and never generates while anything is released; every update is
    posted by the engine's first training rank with one payload per TP rank, inside a session,
    and the engine ends up with the actor's weights, bit for bit."""
    sys.path.insert(0, str(ROOT / "tests"))  # the reward function's module, for the driver too
    from megatron_fipo.components import build_components, prepare_inputs
    from megatron_fipo.trainer import Trainer

    config = _config(
        task,
        tmp_path / "run",
        "trainer.gpus_per_node=2",
        "rollout.engine_tensor_parallel_size=2",
        "parallelism.tensor_model_parallel_size=2",
        "trainer.total_training_steps=2",
        "trainer.save_freq=null",
        "optimizer.offload_during_rollout=true",
    )
    inputs = prepare_inputs(config)
    parts = build_components(
        config, inputs, quiet=True, engine_worker=DoubleEngineWorker, train_worker=TimedTrainWorker
    )
    try:
        assert [r.kind for r in parts.workers.run_all("engine_route")] == ["sglang_ipc"] * 2
        Trainer(config, parts).fit()
        (journal,) = parts.engines.run_all("journal")
        phases = parts.workers.run_all("train_phases")[0]
        records = parts.workers.run_all("training_record")
        expected = parts.workers.run_all("full_weights")[0]
        served = parts.engines.run_all("weights", sorted(expected))[0]
    finally:
        parts.close()
    states = _memory_state(journal)
    for when, event, released, body in states:
        if event == "/generate":
            assert not released, (when, released)
        if event == "/update_weights_from_tensor":
            assert released == {"kv_cache", "cuda_graph"}, released  # weights back, KV not yet
            assert body["num_payloads"] == 2  # one per engine TP rank, from its own training rank
    assert len(phases) == 2
    # The engines started first and released everything before any training rank was built
    # (SGLang sizes its KV cache from the memory free at its start).
    first_release = next(s[0] for s in states if s[1] == "/release_memory_occupation")
    assert all(first_release < record["build_started"] for record in records)
    # The training ranks own the step: no log-prob gathered across ranks, only metrics back.
    for record in records:
        assert record["object_gathers"] == 0
        assert len(record["results"]) == 2
        for result in record["results"]:
            assert all(isinstance(v, float) for v in result.values()), result
    for start, end in phases:  # the training phases ran on a device the engine had left
        during = [s for s in states if s[0] <= end]
        assert during[-1][2] == ALL_TAGS, during[-1]
        assert not [s for s in states if start <= s[0] <= end and s[1] != "health"]
    versions = [b["weight_version"] for _, e, _, b in states if "weight_version" in b]
    assert versions == ["1", "2", "3"]  # the first sync, then one per step
    assert any(s[1] == "/generate" for s in states)
    for name, tensor in expected.items():
        assert torch.equal(torch.tensor(served[name], dtype=tensor.dtype), tensor), name


def test_separate_engines_take_each_stages_broadcast(ray_gpus, task, tmp_path):
    """``rollout.weight_sync=nccl`` (separate placement): two pipeline stages on two logical GPUs,
    one SGLang engine (the double) on a third. Each stage's TP rank 0 broadcasts its own layers
    into an update group of its own with the server (gloo here); nothing else sends, and the
    server ends up with the actor's weights, bit for bit."""
    from megatron_fipo.components import build_components, prepare_inputs

    config = _config(
        task,
        tmp_path / "run",
        "trainer.gpus_per_node=3",
        "rollout.colocate=false",
        "rollout.num_gpus=1",
        "parallelism.pipeline_model_parallel_size=2",
    )
    assert config.rollout.weight_sync_mode == "nccl"
    inputs = prepare_inputs(config)
    parts = build_components(
        config, inputs, quiet=True, engine_worker=DoubleEngineWorker, train_worker=TimedTrainWorker
    )
    try:
        routes = parts.workers.run_all("engine_route")
        assert [(r.kind, r.stage) for r in routes] == [("sglang_nccl", 0), ("sglang_nccl", 1)]
        parts.lifecycle.sync_weights(1)
        (journal,) = parts.engines.run_all("journal")
        expected = parts.workers.run_all("full_weights")[0]
        served = parts.engines.run_all("weights", sorted(expected))[0]
    finally:
        parts.close()
    groups = {
        e["body"]["group_name"] for e in journal if e.get("path") == "/init_weights_update_group"
    }
    assert groups == {"fipo_weights_stage0", "fipo_weights_stage1"}
    updates = [e["body"] for e in journal if e.get("path") == "/update_weights_from_distributed"]
    assert {u["group_name"] for u in updates} == groups and updates[-1]["weight_version"] == "1"
    for name, tensor in expected.items():
        assert torch.equal(torch.tensor(served[name], dtype=tensor.dtype), tensor), name
