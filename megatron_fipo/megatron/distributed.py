"""Process-group set-up for the Megatron actor: torch.distributed + Megatron's parallel state.

One call, :func:`init_distributed`, brings a process from "launched" (torchrun env, or a
spawned worker that already called ``init_process_group``) to "ready to build a model":
gloo on CPU (with :mod:`cpu_compat` applied) or NCCL on GPU, the TP/PP/CP/DP groups, and the
model-parallel RNG seeds. :func:`destroy` undoes it so a process can re-initialise with
another layout (tests do this to compare layouts inside one spawned world).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fipo.megatron import cpu_compat


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Parallel layout of the actor; world size = tp * pp * cp * dp."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits heads, FFN and vocab)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel stages."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage (interleaved schedule); None = 1."""
    context_parallel: int = 1
    """Context-parallel size (splits each sequence into 2*CP zigzag chunks)."""
    data_parallel: int | None = None
    """Data-parallel size; None = whatever the world size leaves."""
    sequence_parallel: bool | None = None
    """Shard norm / dropout activations along the sequence over the TP ranks; None: on with
    the TE spec and TP > 1 (Megatron's usual setting), off otherwise."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline is not None and self.virtual_pipeline < 1:
            raise ValueError(f"virtual_pipeline must be >= 1 or None, got {self.virtual_pipeline}")
        if self.virtual_pipeline not in (None, 1) and self.pipeline_parallel < 2:
            raise ValueError("virtual_pipeline > 1 needs pipeline_parallel >= 2")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ValueError("sequence_parallel needs tensor_parallel >= 2")
        if self.data_parallel is not None and self.data_parallel < 1:
            raise ValueError(f"data_parallel must be >= 1, got {self.data_parallel}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def resolve_data_parallel(self, world_size: int) -> int:
        """DP size for ``world_size`` processes; ValueError when the layout does not divide it."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel * pipeline_parallel"
                f" * context_parallel = {self.model_parallel_size}"
            )
        data_parallel = world_size // self.model_parallel_size
        if self.data_parallel is not None and self.data_parallel != data_parallel:
            raise ValueError(
                f"data_parallel={self.data_parallel} but world size {world_size} with this layout"
                f" gives {data_parallel}"
            )
        return data_parallel


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A lone process (single-rank runs, notebooks): a world of one on a local port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_local_world_env(rank: int, world_size: int, port: int) -> None:
    """The torch.distributed environment of rank ``rank`` in a one-machine world of
    ``world_size`` processes rendezvousing on loopback ``port`` (spawned test / bench ranks)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )


def init_distributed(
    parallel: ParallelConfig,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> int:
    """Initialise torch.distributed (if needed), Megatron's parallel groups and RNG seeds.

    Returns the data-parallel size. Safe to call again after :func:`destroy` with another
    layout in the same world.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = backend or default_backend()
    if backend == "gloo":
        cpu_compat.apply()
    _init_process_group(backend, timeout_minutes)
    data_parallel = parallel.resolve_data_parallel(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.virtual_pipeline if parallel.virtual_pipeline not in (None, 1) else None
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.context_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Same CPU seed on every rank: with use_cpu_initialization Megatron draws each full
    # weight from the CPU generator and slices it, so TP layouts start from equal weights.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return data_parallel


def destroy(process_group: bool = False) -> None:
    """Tear down Megatron's parallel state (and the torch process group when asked)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
