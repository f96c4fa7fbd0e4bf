"""SGLang server processes: one owned `python -m sglang.launch_server` tree and its HTTP endpoint.

Also the wire formats (sampling parameters, `/generate` responses, serialized tensor buckets) and
the driver side of SGLang's weight-update process group. Used by `sglang_engine.py`; the tests'
stand-in server uses `new_custom_process_group` to join the same group the way SGLang does.

The launcher starts child processes (one scheduler per TP rank, a detokenizer) that hold the GPU
memory. Each server runs in its own session, so `kill()` can end the whole process group and wait
until every process of it is gone before a replacement starts on the same GPUs.
"""

from __future__ import annotations

import base64
import http.client
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions ForkingPickler uses)

from megatron_fipo.rollout.engine import GenerationRequest, GenerationSample

Liveness = Literal["up", "starting", "unreachable"]


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Where one server runs; handed to the launch command."""

    index: int
    host: str
    port: int
    base_gpu_id: int
    """First GPU of the server; its TP rank r uses GPU base_gpu_id + r."""
    launch_count: int
    """0 for the first start, then 1, 2, ... for restarts."""
    tp_size: int = 1
    """TP ranks (GPUs) of the server."""


class ServerDied(RuntimeError):
    """The server process exited or its connection failed mid-request."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a server to listen on soon (outside the ephemeral range: see
    :func:`megatron_fipo.megatron.distributed.free_port`)."""
    from megatron_fipo.megatron.distributed import free_port as listen_port

    return listen_port(host)


class ServerClient:
    """The HTTP side of one server: what any process that knows its :class:`ServerSpec` can
    call (the engine that owns it, or a training rank posting weight buckets to it)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.url = f"http://{spec.host}:{spec.port}"

    def request(self, method: str, path: str, payload: Any, timeout_s: float) -> tuple[int, Any]:
        """One HTTP call; returns (status, parsed JSON or text). Raises ServerDied on I/O failure."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                return response.status, _parse_body(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _parse_body(error.read())
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            raise ServerDied(
                f"SGLang server {self.spec.index} at {self.url}{path}: {error}"
            ) from error

    def post_ok(self, path: str, payload: Any, timeout_s: float) -> Any:
        """POST and require success (HTTP 200 and, where present, `success: true`)."""
        status, body = self.request("POST", path, payload, timeout_s)
        failed = isinstance(body, dict) and body.get("success") is False
        if status != 200 or failed:
            raise RuntimeError(f"SGLang server {self.spec.index} {path} failed ({status}): {body}")
        return body


class SGLangServer(ServerClient):
    """One owned server process tree and its HTTP endpoint."""

    def __init__(
        self, spec: ServerSpec, command: list[str], env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(spec)
        # A session of its own: the launcher's pid is then the process group of its whole tree.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._log: list[str] = []
        threading.Thread(target=self._drain_log, daemon=True).start()

    def _drain_log(self) -> None:
        # Keep the tail of the server's output for error messages; an undrained pipe would block it.
        for line in self.process.stdout:
            self._log = (self._log + [line.decode(errors="replace").rstrip()])[-40:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        return "\n".join(self._log)

    def liveness(self) -> Liveness:
        """`GET /health`: 200 is up, 503 is still starting (or shutting down), no answer is
        unreachable. The engine launches servers with health-endpoint generation off, so this
        runs no generation (safe while memory is released)."""
        try:
            status, _ = self.request("GET", "/health", None, timeout_s=10.0)
        except ServerDied:
            return "unreachable"
        return "up" if status == 200 else "starting" if status == 503 else "unreachable"

    def generates(self, timeout_s: float = 60.0) -> bool:
        """`GET /health_generate`: a one-token generation. Only while the server holds its memory."""
        try:
            return self.request("GET", "/health_generate", None, timeout_s)[0] == 200
        except ServerDied:
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        """Wait until `/health` answers 200 (503 means the server is still starting)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerDied(
                    f"SGLang server {self.spec.index} exited with code {self.process.returncode} "
                    f"during start-up; its last output:\n{self.log_tail()}"
                )
            if self.liveness() == "up":
                return
            time.sleep(0.2)
        raise TimeoutError(f"SGLang server {self.spec.index} not healthy after {timeout_s} s")

    def kill(self, timeout_s: float = 60.0) -> None:
        """SIGKILL the whole process group and wait until none of its processes is left.

        Killing only the launcher would leave its scheduler and detokenizer children holding GPU
        memory while a replacement starts on the same GPUs.
        """
        group = self.process.pid  # the session leader's pid is the group id
        members = _group_members(group)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass  # every member already gone
        self.process.wait()
        deadline = time.monotonic() + timeout_s
        while left := [p for p in members + _group_members(group) if _running(p)]:
            if time.monotonic() > deadline:
                pids = sorted({p.pid for p in left})
                raise RuntimeError(
                    f"SGLang server {self.spec.index}: processes {pids} of its tree survived "
                    f"SIGKILL for {timeout_s} s"
                )
            time.sleep(0.05)


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie holds no memory; its reaper may be another process)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _parse_body(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def new_custom_process_group(
    host: str, port: int, world_size: int, rank: int, group_name: str, backend: str
) -> dist.ProcessGroup:
    """A process group outside the default one, built the way SGLang builds its update group.

    Both sides rendezvous on tcp://host:port and wrap the store in PrefixStore(group_name), so the
    driver (rank 0) and the server ranks meet on the same keys.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(minutes=10)
    store, rank, world_size = next(
        rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout,
    )  # fmt: skip
    # Ranks of this group are its own global ranks (broadcast's src is looked up here).
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def join_update_group(
    servers: list[SGLangServer],
    *,
    host: str,
    tp_size: int,
    group_name: str,
    backend: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """The weight-update group of the driver (rank 0) and every server rank (server i's TP rank
    r is rank 1 + i * tp_size + r); the servers join through `/init_weights_update_group`."""
    port = free_port(host)
    world_size = 1 + len(servers) * tp_size
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [
            pool.submit(
                server.post_ok,
                "/init_weights_update_group",
                {
                    "master_address": host,
                    "master_port": port,
                    "rank_offset": 1 + index * tp_size,
                    "world_size": world_size,
                    "group_name": group_name,
                    "backend": backend,
                },
                timeout_s,
            )
            for index, server in enumerate(servers)
        ]
        group = new_custom_process_group(host, port, world_size, 0, group_name, backend)
        for future in futures:
            future.result()
    return group


def leave_update_group(
    servers: list[SGLangServer], group: dist.ProcessGroup, group_name: str
) -> None:
    """Destroy the group on the driver and on every server still running."""
    for server in servers:
        if server.alive():
            server.request(
                "POST", "/destroy_weights_update_group", {"group_name": group_name}, 60.0
            )
    dist.destroy_process_group(group)


def staging_devices(
    base_gpu_id: int, tp_size: int, cuda_available: bool
) -> list[torch.device | None]:
    """Where to stage a bucket for each TP rank of a server whose first GPU is `base_gpu_id`.

    Rank r opens the CUDA IPC handle of its payload on GPU base_gpu_id + r, so its copy is staged
    there (physical indices: Ray leaves CUDA_VISIBLE_DEVICES unset in the engine actor, where the
    current device is GPU 0). Without CUDA (the CPU tests) tensors stay on the host (None).
    """
    if not cuda_available:
        return [None] * tp_size
    return [torch.device("cuda", base_gpu_id + rank) for rank in range(tp_size)]


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """Base64 of a ForkingPickler dump of [(name, tensor)], the format SGLang deserializes."""
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode()


def require_sglang(version: str) -> None:
    """Raise unless this interpreter has sglang `version` (the protocol the client speaks)."""
    try:
        installed = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"rollout.engine=sglang needs sglang=={version} in this interpreter; install the GPU "
            f"set (README, GPU install: pip install -c requirements/gpu-constraints.txt ...)"
        ) from None
    if installed != version:
        raise RuntimeError(
            f"sglang {installed} is installed, but this engine speaks the HTTP protocol of sglang "
            f"{version}; install the pinned set in requirements/gpu-constraints.txt"
        )


def generate_payload(request: GenerationRequest) -> dict[str, Any]:
    """The `/generate` body of one request (token ids in, log-probs out)."""
    return {
        "input_ids": list(request.prompt_token_ids),
        "sampling_params": sampling_payload(request),
        "return_logprob": True,
    }


def sampling_payload(request: GenerationRequest) -> dict[str, Any]:
    """Our SamplingParams as SGLang's `sampling_params` JSON object."""
    params = request.sampling
    payload: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_new_tokens": params.max_new_tokens,
    }
    if params.stop_token_ids:
        payload["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        payload["sampling_seed"] = params.seed
    return payload


def parse_generate_response(
    request: GenerationRequest, body: Any, version: int
) -> GenerationSample:
    """Turn one `/generate` response ({output_ids, meta_info}) into a GenerationSample."""
    if not isinstance(body, dict) or "meta_info" not in body:
        raise RuntimeError(f"unexpected /generate response for {request.request_id!r}: {body!r}")
    meta = body["meta_info"]
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise RuntimeError(
            f"/generate response for {request.request_id!r} has no output_token_logprobs"
        )
    token_ids = [int(entry[1]) for entry in entries]
    if list(body.get("output_ids", token_ids)) != token_ids:
        raise RuntimeError(
            f"/generate {request.request_id!r}: output_ids disagree with logprob tokens"
        )
    if version >= 0 and meta.get("weight_version") != str(version):
        # A server that missed an update would silently produce off-policy samples.
        raise RuntimeError(
            f"/generate {request.request_id!r}: server has weights version "
            f"{meta.get('weight_version')!r}, the engine expects {str(version)!r}"
        )
    reason = (meta.get("finish_reason") or {}).get("type", "abort")
    return GenerationSample(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        response_token_ids=token_ids,
        log_probs=[float(entry[0]) for entry in entries],
        finish_reason=reason if reason in ("stop", "length") else "abort",
        weights_version=version,
    )


def call_each(
    servers: list[SGLangServer], path: str, payload: Any, timeout_s: float
) -> list[BaseException | None]:
    """POST the same payload to every server at once; each server's error (None: success)."""
    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [pool.submit(s.post_ok, path, payload, timeout_s) for s in servers]
        return [future.exception() for future in futures]


def raise_first(errors: list[BaseException | None]) -> None:
    for error in errors:
        if error is not None:
            raise error


def refused(future: Future) -> bool:
    """The server answered the request with a failure (as opposed to dying)."""
    error = future.exception()
    return error is not None and not isinstance(error, ServerDied)


def tensor_bucket_payload(
    serialized: list[str], *, last: bool, version: int, flush_cache: bool = True
) -> dict[str, Any]:
    """`/update_weights_from_tensor` body: one serialized [(name, tensor)] per TP rank of the
    server; the last bucket of an update records the weights version (and flushes the cache)."""
    payload: dict[str, Any] = {
        "serialized_named_tensors": serialized,
        "flush_cache": last and flush_cache,
    }
    if last:
        payload["weight_version"] = str(version)
    return payload


class BroadcastRefused(RuntimeError):
    """A server answered a distributed bucket with a failure instead of joining its broadcast:
    the group's collectives are out of step and the group must be rebuilt."""


def broadcast_bucket(
    servers: list[ServerClient],
    group: dist.ProcessGroup,
    named: list[tuple[str, torch.Tensor]],
    *,
    group_name: str,
    last: bool,
    version: int,
    timeout_s: float,
) -> None:
    """One bucket over an update group (this process is its rank 0): the names, dtypes and shapes
    to every server's `/update_weights_from_distributed` (they block until they have received
    every tensor) while the tensors are broadcast in that order."""
    tensors = [t.detach().contiguous() for _, t in named]
    payload: dict[str, Any] = {
        "names": [name for name, _ in named],
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
        "shapes": [list(t.shape) for t in tensors],
        "group_name": group_name,
        "flush_cache": last,
    }
    if last:
        payload["weight_version"] = str(version)
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [
            pool.submit(s.post_ok, "/update_weights_from_distributed", payload, timeout_s)
            for s in servers
        ]
        handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        # A server that refuses the bucket never joins the broadcast, which would then wait for
        # the group's timeout: fail as soon as such an answer arrives.
        while not all(handle.is_completed() for handle in handles):
            failed = [f for f in futures if f.done() and refused(f)]
            if failed:
                raise BroadcastRefused(
                    f"a server refused a weight bucket while it was being broadcast: "
                    f"{failed[0].exception()}"
                )
            time.sleep(0.005)
        for handle in handles:
            handle.wait()
        for future in futures:
            future.result()
