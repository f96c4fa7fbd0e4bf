"""Run megatron-core 0.16.1 on CPU + gloo: the one place Megatron's CUDA calls are redirected.

Megatron assumes a CUDA device in a handful of places that sit on our CPU test paths
(measured, not guessed):

- ``torch.cuda.current_device`` / ``synchronize`` are called by the schedules, the DDP buffers
  and checkpointing;
- the model-parallel RNG tracker reads and writes CUDA RNG states
  (``torch.cuda.get_rng_state`` / ``manual_seed`` and
  ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``);
- the pipeline schedules and the distributed optimizer allocate with ``device="cuda"`` or
  ``.cuda()`` (and RoPE under context parallelism with ``pin_memory=True``), and the optimizer accepts parameters only when ``Tensor.type()`` says
  ``torch.cuda.FloatTensor``.

:func:`apply` redirects these to CPU: a small stand-in RNG generator plays the CUDA one, and a
:class:`torch.overrides.TorchFunctionMode` maps CUDA device requests to CPU. It does nothing
when CUDA is present, is idempotent and never touches megatron-core's files.

Other CPU rules the callers follow (they are not patches): build models with
``use_cpu_initialization=True``, pass an explicit causal attention mask to the local spec, keep
sequence parallel off with the local spec (torch norms refuse it), save with the ``torch_dist``
backend from a process with a ``__main__`` guard (it starts a spawn manager), and save
distributed-optimizer state with ``distrib_optim_sharding_type='dp_reshardable'``.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: TorchFunctionMode | None = None
# Stands in for the CUDA default generator: keeping it apart from the CPU generator means
# Megatron's tracker forks (which swap "CUDA" states) leave torch's CPU RNG stream alone.
_FAKE_CUDA_GENERATOR = torch.Generator()
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def cuda_missing() -> bool:
    """True when this process has no usable CUDA device (the case :func:`apply` handles)."""
    return not torch.cuda.is_available()


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare index is what the patched torch.cuda.current_device() hands out.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` to CPU, drops ``pin_memory``; reports CPU float
    tensors as ``torch.cuda.*Tensor`` from a bare ``Tensor.type()`` (the optimizer's check)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # no pinned-memory allocator without an accelerator
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = args[:1] + tuple("cpu" if _is_cuda_device(a) else a for a in args[1:])
        return func(*args, **kwargs)


def _get_rng_state(device: object = "cuda") -> torch.Tensor:
    return _FAKE_CUDA_GENERATOR.get_state()


def _set_rng_state(new_state: torch.Tensor, device: object = "cuda") -> None:
    _FAKE_CUDA_GENERATOR.set_state(new_state)


def _megatron_get_rng_state(device=None, clone=False, graph_safe=False) -> torch.Tensor:
    return _FAKE_CUDA_GENERATOR.get_state()


def _megatron_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    _FAKE_CUDA_GENERATOR.set_state(new_state)


def _manual_seed(seed: int) -> None:
    _FAKE_CUDA_GENERATOR.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed
    torch.cuda.manual_seed_all = _manual_seed
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.random.set_rng_state = _set_rng_state


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = _megatron_get_rng_state
    megatron_random._set_cuda_rng_state = _megatron_set_rng_state


def apply() -> bool:
    """Install the CPU redirections once per process; returns True when they are active.

    A no-op (returning False) when CUDA is available.
    """
    global _APPLIED, _MODE
    if not cuda_missing():
        return False
    if _APPLIED:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    # Entered for the life of the process: Megatron allocates on "cuda" deep inside the
    # schedules and optimizer, well outside any scope a caller could wrap.
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    return True


def is_applied() -> bool:
    """Whether :func:`apply` has installed the redirections in this process."""
    return _APPLIED
