"""`python -m hyperprompt_jax.train`, plus a record of the rows every train step consumed.

`tests/test_multihost.py` starts this script instead of the launcher so that it can
check which examples each process fed into each step. It changes nothing about
training: it wraps `Trainer.train_step` to note, before the real step runs,

* the step number (the state's `step`, i.e. the update about to be applied), and
* for every global batch row held by this process's devices, a hash of the row's
  features (the addressable shards of the global arrays built by the launcher, so
  it sees exactly what `jax.make_array_from_process_local_data` placed where).

Environment (everything else, flags and `JAX_*` variables, goes to the launcher):
  HP_TEST_BATCH_LOG: path prefix; process p appends one JSON line per step to
    `<prefix>.<p>.jsonl`: `{"step": s, "rows": {"<global row>": "<hash>", ...}}`.
  HP_TEST_PAUSE_AT_STEP: N; before applying update N+1 the process writes
    `<prefix>.<p>.paused` and sleeps until it is killed. This puts the test's SIGKILL
    deterministically mid-run, after the checkpoints the test waits for.
  HP_TEST_STEP_SECONDS: sleep this long before every step (a slow run that a test can
    send SIGTERM to mid-run).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

from hyperprompt_jax import train
from hyperprompt_jax import trainer as trainer_lib


def row_hashes(batch: Mapping[str, jax.Array]) -> dict[int, str]:
    """`{global row: hash of its features}` for the rows on this process's devices."""
    rows: dict[int, dict[str, bytes]] = {}
    for name in sorted(batch):
        for shard in batch[name].addressable_shards:
            start = shard.index[0].start or 0
            data = np.asarray(shard.data)
            for offset, row in enumerate(data):
                # Devices along `model` hold copies of the same rows: keep one.
                rows.setdefault(start + offset, {})[name] = row.tobytes()
    out = {}
    for index, features in rows.items():
        digest = hashlib.sha256()
        for name in sorted(features):
            digest.update(name.encode() + b"\0" + features[name])
        out[index] = digest.hexdigest()[:20]
    return out


def install_recorder(prefix: str, pause_at: int | None, step_seconds: float = 0.0) -> None:
    """Wraps `Trainer.train_step` to log row hashes (and pause at `pause_at`)."""
    original = trainer_lib.Trainer.train_step

    def recording_train_step(self: Any, state: Any, batch: Mapping[str, jax.Array]):
        step = int(jax.device_get(state.step))
        path = f"{prefix}.{jax.process_index()}"
        if pause_at is not None and step >= pause_at:
            with open(path + ".paused", "w") as f:
                f.write(str(step))
            while True:  # Until the test kills this process.
                time.sleep(1)
        time.sleep(step_seconds)
        record = {"step": step, "rows": {str(k): v for k, v in row_hashes(batch).items()}}
        with open(path + ".jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return original(self, state, batch)

    trainer_lib.Trainer.train_step = recording_train_step


def main() -> int:
    prefix = os.environ.get("HP_TEST_BATCH_LOG")
    pause = os.environ.get("HP_TEST_PAUSE_AT_STEP")
    if prefix:
        seconds = float(os.environ.get("HP_TEST_STEP_SECONDS", "0"))
        install_recorder(prefix, int(pause) if pause else None, seconds)
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
