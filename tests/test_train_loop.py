"""The training loop's run-level behaviour: early stopping, the best-checkpoint rule,
a full disk, and decoding options in the predict-step cache.

Early stopping runs the quickstart in-process with a zero learning rate, so every
evaluation scores exactly the same: the first is a new best and each later one is not,
which fixes the step the run must stop at whatever the model learns.
"""

from __future__ import annotations

import errno
import json
import os

import jax
import numpy as np
import pytest

from hyperprompt_jax import checkpoints, evaluation, optim, partitioning, train
from hyperprompt_jax import trainer as trainer_lib
from tests.test_train import SHAPES, make_batch, tiny_model

QUICK = [
    "--gin_file=quickstart.gin",
    "--gin.BATCH_SIZE=8",
    "--gin.LOG_PERIOD=1",
    "--gin.EVAL_NUM_EXAMPLES=8",
]


def steps_in(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


# ---------------------------------------------------------------------------------------
# The best-checkpoint rule and the patience count
# ---------------------------------------------------------------------------------------


def test_best_score_is_the_mean_of_non_loss_metrics():
    metrics = {"accuracy": 80.0, "f1": 60.0, "loss": 2.5, "perplexity": 9.0, "error_rate": 3.0}
    assert evaluation.best_score(metrics) == pytest.approx(70.0)
    assert evaluation.best_score_name(metrics) == "mean(accuracy, f1)"
    assert evaluation.best_score({"accuracy": 55.0}) == 55.0
    assert np.isnan(evaluation.best_score({"loss": 1.0}))


def test_patience_counts_evaluations_without_a_new_best_of_any_task():
    records = [
        {"step": 10, "task": "a", "accuracy": 50.0},
        {"step": 10, "task": "b", "accuracy": 40.0},
        {"step": 20, "task": "a", "accuracy": 49.0},  # no task improves
        {"step": 20, "task": "b", "accuracy": 40.0},
        {"step": 30, "task": "a", "accuracy": 48.0},  # b improves: reset
        {"step": 30, "task": "b", "accuracy": 41.0, "loss": 0.1},
        {"step": 40, "task": "a", "accuracy": 50.0},  # ties are not new bests
        {"step": 40, "task": "b", "accuracy": 41.0},
    ]
    history = train._EvalHistory(records)
    assert history.since_best == 1
    assert history.best == {"a": 50.0, "b": 41.0}
    assert sorted(history.by_step) == [10, 20, 30, 40]


def test_early_stopping_stops_and_a_rerun_does_not_train_again(tmp_path, capsys):
    model_dir = tmp_path / "model"
    argv = [
        *QUICK,
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.TRAIN_STEPS=20",
        "--gin.EVAL_PERIOD=1",
        "--gin.SAVE_PERIOD=100",
        "--gin.EARLY_STOPPING_PATIENCE=2",
        "--gin.LEARNING_RATE=0.0",
    ]
    assert train.main(argv) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "Early stopping at step 3: no new best score in 2 evaluations" in err
    assert sorted(set(steps_in(model_dir / "eval_metrics.jsonl"))) == [1, 2, 3]
    assert steps_in(model_dir / "train_metrics.jsonl") == [1, 2, 3]
    assert {p for p in os.listdir(model_dir) if p.startswith("checkpoint_")} == {
        "checkpoint_1",  # every task's best
        "checkpoint_3",  # where it stopped
    }
    # The same command again: the count is read back, nothing is trained or appended.
    before = {p: (model_dir / p).read_bytes() for p in os.listdir(model_dir) if "." in p}
    assert train.main(argv) == 0
    assert "Early stopping (before step 3)" in capsys.readouterr().err
    assert {p: (model_dir / p).read_bytes() for p in os.listdir(model_dir) if "." in p} == before


# ---------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------


def test_disk_full_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    real_save = checkpoints.Checkpointer.save

    def save(self, step, state, force=False):
        if step < 2:
            return real_save(self, step, state, force)
        os.makedirs(model_dir / f"checkpoint_{step}.orbax-checkpoint-tmp-1795984294")
        raise OSError(errno.ENOSPC, "No space left on device", str(model_dir))

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save)
    code = train.main(
        [
            *QUICK,
            f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TRAIN_STEPS=4",
            "--gin.SAVE_PERIOD=1",
            "--gin.train.eval_dataset_cfg=None",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "No space left on device while writing to" in lines[0]
    assert "the newest complete checkpoint is checkpoint_1" in lines[0]
    assert sorted(os.listdir(model_dir)) == sorted(
        p for p in os.listdir(model_dir) if "orbax-checkpoint-tmp" not in p
    )
    assert "checkpoint_1" in os.listdir(model_dir) and "RUN_LOCK" not in os.listdir(model_dir)


# ---------------------------------------------------------------------------------------
# Decoding options are part of the compiled predict step
# ---------------------------------------------------------------------------------------


def _trainer():
    from hyperprompt_jax import decoding

    model = tiny_model()
    model.decode_fn = decoding.temperature_sample  # greedy (topk=1); takes max_decode_steps
    return trainer_lib.Trainer(
        model,
        optim.adafactor,
        optim.create_learning_rate_scheduler("constant", 0.1),
        partitioning.Partitioner(),
        SHAPES,
    )


def test_predict_step_recompiles_for_other_decoding_options():
    trainer = _trainer()
    params = trainer.init_state().params
    batch = {k: jax.numpy.asarray(v) for k, v in make_batch(0).items()}
    full = np.asarray(trainer.predict_step(params, batch))
    one = np.asarray(trainer.predict_step(params, batch, {"max_decode_steps": 1}))
    # The reference: a fresh trainer whose first call uses the options.
    fresh = _trainer()
    expected = np.asarray(fresh.predict_step(params, batch, {"max_decode_steps": 1}))
    np.testing.assert_array_equal(one, expected)
    assert (one[:, 1:] == 0).all() and (full[:, 1:] != 0).any()
    np.testing.assert_array_equal(np.asarray(trainer.predict_step(params, batch)), full)
