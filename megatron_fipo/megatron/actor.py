"""The Megatron actor: old log-probs and FIPO / DAPO / GRPO updates under TP / PP / CP / DP.

Objective of :meth:`MegatronActor.train_step` (one optimizer step over this rank's batch)::

    L = sum_{micro-batches, DP ranks, CP ranks} sum_{kept tokens} loss_t  /  N_global

with ``loss_t`` from :func:`megatron_fipo.algorithms.losses.compute_policy_loss` and
``N_global`` the number of response tokens of the whole optimizer step, all-reduced over DP
before the first micro-batch. Megatron is told ``calculate_per_token_loss`` and the grad
finaliser gets no token count, so neither the schedule nor DDP rescale: DDP sums gradients
over DP x CP, and the result equals the single-process gradient of the token-mean loss.

Micro-batches (:mod:`~megatron_fipo.megatron.micro_batches`): fixed groups of
``micro_batch_size`` sequences, or token-budget groups (``max_tokens_per_micro_batch``,
what long-CoT RL needs: responses of 1k and 20k tokens in one batch); each is one padded row
per sequence or, with ``parallelism.packing`` (on with the token budget), one packed row with
the sequence boundaries in ``cu_seqlens``. Pipeline stages exchange shapes when they vary.
Results return in the caller's order.

Data flow per micro-batch: :mod:`~megatron_fipo.megatron.context_parallel` lays the sequences
out (the zigzag split over CP ranks, next-token targets taken from the full sequence; CP = 1
is the same code with one chunk pair); the model returns final hidden states
(:func:`model.hidden_states_only`, in the model's dtype: the bf16 wrapper's fp32 upcast is
off), and :func:`logprobs.chunked_log_probs` turns them into log-probs of the next tokens
without materialising ``[S, V]`` logits. The future-KL scan and FIPO's sequence drop run per
sequence whenever a row holds several sequences (packed) or part of one (CP).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_fipo.algorithms import metrics as metric_utils
from megatron_fipo.algorithms.losses import PolicyLossConfig, compute_policy_loss
from megatron_fipo.batch import ActorBatch
from megatron_fipo.config import (
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    check_actor_sections,
)
from megatron_fipo.megatron import checkpoint
from megatron_fipo.megatron import model as model_lib
from megatron_fipo.megatron.distributed import init_distributed
from megatron_fipo.megatron.logprobs import vocab_head
from megatron_fipo.megatron.micro_batches import (
    MicroBatch,
    build_micro_batch,
    pad_batch,
    plan_micro_batches,
    response_columns,
)


class MegatronActor:
    """Policy model + optimizer on this rank; every method is called on all ranks together."""

    def __init__(
        self,
        hf_config: Any,
        model: ModelConfig,
        parallelism: ParallelismConfig,
        optimizer: OptimizerConfig | None = None,
        loss: PolicyLossConfig | None = None,
        *,
        temperature: float = 1.0,
        seed: int = 42,
        optimizer_checkpoint_format: str = "dp_reshardable",
    ) -> None:
        """``hf_config``: the architecture that runs (the checkpoint's config.json, or the
        inline ``model.architecture``); ``model`` / ``parallelism`` / ``optimizer``: those
        sections of the run config, as they are; ``loss``: the algorithm section's policy loss.
        ``temperature``: the rollout's sampling temperature (logits are divided by it);
        ``seed``: weight init and Megatron's RNG; ``optimizer_checkpoint_format``: how
        :meth:`save` writes the distributed optimizer's state (``trainer`` section)."""
        self.optimizer_config = optimizer or OptimizerConfig()
        check_actor_sections(model, parallelism, self.optimizer_config)
        if optimizer_checkpoint_format not in checkpoint.OPTIMIZER_FORMATS:
            raise ValueError(
                f"optimizer_checkpoint_format must be one of {checkpoint.OPTIMIZER_FORMATS}, "
                f"got {optimizer_checkpoint_format!r}"
            )
        self.hf_config = hf_config
        self.model_config = model
        self.parallelism = parallelism
        self.loss_config = loss or PolicyLossConfig()
        self.temperature = temperature
        self.optimizer_checkpoint_format = optimizer_checkpoint_format
        self.vocab_size = int(model_lib.hf_value(hf_config, "vocab_size"))
        self.data_parallel_size = init_distributed(parallelism, seed=seed)
        self.transformer_config = model_lib.transformer_config_from_hf(
            hf_config,
            model,
            parallelism,
            calculate_per_token_loss=True,
            **_variable_shapes(parallelism),
        )
        # Packed rows need an attention that reads cu_seqlens: ours with the local spec.
        self.own_attention = model_lib.uses_own_attention(
            model.spec, parallelism.context_parallel_size, parallelism.packed
        )
        chunks = model_lib.build_model_chunks(
            hf_config, self.transformer_config, spec=model.spec, own_attention=self.own_attention
        )
        self.model = self._wrap(chunks)
        self.transformer_config.finalize_model_grads_func = _finalize_grads
        _set_overlap_hooks(self.transformer_config, self.model, parallelism)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.num_steps = 0
        self.offloaded = False
        self._params_stale = False  # overlap_param_gather: the last step's gather is pending
        # Where batches go: the GPU under NCCL, else CPU (gloo collectives take CPU tensors).
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )

    # ---------------------------------------------------------------- construction
    def _wrap(self, chunks: list) -> list:
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.transformer.module import Float16Module

        config = ddp_config(self.model_config, self.parallelism)
        wrapped = []
        for index, chunk in enumerate(chunks):
            if self.transformer_config.bf16 or self.transformer_config.fp16:
                chunk = Float16Module(self.transformer_config, chunk)
            wrapped.append(
                DistributedDataParallel(
                    self.transformer_config, config, chunk, disable_bucketing=index > 0
                )
            )
        return wrapped

    def _build_optimizer(self):
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.optimizer_config
        optimizer = get_megatron_optimizer(
            megatron_optimizer_config(
                cfg, self.model_config, self.parallelism, self.transformer_config
            ),
            self.model,
        )
        # "constant" needs no horizon (OptimizerConfig requires one for the decaying styles);
        # Megatron's scheduler wants one past the warm-up all the same.
        decay_steps = cfg.lr_decay_steps or cfg.lr_warmup_steps + 1
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    # ---------------------------------------------------------------- schedule plumbing
    def _micro_batches(self, batch: ActorBatch, with_training_data: bool) -> list[MicroBatch]:
        """Splits ``batch`` into micro-batches laid out for this CP rank (see module doc)."""
        from megatron.core import parallel_state

        parallelism = self.parallelism
        cp_group = (
            parallel_state.get_context_parallel_group()
            if parallelism.context_parallel_size > 1
            else None
        )
        fixed_rows = parallelism.max_tokens_per_micro_batch is None and not parallelism.packed
        padded = pad_batch(
            batch, parallelism.micro_batch_size if fixed_rows else 1, with_training_data
        )
        # Only Megatron's own local attention needs the dense [S, S] causal mask.
        causal_mask = self.model_config.spec == "local" and not self.own_attention
        return [
            build_micro_batch(
                padded,
                plan,
                cp_rank=parallel_state.get_context_parallel_rank(),
                cp_group=cp_group,
                device=self.device,
                with_training_data=with_training_data,
                causal_mask=causal_mask,
            )
            for plan in plan_micro_batches(padded["lengths"], parallelism, self.model_config)
        ]

    def _run_schedule(self, micro_batches: list[MicroBatch], loss_func, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # bf16 / fp16: the wrapper would upcast the last stage's hidden states to fp32, and the
        # vocab head would then run its GEMMs on fp32 copies (see logprobs).
        half = self.transformer_config.bf16 or self.transformer_config.fp16
        extra = {"fp32_output": False} if half else {}

        def forward_step(data_iterator: Iterator[MicroBatch], model_chunk):
            micro = next(data_iterator)
            with model_lib.hidden_states_only(model_chunk):
                hidden = model_chunk(
                    micro.tokens,
                    micro.position_ids,
                    micro.attention_mask,
                    packed_seq_params=micro.packed_seq_params,
                    **extra,
                )
            return hidden, functools.partial(loss_func, micro, model_chunk)

        first = micro_batches[0]
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in self.model],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            # The global (whole-sequence) row length: the schedule divides it by CP (and by
            # TP under sequence parallelism) for the tensors the stages exchange.
            seq_length=first.tokens.shape[1] * self.parallelism.context_parallel_size,
            micro_batch_size=first.tokens.shape[0],
            forward_only=forward_only,
        )

    def _token_log_probs(self, micro: MicroBatch, model_chunk, hidden: torch.Tensor):
        """Log-probs and entropy ``[rows, S_local]`` of each position's next token."""
        log_probs, entropy = vocab_head(
            hidden,
            model_lib.output_weight(model_chunk),
            micro.targets.t(),
            sequence_parallel=self.transformer_config.sequence_parallel,
            temperature=self.temperature,
            chunk_size=self.model_config.logprob_chunk_size,
            vocab_size=self.vocab_size,
        )
        return log_probs.t(), entropy.t()

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch) -> torch.Tensor:
        """Log-probs ``[B, T_resp]`` fp32 of the response tokens (0 past each response);
        returned on every rank. ``T_resp`` is the longest response of ``batch``."""
        self.finish_param_sync()
        for chunk in self.model:
            chunk.eval()
        micro_batches = self._micro_batches(batch, with_training_data=False)
        width = int(torch.as_tensor(batch.response_lengths).max())

        def loss_func(micro, model_chunk, hidden):
            log_probs, _ = self._token_log_probs(micro, model_chunk, hidden)
            response = response_columns(log_probs, micro, width)
            return hidden.new_zeros(()), torch.ones((), dtype=torch.int), response

        outputs = self._run_schedule(micro_batches, loss_func, forward_only=True)
        return self._collect_responses(outputs, micro_batches, batch)

    def _collect_responses(
        self, outputs: list, micro_batches: list[MicroBatch], batch: ActorBatch
    ) -> torch.Tensor:
        from megatron.core import parallel_state

        num_sequences = len(batch.input_ids)
        width = int(torch.as_tensor(batch.response_lengths).max())
        result = torch.zeros(num_sequences, width, dtype=torch.float32, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for micro, values in zip(micro_batches, outputs):
                keep = micro.rows < num_sequences  # not the fixed-size padding rows
                result[micro.rows[keep].to(self.device)] = values[keep.to(values.device)]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                result,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return result.cpu()

    def _global_token_count(self, batch: ActorBatch) -> torch.Tensor:
        from megatron.core import parallel_state

        count = torch.as_tensor(batch.response_lengths, dtype=torch.float64).sum().reshape(1)
        count = count.to(self.device)
        dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
        return count[0]

    def train_step(self, batch: ActorBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` (this DP rank's share of the mini-batch).

        Returns metrics reduced over all ranks: the loss metrics of
        :func:`compute_policy_loss` (``*_mean`` / ``*_max`` / ``*_min``), ``actor/loss``,
        ``actor/entropy_mean``, ``actor/grad_norm``, ``actor/lr`` and ``actor/num_tokens``.
        """
        if batch.old_log_probs is None or batch.advantages is None:
            raise ValueError("train_step needs batch.old_log_probs and batch.advantages")
        if self.offloaded:
            raise RuntimeError("train_step while the training state is offloaded: restore it")
        loss_config = batch.loss_config or self.loss_config
        num_tokens = self._global_token_count(batch)
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()  # with overlap_param_gather: the forward gathers anew
        self._params_stale = False
        self.optimizer.zero_grad()
        micro_batches = self._micro_batches(batch, with_training_data=True)
        loss_func = functools.partial(self._train_loss, loss_config, num_tokens)
        outputs = self._run_schedule(micro_batches, loss_func, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")
        self._params_stale = self.parallelism.overlap_param_gather
        self.scheduler.step(increment=1)
        self.num_steps += 1
        reduced = reduce_metrics(outputs, self.device)
        reduced["actor/grad_norm"] = float(grad_norm)
        reduced["actor/lr"] = float(self.optimizer.param_groups[0]["lr"])
        reduced["actor/num_tokens"] = float(num_tokens.cpu())
        return reduced

    def _train_loss(self, loss_config, num_tokens, micro, model_chunk, hidden):
        log_probs, entropy = self._token_log_probs(micro, model_chunk, hidden)
        mask = micro.response_mask
        loss, stats = compute_policy_loss(
            log_probs,
            micro.old_log_probs,
            micro.advantages,
            mask,
            loss_config,
            num_tokens=num_tokens,
            future_sum_fn=micro.future_sum_fn,
            sequence_sum_fn=micro.sequence_sum_fn,
        )
        if loss_config.entropy_coeff:
            # Entropy bonus, aggregated like the policy loss: sum over response tokens / the
            # optimizer step's global token count.
            loss = loss - loss_config.entropy_coeff * (entropy * mask).sum() / num_tokens
        stats["actor/entropy_sum"] = (entropy.detach().double() * mask).sum()
        stats["actor/entropy_count"] = mask.double().sum()
        stats["actor/loss_sum"] = loss.detach().double()
        # calculate_per_token_loss: Megatron sums these counts but we never divide by them.
        return loss, torch.ones((), dtype=torch.int), stats

    # ---------------------------------------------------------------- colocation
    def offload_train_state(self) -> None:
        """Free what only training needs while colocated engines generate: the optimizer state
        (Adam moments, fp32 main weights: moved to host memory) and the gradient buffers (their
        storage dropped, views kept). The weights stay: the next weight sync reads them."""
        cuda = torch.cuda.is_available()
        self.optimizer.offload_to_cpu()
        for chunk in self.model:
            chunk.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        self.offloaded = True

    def restore_train_state(self) -> None:
        """Undo :meth:`offload_train_state` (gradient buffers come back zeroed)."""
        if not self.offloaded:
            return
        for chunk in self.model:
            chunk.restore_grad_buffers(synchronize=torch.cuda.is_available())
        self.optimizer.restore_from_cpu()
        self.offloaded = False

    # ---------------------------------------------------------------- weights and state
    def named_parameters_for_sync(self) -> Iterator[checkpoint.ParamShard]:
        """This rank's parameter shards with the information needed to rebuild full tensors.

        Yields :class:`checkpoint.ParamShard` (global Megatron name with layer numbers made
        global over PP / VPP, the local tensor, and its TP partition dim / stride / GLU flag).
        See :func:`checkpoint.iter_param_shards`.
        """
        self.finish_param_sync()
        return checkpoint.iter_param_shards(self.model)

    def finish_param_sync(self) -> None:
        """With ``overlap_param_gather`` the parameters that the last step updated on other
        data-parallel ranks arrive during the next training forward; whatever reads the
        weights before that (log-probs, weight sync, checkpoints, checks) calls this first.
        All ranks call it together; a no-op otherwise."""
        if not self._params_stale:
            return
        for chunk in self.model:
            chunk.start_param_sync(force_sync=True)
        self._params_stale = False

    def save(self, path: str) -> None:
        """Saves model, optimizer and LR-scheduler state as a torch_dist checkpoint at ``path``."""
        self.finish_param_sync()
        checkpoint.save_actor_checkpoint(self, path)

    def load(self, path: str, *, load_optimizer: bool = True) -> None:
        """Loads a checkpoint written by :meth:`save` (model part under any TP / PP layout)."""
        checkpoint.load_actor_checkpoint(self, path, load_optimizer=load_optimizer)


def _finalize_grads(model, num_tokens=None, **kwargs) -> None:
    """Megatron's grad finaliser (DP / embedding all-reduces) without the division by the
    token count: our loss is already divided by the global count (see module doc)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)


def reduce_metrics(outputs: list[dict], device: torch.device) -> dict[str, float]:
    """The step's metrics (one dict of 0-d tensors per micro-batch, on the last pipeline stage)
    over every DP x CP rank, by key suffix (:mod:`~megatron_fipo.algorithms.metrics`), in one
    collective: each rank's vector of values is all-gathered and reduced here, key by key."""
    from megatron.core import parallel_state

    merged: dict[str, torch.Tensor] = {}
    for stats in outputs:
        metric_utils.merge(merged, stats)
    objects = [merged]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(
            objects,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    merged = objects[0]
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    keys = sorted(merged)
    values = torch.stack([merged[key].double().reshape(()) for key in keys]).to(device)
    every = values.new_empty((dist.get_world_size(group), len(keys)))
    dist.all_gather_single(every, values.unsqueeze(0), group=group)
    reduced = {"sum": every.sum(0), "max": every.amax(0), "min": every.amin(0)}
    for index, key in enumerate(keys):
        merged[key] = reduced[metric_utils.reduce_op(key)][index]
    result = metric_utils.finalize(merged)
    result["actor/loss"] = result.pop("actor/loss_sum")
    return result


# -------------------------------------------------------------------- Megatron's configs
def ddp_config(model: ModelConfig, parallelism: ParallelismConfig):
    """Megatron's ``DistributedDataParallelConfig`` for the sections: gradients reduced in
    fp32, the overlap switches, FP8 parameter all-gather when the weights are FP8."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallelism.overlap_grad_reduce,
        overlap_param_gather=parallelism.overlap_param_gather,
        use_distributed_optimizer=parallelism.use_distributed_optimizer,
        fp8_param_gather=model.fp8_param,
    )


def megatron_optimizer_config(
    optimizer: OptimizerConfig,
    model: ModelConfig,
    parallelism: ParallelismConfig,
    transformer_config,
):
    """Megatron's optimizer config for the sections (the FP8 recipe decides how the
    distributed optimizer handles FP8 weights)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    return MegatronOptimizerConfig(
        optimizer=optimizer.optimizer,
        lr=optimizer.lr,
        min_lr=optimizer.min_lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_eps=optimizer.adam_eps,
        sgd_momentum=optimizer.sgd_momentum,
        clip_grad=optimizer.clip_grad,
        bf16=transformer_config.bf16,
        fp16=transformer_config.fp16,
        params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=parallelism.use_distributed_optimizer,
        fp8_recipe=model.fp8_recipe if model.fp8 is not None else None,
    )


def _set_overlap_hooks(transformer_config, chunks: list, parallelism: ParallelismConfig) -> None:
    """With ``overlap_grad_reduce`` the schedule must hold each chunk's reduce back until its
    last micro-batch (``no_sync``) and may start it when that backward ends."""
    if not parallelism.overlap_grad_reduce:
        return
    no_sync = [chunk.no_sync for chunk in chunks]
    start = [chunk.start_grad_sync for chunk in chunks]
    transformer_config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
    transformer_config.grad_sync_func = start[0] if len(chunks) == 1 else start


def _variable_shapes(parallelism: ParallelismConfig) -> dict[str, Any]:
    """Token-budget or packed micro-batches have different shapes: pipeline stages then
    exchange them (megatron-core refuses that unless the MoE dispatcher, unused by dense
    models, is ``alltoall``)."""
    varies = parallelism.max_tokens_per_micro_batch is not None or parallelism.packed
    if not varies or parallelism.pipeline_model_parallel_size == 1:
        return {}
    return dict(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
