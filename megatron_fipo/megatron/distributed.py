"""Process-group set-up for the Megatron actor: torch.distributed + Megatron's parallel state.

One call, :func:`init_distributed`, brings a process from "launched" (torchrun env, or a
spawned worker that already called ``init_process_group``) to "ready to build a model":
gloo on CPU (with :mod:`cpu_compat` applied) or NCCL on GPU, the TP/PP/CP/DP groups, and the
model-parallel RNG seeds. :func:`destroy` undoes it so a process can re-initialise with
another layout (tests do this to compare layouts inside one spawned world).

Networking: rank 0 serves torch's rendezvous store (which has no authentication) on
``MASTER_ADDR`` alone, never on every interface (:func:`rendezvous_store`), and one-machine
worlds keep gloo on the loopback interface (:func:`one_machine_network_env`).
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import torch
import torch.distributed as dist

from megatron_fipo.config import ParallelismConfig
from megatron_fipo.megatron import cpu_compat

LOOPBACK = "127.0.0.1"


def data_parallel_size(parallel: ParallelismConfig, world_size: int) -> int:
    """DP size of ``world_size`` processes under ``parallel``; ValueError when the layout does
    not divide the world."""
    if world_size % parallel.model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not divisible by parallelism.tensor_model_parallel_size"
            f" * pipeline_model_parallel_size * context_parallel_size = "
            f"{parallel.model_parallel_size}"
        )
    return world_size // parallel.model_parallel_size


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group_from_env(backend: str, timeout_minutes: float = 30) -> None:
    """Join the world described by ``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE``
    (a world of one on loopback when they are unset); rank 0 serves the rendezvous store on
    ``MASTER_ADDR`` only (:func:`rendezvous_store`). No-op when already initialised."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A lone process (single-rank runs, notebooks): a world of one on a local port.
        os.environ.setdefault("MASTER_ADDR", LOOPBACK)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
        os.environ.update(one_machine_network_env())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun's agent already serves the rendezvous store; join it the usual way.
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = rendezvous_store(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, timeout
    )
    dist.init_process_group(
        backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now, for a process that will listen on it a moment later.

    It is drawn outside the kernel's ephemeral range (``ip_local_port_range``), from which every
    outgoing connection takes its local port: a port from that range (what ``bind(0)`` returns)
    can be taken by any connection before the listener binds it ("Address already in use"),
    which busy test machines do hit. Ray's worker ports (10002-19999) are avoided too.
    """
    low, high = _ephemeral_range()
    candidates = list(range(20000, low)) if low > 20000 else list(range(high + 1, 65536))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every candidate taken: fall back to the kernel's choice
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # the Linux default


def loopback_interface() -> str:
    """Name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address == LOOPBACK for address in addresses):
            return name
    raise RuntimeError(f"no network interface has the address {LOOPBACK}")


def one_machine_network_env() -> dict[str, str]:
    """Variables that keep a one-machine world's gloo sockets on loopback.

    Gloo otherwise listens on the address the host name resolves to, which may be a public
    one. A value the user exported wins. (NCCL's bootstrap interface is left to NCCL and
    ``NCCL_SOCKET_IFNAME``.)
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    return {"GLOO_SOCKET_IFNAME": loopback_interface()}


def listen_socket(address: str, port: int = 0) -> socket.socket:
    """A TCP socket listening on ``address`` only (``port`` 0: any free port)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as error:
        sock.close()
        raise OSError(
            error.errno, f"cannot serve the rendezvous on {address}:{port}: {error.strerror}"
        ) from None
    return sock


def rendezvous_store(
    address: str,
    port: int,
    rank: int,
    world_size: int,
    timeout: datetime.timedelta,
    listener: socket.socket | None = None,
) -> dist.TCPStore:
    """torch.distributed's rendezvous store, served by rank 0 on ``address`` alone.

    A plain ``TCPStore`` (``env://`` / ``tcp://`` init) listens on every interface, and it
    takes no authentication: rank 0 instead hands it a socket bound to ``address`` (loopback
    for one-machine worlds). ``listener`` is such a socket that rank 0 already holds.
    """
    if rank != 0:
        return dist.TCPStore(address, port, world_size, False, timeout)
    sock = listener or listen_socket(address, port)
    # The store takes the descriptor over (and closes it); the socket object lets go of it.
    return dist.TCPStore(
        address, port, world_size, True, timeout, master_listen_fd=sock.detach(), use_libuv=True
    )


def set_local_world_env(rank: int, world_size: int, port: int) -> None:
    """The torch.distributed environment of rank ``rank`` in a one-machine world of
    ``world_size`` processes rendezvousing on loopback ``port`` (spawned test / bench ranks)."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        **one_machine_network_env(),
    )


def init_distributed(
    parallel: ParallelismConfig,
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
    init_process_group_from_env(backend, timeout_minutes)
    data_parallel = data_parallel_size(parallel, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
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
