"""SIGKILL and resume with trainable-only checkpoints: the losses continue exactly.

    python benchmarks/trainable_resume.py [--workdir=/tmp/trainable_resume]

The flow of `tests/test_resume.py` (quickstart HyperPrompt, dropout on, a loss every
step, SIGKILL as soon as the second checkpoint exists, then the same command again),
with `TRAINABLE_PATTERNS=['hyperprompt/.*']`, so every checkpoint is trainable-only
and resume reloads the (seed-initialised) backbone and checks its fingerprint. Prints
the checkpoint sizes and the largest difference between resumed and uninterrupted
losses.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_resume import (  # noqa: E402
    SAVE_PERIOD,
    complete_checkpoints,
    launcher_env,
    losses_by_step,
    train_command,
)

EXTRA = ("--gin.TRAINABLE_PATTERNS=['hyperprompt/.*']",)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/trainable_resume")
    args = parser.parse_args()
    env = launcher_env()
    ref_dir, res_dir = (os.path.join(args.workdir, n) for n in ("reference", "resumed"))
    subprocess.run(train_command(ref_dir, *EXTRA), env=env, check=True, capture_output=True)
    victim = subprocess.Popen(
        train_command(res_dir, *EXTRA), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    killed_after = None
    while victim.poll() is None:
        done = complete_checkpoints(res_dir)
        if done and done[-1] >= 2 * SAVE_PERIOD:
            victim.send_signal(signal.SIGKILL)
            killed_after = done[-1]
            break
        time.sleep(0.01)
    victim.wait()
    resumed = subprocess.run(
        train_command(res_dir, *EXTRA), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, res = losses_by_step(ref_dir), losses_by_step(res_dir)
    diff = max(abs(v - ref[s][0]) for s, vs in res.items() for v in vs)
    last = max(complete_checkpoints(res_dir))
    print(f"killed after checkpoint_{killed_after}; resumed to step {max(res)}")
    print(f"max |resumed - uninterrupted| loss over {len(res)} steps: {diff:.3g}")
    print(f"one checkpoint: {_du(os.path.join(res_dir, f'checkpoint_{last}')):,} bytes; "
          f"MODEL_DIR: {_du(res_dir):,} bytes")  # fmt: skip


if __name__ == "__main__":
    main()
