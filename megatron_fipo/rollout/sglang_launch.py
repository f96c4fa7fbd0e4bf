"""How the SGLang engine's servers are launched: the engine's settings and the command line.

:class:`SGLangEngineConfig` holds the facts of the placement (model path, server count, first
GPU, weight-update mode) and reads every other setting from the run's rollout section;
:func:`default_launch_command` builds one server's `python -m sglang.launch_server` command,
which :class:`megatron_fipo.rollout.sglang_engine.SGLangRolloutEngine` starts with
:data:`SERVER_ENV`. `tests/test_sglang_contract.py` checks the flags and the environment switch
against the pinned release (:data:`SGLANG_VERSION`). Re-exported by `sglang_engine`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from megatron_fipo.config import RolloutConfig
from megatron_fipo.rollout.sglang_server import ServerSpec

SGLANG_VERSION = "0.5.23"
"""The release whose protocol this engine speaks (pinned in requirements/gpu-constraints.txt)."""
SERVER_ENV = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}
"""Makes `/health` a status check without a generation (it answers 503 while starting)."""


@dataclass(kw_only=True, slots=True)
class SGLangEngineConfig:
    """One engine: what its servers load and where they run. Every setting comes from the run's
    rollout section (``rollout``, passed as is: TP size, memory fraction, host, bucket size,
    determinism, extra arguments, and ``rollout.sglang``'s timeouts, concurrency and restarts);
    the fields here are facts of the placement."""

    model_path: str
    """HF model directory the servers load at start (architecture, tokenizer-free)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dtype: str = "bfloat16"
    """The model's dtype (``model.dtype``)."""
    num_servers: int = 1
    base_gpu_id: int = 0
    """Physical GPU index of server 0's first rank; server i uses GPUs [base_gpu_id + i *
    tp_size, ...). Tensor updates are staged on each receiving rank's own GPU
    (`staging_devices`), never on the process's current device."""
    weight_update_mode: Literal["tensor", "distributed"] = "tensor"
    """How `update_weights` (weights pushed through this engine's process, as tools do) reaches
    the servers; a run's training ranks feed the servers themselves (`begin_external_update`)."""
    group_backend: str = "nccl"
    """Backend of the distributed weight-update group (gloo only for CPU tests)."""
    group_name: str = "fipo_weight_update"

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("SGLangEngineConfig.model_path is empty")
        if self.num_servers < 1:
            raise ValueError(f"SGLangEngineConfig.num_servers must be >= 1, got {self.num_servers}")
        if self.base_gpu_id < 0:
            raise ValueError(f"SGLangEngineConfig.base_gpu_id must be >= 0, got {self.base_gpu_id}")
        if self.weight_update_mode not in ("tensor", "distributed"):
            raise ValueError(
                f"SGLangEngineConfig.weight_update_mode must be 'tensor' or 'distributed', "
                f"got {self.weight_update_mode!r}"
            )

    # The rollout section's settings, under the names the engine uses.
    tp_size = property(lambda self: self.rollout.engine_tensor_parallel_size)
    mem_fraction_static = property(lambda self: self.rollout.mem_fraction_static)
    host = property(lambda self: self.rollout.host)
    update_bucket_bytes = property(lambda self: self.rollout.weight_sync_bucket_bytes)
    deterministic_inference = property(lambda self: self.rollout.deterministic_inference)
    extra_server_args = property(lambda self: tuple(self.rollout.extra_server_args))
    startup_timeout_s = property(lambda self: self.rollout.sglang.startup_timeout_s)
    request_timeout_s = property(lambda self: self.rollout.sglang.request_timeout_s)
    max_concurrent_requests = property(lambda self: self.rollout.sglang.max_concurrent_requests)
    max_restarts = property(lambda self: self.rollout.sglang.max_restarts)


LaunchCommand = Callable[[SGLangEngineConfig, ServerSpec], list[str]]


def default_launch_command(config: SGLangEngineConfig, spec: ServerSpec) -> list[str]:
    """`python -m sglang.launch_server ...` for one server (token ids in, no tokenizer)."""
    deterministic = ["--enable-deterministic-inference"] if config.deterministic_inference else []
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", config.model_path,
        "--host", spec.host,
        "--port", str(spec.port),
        "--tp-size", str(config.tp_size),
        "--base-gpu-id", str(spec.base_gpu_id),
        "--mem-fraction-static", str(config.mem_fraction_static),
        "--dtype", config.dtype,
        "--skip-tokenizer-init",
        "--enable-memory-saver",
        *deterministic,
        *config.extra_server_args,
    ]  # fmt: skip
