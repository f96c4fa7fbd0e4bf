"""Numeric check of a conversion: the same tokens through transformers and through the Megatron
model loaded from the dist checkpoint (the actor's ``load_model_checkpoint``, i.e.
``megatron.core.dist_checkpointing.load``) under a chosen
TP/PP layout, in fp32.

Reports the max absolute logit difference over the real vocabulary and the mean (over positions)
``KL(p_hf || p_megatron)``. :func:`verify` spawns ``tp * pp`` gloo processes; inside an existing
world (tests share one), call :func:`verify_in_process` on every rank.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint_convert.adapters import ConversionError
from checkpoint_convert.convert import ROOT_CONFIG, read_config


@dataclass(kw_only=True, slots=True)
class VerifyConfig:
    hf_dir: Path
    """HF checkpoint (the reference, run with transformers)."""
    megatron_dir: Path
    """torch_dist checkpoint; the ``config.json`` beside it (else the HF one) builds the model."""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    batch_size: int = 2
    seq_len: int = 16
    seed: int = 0
    """Seed of the random token batch ``[batch_size, seq_len]``."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    max_abs_diff: float
    mean_kl: float


def _model_config(config: VerifyConfig) -> dict:
    recorded = Path(config.megatron_dir) / ROOT_CONFIG
    return read_config(recorded if recorded.is_file() else Path(config.hf_dir) / "config.json")


def _model_section(config: VerifyConfig):
    """The ``model`` section the check builds: fp32, Megatron's local spec."""
    from megatron_fipo.config import ModelConfig

    return ModelConfig(hf_model_path=str(config.hf_dir), dtype="float32", spec="local")


def _parallelism(config: VerifyConfig):
    from megatron_fipo.config import ParallelismConfig

    return ParallelismConfig(
        tensor_model_parallel_size=config.tensor_parallel,
        pipeline_model_parallel_size=config.pipeline_parallel,
    )


def _load_megatron(hf_config: dict, config: VerifyConfig):
    from megatron_fipo.megatron import model as model_lib
    from megatron_fipo.megatron.checkpoint import load_model_checkpoint

    transformer_config = model_lib.transformer_config_from_hf(
        hf_config, _model_section(config), _parallelism(config)
    )
    (chunk,) = model_lib.build_model_chunks(hf_config, transformer_config)
    # The actor's loader: megatron.core.dist_checkpointing.load + a strict load_state_dict.
    load_model_checkpoint([chunk], str(config.megatron_dir))
    return chunk.eval()


def _megatron_logits(chunk, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocab logits ``[B, S, V]`` on the last pipeline stage, None elsewhere.

    Pipeline stages hand hidden states ``[S, B, H]`` on with plain send / recv: a forward-only
    check needs no schedule.
    """
    from megatron.core import parallel_state as ps

    from megatron_fipo.megatron.model import causal_attention_mask

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = causal_attention_mask(seq)
    group = ps.get_pipeline_model_parallel_group()
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(seq, batch, chunk.config.hidden_size)
        dist.recv(hidden, group_src=ps.get_pipeline_model_parallel_rank() - 1, group=group)
        chunk.set_input_tensor(hidden)
    output = chunk(input_ids=tokens, position_ids=positions, attention_mask=mask)
    if not ps.is_pipeline_last_stage():
        dist.send(
            output.contiguous(), group_dst=ps.get_pipeline_model_parallel_rank() + 1, group=group
        )
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(output) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, output.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


@torch.no_grad()
def verify_in_process(config: VerifyConfig) -> VerifyResult:
    """Run on every rank of an initialised world (size divisible by tp * pp); same result on all."""
    import transformers

    from megatron_fipo.megatron import distributed as dist_lib

    hf_config = _model_config(config)
    dist_lib.init_distributed(_parallelism(config))
    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.randint(
        0, hf_config["vocab_size"], (config.batch_size, config.seq_len), generator=generator
    )
    try:
        logits = _megatron_logits(
            _load_megatron(hf_config, config), tokens, hf_config["vocab_size"]
        )
    finally:
        dist_lib.destroy()
    summary = torch.zeros(2, dtype=torch.float64)
    if logits is not None:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            config.hf_dir, dtype=torch.float32
        )
        expected = reference.eval()(tokens).logits.float()
        log_p, log_q = expected.log_softmax(-1), logits.float().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        summary = torch.tensor(
            [(expected - logits).abs().max().item(), kl.item()], dtype=torch.float64
        )
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    return VerifyResult(max_abs_diff=summary[0].item(), mean_kl=summary[1].item())


def _worker(rank: int, world_size: int, port: int, config: VerifyConfig, result_path: str) -> None:
    from megatron_fipo.megatron import distributed as dist_lib

    dist_lib.set_local_world_env(rank, world_size, port)
    try:
        result = verify_in_process(config)
    except Exception as error:
        # One line for the parent to report; raising then makes mp.spawn stop the other ranks
        # (they may be blocked in a collective with this one).
        message = f"rank {rank}: {type(error).__name__}: {' '.join(str(error).split())[:500]}"
        Path(result_path + f".error{rank}").write_text(message)
        raise
    if rank == 0:
        Path(result_path).write_text(json.dumps(asdict(result)))
    dist_lib.destroy(process_group=True)


def verify(config: VerifyConfig) -> VerifyResult:
    """Spawn ``tp * pp`` gloo processes on this machine and return the comparison."""
    import torch.multiprocessing as mp

    from megatron_fipo.megatron.distributed import free_port

    for path in (config.hf_dir, config.megatron_dir):
        if not Path(path).is_dir():
            raise ConversionError(f"no such directory: {path}")
    hf_config = _model_config(config)  # a missing or unreadable config.json is named here
    for name, size in (
        ("num_attention_heads", config.tensor_parallel),
        ("num_key_value_heads", config.tensor_parallel),
        ("num_hidden_layers", config.pipeline_parallel),
    ):
        if int(hf_config.get(name, size)) % size:
            raise ConversionError(
                f"--tp {config.tensor_parallel} --pp {config.pipeline_parallel}: the model's "
                f"{name} ({hf_config[name]}) is not divisible by {size}"
            )
    if not (Path(config.megatron_dir) / ".metadata").is_file():
        raise ConversionError(
            f"{config.megatron_dir} is not a Megatron torch_dist checkpoint (no .metadata)"
        )
    world_size = config.tensor_parallel * config.pipeline_parallel
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "result.json")
        try:
            mp.spawn(
                _worker, args=(world_size, free_port(), config, result_path), nprocs=world_size
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            reports = sorted(Path(scratch).glob("result.json.error*"))
            reason = reports[0].read_text() if reports else " ".join(str(error).split())[:500]
            raise ConversionError(f"verify failed: {reason}") from None
        return VerifyResult(**json.loads(Path(result_path).read_text()))
