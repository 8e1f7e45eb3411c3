"""One rule for finding checkpoints; a damaged newest checkpoint never blocks resume.

Real orbax checkpoints (written by `Checkpointer`) and real t5x-format checkpoints are
damaged the ways a disk, a copy or a kill damages them: a deleted or truncated array
file, garbage metadata, an empty `checkpoint_<step>/`, a missing commit marker. Resume
must use the newest intact one, warn naming what it skipped, and keep the damaged one.
"""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import checkpoints
from hyperprompt_jax.checkpoints import discovery
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.trainer import TrainState


def _state(value: float, step: int) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        trainable={"prompt": {"prompt": jnp.full((4, 3), value, jnp.float32)}},
        frozen={"encoder": {"kernel": jnp.full((3, 5), -value, jnp.float32)}},
        opt_state={"v": jnp.full((4, 3), 2 * value, jnp.float32)},
    )


def _abstract():
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0, 0))


def _write_run(model_dir: str, steps=(1, 2)) -> None:
    ckpt = checkpoints.Checkpointer(model_dir)
    for step in steps:
        ckpt.save(step, _state(float(step), step))
    ckpt.close()


def _data_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "default")):
        out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in root + os.sep]
    return sorted(out)


def _delete_one_array_file(step_dir):
    # orbax merges every process's OCDBT data into `default/d/` at the end of a save.
    merged = os.path.join(step_dir, "default", "d")
    os.remove(os.path.join(merged, sorted(os.listdir(merged))[0]))


def _truncate_array_files(step_dir):
    for path in _data_files(step_dir):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])


def _garbage_metadata(step_dir):
    open(os.path.join(step_dir, "default", "_METADATA"), "w").write("\x00garbage{")


def _empty_dir(step_dir):
    import shutil

    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _no_commit_marker(step_dir):
    os.remove(os.path.join(step_dir, checkpoints.COMMIT_MARKER))


DAMAGES = {
    "deleted_array_file": _delete_one_array_file,
    "truncated_array_files": _truncate_array_files,
    "garbage_metadata": _garbage_metadata,
    "empty_dir": _empty_dir,
    "no_commit_marker": _no_commit_marker,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, tmp_path, caplog):
    model_dir = str(tmp_path / "run")
    _write_run(model_dir)
    newest = os.path.join(model_dir, "checkpoint_2")
    DAMAGES[damage](newest)

    ckpt = checkpoints.Checkpointer(model_dir)
    with caplog.at_level(logging.WARNING, logger="hyperprompt_jax"):
        restored = ckpt.restore_latest(_abstract(), check_fits=lambda d, t: None)
    assert restored is not None and restored.step == 1
    np.testing.assert_array_equal(
        restored.state.trainable["prompt"]["prompt"], np.full((4, 3), 1.0)
    )
    np.testing.assert_array_equal(restored.state.opt_state["v"], np.full((4, 3), 2.0))
    # One warning names the skipped checkpoint and says it is kept.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "hyperprompt_jax"
    ]
    assert len(warnings) == 1 and newest in warnings[0] and "not deleted" in warnings[0]
    # Kept (moved out of orbax's view), and the run can write that step again.
    aside = os.path.join(model_dir, "damaged_checkpoint_2")
    assert os.path.isdir(aside)
    assert ckpt.save(2, _state(5.0, 2), force=True)
    ckpt.close()
    assert discovery.damage(newest) is None


def test_every_checkpoint_damaged_starts_fresh_without_deleting(tmp_path):
    model_dir = str(tmp_path / "run")
    _write_run(model_dir, steps=(1,))
    _garbage_metadata(os.path.join(model_dir, "checkpoint_1"))
    ckpt = checkpoints.Checkpointer(model_dir)
    assert ckpt.restore_latest(_abstract(), check_fits=lambda d, t: None) is None
    ckpt.close()
    assert os.path.isdir(os.path.join(model_dir, "damaged_checkpoint_1"))


def test_another_model_is_not_mistaken_for_damage(tmp_path):
    model_dir = str(tmp_path / "run")
    _write_run(model_dir)

    def check_fits(step_dir, trainable_only):
        raise UserError(f"{step_dir} holds another model")

    ckpt = checkpoints.Checkpointer(model_dir)
    with pytest.raises(UserError, match="checkpoint_2 holds another model"):
        ckpt.restore_latest(_abstract(), check_fits=check_fits)
    ckpt.close()
    assert sorted(os.listdir(model_dir)) == ["checkpoint_1", "checkpoint_2"]


def test_one_rule_for_step_directories(tmp_path):
    model_dir = tmp_path / "run"
    for name in ("checkpoint_10", "checkpoint_9", "checkpoint_x", "checkpoint_3.orbax-checkpoint-tmp-1",
                 "damaged_checkpoint_11", "ckpt_12"):  # fmt: skip
        (model_dir / name).mkdir(parents=True)
    assert [s for s, _ in checkpoints.step_dirs(str(model_dir))] == [9, 10]
    assert checkpoints.step_dir_name(7) == "checkpoint_7"
    assert checkpoints.parse_step("/a/checkpoint_12/") == 12
    assert checkpoints.parse_step("/a/checkpoint_12.tmp") is None


def test_t5x_model_dir_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    params = {"encoder": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    model_dir = str(tmp_path / "t5x")
    checkpoints.save_t5x_checkpoint(params, model_dir, 1)
    newer = checkpoints.save_t5x_checkpoint(
        {"encoder": {"kernel": np.ones((2, 3), np.float32)}}, model_dir, 2
    )
    open(os.path.join(newer, "checkpoint"), "wb").write(b"\x93garbage")
    with caplog.at_level(logging.WARNING, logger="hyperprompt_jax"):
        loaded = checkpoints.load_t5x_checkpoint(model_dir)
    np.testing.assert_array_equal(loaded["encoder"]["kernel"], params["encoder"]["kernel"])
    assert any(newer in r.getMessage() for r in caplog.records)
    assert os.path.isdir(newer)  # never deleted
    with pytest.raises(UserError, match="damaged or incomplete"):
        checkpoints.load_t5x_checkpoint(newer)  # given directly: no silent fallback


def test_trainable_only_save_and_restore(tmp_path):
    """With a backbone reference set, a checkpoint holds step, trainable tree and
    optimizer state only, and the reference comes back on restore."""
    import jax

    model_dir = str(tmp_path / "run")
    ref = checkpoints.BackboneRef("/backbone", 0, "abc", {"encoder/kernel": (1.0, 2.0)})
    ckpt = checkpoints.Checkpointer(model_dir)
    ckpt.set_backbone(ref)
    ckpt.save(3, _state(3.0, 3))
    ckpt.close()
    step_dir = os.path.join(model_dir, "checkpoint_3")
    stored = checkpoints.orbax_source.item_tree_shapes(os.path.join(step_dir, "default"))
    assert {p[0] for p in stored} == {"step", "trainable", "opt_state"}

    seen = []
    ckpt = checkpoints.Checkpointer(model_dir)
    restored = ckpt.restore_latest(_abstract(), check_fits=lambda d, t: seen.append(t))
    ckpt.close()
    assert seen == [True] and restored.backbone == ref and restored.data_position == 3
    np.testing.assert_array_equal(
        restored.state["trainable"]["prompt"]["prompt"], np.full((4, 3), 3.0)
    )
    assert int(jax.device_get(restored.state["step"])) == 3
