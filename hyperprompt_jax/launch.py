"""The shared `main` of `python -m hyperprompt_jax.{train,eval,infer}`.

It does only what every entry point needs: split the t5x-style flags, parse the gin
files (found by relative name from any directory) and bindings, start
`jax.distributed` on multi-process setups, configure logging, turn on the persistent
compilation cache (`compilation_cache`), and call the entry's
gin-configured function (`train.train`, `eval.evaluate`, `infer.infer`), which does the
real work. `report_errors` is the one place an entry point turns exceptions into exit
codes: a `errors.UserError` (bad gin, unknown task, unwritable directory, weights that
do not fit, a non-finite loss, ...) prints one `error: ...` line and exits 1;
`errors.Preempted` (SIGTERM, state saved) prints its line and exits 143; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import gin
from hyperprompt_jax import cli, compilation_cache, errors, gin_utils
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")


# Seconds `jax.distributed.initialize` may take before the run gives up (JAX's default);
# the environment variable JAX_INITIALIZATION_TIMEOUT overrides it.
DEFAULT_INIT_TIMEOUT = 300


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}.") from None


def _accepts_connections(address: str) -> bool:
    """True if something accepts TCP connections at `address` (`host:port`)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _not_joined_message(address: str | None, num: int | None, pid: int | None, timeout: int) -> str:
    who = f"process {pid}" if pid is not None else "this process"
    where = f"the JAX coordinator at {address}" if address else "the JAX coordinator"
    setup = (
        "Start every process with the same JAX_COORDINATOR_ADDRESS (host:port of process 0) "
        f"and JAX_NUM_PROCESSES{f'={num}' if num else ''}, and a distinct JAX_PROCESS_ID"
        f"{f' in 0..{num - 1}' if num else ''}; JAX_INITIALIZATION_TIMEOUT sets the wait."
    )
    if address and pid != 0 and not _accepts_connections(address):
        return (
            f"{who} could not reach {where} within {timeout} s: nothing accepts "
            "connections there. Start process 0 first, and check the host, the port and the "
            f"firewall. {setup}"
        )
    count = f"all {num} processes" if num else "all processes"
    return f"not {count} joined {where} within {timeout} s ({who} did). {setup}"


def initialize_distributed() -> None:
    """Starts `jax.distributed` when the environment describes several processes.

    Set `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` (or run on a multi-host Cloud TPU slice, where JAX discovers them);
    `JAX_INITIALIZATION_TIMEOUT` (seconds, default 300) bounds the wait for all processes.
    One process on one machine needs nothing.

    Raises:
      ValueError: for non-integer settings, or process settings without a coordinator.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    num = _env_int("JAX_NUM_PROCESSES")
    pid = _env_int("JAX_PROCESS_ID")
    timeout = _env_int("JAX_INITIALIZATION_TIMEOUT") or DEFAULT_INIT_TIMEOUT
    if timeout < 0:
        raise UserError(f"JAX_INITIALIZATION_TIMEOUT must be positive, got {timeout}.")
    if not address and len([h for h in hosts.split(",") if h]) <= 1:
        if (num or 1) > 1 or pid:
            # Otherwise every process would silently train alone into the same MODEL_DIR.
            raise UserError(
                f"JAX_NUM_PROCESSES={num} / JAX_PROCESS_ID={pid} are set but "
                "JAX_COORDINATOR_ADDRESS is not; set it to host:port of process 0."
            )
        return
    logger.info(
        "Joining %s processes through coordinator %s as process %s (waiting up to %d s).",
        num if num is not None else "the",
        address or "(auto-detected)",
        pid if pid is not None else "(auto-detected)",
        timeout,
    )
    # When its deadline passes, JAX aborts the process from C++ (Python cannot catch it)
    # with a misleading "another task died" message. This watchdog ends the process
    # first, with the actual reason; JAX's own deadline is a later backstop.
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(timeout):
            message = _not_joined_message(address, num, pid, timeout)
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, name="jax-distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=address or None,
            num_processes=num,
            process_id=pid,
            initialization_timeout=timeout + 30,
        )
    finally:
        joined.set()
    _connect_cpu_collectives()


def _connect_cpu_collectives() -> None:
    """Connects the processes' CPU collectives (gloo) over all devices, while in step.

    gloo connects a group of devices at the group's first collective and fails if the
    processes arrive more than 30 s apart (fixed in XLA), which a slower start-up or
    compilation on one machine easily causes before the first train step. Right after
    `jax.distributed.initialize` the processes are in step; later collectives over the
    same devices (the data-parallel all-reduce) reuse the connection and wait as long
    as needed. No-op on TPU / GPU and for one process.
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("all")), np.ones(jax.local_device_count(), np.int32)
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
    if int(total) != jax.device_count():
        raise RuntimeError(f"CPU collectives: sum of ones over the devices is {int(total)}.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (it may be replaced, e.g. by tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def setup_logging() -> None:
    """INFO lines with a timestamp on stderr (process 0 only logs progress)."""
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# Moved to gin_utils (count_params and the launchers share it); old name kept.
check_macro_bindings = gin_utils.check_macro_bindings


def report_errors(fn: Callable[[], Any]) -> int:
    """Calls `fn()`; returns the exit code of an entry point.

    A `UserError` (bad flags, gin, files, task names or ids, data) prints one
    `error: ...` line and gives 1; `Preempted` prints its line and gives 143; every
    other exception is a bug and propagates with its traceback.
    """
    try:
        fn()
    except errors.UserError as error:
        _stop_background_errors()
        print(f"error: {errors.message(error)}", file=sys.stderr, flush=True)
        return 1
    except errors.Preempted as stop:
        print(f"stopped: {errors.message(stop)}", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


def _stop_background_errors() -> None:
    """Silences what background threads (orbax's async savers) report after a clear error.

    The error already ended the run; their tracebacks about the interrupted work would
    bury the one line that says what to fix.
    """
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None


def run(argv: Sequence[str] | None, entry: str, module_name: str) -> int:
    """Parses flags and gin, then calls `module_name.entry()`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    cli.quiet_logging()

    def main() -> None:
        files, bindings, paths = gin_utils.flags_to_gin(argv)
        if not files:
            raise UserError(
                "No --gin_file given; e.g. --gin_file=quickstart.gin (the embedded demo)."
            )
        module = importlib.import_module(module_name)
        # Task modules register gin configurables: import them before gin is locked.
        from hyperprompt_jax import data

        data.import_task_modules()
        gin_utils.parse_gin(files, bindings, paths)
        check_macro_bindings(bindings)
        initialize_distributed()
        cli.set_process_index(jax.process_index())
        compilation_cache.enable(compilation_cache.gin_setting())
        cli.watch_compilation()
        # gin's dynamic registration configures a wrapper, not the module attribute.
        gin.get_configurable(getattr(module, entry))()

    return report_errors(main)
