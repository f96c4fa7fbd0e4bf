"""FP8 plumbing that CPU can check (the FP8 kernels need TransformerEngine on a GPU): what the
run config's ``model.fp8*`` and ``parallelism`` knobs become in Megatron's DDP and optimizer
configs, and weight export of FP8 parameters (GPU + TE only). The padding rule is tested in
``test_megatron_micro_batches.py``."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from megatron_fipo.config import ModelConfig
from megatron_fipo.megatron.actor import ddp_config, megatron_optimizer_config
from megatron_fipo.megatron.check_parallel import layout
from megatron_fipo.megatron.checkpoint import exportable

FP8_PARAMS = ModelConfig(
    hf_model_path="m", spec="te", dtype="bfloat16", fp8="hybrid", fp8_param=True
)
BF16 = ModelConfig(hf_model_path="m", spec="te", dtype="bfloat16")
BF16_TRANSFORMER = SimpleNamespace(bf16=True, fp16=False, params_dtype=torch.bfloat16)


def test_fp8_params_reach_ddp_and_the_optimizer():
    """model.fp8_param: DDP gathers the FP8 weights as FP8 (fp8_param_gather), and the
    distributed optimizer is told the recipe (it handles FP8 shards by it). Without FP8
    neither is set; the overlap switches pass through as they are."""
    from megatron_fipo.config import OptimizerConfig

    parallel = layout(tp=2, overlap_grad_reduce=True, overlap_param_gather=True)
    ddp = ddp_config(FP8_PARAMS, parallel)
    assert ddp.fp8_param_gather and ddp.use_distributed_optimizer
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.grad_reduce_in_fp32
    optimizer = megatron_optimizer_config(OptimizerConfig(), FP8_PARAMS, parallel, BF16_TRANSFORMER)
    assert optimizer.fp8_recipe == "delayed" and optimizer.bf16
    plain = ddp_config(BF16, layout(tp=2))
    assert not (plain.fp8_param_gather or plain.overlap_grad_reduce or plain.overlap_param_gather)
    assert (
        megatron_optimizer_config(OptimizerConfig(), BF16, layout(), BF16_TRANSFORMER).fp8_recipe
        is None
    )


def test_plain_parameters_export_as_themselves():
    param = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    out = exportable(param)
    assert not out.requires_grad and out.data_ptr() == param.data_ptr()


_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(
    not (_TE and torch.cuda.is_available()), reason="needs TransformerEngine and a GPU"
)
def test_fp8_weights_export_as_bf16():  # pragma: no cover - GPU only
    """An FP8 weight (TE's FP8 parameters, what model.fp8_param gives) leaves weight sync as a
    plain bf16 tensor holding its dequantized values."""
    import transformer_engine.pytorch as te
    from megatron.core.fp8_utils import is_float8tensor

    with te.fp8_model_init(enabled=True):
        linear = te.Linear(64, 64, params_dtype=torch.bfloat16, device="cuda")
    assert is_float8tensor(linear.weight)
    out = exportable(linear.weight)
    assert type(out) is torch.Tensor and out.dtype == torch.bfloat16
    assert torch.equal(out, linear.weight.dequantize().to(torch.bfloat16))
