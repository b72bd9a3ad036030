"""Stopping a run cleanly on a signal: Ctrl-C (SIGINT), a preemption (SIGTERM from Slurm, ``docker stop``,
Kubernetes) or Slurm's warning before a job's time ends (SIGUSR1, ``#SBATCH --signal=USR1@120``).

While training, each of these only asks the run to stop: the step in progress finishes, a checkpoint is written where
the run stands (mid-epoch included, with the sampler's position), and the run ends with :class:`Stopped`, whose exit
code is the shell's convention for the signal (128 + its number: 130, 143, 138). A second Ctrl-C stops at once
(``KeyboardInterrupt``; the checkpoints written so far are kept, writes being atomic).

Loader worker processes leave the signals to the main process (``ignore_stop_signals``): a terminal's Ctrl-C and
Slurm's signals reach the whole process group, and a worker killed by a signal makes the main process fail (PyTorch's
"DataLoader worker is killed by signal") before it can write its checkpoint. A worker ignores SIGINT and SIGUSR1 and
ends quietly (exit status 0) on SIGTERM, which is also how its loader shuts it down; the batches it already prepared
stay readable, enough for the step in progress.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from ssl_cli.errors import SSLError

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Stopped(SSLError):
    """A run stopped by a signal after writing its checkpoint; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """A context in which SIGINT, SIGTERM and SIGUSR1 set :attr:`signum` instead of ending the process.

    The training loop reads :attr:`requested` after each step. Outside the main thread (where Python cannot take
    signals) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def _quiet_exit(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training loaders: the workers leave the stop signals to the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, _quiet_exit if s == getattr(signal, "SIGTERM", None) else signal.SIG_IGN)
