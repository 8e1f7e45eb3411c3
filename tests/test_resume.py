"""A run killed with SIGKILL between checkpoints resumes as if it had never stopped.

Three runs of `python -m hyperprompt_jax.train --gin_file=quickstart.gin` (tiny T5,
HyperPrompt, synthetic mixture, dropout on, a loss logged every step):

1. uninterrupted, to `STEPS`;
2. the same command, SIGKILLed as soon as a checkpoint after the first one exists;
3. the same command again: it resumes from the newest complete checkpoint.

Every loss logged by runs 2 and 3 equals run 1's loss at the same step, so the data
order, the dropout randomness, the parameters and the optimizer state all continued
exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

STEPS = 60
SAVE_PERIOD = 5


def launcher_env() -> dict:
    """Environment of launcher subprocesses: CPU, and a compilation cache shared by runs."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), "hyperprompt_jax_test_compilation_cache"
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_command(model_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hyperprompt_jax.train",
        "--gin_file=quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={STEPS}",
        f"--gin.SAVE_PERIOD={SAVE_PERIOD}",
        "--gin.KEEP=2",
        "--gin.LOG_PERIOD=1",
        "--gin.BATCH_SIZE=16",
        "--gin.DROPOUT_RATE=0.1",
        "--gin.train.eval_dataset_cfg=None",  # no evaluation
        *extra,
    ]  # fmt: skip


def losses_by_step(model_dir: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def complete_checkpoints(model_dir: str) -> list[int]:
    """Steps of finished checkpoints (orbax renames a checkpoint into place when done)."""
    if not os.path.isdir(model_dir):
        return []
    steps = []
    for name in os.listdir(model_dir):
        prefix, _, number = name.partition("_")
        if prefix == "checkpoint" and number.isdigit():
            steps.append(int(number))
    return sorted(steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    env = launcher_env()
    reference_dir, resumed_dir = str(work / "reference"), str(work / "resumed")

    ref = subprocess.run(
        train_command(reference_dir), cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    victim = subprocess.Popen(
        train_command(resumed_dir), cwd=work, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed_after = None
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        done = complete_checkpoints(resumed_dir)
        if done and done[-1] >= 2 * SAVE_PERIOD:
            victim.send_signal(signal.SIGKILL)
            killed_after = done[-1]
            break
        time.sleep(0.01)
    victim.wait(timeout=60)
    victim.stderr.close()

    resumed = subprocess.run(
        train_command(resumed_dir), cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return dict(
        reference=losses_by_step(reference_dir),
        resumed=losses_by_step(resumed_dir),
        killed_after=killed_after,
        victim_returncode=victim.returncode,
        resumed_stderr=resumed.stderr,
    )


def test_run_was_killed_between_checkpoints(runs):
    assert runs["victim_returncode"] == -signal.SIGKILL
    assert runs["killed_after"] is not None and runs["killed_after"] < STEPS


def test_restart_resumes_from_latest_checkpoint(runs):
    assert "Resuming from" in runs["resumed_stderr"]
    assert sorted(runs["resumed"]) == list(range(1, STEPS + 1))


def test_resumed_losses_equal_uninterrupted_losses(runs):
    reference, resumed = runs["reference"], runs["resumed"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert len({round(v[0], 3) for v in reference.values()}) > STEPS // 2  # really varies
    for step, values in resumed.items():
        # Steps after the last checkpoint were logged twice (before the kill and after
        # the restart): both must match the uninterrupted run.
        for value in values:
            assert value == pytest.approx(reference[step][0], rel=1e-6, abs=1e-6), step
