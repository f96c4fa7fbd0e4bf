"""SGLang rollout engine: owns `python -m sglang.launch_server` processes and talks HTTP to them.

Targets the native SGLang HTTP API as of sglang 0.5.23 (`/generate`, `/health`, `/flush_cache`,
`/update_weights_from_tensor`, `/init_weights_update_group`, `/update_weights_from_distributed`,
`/destroy_weights_update_group`, `/release_memory_occupation`, `/resume_memory_occupation`).
sglang itself is only needed by the server processes, so this module imports without it.

Weights reach the servers in one of two ways:
- "tensor" (colocated with training): each bucket of HF-named tensors is pickled with torch's
  ForkingPickler (CUDA tensors travel as IPC handles, not bytes), base64-encoded once per engine TP
  rank and posted to `/update_weights_from_tensor`.
- "distributed": the driver joins a process group with every server rank (driver is rank 0) and,
  per bucket, posts the names / dtypes / shapes to `/update_weights_from_distributed` while it
  broadcasts the tensors in the same order.

Log-probs are SGLang's `output_token_logprobs`: log_softmax of the temperature-scaled logits before
top-p / top-k truncation, the same convention as the HF engine. SGLang also stops at the model's
EOS token; pass EOS in `stop_token_ids` so both engines agree.

A server that dies (the process exits or its socket fails) is restarted, resynced to the current
weights version, and the requests it had not finished are sent again.
"""

from __future__ import annotations

import base64
import io
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions ForkingPickler uses)

from megatron_fipo.rollout.engine import (
    EngineHealth,
    GenerationRequest,
    GenerationSample,
    RolloutEngine,
    iter_buckets,
    validate_requests,
)
from megatron_fipo.rollout.sglang_server import (
    ServerDied,
    ServerSpec,
    SGLangServer,
    free_port,
    new_custom_process_group,
    responds_healthy,
)

SGLANG_VERSION_RANGE = ">=0.5.23,<0.6"


@dataclass(kw_only=True, slots=True)
class SGLangEngineConfig:
    """Settings of the SGLang servers this engine starts."""

    model_path: str
    """HF model directory the servers load at start (architecture, tokenizer-free)."""
    num_servers: int = 1
    tp_size: int = 1
    """GPUs per server; server i uses GPUs [base_gpu_id + i * tp_size, ...)."""
    base_gpu_id: int = 0
    mem_fraction_static: float = 0.8
    dtype: str = "bfloat16"
    host: str = "127.0.0.1"
    weight_update_mode: Literal["tensor", "distributed"] = "tensor"
    update_bucket_bytes: int = 512 * 1024**2
    group_backend: str = "nccl"
    """Backend of the distributed weight-update group (gloo only for CPU tests)."""
    group_name: str = "fipo_weight_update"
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    max_concurrent_requests: int = 256
    max_restarts: int = 3
    """Restarts allowed per server over the engine's life."""
    extra_server_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("SGLangEngineConfig.model_path is empty")
        for name in ("num_servers", "tp_size", "max_concurrent_requests", "update_bucket_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"SGLangEngineConfig.{name} must be >= 1")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("SGLangEngineConfig.mem_fraction_static must be in (0, 1)")
        if self.weight_update_mode not in ("tensor", "distributed"):
            raise ValueError(
                f"SGLangEngineConfig.weight_update_mode must be 'tensor' or 'distributed', "
                f"got {self.weight_update_mode!r}"
            )


LaunchCommand = Callable[[SGLangEngineConfig, ServerSpec], list[str]]


def default_launch_command(config: SGLangEngineConfig, spec: ServerSpec) -> list[str]:
    """`python -m sglang.launch_server ...` for one server (token ids in, no tokenizer)."""
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
        *config.extra_server_args,
    ]  # fmt: skip


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """Base64 of a ForkingPickler dump of [(name, tensor)], the format SGLang deserializes."""
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode()


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


class SGLangRolloutEngine(RolloutEngine):
    """Generation and weight updates over `num_servers` SGLang servers it starts and restarts.

    `launch_command(config, spec)` builds each server's command line (injectable for tests).
    `weights_source()` returns the current weights as HF-named tensors for resyncing a restarted
    server; without one, `update_weights` keeps a host (CPU) copy of the last weights for that.
    """

    def __init__(
        self,
        config: SGLangEngineConfig,
        *,
        launch_command: LaunchCommand = default_launch_command,
        weights_source: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    ) -> None:
        self.config = config
        self._launch = launch_command
        self._weights_source = weights_source
        self._host_weights: list[tuple[str, torch.Tensor]] | None = None
        self._version = -1
        self._paused = False
        self._servers: list[SGLangServer] = []
        self._restart_counts = [0] * config.num_servers
        self._lock = threading.RLock()
        self._group: dist.ProcessGroup | None = None
        self._update_incomplete = False

    # ----- lifecycle -----

    def start(self) -> SGLangRolloutEngine:
        """Start every server, wait until all are healthy, and set up the update group."""
        if self._servers:
            return self
        self._servers = [self._spawn(index, 0) for index in range(self.config.num_servers)]
        for server in self._servers:
            server.wait_healthy(self.config.startup_timeout_s)
        if self.config.weight_update_mode == "distributed":
            self._init_update_group()
        return self

    def _spawn(self, index: int, launch_count: int) -> SGLangServer:
        spec = ServerSpec(
            index=index,
            host=self.config.host,
            port=free_port(self.config.host),
            base_gpu_id=self.config.base_gpu_id + index * self.config.tp_size,
            launch_count=launch_count,
        )
        return SGLangServer(spec, self._launch(self.config, spec))

    def shutdown(self) -> None:
        for server in self._servers:
            server.kill()
        self._servers = []
        self._group = None

    def __enter__(self) -> SGLangRolloutEngine:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def servers(self) -> list[SGLangServer]:
        return list(self._servers)

    @property
    def weights_version(self) -> int:
        return self._version

    # ----- generation -----

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationSample]:
        """Send each request to server (i mod num_servers) concurrently; results in order."""
        validate_requests(requests)
        if self._paused:
            raise RuntimeError(
                "SGLangRolloutEngine.generate called while paused; call resume() first"
            )
        if self._update_incomplete:
            raise RuntimeError(
                "the last update_weights failed midway; call update_weights again before generating"
            )
        self.start()
        if not requests:
            return []
        workers = min(self.config.max_concurrent_requests, len(requests))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._generate_one, range(len(requests)), requests))

    def _generate_one(self, position: int, request: GenerationRequest) -> GenerationSample:
        index = position % self.config.num_servers
        payload = {
            "input_ids": list(request.prompt_token_ids),
            "sampling_params": sampling_payload(request),
            "return_logprob": True,
        }
        # Each failed attempt either restarts the server (bounded by max_restarts) or finds it
        # healthy again; the attempt cap stops a server that keeps failing while looking healthy.
        for _ in range(self.config.max_restarts + 3):
            server = self._servers[index]
            try:
                status, body = server.request(
                    "POST", "/generate", payload, self.config.request_timeout_s
                )
            except ServerDied:
                self._recover(index, server)
                continue
            if status != 200:
                raise RuntimeError(f"/generate {request.request_id!r} failed ({status}): {body}")
            return parse_generate_response(request, body, self._version)
        raise ServerDied(f"request {request.request_id!r} failed on server {index} too many times")

    # ----- failure handling -----

    def _recover(self, index: int, failed: SGLangServer) -> None:
        """Restart server `index` if `failed` is still the current one and is dead or unhealthy."""
        with self._lock:
            if self._servers[index] is not failed:
                return  # another thread already replaced it
            if failed.alive() and responds_healthy(failed):
                return  # a transient socket error; retry on the same server
            if self._restart_counts[index] >= self.config.max_restarts:
                raise ServerDied(
                    f"SGLang server {index} died again after {self.config.max_restarts} restarts; "
                    f"its last output:\n{failed.log_tail()}"
                )
            self._restart_counts[index] += 1
            failed.kill()
            server = self._spawn(index, self._restart_counts[index])
            server.wait_healthy(self.config.startup_timeout_s)
            self._servers[index] = server
            self._resync(index)

    def _resync(self, index: int) -> None:
        """Bring a restarted server to the current weights version (and memory state)."""
        if self.config.weight_update_mode == "distributed":
            self._init_update_group()  # the old group lost a member; every rank rejoins
        if self._version >= 0:
            weights = self._current_weights()
            if self.config.weight_update_mode == "tensor":
                self._push_tensor([self._servers[index]], weights, self._version)
            else:
                self._push_distributed(weights, self._version)
        if self._paused:
            self._servers[index].post_ok(
                "/release_memory_occupation", {}, self.config.request_timeout_s
            )

    def _current_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        if self._weights_source is not None:
            return self._weights_source()
        if self._host_weights is None:
            raise RuntimeError("cannot resync a restarted SGLang server: no weights were kept")
        return self._host_weights

    # ----- weights -----

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Push HF-named full tensors to every server in buckets; the last bucket sets `version`.

        Dead servers are restarted first. If a server fails midway the engine refuses to
        generate (servers may hold a mix of two versions) until an update succeeds.
        """
        self.start()
        with self._lock:
            for index, server in enumerate(self._servers):
                if not server.alive():
                    self._recover(index, server)
            self._update_incomplete = True
            stream: Iterable[tuple[str, torch.Tensor]] = named_tensors
            if self._weights_source is None:
                kept: list[tuple[str, torch.Tensor]] = []
                stream = _keep_host_copy(named_tensors, kept)
            if self.config.weight_update_mode == "tensor":
                self._push_tensor(self._servers, stream, version)
            else:
                self._push_distributed(stream, version)
            if self._weights_source is None:
                self._host_weights = kept
            self._version = int(version)
            self._update_incomplete = False

    def _push_tensor(
        self, servers: list[SGLangServer], named: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        # SGLang unpickles only CUDA tensors (IPC handles): host tensors (e.g. received through
        # Ray) are staged on this process's GPU, one bucket at a time. Without CUDA (the CPU
        # tests) they stay on the host.
        staging = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        )
        for bucket, is_last in _mark_last(iter_buckets(named, self.config.update_bucket_bytes)):
            bucket = [(name, _staged(tensor, staging)) for name, tensor in bucket]
            payloads = []
            for _ in servers:
                # One pickle per receiving TP rank: each unpickle consumes the shared-memory / IPC
                # reference its pickle took, so a pickle read twice would find its storage gone.
                payload: dict[str, Any] = {
                    "serialized_named_tensors": [
                        serialize_named_tensors(bucket) for _ in range(self.config.tp_size)
                    ],
                    "flush_cache": is_last,
                }
                if is_last:
                    payload["weight_version"] = str(version)
                payloads.append(payload)
            path = "/update_weights_from_tensor"
            timeout = self.config.request_timeout_s
            with ThreadPoolExecutor(max_workers=len(servers)) as pool:
                futures = [
                    pool.submit(s.post_ok, path, p, timeout) for s, p in zip(servers, payloads)
                ]
                for future in futures:
                    future.result()

    def _push_distributed(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        assert self._group is not None, "distributed update group not initialised"
        for bucket, is_last in _mark_last(iter_buckets(named, self.config.update_bucket_bytes)):
            tensors = [t.detach().contiguous() for _, t in bucket]
            payload: dict[str, Any] = {
                "names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": self.config.group_name,
                "flush_cache": is_last,
            }
            if is_last:
                payload["weight_version"] = str(version)
            # The servers block in the HTTP call until they have received every broadcast.
            with ThreadPoolExecutor(max_workers=len(self._servers)) as pool:
                futures = [
                    pool.submit(
                        s.post_ok,
                        "/update_weights_from_distributed",
                        payload,
                        self.config.request_timeout_s,
                    )
                    for s in self._servers
                ]
                handles = [
                    dist.broadcast(t, src=0, group=self._group, async_op=True) for t in tensors
                ]
                for handle in handles:
                    handle.wait()
                for future in futures:
                    future.result()

    def _init_update_group(self) -> None:
        """(Re)build the group of the driver (rank 0) and every server rank."""
        config = self.config
        if self._group is not None:
            for server in self._servers:
                if server.alive():
                    server.request(
                        "POST",
                        "/destroy_weights_update_group",
                        {"group_name": config.group_name},
                        60.0,
                    )
            dist.destroy_process_group(self._group)
            self._group = None
        port = free_port(config.host)
        world_size = 1 + config.num_servers * config.tp_size
        with ThreadPoolExecutor(max_workers=len(self._servers)) as pool:
            futures = [
                pool.submit(
                    server.post_ok,
                    "/init_weights_update_group",
                    {
                        "master_address": config.host,
                        "master_port": port,
                        "rank_offset": 1 + index * config.tp_size,
                        "world_size": world_size,
                        "group_name": config.group_name,
                        "backend": config.group_backend,
                    },
                    config.startup_timeout_s,
                )
                for index, server in enumerate(self._servers)
            ]
            self._group = new_custom_process_group(
                config.host, port, world_size, 0, config.group_name, config.group_backend
            )
            for future in futures:
                future.result()

    # ----- memory and health -----

    def pause(self, tags: list[str] | None = None) -> None:
        """Flush the KV cache, then release GPU memory (weights and KV cache, or `tags`)."""
        self.start()
        timeout = self.config.request_timeout_s
        _on_each(self._servers, "/flush_cache", {}, timeout)
        _on_each(
            self._servers, "/release_memory_occupation", {"tags": tags} if tags else {}, timeout
        )
        self._paused = True

    def resume(self, tags: list[str] | None = None) -> None:
        """Retake the released memory. Weight contents are not guaranteed after a release
        (unless the servers run with --enable-weights-cpu-backup): call `update_weights` next."""
        timeout = self.config.request_timeout_s
        _on_each(
            self._servers, "/resume_memory_occupation", {"tags": tags} if tags else {}, timeout
        )
        self._paused = False

    def health(self) -> EngineHealth:
        problems = [
            f"server {server.spec.index} {'unhealthy' if server.alive() else 'exited'}"
            for server in self._servers
            if not (server.alive() and responds_healthy(server))
        ]
        if not self._servers:
            problems.append("not started")
        return EngineHealth(
            healthy=not problems,
            paused=self._paused,
            weights_version=self._version,
            detail="; ".join(problems),
        )


def _on_each(servers: list[SGLangServer], path: str, payload: Any, timeout_s: float) -> None:
    """POST the same payload to every server at once; raise the first failure."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        for future in [pool.submit(s.post_ok, path, payload, timeout_s) for s in servers]:
            future.result()


def _mark_last(items: Iterable[Any]) -> Iterable[tuple[Any, bool]]:
    """Yield (item, is_last) without materialising the stream (one item of look-ahead)."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def _staged(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    tensor = tensor.detach()
    if device is not None and tensor.device.type == "cpu":
        tensor = tensor.to(device)
    return tensor.contiguous()


def _keep_host_copy(
    named_tensors: Iterable[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]]
) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in named_tensors:
        kept.append((name, tensor.detach().to("cpu", copy=True)))
        yield name, tensor
