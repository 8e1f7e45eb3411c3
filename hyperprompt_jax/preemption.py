"""SIGTERM (preemption) notice for the training loop: save, then stop, on every host together.

Cloud TPU and most schedulers preempt a job with SIGTERM and a grace period. The loop
asks `PreemptionNotice.reached(step)` after every step; once it is True the loop saves
a checkpoint at that step, flushes its metrics and stops (`errors.Preempted`).

* One process: a Python SIGTERM handler sets a flag; the loop stops after the step in
  flight.
* Several processes: JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches SIGTERM on any host, tells the others through
  the coordination service, and every host agrees on the same step (one past the
  largest step any host had reached); `reached` is True on every host at that step, so
  all of them save the same step together. No collective is added to the steps. If the
  service is off (`jax_enable_preemption_service=False`), a Python handler sets a flag
  and the hosts agree with one small all-reduce per step.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

logger = logging.getLogger("hyperprompt_jax")


def _sync_manager_available() -> bool:
    from jax._src import distributed

    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionNotice:
    """Tells the loop when to save and stop; a context manager around the loop."""

    def __init__(self):
        self.signal_received: int | None = None
        self._previous = None
        self._installed = False
        self._use_sync_manager = jax.process_count() > 1 and _sync_manager_available()

    def _handler(self, signum, frame) -> None:
        del frame
        if self.signal_received is None:
            logger.warning(
                "Received signal %d: saving a checkpoint after the current step, then stopping.",
                signum,
            )
        self.signal_received = signum

    def __enter__(self) -> PreemptionNotice:
        # Python handlers can only be set from the main thread (a loop run from another
        # thread, e.g. a notebook worker, then simply has no preemption notice).
        if not self._use_sync_manager and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def reached(self, step: int) -> bool:
        """True when the run must save at `step` and stop (the same step on every host)."""
        if self._use_sync_manager:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() == 1:
            return self.signal_received is not None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal_received is not None))
        return bool(np.any(flags))
