"""How the consumer stops on SIGTERM/SIGINT (kept light: the CLI installs it before importing the rest)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

__all__ = ["StopSignals"]

logger = logging.getLogger("streamem_connectors.kafka.pipeline")  # the name these lines have always been logged under


class StopSignals:
    """Set by SIGTERM/SIGINT: the loop finishes its batch, flushes, checkpoints, commits, exits 0.

    A repeated SIGTERM changes nothing; a second SIGINT raises KeyboardInterrupt (abort, no final checkpoint).
    Installed from the very start of `streamem run`, so a signal during start-up (topics being
    created, the model process starting) stops the consumer as cleanly as one later."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event if event is not None else threading.Event()
        self._installed = False

    @contextlib.contextmanager
    def on_signals(self):
        if self._installed or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum, _frame):
            name = signal.Signals(signum).name
            if not self.event.is_set():
                self.event.set()  # before logging: a signal arriving while this one logs is then a repeat
                logger.info("signal %s: finishing the current batch, then stopping", name)
            elif signum == signal.SIGINT:  # a second Ctrl-C: a person wants out now (the CLI says so in a line)
                raise KeyboardInterrupt
            else:  # GNU timeout signals the process, then its whole group: a repeated SIGTERM is no abort
                logger.info("signal %s again: still finishing the current batch", name)

        for sig in previous:
            signal.signal(sig, handle)
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)
