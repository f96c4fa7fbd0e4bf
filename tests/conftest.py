"""Session-wide rules: known harmless third-party warnings are filtered, and a test run leaves
no process behind.

At the start, this pytest process becomes a child subreaper: whatever the tests start, and
whatever those processes start in turn, stays this process's descendant even when its own
parent dies first. At the end (after every fixture is torn down) the descendants still alive
after a grace period are listed, SIGKILLed, and the session fails. Not counted: this process's
own multiprocessing resource tracker and the guardians watching this process
(:mod:`megatron_fipo.lifetime`) and torch's shared-memory manager, which live as long as it
by design.
"""

from __future__ import annotations

import os
import re
import time

import psutil
import pytest

from megatron_fipo import lifetime

LEFTOVER_GRACE_S = float(os.environ.get("FIPO_TEST_LEFTOVER_GRACE_S", "20"))
"""How long processes may take to finish exiting after the last test (Ray's agents notice a
stopped raylet within about 2 s)."""


def pytest_configure(config: pytest.Config) -> None:
    from megatron_fipo.megatron.cpu_compat import KNOWN_WARNINGS

    for known in KNOWN_WARNINGS:
        message = re.escape(known.message)
        config.addinivalue_line(
            "filterwarnings", f"ignore:{message}:{known.category.__name__}:{known.module}"
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    lifetime.become_subreaper()


def _own_helpers() -> set[int]:
    """Descendants that legitimately live as long as this process."""
    from multiprocessing import resource_tracker

    helpers = {resource_tracker._resource_tracker._pid}  # None when never started
    for child in psutil.Process().children():
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if lifetime.is_guardian(cmdline) and lifetime.guarded_pid(cmdline) == os.getpid():
            helpers.add(child.pid)
        # torch's shared-memory manager serves this process's file_system-shared tensors (the
        # SGLang double's tests) and exits when its last client, this process, does.
        if cmdline and cmdline[0].endswith("torch_shm_manager"):
            helpers.add(child.pid)
    return helpers


def _leftovers() -> list[psutil.Process]:
    helpers = _own_helpers()
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid in helpers:
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(process.pid, os.WNOHANG)  # an orphan re-parented here, then ended
                continue
            alive.append(process)
        except (psutil.Error, ChildProcessError):
            continue
    return alive


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200] or process.name()}"
    except psutil.Error:
        return f"pid {process.pid}: (gone)"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    leftovers = _leftovers()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = _leftovers()
    if not leftovers:
        return
    report = [_describe(process) for process in leftovers]
    for process in leftovers:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = (
        f"{len(report)} process(es) started by the tests were still alive "
        f"{LEFTOVER_GRACE_S:.0f} s after the last test (now killed):\n  " + "\n  ".join(report)
    )
    if reporter is not None:
        reporter.write_sep("=", "leaked processes", red=True, bold=True)
        reporter.write_line(text)
    else:
        print(text)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
