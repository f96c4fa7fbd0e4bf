"""What runs inside the Ray actors: one training rank (:class:`TrainWorker`) and one rollout
engine (:class:`EngineWorker`).

Training ranks hold a :class:`MegatronActor` and a :class:`WeightSync`; every method is called
on all ranks together (:meth:`RayActorGroup.run_all`). Each rank receives the whole batch (one
Ray object, fetched once per node) and takes its own data-parallel share. Engines are separate
actors; weights reach them from training rank 0 bucket by bucket through the Ray object store
(:class:`RemoteEngines`), so peak extra memory stays about one bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from megatron_fipo.algorithms.losses import PolicyLossConfig
from megatron_fipo.config import FipoConfig, to_dict


def hf_config_of(config: FipoConfig) -> Any:
    """The transformers config of the policy: the checkpoint's, else the inline architecture."""
    from transformers import AutoConfig

    if config.model.hf_model_path:
        return AutoConfig.from_pretrained(config.model.hf_model_path)
    if config.model.architecture is None:
        raise ValueError("model.hf_model_path or model.architecture must be set")
    fields = to_dict(config.model.architecture)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def loss_config_of(config: FipoConfig) -> PolicyLossConfig:
    algorithm = config.algorithm
    names = PolicyLossConfig.__dataclass_fields__
    return PolicyLossConfig(**{name: getattr(algorithm, name) for name in names})


class TrainWorker:
    """One Megatron rank: old log-probs, mini-batch updates, weight sync, checkpoints."""

    def __init__(self, config: FipoConfig, init_checkpoint: str | None = None) -> None:
        from megatron_fipo.megatron.actor import ActorConfig, ActorOptimizerConfig, MegatronActor
        from megatron_fipo.megatron.distributed import ParallelConfig
        from megatron_fipo.rollout.weight_sync import WeightSync, WeightSyncConfig

        torch.manual_seed(config.trainer.seed)
        self.hf_config = hf_config_of(config)
        par = config.parallelism
        optim = config.optimizer
        self.actor = MegatronActor(
            self.hf_config,
            ParallelConfig(
                tensor_parallel=par.tensor_model_parallel_size,
                pipeline_parallel=par.pipeline_model_parallel_size,
                virtual_pipeline=par.virtual_pipeline_model_parallel_size,
                context_parallel=par.context_parallel_size,
                sequence_parallel=par.sequence_parallel,
            ),
            ActorConfig(
                dtype=config.model.dtype,
                spec=config.model.spec,
                fp8=config.model.fp8,
                fp8_recipe=config.model.fp8_recipe,
                fp8_param=config.model.fp8_param,
                micro_batch_size=par.micro_batch_size,
                max_tokens_per_micro_batch=par.max_tokens_per_micro_batch,
                use_distributed_optimizer=par.use_distributed_optimizer,
                temperature=config.rollout.temperature or 1.0,
                recompute_granularity=config.model.recompute_granularity,
                recompute_method=config.model.recompute_method,
                recompute_num_layers=config.model.recompute_num_layers,
                seed=config.trainer.seed,
                optimizer_checkpoint_format=config.trainer.optimizer_checkpoint_format,
            ),
            ActorOptimizerConfig(
                lr=optim.lr,
                min_lr=optim.min_lr,
                lr_warmup_steps=optim.lr_warmup_steps,
                lr_decay_style=optim.lr_decay_style,
                lr_decay_steps=optim.lr_decay_steps,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
            ),
            loss_config_of(config),
        )
        if init_checkpoint:
            self.actor.load(init_checkpoint, load_optimizer=False)
        self.weight_sync = WeightSync(
            self.actor.named_parameters_for_sync,
            self.hf_config,
            WeightSyncConfig(
                bucket_bytes=config.rollout.weight_sync_bucket_bytes, reuse_buffers=True
            ),
        )

    def _data_parallel_share(self, batch: Any) -> Any:
        import ray
        from megatron.core import parallel_state

        from megatron_fipo.megatron.actor import ActorBatch

        if isinstance(batch, ray.ObjectRef):  # one copy per node, shared by its ranks
            batch = ray.get(batch)
        size = parallel_state.get_data_parallel_world_size()
        rank = parallel_state.get_data_parallel_rank()
        rows = list(range(rank, len(batch.input_ids), size))

        def take(value):
            return None if value is None else value[rows]

        return (
            ActorBatch(
                input_ids=[batch.input_ids[i] for i in rows],
                prompt_lengths=batch.prompt_lengths[rows],
                response_lengths=batch.response_lengths[rows],
                old_log_probs=take(batch.old_log_probs),
                advantages=take(batch.advantages),
                loss_config=batch.loss_config,
            ),
            rows,
            batch,
        )

    def compute_log_probs(self, batch: Any) -> torch.Tensor | None:
        """``[B, T_resp]`` log-probs of the whole batch, assembled on rank 0 (None elsewhere)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        share, rows, batch = self._data_parallel_share(batch)
        local = self.actor.compute_log_probs(share)
        width = int(batch.response_lengths.max())
        group = parallel_state.get_data_parallel_group()
        pieces = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(pieces, (rows, local), group=group)
        if dist.get_rank() != 0:
            return None
        result = torch.zeros(len(batch.input_ids), width)
        for piece_rows, values in pieces:
            result[piece_rows, : values.shape[1]] = values
        return result

    def train_step(self, batch: Any) -> dict[str, float]:
        share, _, _ = self._data_parallel_share(batch)
        return self.actor.train_step(share)

    def sync_weights(self, engines: RemoteEngines | None, version: int) -> int:
        """All ranks: gather HF-named tensors; rank 0 streams them to the engines."""
        import torch.distributed as dist

        return self.weight_sync.sync(engines if dist.get_rank() == 0 else None, version)

    def save(self, path: str) -> None:
        self.actor.save(path)

    def load(self, path: str) -> None:
        self.actor.load(path, load_optimizer=True)

    def num_parameters(self) -> int:
        return sum(shard.tensor.numel() for shard in self.actor.named_parameters_for_sync())


class EngineWorker:
    """One rollout engine: the HF engine on CPU, an SGLang engine (its own servers) on GPU."""

    def __init__(self, config: FipoConfig, hf_config: Any, model_path: str | None = None) -> None:
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        rollout = config.rollout
        if rollout.engine == "hf":
            from megatron_fipo.rollout.hf_engine import HFEngineConfig, HFRolloutEngine

            self.engine = HFRolloutEngine(
                HFEngineConfig(
                    model_path=model_path or "",
                    dtype=config.model.dtype,
                    max_batch_size=rollout.hf_max_batch_size,
                    seed=config.trainer.seed,
                ),
                hf_config=hf_config,
            )
        else:
            self.engine = _sglang_engine(config, model_path)

    def generate(self, requests: Sequence[Any]) -> list[Any]:
        return self.engine.generate(requests)

    def update_weights(self, named_tensors: Any, version: int) -> None:
        """``named_tensors``: a list of (HF name, tensor), or a Ray reference to one."""
        import ray

        if isinstance(named_tensors, ray.ObjectRef):
            named_tensors = ray.get(named_tensors)
        self.engine.update_weights(named_tensors, version)

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def health(self) -> Any:
        return self.engine.health()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _sglang_engine(config: FipoConfig, model_path: str | None) -> Any:
    """An SGLang engine on the GPUs Ray reserved for this actor (``FIPO_GPU_IDS``)."""
    from megatron_fipo.rollout.sglang_engine import SGLangRolloutEngine

    return SGLangRolloutEngine(_sglang_engine_config(config, model_path)).start()


def _sglang_engine_config(config: FipoConfig, model_path: str | None) -> Any:
    """The engine's settings from the run config. ``FIPO_GPU_IDS`` lists the physical GPUs Ray
    reserved (it leaves CUDA_VISIBLE_DEVICES unset here): the servers and the staging of tensor
    updates use them, starting at the first."""
    from megatron_fipo.rollout.sglang_engine import SGLangEngineConfig

    rollout = config.rollout
    path = model_path or config.model.hf_model_path
    if not path:
        raise ValueError("rollout.engine=sglang needs model.hf_model_path (the servers load it)")
    gpu_ids = [int(i) for i in os.environ.get("FIPO_GPU_IDS", "0").split(",")]
    return SGLangEngineConfig(
        model_path=path,
        tp_size=rollout.engine_tensor_parallel_size,
        base_gpu_id=gpu_ids[0],
        mem_fraction_static=rollout.mem_fraction_static,
        dtype=config.model.dtype,
        host=rollout.host,
        update_bucket_bytes=rollout.weight_sync_bucket_bytes,
        deterministic_inference=rollout.deterministic_inference,
        extra_server_args=tuple(rollout.extra_server_args),
    )


class RemoteEngines:
    """Duck-types ``RolloutEngine.update_weights`` for training rank 0: groups the streamed
    tensors into buckets of ``bucket_bytes`` and sends each bucket to every engine actor."""

    def __init__(self, handles: Sequence[Any], bucket_bytes: int) -> None:
        self.handles = list(handles)  # the engine group's actor handles (picklable)
        self.bucket_bytes = bucket_bytes

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        import ray

        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in named_tensors:
            bucket.append((name, tensor.detach().cpu().clone()))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                self._send(ray, bucket, version)
                bucket, size = [], 0
        self._send(ray, bucket, version)

    def _send(self, ray: Any, bucket: list, version: int) -> None:
        if not bucket:
            return
        ref = ray.put(bucket)
        ray.get([h.call.remote("update_weights", (ref, version), {}) for h in self.handles])
