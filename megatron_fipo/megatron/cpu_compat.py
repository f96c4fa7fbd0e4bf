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

Known harmless third-party warnings (:data:`KNOWN_WARNINGS`: Megatron reporting that
TransformerEngine / Apex are absent, and deprecations inside Megatron and torch that we cannot
act on) are filtered by :func:`filter_known_warnings`, each by its exact message, category and
module; the Ray actors, the driver and the test harness call it. Instead, :func:`apply` prints
one line per process naming the CPU fallbacks in use (and filters them too).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class KnownWarning:
    """One harmless third-party warning: its message (exact start), category, and the modules
    it is reported from (a regex; a warning raised from inside a torch function under
    :class:`CudaToCpuMode` is reported from this module)."""

    message: str
    category: type[Warning]
    module: str


_THIS = re.escape(__name__)
KNOWN_WARNINGS = (
    # Megatron-core 0.16.1 without TransformerEngine / Apex: it falls back to torch code.
    KnownWarning(
        "Transformer Engine and Apex are not installed. Falling back to local implementations"
        " of multi_tensor_applier",
        UserWarning,
        r"megatron\.core\.(optimizer\.optimizer|optimizer\.clip_grads|distributed\.fsdp\.)",
    ),
    KnownWarning(
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
        UserWarning,
        r"megatron\.core\.optimizer$",
    ),
    KnownWarning(
        "Apex is not installed. Falling back to Torch Norm",
        UserWarning,
        r"megatron\.core\.models\.(backends|gpt\.gpt_layer_specs)$",
    ),
    # Megatron's own default cuda_graph_scope="full" warns about itself (no CUDA graphs here).
    KnownWarning(
        "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
        UserWarning,
        r"megatron\.core\.transformer\.transformer_config$",
    ),
    # The distributed optimizer's zero_grad reads .grad of its (non-leaf) shard views.
    KnownWarning(
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.",
        UserWarning,
        rf"(megatron\.core\.optimizer\.optimizer|{_THIS})$",
    ),
    # torch deprecations of the calls Megatron 0.16.1 makes.
    KnownWarning(
        "`torch.distributed.reduce_scatter_tensor` is deprecated.",
        FutureWarning,
        r"torch\.distributed\.c10d_logger$",
    ),
    KnownWarning(
        "`torch.distributed.all_gather_into_tensor` is deprecated.",
        FutureWarning,
        r"torch\.distributed\.c10d_logger$",
    ),
    KnownWarning(
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        FutureWarning,
        rf"(megatron\.core\.dist_checkpointing\.|torch\.distributed\.|{_THIS}$)",
    ),
    KnownWarning(
        "`load_state_dict` is deprecated and will be removed in future versions.",
        FutureWarning,
        r"megatron\.core\.dist_checkpointing\.strategies\.torch$",
    ),
    # Deprecations shown only where DeprecationWarning is on (pytest): raised while importing.
    KnownWarning(
        "`torch.jit.script_method` is deprecated.", DeprecationWarning, r"torch\.jit\._script$"
    ),
    KnownWarning(
        "The following imports from `dynamic_context.py` will be removed in this file",
        DeprecationWarning,
        r"megatron\.core\.inference\.contexts$",
    ),
)


def filter_known_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS` in this process (and only those); idempotent."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings(
            "ignore", message=re.escape(known.message), category=known.category, module=known.module
        )


def fallbacks_line() -> str:
    """The one line :func:`apply` prints: which CPU fallbacks this process uses (Megatron
    falls back to torch code when it cannot import ``apex`` / ``transformer_engine``)."""
    used = ["gloo", "CUDA tensors and RNG on CPU"]
    if importlib.util.find_spec("apex") is None:
        used.append("torch norms (no Apex)")
    if importlib.util.find_spec("transformer_engine") is None:
        used.append("torch optimizers and multi-tensor kernels (no TransformerEngine / Apex)")
    return "megatron_fipo: no CUDA; CPU fallbacks in use: " + ", ".join(used)


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
    filter_known_warnings()
    print(fallbacks_line(), file=sys.stderr, flush=True)
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
