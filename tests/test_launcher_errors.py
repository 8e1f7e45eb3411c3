"""Bad input to the launcher ends with one helpful line (exit code 1), before any work.

Covers: malformed gin, a misspelt macro or parameter, a gin file that does not exist,
an unknown task (close names suggested), a MODEL_DIR that cannot be written, an
INITIAL_CHECKPOINT_PATH whose shapes do not fit the model, and a non-finite loss
(training stops with a message and the last good checkpoint stays the latest).
The entry point runs in-process (`train.main(argv)`), exactly as `python -m` calls it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hyperprompt_jax import checkpoints, train
from hyperprompt_jax import trainer as trainer_lib

QUICK = [
    "--gin_file=quickstart.gin",
    "--gin.TRAIN_STEPS=4",
    "--gin.SAVE_PERIOD=2",
    "--gin.LOG_PERIOD=1",
    "--gin.BATCH_SIZE=8",
    "--gin.train.eval_dataset_cfg=None",
]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the launcher gets as far as building the train state."""

    def refuse(*args, **kwargs):
        raise AssertionError("the launcher started building the model before failing")

    monkeypatch.setattr(trainer_lib.Trainer, "__init__", refuse)


def run_train(capsys, *argv: str) -> tuple[int, str]:
    code = train.main(list(argv))
    return code, capsys.readouterr().err


def test_malformed_gin_binding(capsys, tmp_path, no_training):
    code, err = run_train(capsys, *QUICK, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=[1,")
    assert code == 1
    assert "error: Invalid gin configuration" in err and "TRAIN_STEPS=[1," in err


def test_malformed_gin_file(capsys, tmp_path, no_training):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'quickstart.gin'\nTRAIN_STEPS = = 3\n")
    code, err = run_train(capsys, f"--gin_file={bad}", f"--gin.MODEL_DIR='{tmp_path}'")
    assert code == 1
    assert "bad.gin" in err and "line 2" in err


def test_misspelt_macro_is_named_with_suggestion(capsys, tmp_path, no_training):
    code, err = run_train(capsys, *QUICK, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPZ=10")
    assert code == 1
    assert "TRAIN_STEPZ" in err and "Did you mean TRAIN_STEPS" in err


def test_unknown_parameter_is_named(capsys, tmp_path, no_training):
    code, err = run_train(
        capsys, *QUICK, f"--gin.MODEL_DIR='{tmp_path}'", "--gin.adafactor.decay_rat=0.5"
    )
    assert code == 1
    assert "decay_rat" in err


def test_unknown_gin_file_suggests_close_names(capsys, tmp_path, no_training):
    code, err = run_train(capsys, "--gin_file=quickstrat.gin", f"--gin.MODEL_DIR='{tmp_path}'")
    assert code == 1
    assert "'quickstrat.gin' not found" in err and "quickstart.gin" in err


def test_unknown_task_suggests_close_names(capsys, tmp_path, no_training):
    code, err = run_train(
        capsys, *QUICK, f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='hp_synthetic_multitsk'",
    )  # fmt: skip
    assert code == 1
    assert "Unknown task or mixture 'hp_synthetic_multitsk'" in err
    assert "hp_synthetic_multitask" in err


def test_unwritable_model_dir_fails_before_training(capsys, tmp_path, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, err = run_train(capsys, *QUICK, f"--gin.MODEL_DIR='{blocker}/model'")
    assert code == 1
    assert f"MODEL_DIR '{blocker}/model' cannot be written" in err


def test_initial_checkpoint_with_wrong_shapes(capsys, tmp_path, monkeypatch):
    # A t5x checkpoint of a T5 with another width: every matrix has the wrong shape.
    import jax

    from hyperprompt_jax import config as config_lib
    from hyperprompt_jax import network

    cfg = config_lib.t5_1_1("small", vocab_size=384, emb_dim=32, num_heads=2, head_dim=16,
                            mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2)  # fmt: skip
    params = jax.device_get(
        network.init_params(network.Transformer(cfg), jax.random.key(0))["params"]
    )
    ckpt = checkpoints.save_t5x_checkpoint(params, str(tmp_path / "other_t5"), 7)

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", pytest.fail)
    model_dir = tmp_path / "model"
    code, err = run_train(
        capsys, *QUICK, f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INITIAL_CHECKPOINT_PATH='{ckpt}'"
    )
    assert code == 1
    assert f"initial checkpoint {ckpt} do not fit the model" in err
    assert "decoder/decoder_norm/scale: expected (64,), found (32,)" in err
    assert "parameter(s) with the wrong shape" in err
    assert not [p for p in os.listdir(model_dir) if p.startswith("checkpoint_")]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(capsys, tmp_path):
    model_dir = tmp_path / "model"
    code, err = run_train(capsys, *QUICK, f"--gin.MODEL_DIR='{model_dir}'")
    assert code == 0, err
    good = sorted(p for p in os.listdir(model_dir) if p.startswith("checkpoint_"))
    assert good == ["checkpoint_2", "checkpoint_4"]

    # Resume with an infinite z-loss coefficient: the first new step's loss is inf.
    code, err = run_train(
        capsys, *QUICK, f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=8", "--gin.Z_LOSS=1e999"
    )  # fmt: skip
    assert code == 1
    assert "Non-finite loss (inf) or update at step 5" in err
    assert "The last good checkpoint" in err and "checkpoint_4" in err
    assert sorted(p for p in os.listdir(model_dir) if p.startswith("checkpoint_")) == good
    with open(model_dir / "train_metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4]
    assert np.isfinite(
        [json.loads(line)["loss"] for line in open(model_dir / "train_metrics.jsonl")]
    ).all()
