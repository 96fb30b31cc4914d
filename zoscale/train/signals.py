"""Stopping well: a preemption signal ends the run at a step boundary with a checkpoint, and a rank
whose launcher died ends at once instead of training on as an orphan.

SIGTERM is what torchrun, the deepspeed launcher, SLURM and Kubernetes send before they kill;
SIGUSR1 is what SLURM sends ahead of a time limit (`sbatch --signal=B:USR1@180`, passed on by the
launch/ scripts as SIGTERM); SIGINT is Ctrl-C (a second one interrupts at once). The handler only
records the signal: the loop finishes the step it is in, all ranks agree (one all-reduce), write a
checkpoint and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, a checkpoint written; resume to go on
EXIT_ORPHANED = 70  # the launcher died: this rank stopped without writing anything
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_WITH_PARENT = "ZOSCALE_EXIT_WITH_PARENT"  # set by a parent that starts runs (zoscale compare)


class StopRequest:
    """Records the first stop signal; repeated signals (a launcher and SLURM both forward one) change nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: now, without the checkpoint
        if self.received is None:
            self.received = signum
            print(f"zoscale: {signal.Signals(signum).name} received: stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


def exit_when_the_launcher_dies(poll_s: float = 1.0) -> None:
    """Under a launcher (torchrun, deepspeed, accelerate set LOCAL_RANK) or a parent that asks for it
    (``ZOSCALE_EXIT_WITH_PARENT``: zoscale compare), a daemon thread ends this process once it is
    re-parented: the launcher was killed and can no longer end it."""
    if "LOCAL_RANK" not in os.environ and not os.environ.get(EXIT_WITH_PARENT):
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        who = f"rank {os.environ['RANK']}: its launcher" if "RANK" in os.environ else "its parent (zoscale compare)"
        print(f"zoscale: error: {who} (pid {launcher}) died; exiting without writing anything", file=sys.stderr,
              flush=True)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="zoscale-launcher-watch", daemon=True).start()
