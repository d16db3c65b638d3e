"""Child processes die with the process that started them, whatever kills it.

A kill -9 of the trainer runs no cleanup code, so its rollout servers (hundreds of MB each)
would live on as orphans. Two mechanisms, because each has a gap:

* `PR_SET_PDEATHSIG` (Linux): the kernel sends SIGKILL to the child when its parent dies. It
  is armed between fork and exec (`popen_kwargs`), so it covers any program (SGLang, the
  router). The kernel ties it to the *thread* that forked, so it is armed only when the
  launch happens on the main thread: a server launched from a short-lived worker thread
  would otherwise be killed when that thread ends.
* A watchdog thread in our own servers (`watch_parent`): it polls the parent pid the launcher
  put in `ERPO_PARENT_PID` and exits when the process is re-parented. This covers launches
  from any thread and non-Linux hosts, with up to a second of delay.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
import time

PARENT_ENV = "ERPO_PARENT_PID"
_PR_SET_PDEATHSIG = 1

try:  # loaded in the parent: the child between fork and exec only calls the function
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _PRCTL = _LIBC.prctl
except (OSError, AttributeError):
    _PRCTL = None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies."""
    if _PRCTL is None:
        return False
    return _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _arm_in_child() -> None:
    set_parent_death_signal(signal.SIGKILL)


def popen_kwargs(env: dict | None = None) -> dict:
    """Extra `subprocess.Popen` arguments for a child that must not outlive this process:
    `preexec_fn` arming PDEATHSIG (main thread only) and `env` carrying our pid for the watchdog."""
    kw: dict = {"env": {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}}
    if _PRCTL is not None and threading.current_thread() is threading.main_thread():
        kw["preexec_fn"] = _arm_in_child
    return kw


def watch_parent(interval_s: float = 0.5, on_orphaned=None) -> threading.Thread | None:
    """In a server we launched: exit as soon as the launching process is gone.

    Does nothing when `ERPO_PARENT_PID` is unset (started by hand) or names a process that is
    not our parent (the variable leaked through an intermediate program).
    """
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return None
    if os.getppid() != parent:
        return None

    def run():
        while os.getppid() == parent:
            time.sleep(interval_s)
        logging.getLogger("erpo_mega.lifeline").warning("parent process %d is gone; exiting", parent)
        if on_orphaned is not None:
            on_orphaned()
        os.kill(os.getpid(), signal.SIGKILL)

    t = threading.Thread(target=run, name="parent-watchdog", daemon=True)
    t.start()
    return t
