"""Math answer reward: +1 if a response's final answer equals the ground truth, else -1.

What it computes, per sample: ``extract_answer(response)`` (last ``\\boxed{}``, else DAPO's last
``Answer:`` line; see ``extraction.py``), then

- no answer                                   -> -1, reason "no_answer"
- answer longer than ``MAX_ANSWER_CHARS``     -> -1, reason "too_long" (never parsed)
- answer and ground truth both plain integers -> compared as integers in the calling process
- otherwise math-verify 0.9 decides: ``verify(parse(gold), parse(answer))`` -> "correct" / "wrong".

math-verify (sympy underneath) can run for seconds to forever on adversarial LaTeX (ten nested
brace groups already take seconds), and its own time limits use ``signal.alarm``, which only works
in a main thread. So ``MathReward`` runs math-verify with its time limits off inside a small pool
of long-lived worker processes (spawn context) and enforces its own per-sample deadline: a worker
that overruns is killed (SIGKILL) and replaced, and the sample scores -1 with reason "timeout".
Errors raised inside math-verify score -1 with reason "error: <type>: <message>"; a worker that
dies scores its sample the same way and is replaced. Nothing a response contains can crash or
hang the caller. Model output is only parsed as text, never executed or eval'd.

Ground truths are data, not model output: a ground truth that is empty, has unbalanced braces,
is longer than ``MAX_ANSWER_CHARS``, or that math-verify cannot parse into a math expression makes
``score`` / ``score_batch`` / ``math_reward`` raise ``ValueError`` naming it, because scoring it
silently (every response wrong) would corrupt training without anyone noticing.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import resource
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait

from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from megatron_fipo.rewards.extraction import braces_balanced, extract_answer

MAX_ANSWER_CHARS = 1000
"""Extracted answers (and ground truths) longer than this are never handed to math-verify."""

_PLAIN_INTEGER = re.compile(r"[+-]?\d{1,64}")
# LaTeX extraction only: math-verify's plain-expression extractor hands text to sympy's
# parse_expr, which is built on eval(); the LaTeX path builds sympy objects from a parse tree.
_LATEX_ONLY = (LatexExtractionConfig(),)


@dataclass(frozen=True, slots=True)
class RewardResult:
    """Score of one response."""

    reward: float
    """+1.0 if correct, else -1.0."""
    correct: bool
    extracted: str | None
    """The final answer found in the response, None if there was none."""
    reason: str
    """"correct", "wrong", "no_answer", "too_long", "timeout" or "error: <type>: <message>"."""


def _result(extracted: str | None, reason: str) -> RewardResult:
    correct = reason == "correct"
    return RewardResult(1.0 if correct else -1.0, correct, extracted, reason)


def check_ground_truth(ground_truth: str) -> str:
    """Return the stripped ground truth, or raise ValueError naming what is wrong with it."""
    if not isinstance(ground_truth, str):
        raise ValueError(f"ground truth must be a str, got {type(ground_truth).__name__}")
    gold = ground_truth.strip()
    if not gold:
        raise ValueError(f"ground truth {ground_truth!r} is empty")
    if len(gold) > MAX_ANSWER_CHARS:
        raise ValueError(
            f"ground truth {gold[:80]!r}... is {len(gold)} characters, over {MAX_ANSWER_CHARS}"
        )
    if not braces_balanced(gold):
        raise ValueError(f"ground truth {gold!r} has unbalanced braces")
    return gold


def _quick_verdict(extracted: str | None, gold: str) -> RewardResult | None:
    """The verdict when it needs no math-verify call, else None."""
    if extracted is None:
        return _result(None, "no_answer")
    if len(extracted) > MAX_ANSWER_CHARS:
        return _result(extracted, "too_long")
    answer = extracted.strip("$ ").rstrip(".")
    if _PLAIN_INTEGER.fullmatch(gold) and _PLAIN_INTEGER.fullmatch(answer):
        return _result(extracted, "correct" if int(answer) == int(gold) else "wrong")
    return None


class _BadGroundTruthError(Exception):
    pass


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """math-verify's parse of a ground truth (cached: each prompt's is reused by its group)."""
    parsed = parse("\\boxed{" + gold + "}", _LATEX_ONLY, parsing_timeout=None, raise_on_error=True)
    if not any(isinstance(item, (Basic, MatrixBase)) for item in parsed):
        raise _BadGroundTruthError(
            f"ground truth {gold!r} is not a math expression math-verify can parse"
        )
    return parsed


def _compare(extracted: str, gold: str) -> str:
    """Verdict of math-verify: "correct", "wrong" or "error: ..."; raises _BadGroundTruthError.

    No time limit here: callers run it in a worker process with a deadline, or accept the risk.
    """
    gold_parsed = _parse_gold(gold)
    # Box answers are wrapped back into a box so math-verify reads them as LaTeX; an Answer-line
    # answer with `$` math (or stray braces) is handed over as text for math-verify to search.
    if "$" in extracted or not braces_balanced(extracted):
        text = extracted
    else:
        text = "\\boxed{" + extracted + "}"
    try:
        answer = parse(text, _LATEX_ONLY, parsing_timeout=None, raise_on_error=True)
        same = verify(gold_parsed, answer, timeout_seconds=None, raise_on_error=True)
    except Exception as error:  # anything sympy raises on model output is the answer's fault
        return f"error: {type(error).__name__}: {str(error)[:200]}"
    return "correct" if same else "wrong"


def math_reward(response: str, ground_truth: str) -> RewardResult:
    """Score one response in the calling process, for one-off use (scripts, notebooks, eval).

    WARNING: no time limit. A pathological response can keep math-verify busy for minutes;
    training and anything else that scores model output at scale must use ``MathReward``.
    Raises ValueError for a malformed ground truth (see the module docstring).
    """
    gold = check_ground_truth(ground_truth)
    extracted = extract_answer(response)
    quick = _quick_verdict(extracted, gold)
    if quick is not None:
        return quick
    try:
        return _result(extracted, _compare(extracted, gold))
    except _BadGroundTruthError as error:
        raise ValueError(str(error)) from None


def _exit_when_orphaned(parent_pid: int) -> None:
    """Thread body: end the worker if its parent dies (say SIGKILLed mid-sample), so no
    orphan keeps a core busy on a pathological expression."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker_main(connection: Connection, memory_limit_mb: int | None) -> None:
    """Worker process loop: receive (task id, answer, gold), send (task id, verdict, detail)."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    if memory_limit_mb:
        # A sympy blow-up (e.g. 9^{9^{9^9}}) must fail with MemoryError, not take the host down.
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # We enforce deadlines ourselves; silence math-verify's "timeout is disabled" warning.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Ctrl-C is the parent's to handle (it stops the pool); a worker must not die mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # sympy builds caches on first use (a cold first comparison costs ~1 s); pay that before
    # reporting ready, so it never counts against a sample's deadline.
    _compare("x^2+2x+1", "(x+1)^2")
    _compare("0.5", "\\frac{1}{2}")
    connection.send(("ready", None, None))
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        task_id, extracted, gold = message
        try:
            verdict, detail = _compare(extracted, gold), ""
        except _BadGroundTruthError as error:
            verdict, detail = "bad_ground_truth", str(error)
        except Exception as error:  # never let one sample take the worker down
            verdict = f"error: {type(error).__name__}: {str(error)[:200]}"
            detail = ""
        connection.send((task_id, verdict, detail))


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
        # Busy or still importing sympy: it would not read the stop message soon, kill it now.
        if worker.ready and worker.task_id is None:
            worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=2.0)
        worker.connection.close()
    workers.clear()


class MathReward:
    """Math answer reward with a per-sample deadline, scored in ``num_workers`` processes.

    Use as a context manager (or call ``close``). ``score_batch`` is the fast path: samples are
    spread over the workers and results come back in input order. Calls are serialised by a
    lock, so one instance may be shared by threads, but it is not parallel across them.
    Workers are spawned, so a script that builds a ``MathReward`` must keep its top level under
    ``if __name__ == "__main__":`` (the spawned interpreter re-imports the main module).

    Args:
        num_workers: worker processes (each holds a sympy/math-verify interpreter, ~100 MB).
        timeout_s: per-sample deadline for math-verify, counted from the moment the sample is
            handed to a ready worker (worker start-up does not count against it).
        memory_limit_mb: address-space limit of each worker (None: no limit).
        start_timeout_s: how long a worker may take to start before RuntimeError.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int | None = 4096,
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_limit_mb is not None and memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb must be >= 256 or None, got {memory_limit_mb}")
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = float(start_timeout_s)
        # spawn: a clean interpreter per worker, safe however many threads the trainer runs.
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self.num_restarts = 0
        """Workers killed and replaced so far (deadline overruns and crashes)."""
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        with self._lock:
            self._finalizer()

    def score(self, response: str, ground_truth: str) -> RewardResult:
        """Score one response; raises ValueError for a malformed ground truth."""
        return self.score_batch([response], [ground_truth])[0]

    def score_batch(
        self, responses: Sequence[str], ground_truths: Sequence[str]
    ) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``; results in input order.

        Raises ValueError (after the batch is scored, so the pool stays consistent) naming the
        first malformed ground truth.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) "
                "must have the same length"
            )
        golds = [check_ground_truth(ground_truth) for ground_truth in ground_truths]
        results: list[RewardResult | None] = [None] * len(golds)
        jobs = []
        for index, (response, gold) in enumerate(zip(responses, golds)):
            extracted = extract_answer(response)
            results[index] = _quick_verdict(extracted, gold)
            if results[index] is None:
                jobs.append((index, extracted, gold))
        with self._lock:
            if not self._workers:
                raise RuntimeError("MathReward is closed")
            try:
                verdicts = self._run(jobs)
            except BaseException:
                # A worker that cannot start, or an interrupt mid-batch, leaves replies in
                # flight: stop the pool rather than risk pairing them with later samples.
                self._finalizer()
                raise
        bad_ground_truths = []
        for index, extracted, _ in jobs:
            verdict, detail = verdicts[index]
            if verdict == "bad_ground_truth":
                bad_ground_truths.append(detail)
            results[index] = _result(extracted, verdict)
        if bad_ground_truths:
            raise ValueError(
                f"{len(bad_ground_truths)} malformed ground truth(s); first: {bad_ground_truths[0]}"
            )
        return results

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_end, self.memory_limit_mb),
            name="math-reward-worker",
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

    def _run(self, jobs: list[tuple[int, str, str]]) -> dict[int, tuple[str, str]]:
        """Feed ``(index, answer, gold)`` jobs to ready workers until each has a verdict."""
        pending = deque(jobs)
        verdicts: dict[int, tuple[str, str]] = {}
        while len(verdicts) < len(jobs):
            self._dispatch(pending)
            self._receive(verdicts, pending)
            self._enforce_deadlines(verdicts)
        return verdicts

    def _dispatch(self, pending: deque) -> None:
        for position, worker in enumerate(self._workers):
            if not pending:
                return
            if not worker.ready or worker.task_id is not None:
                continue
            job = pending.popleft()
            try:
                worker.connection.send(job)
            except OSError:  # died while idle: requeue the job, replace the worker
                pending.appendleft(job)
                self._replace(position)
                continue
            worker.task_id = job[0]
            worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, verdicts: dict, pending: deque) -> None:
        """Wait until a message arrives or the nearest deadline passes; handle the messages."""
        nearest = min(
            worker.deadline if worker.ready else worker.start_deadline for worker in self._workers
        )
        timeout = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
        readable = wait([worker.connection for worker in self._workers], timeout=timeout)
        for position, worker in enumerate(self._workers):
            if worker.connection not in readable:
                continue
            try:
                task_id, verdict, detail = worker.connection.recv()
            except (EOFError, OSError):
                self._worker_died(position, verdicts, pending)
                continue
            if task_id == "ready":
                worker.ready = True
                continue
            assert task_id == worker.task_id, (task_id, worker.task_id)
            verdicts[task_id] = (verdict, detail)
            worker.task_id, worker.deadline = None, math.inf

    def _worker_died(self, position: int, verdicts: dict, pending: deque) -> None:
        worker = self._workers[position]
        worker.process.join(timeout=5.0)
        exit_code = worker.process.exitcode
        if not worker.ready:
            raise RuntimeError(f"math reward worker failed to start (exit code {exit_code})")
        if worker.task_id is not None:
            verdicts[worker.task_id] = (f"error: reward worker died (exit code {exit_code})", "")
        self._replace(position)

    def _enforce_deadlines(self, verdicts: dict) -> None:
        now = time.monotonic()
        for position, worker in enumerate(self._workers):
            if worker.task_id is not None and now >= worker.deadline:
                verdicts[worker.task_id] = ("timeout", "")
                self._replace(position)
            elif not worker.ready and now >= worker.start_deadline:
                raise RuntimeError(
                    f"math reward worker did not start within {self.start_timeout_s} s"
                )
