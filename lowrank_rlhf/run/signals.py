"""How a run stops on a signal: Ctrl-C (SIGINT) and SIGTERM (what Colab, spot instances, `timeout` and job
schedulers send before they kill) both finish the PPO step, write a checkpoint and end in `Interrupted`; the CLI
exits with 128 + the signal's number (130, 143), as a shell reports a process killed by it."""

from __future__ import annotations

import signal

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal; a KeyboardInterrupt, so code that handles Ctrl-C handles this too."""

    def __init__(self, signum: int = signal.SIGINT, advice: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.advice = advice or ("no checkpoint was due yet: the run directory keeps the stages that finished; "
                                 "rerun the command to do the stopped stage again")


def raise_interrupted(signum, frame) -> None:
    """A signal handler: unwind like Ctrl-C (finally blocks run: locks released, scratch folders removed)."""
    raise Interrupted(signum)
