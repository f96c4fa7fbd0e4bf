"""Reward functions scored in worker processes with a per-sample deadline.

A reward function is named by a dotted path, ``"package.module:function"``, and called as
``function(response: str, ground_truth: str, **extra) -> float | RewardResult``; ``extra`` holds
the per-sample fields the caller passes (the trainer passes ``data_source``), so a function
should accept ``**extra`` (or name the fields it uses). ``RewardPool`` imports and calls it ONLY
inside a small pool of long-lived spawned worker processes, so user code never runs in the
trainer process, and one bad sample cannot stop the run (failures score ``error_reward``, -1.0
by default, with correct=False):

- the function raises            -> reason "error: <type>: <msg>" (SystemExit included)
- it runs past ``timeout_s``     -> the worker is killed (SIGKILL) and replaced; reason "timeout"
- the batch runs past ``batch_budget_s`` -> every sample not yet scored scores reason "timeout"
  (busy workers killed and replaced), counted in ``last_budget_timeouts``
- the worker dies (segfault, ...) -> it is replaced; reason "error: reward worker died (...)"
- it returns a bool, a non-number or a non-finite number -> reason "error: TypeError/ValueError:
  reward function returned <the value> ..."
- a plain number ``r`` becomes ``RewardResult(r, correct=r > 0, extracted=None, reason="scored")``.

A path that cannot be imported, or that names something not callable, is reported by the workers
at start-up and makes the constructor raise ``ValueError``; anything the module does at import
time (load a table, warm a cache) happens before a worker reports ready, so it never counts
against a sample's deadline.

``MathReward`` (``math_reward.py``) is this pool running the built-in math answer checker;
``build_reward`` turns a ``RewardConfig`` into one or the other.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import numbers
import os
import pickle
import resource
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_fipo.config import RewardConfig

_MAX_MESSAGE_CHARS = 200
DEFAULT_BUDGET_PER_TIMEOUT = 30.0
"""``batch_budget_s`` when not given: this many per-sample deadlines. An ordinary batch spends
milliseconds per sample (math-verify on short answers; integer answers never reach a worker), so
even thousands of samples end far inside it; 30 x num_workers samples could run to their full
deadline before it applies. Without it a batch of hostile outputs would take
num_samples * timeout_s / num_workers (384 samples at 5.7 s on one worker: 37 minutes)."""


@dataclass(frozen=True, slots=True)
class RewardResult:
    """Score of one response."""

    reward: float
    """The reward (the math reward: +1.0 if correct, else -1.0)."""
    correct: bool
    """Whether the response counts as correct (accuracy metrics)."""
    extracted: str | None = None
    """The final answer found in the response, None if there was none (or none was reported)."""
    reason: str = "scored"
    """Math: "correct", "wrong", "no_answer", "too_long"; a user function's plain number:
    "scored"; any reward: "timeout" or "error: <type>: <message>"."""


def resolve_function(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (the part after ``:`` may be dotted,
    e.g. ``"module:Class.method"``). Imports the module: call it only where user code may run.

    Raises ValueError saying what is wrong with the path.
    """
    module_name, attribute = _split_path(path)
    try:
        target = importlib.import_module(module_name)
    except BaseException as error:  # SyntaxError, SystemExit in module code, ...
        raise ValueError(f"cannot import module {module_name!r}: {_describe(error)}") from None
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ValueError(f"{attribute!r} is a {type(target).__name__}, not a callable")
    return target


def _split_path(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``"package.module:function"``; ValueError if malformed."""
    parts = path.split(":") if isinstance(path, str) else []
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"must look like 'package.module:function', got {path!r}")
    return parts[0], parts[1]


def _message(error: BaseException) -> str:
    """``str(error)``, surviving an exception whose ``__str__`` raises."""
    try:
        return str(error)[:2000]
    except Exception:
        return "<unprintable message>"


def _describe(error: BaseException) -> str:
    """``"<type>: <message>"``, cut short."""
    return f"{type(error).__name__}: {_message(error)[:_MAX_MESSAGE_CHARS]}"


def _show(value: Any) -> str:
    """A short description of a returned value for an error message."""
    try:
        text = repr(value)
    except Exception:
        text = "<unprintable>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _finite_reward(value: Any) -> float:
    # bool is an int subclass, but True/False almost surely means "correct", not +1/0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"reward function returned {_show(value)}; expected a finite number or a RewardResult"
        )
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"reward function returned {_show(value)}; the reward must be finite")
    return reward


def _as_fields(value: Any) -> tuple[float, bool, str | None, str]:
    """A function's return value as plain RewardResult fields (checked in the worker, so the
    parent never unpickles a user-defined object). Raises TypeError/ValueError naming it."""
    if not isinstance(value, RewardResult):
        reward = _finite_reward(value)
        return reward, reward > 0, None, "scored"
    reward = _finite_reward(value.reward)
    if not isinstance(value.correct, bool):
        raise TypeError(f"RewardResult.correct must be a bool, got {_show(value.correct)}")
    if value.extracted is not None and not isinstance(value.extracted, str):
        raise TypeError(f"RewardResult.extracted must be str or None, got {_show(value.extracted)}")
    if not isinstance(value.reason, str):
        raise TypeError(f"RewardResult.reason must be a str, got {_show(value.reason)}")
    # str() makes str subclasses plain str, so unpickling the fields imports no user module.
    extracted = None if value.extracted is None else str(value.extracted)
    return reward, value.correct, extracted, str(value.reason)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Thread body: end the worker if its parent dies (say SIGKILLed mid-sample), so no
    orphan keeps a core busy on a pathological sample."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker_main(
    connection: Connection,
    function_path: str,
    warmup_path: str | None,
    memory_limit_mb: int | None,
) -> None:
    """Worker process: load the function, report ("ready", None) or ("start_failed", message),
    then receive (task id, args, kwargs) and send (task id, outcome) until told to stop.

    An outcome is ("ok", RewardResult fields) or ("raised", (exception type name, message)).
    """
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    if memory_limit_mb:
        # A blow-up (e.g. sympy on 9^{9^{9^9}}) must fail with MemoryError, not take the host down.
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Ctrl-C is the parent's to handle (it stops the pool); a worker must not die mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = resolve_function(function_path)
        if warmup_path is not None:
            resolve_function(warmup_path)()
    except BaseException as error:
        message = str(error) if isinstance(error, ValueError) else _describe(error)
        connection.send(("start_failed", message))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        task_id, args, kwargs = message
        try:
            outcome = ("ok", _as_fields(function(*args, **kwargs)))
        except BaseException as error:  # SystemExit too: one sample must not end the worker
            outcome = ("raised", (type(error).__name__, _message(error)))
        connection.send((task_id, outcome))


@dataclass(slots=True)
class _Worker:
    """Parent-side handle of one worker process."""

    process: multiprocessing.process.BaseProcess
    connection: Connection
    start_deadline: float
    ready: bool = False
    task_id: int | None = None
    deadline: float = math.inf


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask workers to exit, then kill whatever is still alive (also runs at garbage collection)."""
    for worker in workers:
        try:
            worker.connection.send(None)
        except OSError:
            pass
    for worker in workers:
        # Busy or still importing: it would not read the stop message soon, kill it now.
        if worker.ready and worker.task_id is None:
            worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=2.0)
        worker.connection.close()
    workers.clear()


Outcome = tuple[str, Any]
"""What became of one job: ("ok", RewardResult fields), ("raised", (type name, message)),
("timeout", None) or ("died", exit code)."""


class RewardPool:
    """A reward function (``"package.module:function"``) run in ``num_workers`` spawned worker
    processes with a per-sample deadline; see the module docstring for what each failure scores.

    The constructor blocks until every worker has imported the function (ValueError if it
    cannot). Use as a context manager (or call ``close``). ``score_batch`` spreads samples over
    the workers and returns results in input order. Calls are serialised by a lock, so one pool
    may be shared by threads, but it is not parallel across them. Workers are spawned, so a
    script that builds a pool must keep its top level under ``if __name__ == "__main__":``, and
    the function's module must be importable from ``sys.path`` (which workers inherit).

    Args:
        function: ``"package.module:function"`` (see ``resolve_function``).
        num_workers: worker processes.
        timeout_s: per-sample deadline, counted from the moment the sample is handed to a ready
            worker (worker start-up does not count against it).
        batch_budget_s: time budget of one ``score_batch`` / ``run_jobs`` call, counted from the
            moment a worker is ready; when it runs out, every sample not yet scored scores as a
            timeout (``last_budget_timeouts`` counts them). None: ``DEFAULT_BUDGET_PER_TIMEOUT *
            timeout_s``. Must be >= ``timeout_s``.
        error_reward: the reward of a sample whose function raised, timed out or crashed.
        memory_limit_mb: address-space limit of each worker (None: no limit; libraries that
            reserve large virtual ranges, CUDA for one, fail under a limit).
        start_timeout_s: how long a worker may take to start before RuntimeError.
        warmup: ``"package.module:function"`` called with no arguments in each worker before it
            reports ready (costs paid there never count against a deadline).
    """

    def __init__(
        self,
        function: str,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        batch_budget_s: float | None = None,
        error_reward: float = -1.0,
        memory_limit_mb: int | None = None,
        start_timeout_s: float = 120.0,
        warmup: str | None = None,
    ) -> None:
        if batch_budget_s is None:
            batch_budget_s = DEFAULT_BUDGET_PER_TIMEOUT * timeout_s
        _check_pool_arguments(
            function, num_workers, timeout_s, batch_budget_s, error_reward, memory_limit_mb
        )
        self.function = function
        self.timeout_s = float(timeout_s)
        self.batch_budget_s = float(batch_budget_s)
        self.error_reward = float(error_reward)
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = float(start_timeout_s)
        self._warmup = warmup
        # spawn: a clean interpreter per worker, safe however many threads the trainer runs.
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self.num_restarts = 0
        """Workers killed and replaced so far (deadline overruns and crashes)."""
        self.last_budget_timeouts = 0
        """Samples of the latest batch scored as timeouts because the batch budget ran out
        (the trainer logs it as ``reward/budget_timeouts``)."""
        self.num_budget_timeouts = 0
        """The same, summed over every batch so far."""
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        try:
            for _ in range(num_workers):
                self._workers.append(self._start_worker())
            # Wait for every handshake, so a bad path fails here, not at the first batch.
            while not all(worker.ready for worker in self._workers):
                self._receive({}, deque(), math.inf)
                self._enforce_deadlines({})
        except BaseException:
            self._finalizer()
            raise

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        with self._lock:
            self._finalizer()

    def score(self, response: str, ground_truth: str, **extra: Any) -> RewardResult:
        """Score one response (``extra``: per-sample keyword arguments of the function)."""
        return self.score_batch([response], [ground_truth], [extra] if extra else None)[0]

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[RewardResult]:
        """Score ``function(responses[i], ground_truths[i], **extras[i])``; results in input order.

        ``extras`` (one mapping of keyword arguments per sample, e.g. ``{"data_source": ...}``)
        is optional. Raises ValueError for mismatched lengths or arguments of the wrong type.
        """
        _check_batch(responses, ground_truths, extras)
        jobs = [
            (index, (response, ground_truth), dict(extras[index]) if extras else {})
            for index, (response, ground_truth) in enumerate(zip(responses, ground_truths))
        ]
        outcomes = self.run_jobs(jobs)
        return [self.outcome_result(outcomes[index]) for index in range(len(jobs))]

    def outcome_result(self, outcome: Outcome, extracted: str | None = None) -> RewardResult:
        """The RewardResult of one job's outcome (failures score ``error_reward``)."""
        kind, detail = outcome
        if kind == "ok":
            return RewardResult(*detail)
        if kind == "timeout":
            reason = "timeout"
        elif kind == "died":
            reason = f"error: reward worker died (exit code {detail})"
        else:
            reason = f"error: {detail[0]}: {detail[1][:_MAX_MESSAGE_CHARS]}"
        return RewardResult(self.error_reward, False, extracted, reason)

    def run_jobs(self, jobs: list[tuple[int, tuple, dict[str, Any]]]) -> dict[int, Outcome]:
        """Run ``function(*args, **kwargs)`` for each ``(index, args, kwargs)`` job in the
        workers; the outcome of each by index. Raises ValueError if a job cannot be pickled."""
        messages = deque()
        for index, args, kwargs in jobs:
            try:  # pickled here, so a bad argument fails before any work is handed out
                messages.append((index, pickle.dumps((index, args, kwargs))))
            except Exception as error:
                raise ValueError(
                    f"sample {index}: arguments cannot be sent to a reward worker: "
                    f"{_describe(error)}"
                ) from None
        with self._lock:
            if not self._workers:
                raise RuntimeError(f"{type(self).__name__} is closed")
            try:
                return self._run(messages)
            except BaseException:
                # A worker that cannot start, or an interrupt mid-batch, leaves replies in
                # flight: stop the pool rather than risk pairing them with later samples.
                self._finalizer()
                raise

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_end, self.function, self._warmup, self.memory_limit_mb),
            name="reward-worker",
            daemon=True,
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the worker dies
        return _Worker(process, parent_end, time.monotonic() + self.start_timeout_s)

    def _replace(self, position: int) -> None:
        """Kill the worker at ``position`` (whatever it is doing) and start a fresh one."""
        worker = self._workers[position]
        worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.connection.close()
        self._workers[position] = self._start_worker()
        self.num_restarts += 1

    def _run(self, pending: deque) -> dict[int, Outcome]:
        """Feed pickled ``(index, message)`` jobs to ready workers until each has an outcome or
        the batch budget runs out."""
        outcomes: dict[int, Outcome] = {}
        total = len(pending)
        self.last_budget_timeouts = 0
        budget_end = math.inf  # starts with the first ready worker, as a sample's deadline does
        while len(outcomes) < total:
            if budget_end == math.inf and any(worker.ready for worker in self._workers):
                budget_end = time.monotonic() + self.batch_budget_s
            self._dispatch(pending)
            self._receive(outcomes, pending, budget_end)
            self._enforce_deadlines(outcomes)
            if time.monotonic() >= budget_end:
                self._end_batch(outcomes, pending)
        return outcomes

    def _end_batch(self, outcomes: dict, pending: deque) -> None:
        """The budget ran out: every job without an outcome times out (busy workers replaced)."""
        expired = [index for index, _ in pending]
        pending.clear()
        for position, worker in enumerate(self._workers):
            if worker.task_id is not None:
                expired.append(worker.task_id)
                self._replace(position)
        for index in expired:
            outcomes[index] = ("timeout", "batch budget")
        self.last_budget_timeouts = len(expired)
        self.num_budget_timeouts += len(expired)

    def _dispatch(self, pending: deque) -> None:
        for position, worker in enumerate(self._workers):
            if not pending:
                return
            if not worker.ready or worker.task_id is not None:
                continue
            job = pending.popleft()
            try:
                worker.connection.send_bytes(job[1])
            except OSError:  # died while idle: requeue the job, replace the worker
                pending.appendleft(job)
                self._replace(position)
                continue
            worker.task_id = job[0]
            worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, outcomes: dict, pending: deque, budget_end: float) -> None:
        """Wait until a message arrives or the nearest deadline passes; handle the messages."""
        nearest = min(
            budget_end,
            *(
                worker.deadline if worker.ready else worker.start_deadline
                for worker in self._workers
            ),
        )
        timeout = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
        readable = wait([worker.connection for worker in self._workers], timeout=timeout)
        for position, worker in enumerate(self._workers):
            if worker.connection not in readable:
                continue
            try:
                task_id, outcome = worker.connection.recv()
            except (EOFError, OSError):
                self._worker_died(position, outcomes, pending)
                continue
            if task_id == "ready":
                worker.ready = True
            elif task_id == "start_failed":
                raise ValueError(f"reward function {self.function!r}: {outcome}")
            else:
                assert task_id == worker.task_id, (task_id, worker.task_id)
                outcomes[task_id] = outcome
                worker.task_id, worker.deadline = None, math.inf

    def _worker_died(self, position: int, outcomes: dict, pending: deque) -> None:
        worker = self._workers[position]
        worker.process.join(timeout=5.0)
        exit_code = worker.process.exitcode
        if not worker.ready:
            raise RuntimeError(
                f"reward worker for {self.function!r} failed to start (exit code {exit_code})"
            )
        if worker.task_id is not None:
            outcomes[worker.task_id] = ("died", exit_code)
        self._replace(position)

    def _enforce_deadlines(self, outcomes: dict) -> None:
        now = time.monotonic()
        for position, worker in enumerate(self._workers):
            if worker.task_id is not None and now >= worker.deadline:
                outcomes[worker.task_id] = ("timeout", None)
                self._replace(position)
            elif not worker.ready and now >= worker.start_deadline:
                raise RuntimeError(
                    f"reward worker for {self.function!r} did not start within "
                    f"{self.start_timeout_s} s"
                )


def _check_pool_arguments(
    function: str,
    num_workers: int,
    timeout_s: float,
    batch_budget_s: float,
    error_reward: float,
    memory_limit_mb: int | None,
) -> None:
    try:
        _split_path(function)
    except ValueError as error:
        raise ValueError(f"function {error}") from None
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s}")
    if not (timeout_s <= batch_budget_s < math.inf):
        raise ValueError(
            f"batch_budget_s must be finite and >= timeout_s ({timeout_s}), got {batch_budget_s}"
        )
    if not math.isfinite(error_reward):
        raise ValueError(f"error_reward must be finite, got {error_reward}")
    if memory_limit_mb is not None and memory_limit_mb < 256:
        raise ValueError(f"memory_limit_mb must be >= 256 or None, got {memory_limit_mb}")


def _check_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    extras: Sequence[Mapping[str, Any]] | None,
) -> None:
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) "
            "must have the same length"
        )
    if extras is not None and len(extras) != len(responses):
        raise ValueError(
            f"extras ({len(extras)}) and responses ({len(responses)}) must have the same length"
        )
    for index, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
        if not isinstance(response, str):
            raise ValueError(
                f"response must be a str, got {type(response).__name__} (sample {index})"
            )
        if not isinstance(ground_truth, str):
            raise ValueError(
                f"ground truth must be a str, got {type(ground_truth).__name__} (sample {index})"
            )
        if extras is not None and not isinstance(extras[index], Mapping):
            raise ValueError(
                f"extras[{index}] must be a mapping of keyword arguments, "
                f"got {type(extras[index]).__name__}"
            )


def build_reward(config: RewardConfig) -> RewardPool:
    """The reward pool a config asks for: ``config.function`` (``"package.module:function"``)
    in ``config.num_workers`` workers with ``config.timeout_s`` per sample and
    ``config.batch_budget_s`` per batch, or the built-in ``MathReward`` when ``config.function``
    is None."""
    # Imported here: math_reward imports this module (MathReward subclasses RewardPool).
    from megatron_fipo.rewards.math_reward import MathReward

    limits = dict(
        num_workers=config.num_workers,
        timeout_s=config.timeout_s,
        batch_budget_s=config.batch_budget_s,
    )
    if config.function is None:
        return MathReward(**limits)
    return RewardPool(config.function, **limits)
