"""Every process a run starts dies with its parent, also when the parent is SIGKILLed (Linux).

A killed parent runs no clean-up code, so each guarantee below is held by the kernel or by a
small *guardian* process that outlives what it watches by design:

- :func:`die_with_parent`: ``PR_SET_PDEATHSIG`` = SIGKILL in the calling process. The kernel
  sends it when the *thread* that created the process exits, so only use it in processes
  created by a long-lived thread (the test harness spawns its ranks from the main thread).
- :func:`guard_group`: the calling process leads its own process group, and a guardian
  SIGKILLs that group as soon as the process is gone. Everything it started and that did not
  leave the group goes with it: Megatron's checkpoint-writer manager and its resource
  tracker, forked writers, whatever a user hook spawned. Ray actors and harness ranks call it.
  The named shared-memory segments the dead processes created are then removed.
- :func:`guard_descendants`: a guardian that records the calling process's descendants every
  second and SIGKILLs those still alive once the process is gone. The driver calls it when it
  starts local Ray: after a ``kill -9`` of the driver, Ray's dashboard and runtime-env agents
  otherwise keep listening for up to 60 s (they try to report the dead raylet to the dead GCS).
- :func:`become_subreaper`: orphans of the caller's descendants are re-parented to the caller
  instead of init, so the test session can see (and end) every process the tests left behind.

A guardian watches its process through a pidfd the watched process opens for itself and
hands over, so a recycled pid can never be mistaken for it. It is a grandchild (its launcher
exits at once): Ray kills the children of an exiting worker, which must not include the
guardian that is to clean up after it. It is started in a process group
of its own: a ``kill -9 -PGID`` of the run's group cannot take it down with the others. This
file is also the guardian's program (``python -I lifetime.py guard ...``), so it imports only
the standard library at module level.
"""

from __future__ import annotations

import ctypes
import glob
import os
import select
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
GUARDIAN_MARK = "megatron_fipo-guardian"
"""The argument after the script in every guardian's command line (how checks recognise one)."""
SNAPSHOT_INTERVAL_S = 1.0
"""How often :func:`guard_descendants` records the tree (one /proc scan, a few ms)."""

_guardians: dict[str, subprocess.Popen] = {}


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}, {value}) failed: {os.strerror(error)}")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent ``parent_pid`` (the thread that created this
    process) exits; at once if it already has."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # re-parented: the parent died before the request stood
        os.kill(os.getpid(), signal.SIGKILL)


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it (not to init)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def guard_group() -> None:
    """Lead a process group of our own; SIGKILL the group once this process is gone.

    Idempotent per process. Children that call ``setsid``/``setpgid`` themselves leave the
    group and are not covered.
    """
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # children start in our group from now on
    _start_guardian("group")


def guard_descendants() -> None:
    """SIGKILL this process's descendants (as last recorded) once it is gone. Idempotent."""
    _start_guardian("tree")


def _start_guardian(mode: str) -> None:
    if mode in _guardians:
        return
    pidfd = os.pidfd_open(os.getpid())
    try:
        # -I: the guardian ignores PYTHONPATH and the user site; it needs only this file.
        command = [sys.executable, "-I", os.path.abspath(__file__), GUARDIAN_MARK, mode]
        launcher = subprocess.Popen(
            [*command, str(os.getpid()), str(pidfd)],
            pass_fds=(pidfd,),
            process_group=0,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        # The launcher forks the guardian and exits at once: a guardian that stayed our direct
        # child would die with us (Ray kills an exiting worker's children), before its work.
        launcher.wait()
        _guardians[mode] = launcher
    finally:
        os.close(pidfd)


def is_guardian(cmdline: list[str]) -> bool:
    """Whether a command line (``psutil.Process.cmdline()``) is one of our guardians."""
    return len(cmdline) > 3 and cmdline[3] == GUARDIAN_MARK


def guarded_pid(cmdline: list[str]) -> int:
    """The pid a guardian watches (its command line must pass :func:`is_guardian`)."""
    return int(cmdline[5])


def _descendants(pid: int) -> list:
    import psutil

    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    mine = os.getpid()
    return [p for p in found if p.pid != mine and not _is_guardian_process(p)]


def _is_guardian_process(process) -> bool:
    import psutil

    try:
        return is_guardian(process.cmdline())
    except psutil.Error:
        return False


def _kill_recorded(recorded: list) -> None:
    import psutil

    for process in recorded:
        try:
            if process.is_running():  # same pid *and* start time: never a recycled pid
                process.kill()
        except psutil.Error:
            pass


def _unlink_shared_memory(pids: list[int]) -> None:
    """Remove the named shared-memory segments the dead processes ``pids`` created (torch's
    ``file_system`` sharing names them ``torch_<pid>_...``: engine weights, weight-sync
    buckets). torch's shm manager would do it, but Ray kills a dead worker's children, the
    manager among them, and the segments would stay in /dev/shm for good. Processes that
    still map a segment keep their mapping."""
    for pid in set(pids):
        for path in glob.glob(f"/dev/shm/torch_{pid}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _group_members(group: int) -> list:
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and process.pid != os.getpid():
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _guard(mode: str, pid: int, pidfd: int) -> None:
    """The guardian's body: wait for ``pid`` to exit, then end what it left behind."""
    recorded: list = []
    while True:
        if mode == "tree":
            recorded = _descendants(pid)
        timeout = SNAPSHOT_INTERVAL_S if mode == "tree" else None
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if ready:
            break
    victims = _group_members(pid) if mode == "group" else recorded
    _kill_recorded(victims)
    _unlink_shared_memory([pid, *(process.pid for process in victims)])


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == GUARDIAN_MARK:
    if os.fork() == 0:  # the guardian: re-parented once the launcher exits
        _guard(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    os._exit(0)
