"""SGLang rollout engine: owns `python -m sglang.launch_server` processes and talks HTTP to them.

Targets the native HTTP API of sglang 0.5.23 (the pinned release; `tests/test_sglang_contract.py`
checks every route, request field and launch flag used here against its source). sglang itself
is only needed by the server processes, so this module imports without it.

Protocol, as 0.5.23 enforces it:
- Weight updates run inside a session: `POST /begin_weight_update`, the buckets, then
  `POST /end_weight_update` (also after a failed bucket, so no server is left in a session).
  Outside a session the server answers 400; on the distributed path it does so without joining
  the broadcast, so the driver checks the HTTP answers while it broadcasts.
- Generation is paused (`/pause_generation`, mode "abort": requests still running, e.g. left by a
  client timeout, are aborted) before an update or a memory release, and continued after.
- `/health` answers 503 while a server starts. By default it also runs a one-token generation,
  which must not happen while memory is released: servers are launched with
  `SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false`, and the generation check
  (`/health_generate`) runs only while a server holds its memory.
- `sampling_seed` is honoured only by servers launched with `--enable-deterministic-inference`
  (`deterministic_inference=True`); otherwise SGLang ignores it and seeded requests are not
  reproducible (the engine warns once).

Weights reach the servers in one of two ways:
- "tensor" (colocated with training): each bucket of HF-named tensors is staged on the GPU of each
  receiving TP rank (`staging_devices`), pickled with torch's ForkingPickler (CUDA tensors travel
  as IPC handles, not bytes), base64-encoded once per TP rank and posted to
  `/update_weights_from_tensor`.
- "distributed": the driver joins a process group with every server rank (driver is rank 0) and,
  per bucket, posts the names / dtypes / shapes to `/update_weights_from_distributed` while it
  broadcasts the tensors in the same order.

Log-probs are SGLang's `output_token_logprobs`: log_softmax of the temperature-scaled logits before
top-p / top-k truncation, the same convention as the HF engine. SGLang also stops at the model's
EOS token; pass EOS in `stop_token_ids` so both engines agree.

A server that dies (the process exits or its socket fails) is killed with its whole process tree,
restarted, resynced to the current weights version, and the requests it had not finished are sent
again.

The engine's settings (`SGLangEngineConfig`), the server command line (`default_launch_command`),
`SERVER_ENV` and `SGLANG_VERSION` live in `sglang_launch.py`; they are re-exported here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from megatron_fipo.rollout.engine import (
    EngineHealth,
    GenerationRequest,
    GenerationSample,
    RolloutEngine,
    WeightsNeeded,
    iter_buckets,
    validate_requests,
)
from megatron_fipo.rollout.sglang_launch import (
    SERVER_ENV,
    SGLANG_VERSION,
    LaunchCommand,
    SGLangEngineConfig,
    default_launch_command,
)
from megatron_fipo.rollout.sglang_server import (
    BroadcastRefused,
    ServerDied,
    ServerSpec,
    SGLangServer,
    broadcast_bucket,
    call_each,
    free_port,
    generate_payload,
    join_update_group,
    leave_update_group,
    parse_generate_response,
    raise_first,
    require_sglang,
    serialize_named_tensors,
    staging_devices,
    tensor_bucket_payload,
)

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
"""What `/release_memory_occupation` releases when given no tags (SGLang's GPU_MEMORY_ALL_TYPES)."""
PAUSE_MODE = "abort"
"""`/pause_generation` mode: abort running requests (their clients get finish reason abort)."""


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
        self._released: set[str] = set()
        self._servers: list[SGLangServer] = []
        self._restart_counts = [0] * config.num_servers
        self._lock = threading.RLock()
        self._group: dist.ProcessGroup | None = None
        self._group_broken = False
        self._update_incomplete = False
        self._warned_seeds = False
        self._external = False
        """Weights arrive from other processes (`begin_external_update`): a restarted server
        cannot be resynced here and waits for the next update (`WeightsNeeded`)."""
        self._session: list[SGLangServer] = []

    # ----- lifecycle -----

    def start(self) -> SGLangRolloutEngine:
        """Start every server, wait until all are healthy, and set up the update group."""
        if self._servers:
            return self
        if self._launch is default_launch_command:
            require_sglang(SGLANG_VERSION)  # the servers run under this interpreter
        self._servers = [self._spawn(index, 0) for index in range(self.config.num_servers)]
        for server in self._servers:
            server.wait_healthy(self.config.startup_timeout_s)
        if self.config.weight_update_mode == "distributed":
            self._init_update_group(self._servers)
        return self

    def _spawn(self, index: int, launch_count: int) -> SGLangServer:
        spec = ServerSpec(
            index=index,
            host=self.config.host,
            port=free_port(self.config.host),
            base_gpu_id=self.config.base_gpu_id + index * self.config.tp_size,
            launch_count=launch_count,
            tp_size=self.config.tp_size,
        )
        return SGLangServer(spec, self._launch(self.config, spec), env=SERVER_ENV)

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
        if self._released:
            raise RuntimeError(
                "SGLangRolloutEngine.generate called while paused; call resume() first"
            )
        if self._update_incomplete:
            if self._external:
                raise WeightsNeeded("a server holds no current weights: sync them, then generate")
            raise RuntimeError(
                "the last update_weights failed midway; call update_weights again before generating"
            )
        self.start()
        if not requests:
            return []
        if not self.config.deterministic_inference and not self._warned_seeds:
            if any(request.sampling.seed is not None for request in requests):
                self._warned_seeds = True
                warnings.warn(
                    "SGLang ignores per-request seeds unless its servers run with "
                    "--enable-deterministic-inference (rollout.deterministic_inference=true): "
                    "these samples are not reproducible",
                    RuntimeWarning,
                    stacklevel=2,
                )
        workers = min(self.config.max_concurrent_requests, len(requests))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._generate_one, range(len(requests)), requests))

    def _generate_one(self, position: int, request: GenerationRequest) -> GenerationSample:
        index = position % self.config.num_servers
        payload = generate_payload(request)
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
            if failed.alive() and failed.liveness() == "up":
                return  # a transient socket error; retry on the same server
            if self._restart_counts[index] >= self.config.max_restarts:
                raise ServerDied(
                    f"SGLang server {index} died again after {self.config.max_restarts} restarts; "
                    f"its last output:\n{failed.log_tail()}"
                )
            self._restart_counts[index] += 1
            failed.kill()  # the whole tree, so the replacement finds its GPUs free
            server = self._spawn(index, self._restart_counts[index])
            try:
                server.wait_healthy(self.config.startup_timeout_s)
                self._resync(index, server)
            except BaseException:
                server.kill()
                raise
            self._servers[index] = server  # only now do other threads send it requests
            if self._external and self._version >= 0:
                raise WeightsNeeded(
                    f"SGLang server {index} was restarted and holds no current weights: sync "
                    "them, then generate again"
                )

    def _resync(self, index: int, server: SGLangServer) -> None:
        """Bring `server`, replacing server `index`, to the current weights version and memory
        state."""
        servers = [server if i == index else s for i, s in enumerate(self._servers)]
        distributed = self.config.weight_update_mode == "distributed"
        if distributed:
            self._init_update_group(servers)  # the old group lost a member; every rank rejoins
        if self._version >= 0 and distributed and "weights" in self._released:
            # The other servers' weights are released and cannot take a broadcast now; the
            # update that follows resume() brings every server to one version.
            self._update_incomplete = True
        elif self._version >= 0 and self._external:
            self._update_incomplete = True  # the training ranks' next update brings it up to date
        elif self._version >= 0:
            weights, version = self._current_weights(), self._version
            targets = servers if distributed else [server]
            self._in_session(targets, lambda: self._push(targets, weights, version))
        if self._released:
            timeout = self.config.request_timeout_s
            server.post_ok("/pause_generation", {"mode": PAUSE_MODE}, timeout)
            server.post_ok("/release_memory_occupation", {"tags": self._release_order()}, timeout)

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

        Dead servers are restarted first. Generation is paused (running requests aborted) for
        the update and continued after. If a server fails midway the engine refuses to generate
        (servers may hold a mix of two versions) until an update succeeds.
        """
        if "weights" in self._released:
            raise RuntimeError(
                "SGLangRolloutEngine.update_weights called while the weights' memory is released; "
                "call resume() first"
            )
        self.start()
        with self._lock:
            for index, server in enumerate(self._servers):
                if not (server.alive() and server.liveness() == "up"):
                    self._recover(index, server)
            self._update_incomplete = True
            stream: Iterable[tuple[str, torch.Tensor]] = named_tensors
            if self._weights_source is None:
                kept: list[tuple[str, torch.Tensor]] = []
                stream = _keep_host_copy(named_tensors, kept)
            self._in_session(self._servers, lambda: self._push(self._servers, stream, version))
            if self._weights_source is None:
                self._host_weights = kept
            self._version = int(version)
            self._update_incomplete = False

    def begin_external_update(self) -> list[ServerSpec]:
        """Open a weight update that other processes fill: dead servers are restarted,
        generation is paused and a session begun on every server, whose specs are returned
        (training ranks post the buckets there: `megatron_fipo.cluster.engine_links`). Close it
        with `end_external_update`."""
        if "weights" in self._released:
            raise RuntimeError(
                "begin_external_update while the weights' memory is released; resume it first"
            )
        self.start()
        self._external = True
        with self._lock:
            for index, server in enumerate(self._servers):
                if not (server.alive() and server.liveness() == "up"):
                    try:
                        self._recover(index, server)
                    except WeightsNeeded:
                        pass  # expected: this update is what brings it up to date
            self._update_incomplete = True
            self._session = self._open_session(self._servers)
        return [server.spec for server in self._servers]

    def end_external_update(self, version: int, succeeded: bool) -> None:
        """Close the session of `begin_external_update`; on success the servers hold `version`
        (their last bucket recorded it) and generation may continue."""
        opened, self._session = self._session, []
        self._close_session(self._servers, opened, None)
        if succeeded:
            self._version = int(version)
            self._update_incomplete = False

    def _open_session(self, servers: list[SGLangServer]) -> list[SGLangServer]:
        """Pause generation and begin a session on `servers`; the servers that opened one. On a
        failure the opened sessions are closed again before it propagates."""
        timeout = self.config.request_timeout_s
        opened: list[SGLangServer] = []
        try:
            raise_first(call_each(servers, "/pause_generation", {"mode": PAUSE_MODE}, timeout))
            began = call_each(servers, "/begin_weight_update", {}, timeout)
            opened = [server for server, error in zip(servers, began) if error is None]
            raise_first(began)
        except BaseException as error:
            self._close_session(servers, opened, error)
            raise
        return opened

    def _in_session(self, servers: list[SGLangServer], push: Callable[[], None]) -> None:
        """pause generation -> begin session -> push -> end session -> continue generation.

        The session is ended on every server that opened one and generation is continued
        (unless memory is released) also when `push` fails.
        """
        opened = self._open_session(servers)
        try:
            push()
        except BaseException as error:
            self._close_session(servers, opened, error)
            raise
        self._close_session(servers, opened, None)

    def _close_session(
        self, servers: list[SGLangServer], opened: list[SGLangServer], error: BaseException | None
    ) -> None:
        """End the session on `opened`, continue generation on `servers`; raise the first
        failure, or attach them to `error` when one is already propagating."""
        timeout = self.config.request_timeout_s
        failures = call_each(opened, "/end_weight_update", {}, timeout)
        if not self._released:
            alive = [server for server in servers if server.alive()]
            failures += call_each(alive, "/continue_generation", {}, timeout)
        if error is None:
            raise_first(failures)
        for failure in failures:
            if failure is not None:
                error.add_note(f"closing the weight-update session also failed: {failure}")

    def _push(
        self, servers: list[SGLangServer], named: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        if self.config.weight_update_mode == "tensor":
            self._push_tensor(servers, named, version)
        else:
            self._push_distributed(servers, named, version)  # all of them take every broadcast

    def _push_tensor(
        self, servers: list[SGLangServer], named: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Post each bucket to every server; the last one records `version`."""
        cuda = torch.cuda.is_available()
        devices = [staging_devices(s.spec.base_gpu_id, self.config.tp_size, cuda) for s in servers]
        for bucket, is_last in _mark_last(iter_buckets(named, self.config.update_bucket_bytes)):
            # One copy per receiving TP rank on that rank's GPU, kept alive until the servers
            # answer (they open its IPC handle), and one pickle each: an unpickle consumes the
            # IPC / shared-memory reference its pickle took.
            staged = [
                [[(name, _staged(t, device)) for name, t in bucket] for device in server_devices]
                for server_devices in devices
            ]
            payloads = [
                tensor_bucket_payload(
                    [serialize_named_tensors(c) for c in copies], last=is_last, version=version
                )
                for copies in staged
            ]
            timeout = self.config.request_timeout_s
            with ThreadPoolExecutor(max_workers=len(servers)) as pool:
                futures = [
                    pool.submit(s.post_ok, "/update_weights_from_tensor", p, timeout)
                    for s, p in zip(servers, payloads)
                ]
                for future in futures:
                    future.result()
            del staged

    def _push_distributed(
        self, servers: list[SGLangServer], named: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        if self._group_broken:
            raise RuntimeError(
                "the weight-update group is broken (a broadcast was left unmatched after a server "
                "refused a bucket); restart the engine"
            )
        assert self._group is not None, "distributed update group not initialised"
        for bucket, is_last in _mark_last(iter_buckets(named, self.config.update_bucket_bytes)):
            try:
                broadcast_bucket(
                    servers,
                    self._group,
                    bucket,
                    group_name=self.config.group_name,
                    last=is_last,
                    version=version,
                    timeout_s=self.config.request_timeout_s,
                )
            except BroadcastRefused:
                self._group_broken = True
                raise

    def _init_update_group(self, servers: list[SGLangServer]) -> None:
        """(Re)build the group of the driver (rank 0) and every rank of `servers`."""
        config = self.config
        if self._group is not None:
            leave_update_group(self._servers, self._group, config.group_name)
            self._group = None
        self._group = join_update_group(
            servers,
            host=config.host,
            tp_size=config.tp_size,
            group_name=config.group_name,
            backend=config.group_backend,
            timeout_s=config.startup_timeout_s,
        )

    # ----- memory and health -----

    def pause(self, tags: list[str] | None = None) -> None:
        """Pause generation (aborting running requests), flush the KV cache, then release GPU
        memory: all of it (weights, KV cache, CUDA graphs) or `tags`."""
        wanted = set(MEMORY_TAGS if not tags else tags)
        unknown = wanted - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
        self.start()
        timeout = self.config.request_timeout_s
        raise_first(call_each(self._servers, "/pause_generation", {"mode": PAUSE_MODE}, timeout))
        raise_first(call_each(self._servers, "/flush_cache", {}, timeout))
        new = sorted(wanted - self._released, key=MEMORY_TAGS.index)
        if new:
            payload = {"tags": new}  # explicit: SGLang would release an empty list as every tag
            raise_first(call_each(self._servers, "/release_memory_occupation", payload, timeout))
            self._released |= set(new)

    def resume(self, tags: list[str] | None = None) -> None:
        """Retake released memory (all of it, or `tags`), then continue generation once nothing
        is released. Weight contents are not guaranteed after a release (unless the servers run
        with --enable-weights-cpu-backup): call `update_weights` next."""
        wanted = set(self._released if not tags else tags)
        if not wanted <= self._released:
            raise ValueError(
                f"cannot resume memory tags {sorted(wanted - self._released)}: not released "
                f"(released: {sorted(self._released)})"
            )
        timeout = self.config.request_timeout_s
        if wanted:
            # Explicit tags: an empty list would ask SGLang to resume every tag, including ones
            # never released, which it refuses.
            payload = {"tags": sorted(wanted, key=MEMORY_TAGS.index)}
            raise_first(call_each(self._servers, "/resume_memory_occupation", payload, timeout))
            self._released -= wanted
        if not self._released:
            raise_first(call_each(self._servers, "/continue_generation", {}, timeout))

    def _release_order(self) -> list[str]:
        return sorted(self._released, key=MEMORY_TAGS.index)

    def health(self) -> EngineHealth:
        """`/health` per server (503: still starting); while the servers hold their memory, also
        a one-token generation (`/health_generate`)."""
        problems = []
        for server in self._servers:
            name = f"server {server.spec.index}"
            if not server.alive():
                problems.append(f"{name} exited")
            elif (state := server.liveness()) != "up":
                problems.append(f"{name} {state}")
            elif not self._released and not server.generates():
                problems.append(f"{name} failed its generation check")
        if not self._servers:
            problems.append("not started")
        return EngineHealth(
            healthy=not problems,
            paused=bool(self._released),
            weights_version=self._version,
            detail="; ".join(problems),
        )


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
    if device is not None and tensor.device != device:
        tensor = tensor.to(device)
    return tensor.contiguous()


def _keep_host_copy(
    named_tensors: Iterable[tuple[str, torch.Tensor]], kept: list[tuple[str, torch.Tensor]]
) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in named_tensors:
        kept.append((name, tensor.detach().to("cpu", copy=True)))
        yield name, tensor
