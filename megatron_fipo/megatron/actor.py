"""The Megatron actor: old log-probs and FIPO / DAPO / GRPO updates under TP / PP / CP / DP.

Objective of :meth:`MegatronActor.train_step` (one optimizer step over this rank's batch)::

    L = sum_{micro-batches, DP ranks, CP ranks} sum_{kept tokens} loss_t  /  N_global

with ``loss_t`` from :func:`megatron_fipo.algorithms.losses.compute_policy_loss` and
``N_global`` the number of response tokens of the whole optimizer step, all-reduced over DP
before the first micro-batch. Megatron is told ``calculate_per_token_loss`` and the grad
finaliser gets no token count, so neither the schedule nor DDP rescale: DDP sums gradients
over DP x CP, and the result equals the single-process gradient of the token-mean loss.

Micro-batches: ``micro_batch_size`` consecutive sequences, all padded to the batch's longest;
or, with ``max_tokens_per_micro_batch`` (dynamic batching, what long-CoT RL needs: responses
of 1k and 20k tokens in one batch), sequences sorted longest first and grouped while rows x
the group's longest stays within the token budget, each group padded to its own longest
(pipeline stages then exchange shapes). Results return in the caller's order.

Data flow per micro-batch: :mod:`megatron_fipo.megatron.context_parallel` lays the sequences
out (one padded row per sequence, the zigzag split over CP ranks, next-token targets taken
from the full sequence; CP = 1 is the same code with one chunk pair); the model returns
final hidden states
(:func:`model.hidden_states_only`), and :func:`logprobs.chunked_log_probs` turns them into
log-probs of the next tokens without materialising ``[S, V]`` logits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
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
from megatron_fipo.megatron import checkpoint, context_parallel
from megatron_fipo.megatron import model as model_lib
from megatron_fipo.megatron.distributed import init_distributed
from megatron_fipo.megatron.logprobs import chunked_log_probs


@dataclass(kw_only=True, slots=True)
class MicroBatch:
    """One micro-batch as this CP rank feeds it to the model and the loss (device tensors).

    ``tokens`` / ``position_ids`` / ``targets``: ``[mbs, S_local]`` (targets: the next token
    of each position); the training fields are label aligned ``[mbs, S_local]``; ``rows``: the
    sequences' rows in the actor's batch (>= its size: fixed-size padding rows).
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """Causal mask for Megatron's local softmax (CP = 1); None when our CP attention masks."""
    targets: torch.Tensor
    layout: context_parallel.SequenceLayout
    cp_group: Any
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    response_mask: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    future_sum_fn: Any = None
    """The CP reverse scan (None: one rank holds the whole sequence)."""
    sequence_sum_fn: Any = None
    """The CP per-sequence sum (None with CP = 1)."""


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
        chunks = model_lib.build_model_chunks(hf_config, self.transformer_config, spec=model.spec)
        self.model = self._wrap(chunks)
        self.transformer_config.finalize_model_grads_func = _finalize_grads
        self.optimizer, self.scheduler = self._build_optimizer()
        self.num_steps = 0
        self.offloaded = False
        # Where batches go: the GPU under NCCL, else CPU (gloo collectives take CPU tensors).
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )

    # ---------------------------------------------------------------- construction
    def _wrap(self, chunks: list) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.parallelism.use_distributed_optimizer,
        )
        wrapped = []
        for index, chunk in enumerate(chunks):
            if self.transformer_config.bf16 or self.transformer_config.fp16:
                chunk = Float16Module(self.transformer_config, chunk)
            wrapped.append(
                DistributedDataParallel(
                    self.transformer_config, ddp_config, chunk, disable_bucketing=index > 0
                )
            )
        return wrapped

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.optimizer_config
        optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer=cfg.optimizer,
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                sgd_momentum=cfg.sgd_momentum,
                clip_grad=cfg.clip_grad,
                bf16=self.transformer_config.bf16,
                fp16=self.transformer_config.fp16,
                params_dtype=self.transformer_config.params_dtype,
                use_distributed_optimizer=self.parallelism.use_distributed_optimizer,
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

        cp_group = (
            parallel_state.get_context_parallel_group()
            if self.parallelism.context_parallel_size > 1
            else None
        )
        cp_rank = parallel_state.get_context_parallel_rank()
        dynamic = self.parallelism.max_tokens_per_micro_batch is not None
        padded = _pad_batch(
            batch, 1 if dynamic else self.parallelism.micro_batch_size, with_training_data
        )
        micro_batches = []
        plan = plan_micro_batches(padded["lengths"], self.parallelism)
        for rows, common in plan:
            micro = self._micro_batch(padded, rows, common, cp_rank, cp_group, with_training_data)
            micro_batches.append(micro)
        return micro_batches

    def _micro_batch(
        self, padded, rows, common, cp_rank, cp_group, with_training_data
    ) -> MicroBatch:
        lengths = padded["lengths"][rows]
        width = min(common, padded["input_ids"].shape[1])  # the group's columns only
        layout = context_parallel.SequenceLayout(
            lengths=tuple(lengths.tolist()),
            padded_lengths=(common,) * len(lengths),
            cp_size=self.parallelism.context_parallel_size,
            cp_rank=cp_rank,
            packed=False,
        )
        names = ("response_mask", "old_log_probs", "advantages") if with_training_data else ()
        cp_batch = context_parallel.build_cp_batch(
            padded["input_ids"][rows, :width],
            lengths,
            layout,
            {name: padded[name][rows, :width] for name in names},
        )
        local_length = cp_batch.tokens.shape[1]
        device = self.device
        micro = MicroBatch(
            rows=rows,
            tokens=cp_batch.tokens.to(device),
            position_ids=cp_batch.position_ids.to(device),
            attention_mask=model_lib.causal_attention_mask(local_length, device)
            if self.parallelism.context_parallel_size == 1
            else None,
            targets=cp_batch.labels.to(device),
            layout=layout,
            cp_group=cp_group,
            prompt_lengths=padded["prompt_lengths"][rows].to(device),
            response_lengths=padded["response_lengths"][rows].to(device),
            **{name: value.to(device) for name, value in cp_batch.label_aligned.items()},
        )
        if with_training_data and cp_group is not None:
            from megatron_fipo.megatron.cp_scan import make_cp_future_sum, make_cp_sequence_sum

            micro.future_sum_fn = make_cp_future_sum(layout, cp_group)
            micro.sequence_sum_fn = make_cp_sequence_sum(layout, cp_group)
        return micro

    def _run_schedule(self, micro_batches: list[MicroBatch], loss_func, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[MicroBatch], model_chunk):
            micro = next(data_iterator)
            with model_lib.hidden_states_only(model_chunk):
                hidden = model_chunk(micro.tokens, micro.position_ids, micro.attention_mask)
            return hidden, functools.partial(loss_func, micro, model_chunk)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in self.model],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].tokens.shape[1],
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=forward_only,
        )

    def _token_log_probs(self, micro: MicroBatch, model_chunk, hidden: torch.Tensor):
        """Log-probs and entropy ``[mbs, S_local]`` of each position's next token."""
        sequence_parallel = self.transformer_config.sequence_parallel
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # [S_local / TP, B, H] -> [S_local, B, H]; its backward reduce-scatters (sums
            # over TP), so chunked_log_probs must not all-reduce the gradient again.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        log_probs, entropy = chunked_log_probs(
            hidden,
            model_lib.output_weight(model_chunk),
            micro.targets.t(),
            temperature=self.temperature,
            chunk_size=self.model_config.logprob_chunk_size,
            vocab_size=self.vocab_size,
            reduce_hidden_grad=not sequence_parallel,
        )
        return log_probs.t(), entropy.t()

    # ---------------------------------------------------------------- public API
    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch) -> torch.Tensor:
        """Log-probs ``[B, T_resp]`` fp32 of the response tokens (0 past each response);
        returned on every rank. ``T_resp`` is the longest response of ``batch``."""
        for chunk in self.model:
            chunk.eval()
        micro_batches = self._micro_batches(batch, with_training_data=False)
        width = int(torch.as_tensor(batch.response_lengths).max())

        def loss_func(micro, model_chunk, hidden):
            log_probs, _ = self._token_log_probs(micro, model_chunk, hidden)
            response = _response_columns(log_probs, micro, width)
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
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_batches = self._micro_batches(batch, with_training_data=True)
        loss_func = functools.partial(self._train_loss, loss_config, num_tokens)
        outputs = self._run_schedule(micro_batches, loss_func, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")
        self.scheduler.step(increment=1)
        self.num_steps += 1
        reduced = self._reduce_metrics(outputs)
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

    def _reduce_metrics(self, outputs: list[dict]) -> dict[str, float]:
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
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        for key in sorted(merged):
            value = merged[key].to(self.device).reshape(1).clone()
            dist.all_reduce(value, op=ops[metric_utils.reduce_op(key)], group=group)
            merged[key] = value[0]
        result = metric_utils.finalize(merged)
        result["actor/loss"] = result.pop("actor/loss_sum")
        return result

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
        return checkpoint.iter_param_shards(self.model)

    def save(self, path: str) -> None:
        """Saves model, optimizer and LR-scheduler state as a torch_dist checkpoint at ``path``."""
        checkpoint.save_actor_checkpoint(self, path)

    def load(self, path: str, *, load_optimizer: bool = True) -> None:
        """Loads a checkpoint written by :meth:`save` (model part under any TP / PP layout)."""
        checkpoint.load_actor_checkpoint(self, path, load_optimizer=load_optimizer)


def _finalize_grads(model, num_tokens=None, **kwargs) -> None:
    """Megatron's grad finaliser (DP / embedding all-reduces) without the division by the
    token count: our loss is already divided by the global count (see module doc)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, **kwargs)


# -------------------------------------------------------------------- batch layout helpers
def plan_micro_batches(
    lengths: torch.Tensor, parallelism: ParallelismConfig
) -> list[tuple[torch.Tensor, int]]:
    """``(row indices, padded length)`` per micro-batch of rows of ``lengths``; rows are padded
    to multiples of ``2 * CP * TP``.

    Fixed size (``micro_batch_size``): consecutive rows, every one padded to the batch's
    longest sequence (one shape for the whole schedule). Dynamic
    (``max_tokens_per_micro_batch``): rows sorted longest first, a micro-batch takes the next
    row while rows x its first (longest) row's padded length stays within the budget; each
    micro-batch has its own length (pipeline stages then exchange shapes,
    ``variable_seq_lengths``).
    """
    cp, tp = parallelism.context_parallel_size, parallelism.tensor_model_parallel_size
    budget = parallelism.max_tokens_per_micro_batch
    if budget is None:
        common = context_parallel.padded_length(int(lengths.max()), cp, tp)
        size = parallelism.micro_batch_size
        return [
            (torch.arange(start, min(start + size, len(lengths))), common)
            for start in range(0, len(lengths), size)
        ]
    order = sorted(range(len(lengths)), key=lambda row: (-int(lengths[row]), row))
    plan: list[tuple[list[int], int]] = []
    for row in order:
        length = context_parallel.padded_length(int(lengths[row]), cp, tp)
        if length > budget:
            raise ValueError(
                f"a sequence of {int(lengths[row])} tokens (padded to {length} for CP={cp}, "
                f"TP={tp}) exceeds parallelism.max_tokens_per_micro_batch={budget}"
            )
        if plan and (len(plan[-1][0]) + 1) * plan[-1][1] <= budget:
            plan[-1][0].append(row)
        else:
            plan.append(([row], length))
    return [(torch.tensor(rows), common) for rows, common in plan]


def _variable_shapes(parallelism: ParallelismConfig) -> dict[str, Any]:
    """Dynamic batching gives micro-batches of different shapes: pipeline stages then exchange
    them (megatron-core refuses that unless the MoE dispatcher, unused by dense models, is
    ``alltoall``)."""
    if (
        parallelism.max_tokens_per_micro_batch is None
        or parallelism.pipeline_model_parallel_size == 1
    ):
        return {}
    return dict(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")


def _pad_batch(batch: ActorBatch, micro_batch_size: int, with_training_data: bool) -> dict:
    """Right-padded token-aligned ``[B_pad, T]`` tensors; B padded to a multiple of
    ``micro_batch_size`` with one-token dummy sequences that carry no response."""
    prompt = torch.as_tensor(batch.prompt_lengths, dtype=torch.int64).reshape(-1)
    response = torch.as_tensor(batch.response_lengths, dtype=torch.int64).reshape(-1)
    num_real = len(batch.input_ids)
    if not num_real or prompt.numel() != num_real or response.numel() != num_real:
        raise ValueError(
            f"batch has {num_real} input_ids, {prompt.numel()} prompt_lengths and "
            f"{response.numel()} response_lengths; they must match and be non-empty"
        )
    lengths = prompt + response
    for index, ids in enumerate(batch.input_ids):
        if ids.dim() != 1 or ids.numel() != int(lengths[index]) or int(prompt[index]) < 1:
            raise ValueError(
                f"sequence {index}: input_ids has {ids.numel()} tokens but prompt_lengths + "
                f"response_lengths = {int(lengths[index])} (prompt must be >= 1 token)"
            )
    num_rows = -(-num_real // micro_batch_size) * micro_batch_size
    extra = num_rows - num_real
    total = int(lengths.max())
    input_ids = torch.zeros(num_rows, total, dtype=torch.int64)
    for index, ids in enumerate(batch.input_ids):
        input_ids[index, : ids.numel()] = ids
    prompt = torch.cat([prompt, torch.ones(extra, dtype=torch.int64)])
    response = torch.cat([response, torch.zeros(extra, dtype=torch.int64)])
    padded = dict(
        input_ids=input_ids,
        lengths=prompt + response,
        prompt_lengths=prompt,
        response_lengths=response,
    )
    if with_training_data:
        padded.update(_training_tensors(batch, prompt, response, num_rows, total))
    return padded


def _training_tensors(batch, prompt, response, num_rows, total) -> dict[str, torch.Tensor]:
    """Response mask, old log-probs and per-token advantages, token aligned ``[B_pad, T]``."""
    width = int(response.max())
    old = torch.as_tensor(batch.old_log_probs, dtype=torch.float32)
    advantages = torch.as_tensor(batch.advantages, dtype=torch.float32)
    num_real = old.shape[0]
    if old.dim() != 2 or old.shape[1] < width:
        raise ValueError(f"old_log_probs must be [B, T_resp>={width}], got {tuple(old.shape)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(-1, width)
    if advantages.shape[0] != num_real or advantages.shape[1] < width:
        raise ValueError(
            f"advantages must be [B] or [B, T_resp>={width}], got {tuple(advantages.shape)}"
        )
    column = torch.arange(width)
    positions = (prompt[:num_real, None] + column).clamp(max=total - 1)
    valid = column < response[:num_real, None]
    out = {
        name: torch.zeros(num_rows, total)
        for name in ("response_mask", "old_log_probs", "advantages")
    }
    for name, values in (
        ("response_mask", valid.float()),
        ("old_log_probs", old),
        ("advantages", advantages),
    ):
        out[name][:num_real].scatter_(1, positions, torch.where(valid, values[:, :width], 0.0))
    return out


def _response_columns(local_values: torch.Tensor, micro: MicroBatch, width: int) -> torch.Tensor:
    """Label-aligned local ``[mbs, S_local]`` values -> ``[mbs, width]`` per response token.

    Gathers over the CP group (rows of the global sequence on every CP rank) and shifts so
    that column ``j`` is the value for response token ``j`` (predicted at position
    ``prompt + j - 1``); 0 past each response.
    """
    layout = micro.layout
    full = context_parallel.gather_to_global(
        local_values, layout, layout.padded_lengths[0], micro.cp_group, shift_to_tokens=True
    )
    column = torch.arange(width, device=full.device)
    positions = (micro.prompt_lengths[:, None] + column).clamp(max=full.shape[1] - 1)
    valid = column < micro.response_lengths[:, None]
    return torch.where(valid, full.gather(1, positions), 0.0)
