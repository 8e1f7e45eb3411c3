"""The shared `main` of `python -m hyperprompt_jax.{train,eval,infer}`.

It does only what every entry point needs: split the t5x-style flags, parse the gin
files (found by relative name from any directory) and bindings, start
`jax.distributed` on multi-process setups, configure logging, and call the entry's
gin-configured function (`train.train`, `eval.evaluate`, `infer.infer`), which does the
real work. Errors a user can fix (bad gin, unknown task, unwritable directory, weights
that do not fit, a non-finite loss) end the run with one line on stderr and exit code
1 instead of a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import socket
import sys
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import gin
from hyperprompt_jax import cli, gin_utils, utils

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
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


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
        raise ValueError(f"JAX_INITIALIZATION_TIMEOUT must be positive, got {timeout}.")
    if not address and len([h for h in hosts.split(",") if h]) <= 1:
        if (num or 1) > 1 or pid:
            # Otherwise every process would silently train alone into the same MODEL_DIR.
            raise ValueError(
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


# Macros read by code (`gin_utils.query_macro`) rather than by a gin binding.
CODE_MACROS = ("TRAINABLE_PATTERNS",)


def _macro_references(value, out: set) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector == "gin.macro":
            out.add(value.scoped_selector.split("/", 1)[0])
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _macro_references(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _macro_references(v, out)


def check_macro_bindings(bindings: Sequence[str]) -> None:
    """Rejects `--gin.NAME=VALUE` for a macro NAME that no binding uses (a typo).

    gin accepts any new macro silently, so `--gin.TRAIN_STEPZ=10` would otherwise be
    ignored. Bindings of configurable parameters (`a.b.c=...`) are checked by gin.

    Raises:
      ValueError: naming the macro and the closest used ones.
    """
    config = gin.config._CONFIG  # noqa: SLF001 (gin has no public listing API)
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    used = set(CODE_MACROS)
    for params in config.values():
        _macro_references(params, used)
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "." in name or "/" in name or name not in defined or name in used:
            continue
        close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"--gin.{name}: no gin binding uses the macro {name}, so it would have no effect.{hint}"
        )


def run(argv: Sequence[str] | None, entry: str, module_name: str) -> int:
    """Parses flags and gin, then calls `module_name.entry()`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    cli.quiet_logging()
    try:
        files, bindings, paths = gin_utils.flags_to_gin(argv)
        if not files:
            raise ValueError(
                "No --gin_file given; e.g. --gin_file=quickstart.gin (the embedded demo)."
            )
        module = importlib.import_module(module_name)
        # Task modules register gin configurables: import them before gin is locked.
        utils.import_task_modules()
        gin_utils.parse_gin(files, bindings, paths)
        check_macro_bindings(bindings)
        initialize_distributed()
        cli.set_process_index(jax.process_index())
        cli.watch_compilation()
        # gin's dynamic registration configures a wrapper, not the module attribute.
        gin.get_configurable(getattr(module, entry))()
    except (ValueError, FloatingPointError) as error:
        print(cli.error_line(error), file=sys.stderr)
        return 1
    return 0
