"""The model directory of a run: write check, run lock, atomic writes, resumable records.

* `ensure_writable_dir`: creates the directory and writes a probe file before any work.
* `RunLock`: one run per `MODEL_DIR`. Process 0 creates `RUN_LOCK` (pid, host, start
  time) atomically and touches it every `HEARTBEAT_SECONDS`; a second run finds it and
  stops at once with a line naming the holder. A lock is stale, and taken over with a
  warning, when its process is gone (same host) or its heartbeat is older than
  `STALE_SECONDS` (another host, or a frozen machine), so a crashed run never leaves
  its directory locked for good. All processes of a multi-host run learn the outcome.
* `truncate_records`: on resume from step S, drops `train_metrics.jsonl` and
  `eval_metrics.jsonl` records after S (written by a run that stopped before its next
  checkpoint), so the redone steps are not recorded twice and the files read as one run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

LOCK_FILE = "RUN_LOCK"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0
RECORD_FILES = ("train_metrics.jsonl", "eval_metrics.jsonl")


def ensure_writable_dir(path: str, name: str = "MODEL_DIR") -> str:
    """Creates `path` and checks that a file can be written there (before any work).

    Raises:
      UserError: naming the directory and the operating-system error.
    """
    if not path:
        raise UserError(f"{name} is not set; pass --gin.{name}=\"'/path/to/dir'\".")
    probe = os.path.join(path, f".write_test_{jax.process_index()}")
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise UserError(f"{name} {path!r} cannot be written: {e}") from e
    return path


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` (local or GCS), replacing it atomically on local disks."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


# -------------------------------------------------------------------------------------
# The run lock
# -------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by someone else.
        return True
    return True


class RunLock:
    """`MODEL_DIR/RUN_LOCK`, held by process 0 while a run uses the directory.

    Use as a context manager around the run, or call `acquire` / `release`.

    Args:
      model_dir: the run's directory (local or an object store such as gs://).
      what: the run's kind, shown to a second run (e.g. "train").
    """

    def __init__(self, model_dir: str, what: str = "train"):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.what = what
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "what": what,
        }

    # -- reading -----------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """`(record, seconds since the last heartbeat)`, or None if there is no lock."""
        try:
            with tf.io.gfile.GFile(self.path) as f:
                text = f.read()
            mtime = tf.io.gfile.stat(self.path).mtime_nsec / 1e9
        except (tf.errors.NotFoundError, FileNotFoundError):
            return None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError(text)
        except ValueError:  # Half-written by a process killed mid-write: stale.
            record = {}
        return record, max(time.time() - mtime, 0.0)

    def _stale_reason(self, record: dict[str, Any], age: float) -> str | None:
        pid, host = record.get("pid"), record.get("host")
        if not isinstance(pid, int) or not host:
            return "it is unreadable"
        if host == socket.gethostname() and not _pid_alive(pid):
            return f"process {pid} on {host} no longer exists"
        if age > STALE_SECONDS:
            return f"its heartbeat is {age:.0f} s old (process {pid} on {host})"
        return None

    # -- holding -----------------------------------------------------------------------

    def _try_create(self) -> bool:
        text = json.dumps(self._record)
        if "://" in self.path:  # Object stores have no exclusive create: check, then write.
            if tf.io.gfile.exists(self.path):
                return False
            with tf.io.gfile.GFile(self.path, "w") as f:
                f.write(text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _acquire_local(self) -> str | None:
        """Takes the lock on this process; returns why not (None: taken)."""
        for _ in range(3):
            if self._try_create():
                return None
            found = self._read()
            if found is None:
                continue  # Released in between: try again.
            record, age = found
            reason = self._stale_reason(record, age)
            if reason is None:
                started = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0))
                )
                return (
                    f"MODEL_DIR {self.model_dir} is in use by another {record.get('what', 'run')}"
                    f" (process {record['pid']} on {record['host']}, started {started}, "
                    f"heartbeat {age:.0f} s ago). Wait for it to finish, stop it, or use "
                    f"another MODEL_DIR. If no run uses it, delete {self.path}."
                )
            logger.warning("Taking over the stale lock %s: %s.", self.path, reason)
            try:
                tf.io.gfile.remove(self.path)
            except (tf.errors.NotFoundError, FileNotFoundError):
                pass
        return f"MODEL_DIR {self.model_dir}: could not take the lock {self.path}."

    def acquire(self) -> RunLock:
        """Takes the lock (process 0) and tells every process whether it may run.

        Raises:
          UserError: another live run holds the lock.
        """
        reason = self._acquire_local() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.int32(reason is None))
            if not int(ok) and reason is None:
                reason = f"MODEL_DIR {self.model_dir} is in use (see process 0's message)."
        if reason is not None:
            raise UserError(reason)
        if jax.process_index() == 0:
            self.held = True
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._heartbeat, name="model-dir-lock", daemon=True
            )
            self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if "://" in self.path:
                    with tf.io.gfile.GFile(self.path, "w") as f:
                        f.write(json.dumps(self._record))
                else:
                    os.utime(self.path)
            except (OSError, tf.errors.OpError) as e:  # Keep training; say it once.
                logger.warning("Could not refresh the lock %s: %s", self.path, e)
                return

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if this process holds it."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        found = self._read()
        if (
            found is not None
            and found[0].get("pid") == self._record["pid"]
            and (found[0].get("started") == self._record["started"])
        ):
            try:
                tf.io.gfile.remove(self.path)
            except (tf.errors.NotFoundError, FileNotFoundError):
                pass
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -------------------------------------------------------------------------------------
# Records after a resume
# -------------------------------------------------------------------------------------


def read_records(model_dir: str, name: str) -> list[dict[str, Any]]:
    """The JSON records of `model_dir/name` (empty if the file does not exist)."""
    path = os.path.join(model_dir, name)
    if not tf.io.gfile.exists(path):
        return []
    out = []
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # A line cut by a kill mid-write.
                    continue
    return out


def truncate_records(model_dir: str, step: int) -> int:
    """Drops records after `step` from the run's JSON-lines files (process 0).

    Called when a run resumes from `checkpoint_<step>`: records after it come from a run
    that stopped before saving those steps, which this run redoes (with the same
    results). Also drops lines cut short by a kill.

    Returns:
      The number of records dropped.
    """
    if jax.process_index() != 0:
        return 0
    dropped = 0
    for name in RECORD_FILES:
        path = os.path.join(model_dir, name)
        if not tf.io.gfile.exists(path):
            continue
        with tf.io.gfile.GFile(path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            write_text(path, "".join(line + "\n" for line in kept))
    if dropped:
        logger.info(
            "Dropped %d metric record(s) after step %d (written before the restart).",
            dropped,
            step,
        )
    return dropped
