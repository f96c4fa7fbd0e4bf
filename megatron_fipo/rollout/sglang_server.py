"""SGLang server processes: one owned `python -m sglang.launch_server` and its HTTP endpoint.

Also the driver side of SGLang's weight-update process group. Used by `sglang_engine.py`; the
tests' stand-in server uses `new_custom_process_group` to join the same group the way SGLang does.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """Where one server runs; handed to the launch command."""

    index: int
    host: str
    port: int
    base_gpu_id: int
    launch_count: int
    """0 for the first start, then 1, 2, ... for restarts."""


class ServerDied(RuntimeError):
    """The server process exited or its connection failed mid-request."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class SGLangServer:
    """One owned server process and its HTTP endpoint."""

    def __init__(self, spec: ServerSpec, command: list[str]) -> None:
        self.spec = spec
        self.url = f"http://{spec.host}:{spec.port}"
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerDied(
                    f"SGLang server {self.spec.index} exited with code {self.process.returncode} "
                    f"during start-up; its last output:\n{self.log_tail()}"
                )
            try:
                if self.request("GET", "/health", None, timeout_s=5.0)[0] == 200:
                    return
            except ServerDied:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"SGLang server {self.spec.index} not healthy after {timeout_s} s")

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

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()


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


def responds_healthy(server: SGLangServer) -> bool:
    try:
        return server.request("GET", "/health", None, timeout_s=10.0)[0] == 200
    except ServerDied:
        return False
