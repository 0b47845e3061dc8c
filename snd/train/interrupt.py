"""Ctrl-C during `snd distill`: finish the step, save a checkpoint, stop (exit 130), so a rerun resumes
exactly there instead of at the last periodic checkpoint (up to `--ckpt-every` steps earlier).

Why only one process: under torchrun every rank gets the signal at a different point of its step, and a
rank that stops to save while another waits in the step's all-reduce would hang both; several ranks keep
Ctrl-C's default (stop at once, resume from the last periodic checkpoint). A second Ctrl-C stops at once.
DataLoader workers ignore SIGINT (`ignore_sigint`): a terminal's Ctrl-C reaches the whole process group,
and a worker that died of it would fail the main process before it saves. A process started with SIGINT
ignored (`nohup`, a background job of a non-interactive shell) keeps ignoring it: that is what its caller asked."""
from __future__ import annotations

import signal
import sys
import threading


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers leave Ctrl-C to the main process (which shuts them down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class GracefulInterrupt:
    """While installed, the first SIGINT only sets `requested` (the loop checks it at each step boundary); the
    previous handler is back for a second SIGINT, and after `restore()`."""

    def __init__(self, active: bool):
        self.active = (active and threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        self.requested = False
        self._prev = None

    def _handler(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._prev)
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def install(self) -> "GracefulInterrupt":
        if self.active:
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def restore(self) -> None:
        if self.active and signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, self._prev)
