"""Trainable-only train checkpoints: small, exact to resume, and tied to their backbone.

Runs the launcher in this process (`train.main`, tiny quickstart model):

1. a full fine-tuning run, whose own train checkpoint then serves as
   `INITIAL_CHECKPOINT_PATH` (the launcher's checkpoints are accepted as a backbone);
2. HyperPrompt with `TRAINABLE_PATTERNS=['hyperprompt/.*']` on that backbone,
   uninterrupted to step 6, and the same run stopped at step 3 and resumed to 6.

The resumed losses equal the uninterrupted ones; the checkpoints hold no frozen
parameter; a changed or missing backbone stops the resume with one line before the
train step is compiled.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

BASE = [
    "--gin_file=quickstart.gin",
    "--gin.LOG_PERIOD=1",
    "--gin.BATCH_SIZE=8",
    "--gin.train.eval_dataset_cfg=None",
]


def _train(capsys, model_dir, steps, *flags) -> tuple[int, str]:
    from hyperprompt_jax import train

    code = train.main(
        [*BASE, f"--gin.MODEL_DIR={model_dir!r}", f"--gin.TRAIN_STEPS={steps}", *flags]
    )
    return code, capsys.readouterr().err


def _losses(model_dir) -> dict:
    out = {}
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def _bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def test_trainable_only_checkpoints(tmp_path, capsys, monkeypatch):
    from hyperprompt_jax import checkpoints
    from hyperprompt_jax import trainer as trainer_lib
    from hyperprompt_jax.checkpoints import orbax_source

    backbone = str(tmp_path / "backbone")
    assert _train(capsys, backbone, 2, "--gin.SAVE_PERIOD=1")[0] == 0
    tuned = [
        "--gin.SAVE_PERIOD=3",
        f"--gin.INITIAL_CHECKPOINT_PATH={backbone!r}",
        "--gin.TRAINABLE_PATTERNS=['hyperprompt/.*']",
    ]
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    assert _train(capsys, reference, 6, *tuned)[0] == 0
    assert _train(capsys, resumed, 3, *tuned)[0] == 0
    code, err = _train(capsys, resumed, 6, *tuned)
    assert code == 0, err
    assert f"Resuming from {resumed}/checkpoint_3." in err

    # Exact resume: the losses after the restart equal the uninterrupted run's.
    ref_losses, res_losses = _losses(reference), _losses(resumed)
    assert sorted(res_losses) == list(range(1, 7))
    for step in range(1, 7):
        assert res_losses[step] == pytest.approx(ref_losses[step], rel=1e-6, abs=1e-6), step

    # The checkpoint holds the trained tree, the optimizer state and the step only, plus
    # a backbone reference; it is a fraction of the backbone's size.
    step_dir = os.path.join(resumed, "checkpoint_6")
    stored = orbax_source.item_tree_shapes(os.path.join(step_dir, "default"))
    assert {p[0] for p in stored} == {"step", "trainable", "opt_state"}
    assert all(p[1] == "hyperprompt" for p in stored if p[0] == "trainable")
    meta = checkpoints.backbone.read_step_metadata(step_dir)
    assert meta["format"] == "trainable-only" and meta["backbone"]["path"] == backbone
    assert _bytes(step_dir) < 0.25 * _bytes(os.path.join(backbone, "checkpoint_2"))

    # Parameters of the checkpoint (as eval / export / a later INITIAL_CHECKPOINT_PATH
    # read them): the trained tree from it, everything else from the backbone.
    _, _, source = checkpoints.open_weights(resumed)
    params = checkpoints.gathered(source)
    backbone_params = checkpoints.gathered(checkpoints.open_weights(backbone)[2])
    assert set(params) == set(backbone_params)
    for name, value in params.items():
        if name.startswith("hyperprompt/"):
            continue
        np.testing.assert_array_equal(value, backbone_params[name], err_msg=name)
    assert any(
        not np.array_equal(params[n], backbone_params[n])
        for n in params
        if n.startswith("hyperprompt/")
    )

    # Export merges the trained tree with the backbone: t5x (everything) and HF (backbone).
    from hyperprompt_jax import export as export_lib

    out = export_lib.export(resumed, str(tmp_path / "t5x"), str(tmp_path / "hf"))
    t5x_params = checkpoints.flatten_params(checkpoints.load_t5x_checkpoint(out["t5x"]))
    assert t5x_params.keys() == params.keys()
    for name, value in params.items():
        np.testing.assert_array_equal(t5x_params[name], value, err_msg=name)
    _, hf_params = checkpoints.load_hf_t5(out["hf"])
    hf_params = checkpoints.flatten_params(hf_params)
    assert set(hf_params) == {n for n in params if not n.startswith("hyperprompt/")}
    for name, value in hf_params.items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    assert set(np.load(os.path.join(out["hf"], "method_params.npz"))) == set(out["method_params"])

    # A changed backbone, then a missing one: one line, before any compilation.
    def never(*args, **kwargs):
        raise AssertionError("the train step was built before the backbone was checked")

    monkeypatch.setattr(trainer_lib.Trainer, "_jitted_train_step", never)
    # The backbone directory's newest checkpoint is now step 1's: other values.
    shutil.rmtree(os.path.join(backbone, "checkpoint_2"))
    code, err = _train(capsys, resumed, 8, *tuned)
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "has changed since" in error_lines[0], err[-2000:]
    assert backbone in error_lines[0]
    shutil.rmtree(backbone)
    code, err = _train(capsys, resumed, 8, *tuned)
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "cannot be loaded" in error_lines[0], err[-2000:]
