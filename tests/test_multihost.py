"""The launcher under `jax.distributed`: two processes x two CPU devices = one x four.

A TPU pod runs one JAX process per host; here two processes on 127.0.0.1 (gloo CPU
collectives, two fake devices each) stand in for two hosts. All runs train the
quickstart (`quickstart.gin`: tiny T5, HyperPrompt, synthetic mixture, dropout on, a
loss logged every step) through `tests/multihost_worker.py`, which is the launcher
plus a record of the global rows each process fed into each step:

1. reference: one process with four devices, uninterrupted, evaluated at the end;
2. two processes with two devices each, paused (by the worker) after checkpoints
   exist, then SIGKILLed together;
3. the same two commands again: they resume from the newest checkpoint, finish and
   evaluate.

Both layouts read the global batch as `DATA_SHARDS=2` seqio shards (one per process
in 2 and 3; both in 1), so every step sees the same global batch and the same
dropout keys, and the losses agree to float tolerance (the gradient all-reduce adds
in another order). Further tests start processes whose coordinator or peer never
answers, and check in-process which input shards a process reads for the rows its
devices hold (data and model parallelism).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS = 10
SAVE_PERIOD = 3
PAUSE_AT = 7  # The two-process run stops before update 8: checkpoints 3 and 6 exist.
RESUME_FROM = 6
BATCH_SIZE = 16
WAIT = 420  # Seconds any one phase may take before the test gives up (slow shared CPUs).


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, **extra: str) -> dict:
    """A CPU-only environment with `devices` fake devices and a shared compilation cache."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_COMPILATION_CACHE_DIR=os.path.join(
            tempfile.gettempdir(), "hyperprompt_jax_test_compilation_cache"
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        **extra,
    )
    return env


def train_args(model_dir: str) -> list[str]:
    return [
        "--gin_file=quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={STEPS}",
        f"--gin.SAVE_PERIOD={SAVE_PERIOD}",
        "--gin.LOG_PERIOD=1",
        f"--gin.BATCH_SIZE={BATCH_SIZE}",
        "--gin.DATA_SHARDS=2",
        "--gin.DROPOUT_RATE=0.1",
        "--gin.EVAL_PERIOD=None",  # evaluate once, at the end
        "--gin.EVAL_NUM_EXAMPLES=8",
    ]


def tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f"--- {path}:\n" + f.read()[-chars:]


class Group:
    """Launcher processes started together; whatever happens, none outlives the test."""

    def __init__(
        self, work: str, name: str, tag: str, num_processes: int, devices: int, **extra: str
    ):
        """Starts the processes of run `tag` on `MODEL_DIR=<work>/<name>`."""
        self.model_dir = os.path.join(work, name)
        self.logs = [os.path.join(work, f"{tag}.{i}.log") for i in range(num_processes)]
        address = f"127.0.0.1:{free_port()}"
        self.procs = []
        for i in range(num_processes):
            env = child_env(devices, HP_TEST_BATCH_LOG=os.path.join(work, f"{name}.rows"), **extra)
            if num_processes > 1:
                env.update(
                    JAX_COORDINATOR_ADDRESS=address,
                    JAX_NUM_PROCESSES=str(num_processes),
                    JAX_PROCESS_ID=str(i),
                    JAX_INITIALIZATION_TIMEOUT="120",
                )
            with open(self.logs[i], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, WORKER, *train_args(self.model_dir)],
                        cwd=work,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )  # fmt: skip
                )

    def failure(self, what: str) -> str:
        return what + "\n" + "\n".join(tail(p) for p in self.logs)

    def wait(self) -> None:
        deadline = time.time() + WAIT
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(self.failure(f"no exit within {WAIT} s"))
        codes = [p.returncode for p in self.procs]
        assert codes == [0] * len(codes), self.failure(f"exit codes {codes}")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=60)


def complete_checkpoints(model_dir: str) -> list[int]:
    """Steps of finished checkpoints (orbax renames a checkpoint into place when done)."""
    if not os.path.isdir(model_dir):
        return []
    names = [n.split("_", 1) for n in os.listdir(model_dir)]
    return sorted(int(n[1]) for n in names if n[0] == "checkpoint" and n[1:] and n[1].isdigit())


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(model_dir: str) -> dict[int, list[float]]:
    out = collections.defaultdict(list)
    for record in read_jsonl(os.path.join(model_dir, "train_metrics.jsonl")):
        out[record["step"]].append(record["loss"])
    return dict(out)


def rows_by_step(work: str, name: str, process: int) -> dict[int, list[dict[int, str]]]:
    """`{step: [{global row: hash}, ...]}`, one dict per time the process ran the step."""
    out = collections.defaultdict(list)
    for record in read_jsonl(os.path.join(work, f"{name}.rows.{process}.jsonl")):
        out[record["step"]].append({int(k): v for k, v in record["rows"].items()})
    return dict(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("multihost"))
    groups = []
    try:
        # Independent runs, started together: most of their time is single-threaded
        # start-up and compilation, so they share the CPUs well.
        reference = Group(work, "reference", "reference", num_processes=1, devices=4)
        groups.append(reference)
        victim = Group(work, "two", "killed", 2, 2, HP_TEST_PAUSE_AT_STEP=str(PAUSE_AT))
        groups.append(victim)
        reference.wait()
        deadline = time.time() + WAIT
        paused = [os.path.join(work, f"two.rows.{i}.paused") for i in range(2)]
        while not (
            all(map(os.path.exists, paused))
            and RESUME_FROM in complete_checkpoints(victim.model_dir)
        ):
            exited = [p.returncode for p in victim.procs if p.poll() is not None]
            if exited or time.time() > deadline:
                pytest.fail(victim.failure(f"no pause with checkpoint_{RESUME_FROM}: {exited}"))
            time.sleep(0.1)
        victim.kill()
        killed = [p.returncode for p in victim.procs]
        checkpoints_at_kill = complete_checkpoints(victim.model_dir)

        resumed = Group(work, "two", "resumed", 2, 2)  # The same commands and MODEL_DIR.
        groups.append(resumed)
        resumed.wait()
        with open(resumed.logs[0]) as f:
            resumed_log0 = f.read()
        with open(resumed.logs[1]) as f:
            resumed_log1 = f.read()
    finally:
        for group in groups:
            group.kill()
    return dict(
        work=work,
        reference_dir=reference.model_dir,
        two_dir=victim.model_dir,
        killed=killed,
        checkpoints_at_kill=checkpoints_at_kill,
        resumed_logs=(resumed_log0, resumed_log1),
    )


def test_two_processes_give_the_losses_of_one(runs):
    reference, two = losses(runs["reference_dir"]), losses(runs["two_dir"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in reference.values())
    assert len({round(v[0], 2) for v in reference.values()}) == STEPS  # really trains
    # Steps 1..7 come from the killed run, 7..10 from the resumed one (7 twice).
    assert sorted(two) == list(range(1, STEPS + 1))
    measured = [(s, reference[s][0], v) for s in sorted(two) for v in two[s]]
    print("step, one process x 4 devices, two processes x 2 devices:")
    for step, ref, value in measured:
        print(f"{step:3d} {ref:.6f} {value:.6f} rel.diff {abs(value - ref) / ref:.1e}")
    np.testing.assert_allclose(
        [v for _, _, v in measured], [r for _, r, _ in measured], rtol=1e-5, atol=0
    )


def test_killed_processes_resume_from_the_checkpoint(runs):
    assert runs["killed"] == [-signal.SIGKILL, -signal.SIGKILL]
    assert max(runs["checkpoints_at_kill"]) == RESUME_FROM
    for log in runs["resumed_logs"]:
        assert f"Resuming from {runs['two_dir']}/checkpoint_{RESUME_FROM}." in log
    # Update 7 ran before the kill and, from checkpoint_6, again after the restart; the
    # records after checkpoint_6 were dropped on resume, so every step is logged once.
    # (the row log keys an update by the state's step before it: update 7 is step 6).
    assert len(rows_by_step(runs["work"], "two", 0)[PAUSE_AT - 1]) == 2
    two = losses(runs["two_dir"])
    assert all(len(two[s]) == 1 for s in range(1, STEPS + 1))
    assert complete_checkpoints(runs["two_dir"])[-1] == STEPS


def test_sigterm_on_one_host_saves_the_same_step_on_all(tmp_path):
    """A preemption notice on one host: every host saves the same step and stops."""
    work = str(tmp_path)
    group = Group(work, "term", "term", 2, 2, HP_TEST_STEP_SECONDS="0.5")
    try:
        rows = os.path.join(work, "term.rows.1.jsonl")
        deadline = time.time() + WAIT
        while not (os.path.exists(rows) and len(read_jsonl(rows)) >= 2):
            exited = [p.returncode for p in group.procs if p.poll() is not None]
            if exited or time.time() > deadline:
                pytest.fail(group.failure(f"no training steps: {exited}"))
            time.sleep(0.05)
        group.procs[1].send_signal(signal.SIGTERM)  # Only process 1 is told.
        for proc in group.procs:
            proc.wait(timeout=WAIT)
        codes = [p.returncode for p in group.procs]
        assert codes == [143, 143], group.failure(f"exit codes {codes}")
        stopped = []
        for log in group.logs:
            with open(log) as f:
                stopped += [line for line in f if line.startswith("stopped:")]
        assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
        step = int(stopped[0].split(" at step ")[1].split("/")[0])
        assert 2 <= step < STEPS
        assert complete_checkpoints(group.model_dir)[-1] == step
        assert sorted(losses(group.model_dir)) == list(range(1, step + 1))
    finally:
        group.kill()


def test_every_global_example_is_seen_once_per_step(runs):
    work = runs["work"]
    reference = rows_by_step(work, "reference", 0)
    per_process = [rows_by_step(work, "two", p) for p in range(2)]
    assert sorted(reference) == list(range(STEPS))  # `step` = updates applied before
    for process in per_process:
        assert sorted(process) == list(range(STEPS))
    for step in range(STEPS):
        expected = reference[step][0]
        assert sorted(expected) == list(range(BATCH_SIZE))
        # Distinct examples (hash of all features, task id included) fill the batch.
        assert len(set(expected.values())) == BATCH_SIZE, step
        # Before the kill and after the restart alike, each process holds half the rows
        # and together they hold exactly the reference's global batch, row for row.
        for first, second in zip(per_process[0][step], per_process[1][step], strict=True):
            assert set(first).isdisjoint(second), step
            assert len(first) == len(second) == BATCH_SIZE // 2, step
            assert {**first, **second} == expected, step


def test_only_process_0_writes_metrics_and_progress(runs):
    for name in ("train_metrics.jsonl", "eval_metrics.jsonl", "config.gin"):
        assert os.path.exists(os.path.join(runs["two_dir"], name)), name
    log0, log1 = runs["resumed_logs"]
    assert f"step {STEPS}/{STEPS} | loss" in log0
    assert "| loss" not in log1 and "Per-task scores" not in log1


def test_evaluation_gathers_predictions_of_all_processes(runs):
    def final_eval(model_dir):
        records = read_jsonl(os.path.join(model_dir, "eval_metrics.jsonl"))
        return {r["task"]: r for r in records if r["step"] == STEPS}

    reference, two = final_eval(runs["reference_dir"]), final_eval(runs["two_dir"])
    assert sorted(reference) == [f"hp_synthetic_{n}" for n in ("first", "last", "max", "min")]
    assert two == reference


def test_missing_coordinator_or_peer_fails_with_a_clear_message(tmp_path):
    """No hang: process 1 finds nobody at the coordinator address; process 0 (the
    coordinator) waits for a process 1 that never comes. Both stop after
    JAX_INITIALIZATION_TIMEOUT with one clear line and exit code 1, before training."""
    ports = {pid: free_port() for pid in (1, 0)}  # Closed again: nobody listens there.
    procs = {}
    try:
        for pid, port in ports.items():
            env = child_env(
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(pid),
                JAX_INITIALIZATION_TIMEOUT="5",
            )
            command = [sys.executable, "-m", "hyperprompt_jax.train"]
            procs[pid] = subprocess.Popen(
                [*command, *train_args(str(tmp_path / f"m{pid}"))],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        stderr = {pid: proc.communicate(timeout=WAIT)[1] for pid, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    expected = {
        1: f"error: process 1 could not reach the JAX coordinator at 127.0.0.1:{ports[1]} "
        "within 5 s: nothing accepts connections there.",
        0: f"error: not all 2 processes joined the JAX coordinator at 127.0.0.1:{ports[0]} "
        "within 5 s (process 0 did).",
    }
    for pid, proc in procs.items():
        assert proc.returncode == 1, stderr[pid][-3000:]
        assert expected[pid] in stderr[pid], stderr[pid][-3000:]
        assert "JAX_PROCESS_ID" in stderr[pid]  # ... and says how to set the processes up.
        assert not os.path.exists(tmp_path / f"m{pid}" / "train_metrics.jsonl")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS is not"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_PROCESS_ID": "one"}, "must be an integer"),
    ],
)
def test_inconsistent_process_settings_are_rejected(monkeypatch, env, message):
    from hyperprompt_jax import launch

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        launch.initialize_distributed()


class _Rows:
    """Stands in for a partitioner: this process's devices hold `slices` of the batch."""

    def __init__(self, *slices: tuple[int, int]):
        self.slices = slices

    def batch_sharding(self, ndim):
        return self

    def addressable_devices_indices_map(self, shape):
        return {device: (slice(*rows),) for device, rows in enumerate(self.slices)}


@pytest.mark.parametrize(
    "held, data_shards, expected",
    [
        # Data parallelism, process 1 of 2 (two devices): t5x's one shard per host, or
        # DATA_SHARDS=4 for data that does not depend on the number of hosts.
        ([(8, 12), (12, 16)], None, (2, [1])),
        ([(8, 12), (12, 16)], 4, (4, [2, 3])),
        # Model parallelism across hosts: both devices hold every row; so does the
        # other host, which therefore reads the same shards.
        ([(0, 16), (0, 16)], None, (1, [0])),
        ([(0, 16), (0, 16)], 2, (2, [0, 1])),
        # Rows in two blocks: local rows map to them in ascending order.
        ([(12, 16), (4, 8)], 4, (4, [1, 3])),
    ],
)
def test_each_process_reads_the_shards_of_the_rows_it_holds(held, data_shards, expected):
    from hyperprompt_jax import data as data_lib

    cfg = data_lib.DatasetConfig("hp_synthetic_multitask", {"inputs": 9, "targets": 2}, "train", 16)
    cfg.num_shards = data_shards
    assert data_lib.input_shards(cfg, _Rows(*held)) == expected


def test_data_shards_must_fit_the_batch_and_the_rows_held():
    from hyperprompt_jax import data as data_lib

    lengths = {"inputs": 9, "targets": 2}
    with pytest.raises(ValueError, match="DATA_SHARDS must be a positive int dividing"):
        data_lib.DatasetConfig("hp_synthetic_multitask", lengths, "train", 16, num_shards=3)
    cfg = data_lib.DatasetConfig("hp_synthetic_multitask", lengths, "train", 16, num_shards=1)
    with pytest.raises(ValueError, match="holds 8 rows; use a multiple of 2"):
        data_lib.input_shards(cfg, _Rows((8, 16)))
