"""A run killed (SIGKILL) or preempted (SIGTERM) resumes as if it had never stopped.

Four runs of `python -m hyperprompt_jax.train --gin_file=quickstart.gin` (tiny T5,
HyperPrompt, synthetic mixture, dropout on, a loss logged every step):

1. uninterrupted, to `STEPS`;
2. the same command, SIGKILLed as soon as a checkpoint after the first one exists;
3. the same command again: it resumes from the newest complete checkpoint, and gets
   SIGTERM a few steps later: it saves a checkpoint at the step it reached, flushes its
   metrics, says so, and exits with 143;
4. the same command again: it resumes from that step and finishes.

Every loss logged equals run 1's loss at the same step, so the data order, the
dropout randomness, the parameters and the optimizer state all continued exactly; and
`train_metrics.jsonl` holds every step exactly once (records after the checkpoint a
run resumed from are dropped), so it reads as one run.
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

    # Run 3: resumes, then SIGTERM once it has logged steps beyond any the killed run
    # logged (so they are its own, and its handler is installed).
    victim_logged = max(losses_by_step(resumed_dir))
    preempted = subprocess.Popen(
        train_command(resumed_dir), cwd=work, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and preempted.poll() is None:
        if os.path.exists(os.path.join(resumed_dir, "train_metrics.jsonl")):
            logged = sorted(losses_by_step(resumed_dir))
            if logged and logged[-1] >= victim_logged + 2:
                preempted.send_signal(signal.SIGTERM)
                break
        time.sleep(0.01)
    preempted_stderr = preempted.communicate(timeout=120)[1]
    preempted_steps = sorted(losses_by_step(resumed_dir))
    preempted_checkpoints = complete_checkpoints(resumed_dir)

    resumed = subprocess.run(
        train_command(resumed_dir), cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return dict(
        reference=losses_by_step(reference_dir),
        resumed=losses_by_step(resumed_dir),
        killed_after=killed_after,
        victim_returncode=victim.returncode,
        preempted_returncode=preempted.returncode,
        preempted_stderr=preempted_stderr,
        preempted_steps=preempted_steps,
        preempted_checkpoints=preempted_checkpoints,
        resumed_stderr=resumed.stderr,
    )


def test_run_was_killed_between_checkpoints(runs):
    assert runs["victim_returncode"] == -signal.SIGKILL
    assert runs["killed_after"] is not None and runs["killed_after"] < STEPS


def test_sigterm_saves_the_step_reached_and_says_so(runs):
    assert runs["preempted_returncode"] == 143, runs["preempted_stderr"][-3000:]
    stopped = [line for line in runs["preempted_stderr"].splitlines() if "stopped:" in line]
    assert len(stopped) == 1, runs["preempted_stderr"][-3000:]
    step = runs["preempted_steps"][-1]
    assert f"SIGTERM at step {step}/{STEPS}: saved" in stopped[0]
    assert step > runs["killed_after"] and step in runs["preempted_checkpoints"]
    assert runs["preempted_steps"] == list(range(1, step + 1))  # metrics flushed
    assert f"checkpoint_{step}." in runs["resumed_stderr"]  # the next run resumed there


def test_restart_resumes_from_latest_checkpoint(runs):
    assert "Resuming from" in runs["resumed_stderr"]
    assert sorted(runs["resumed"]) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in runs["resumed"].values())  # one record per step


def test_resumed_losses_equal_uninterrupted_losses(runs):
    reference, resumed = runs["reference"], runs["resumed"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert len({round(v[0], 3) for v in reference.values()}) > STEPS // 2  # really varies
    for step, values in resumed.items():
        for value in values:
            assert value == pytest.approx(reference[step][0], rel=1e-6, abs=1e-6), step
