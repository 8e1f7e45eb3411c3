"""t5x's Orbax checkpoint format next to the legacy one, and sharded loading of every format.

The Orbax-format checkpoint is written by orbax itself in the layout `t5x.train`
writes (a `CheckpointManager` with `step_prefix='checkpoint'` and an OCDBT
`PyTreeCheckpointHandler` item `state` holding `{'target': params, 'state': {'step',
'param_states'}}`), from the parameters of the real t5x fixture.

Sharded loading runs in a subprocess with 8 fake CPU devices (`data 2 x model 4`): the
t5x (both formats), Hugging Face and train-checkpoint weights arrive in the model's
shardings with the stored values, and every distinct slice is read once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from hyperprompt_jax import checkpoints


def write_t5x_orbax(params, directory: str, step: int, save_dtype=None) -> str:
    """A checkpoint in t5x's Orbax layout, written by orbax (not by the code under test)."""
    import orbax.checkpoint as ocp

    flat = checkpoints.flatten_params(params)
    if save_dtype is not None:
        flat = {k: np.asarray(v).astype(save_dtype) for k, v in flat.items()}
    target = checkpoints.unflatten_params(flat)
    param_states = checkpoints.unflatten_params(
        {k: {"v": np.zeros_like(np.asarray(v, np.float32))} for k, v in flat.items()}
    )
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
    )
    state = {
        "target": target,
        "state": {"step": np.asarray(step, np.int32), "param_states": param_states},
    }
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(directory, f"checkpoint_{step}")


@pytest.fixture(scope="module")
def fixture_params(tiny_t5x_checkpoint):
    return checkpoints.load_t5x_checkpoint(str(tiny_t5x_checkpoint))


def test_t5x_orbax_format_loads_like_the_legacy_one(fixture_params, tmp_path):
    step_dir = write_t5x_orbax(fixture_params, str(tmp_path / "run"), 3)
    assert sorted(os.listdir(step_dir))[:1] == ["_CHECKPOINT_METADATA"]
    assert checkpoints.discovery.kind(step_dir) == "t5x-orbax"
    for path in (step_dir, str(tmp_path / "run")):
        assert checkpoints.find_t5x_checkpoint_dir(path) == step_dir
        loaded = checkpoints.flatten_params(checkpoints.load_t5x_checkpoint(path))
        expected = checkpoints.flatten_params(fixture_params)
        assert loaded.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
    # bfloat16 storage (t5x's save_dtype) reads back as float32, rounded.
    bf16 = write_t5x_orbax(fixture_params, str(tmp_path / "bf16"), 1, ml_dtypes.bfloat16)
    loaded = checkpoints.load_t5x_checkpoint(bf16)
    emb = fixture_params["token_embedder"]["embedding"]
    assert loaded["token_embedder"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded["token_embedder"]["embedding"], emb.astype(ml_dtypes.bfloat16).astype(np.float32)
    )


def test_damaged_t5x_orbax_checkpoint_is_named(fixture_params, tmp_path):
    step_dir = write_t5x_orbax(fixture_params, str(tmp_path / "run"), 3)
    os.remove(os.path.join(step_dir, checkpoints.COMMIT_MARKER))
    with pytest.raises(ValueError, match="commit marker"):
        checkpoints.load_t5x_checkpoint(step_dir)


# ---------------------------------------------------------------------------------------
# Sharded loading on 8 fake devices
# ---------------------------------------------------------------------------------------

CHILD = r"""
import json, os, sys
import jax, numpy as np
from hyperprompt_jax import checkpoints, config, models, network, optim, partitioning
from hyperprompt_jax import trainer as trainer_lib
sys.path.insert(0, os.environ["TEST_DIR"])
from test_weight_formats import write_t5x_orbax

work = sys.argv[1]
cfg = config.T5Config(vocab_size=64, emb_dim=16, num_heads=4, num_encoder_layers=2,
                      num_decoder_layers=2, head_dim=4, mlp_dim=32,
                      mlp_activations=("gelu", "linear"), dtype="bfloat16")

class V:
    eos_id = 1

model = models.EncoderDecoderModel(network.Transformer(cfg), V(), V())
shapes = {"encoder_input_tokens": (8, 6), "decoder_input_tokens": (8, 3),
          "decoder_target_tokens": (8, 3), "decoder_loss_weights": (8, 3), "task_ids": (8,)}
trainer = trainer_lib.Trainer(model, optim.adafactor,
                              optim.create_learning_rate_scheduler("constant", 0.0),
                              partitioning.Partitioner(num_partitions=4), shapes)
rng = np.random.RandomState(0)
abstract = trainer.abstract_params()
# bfloat16-representable values: the t5x copy is stored in bfloat16 and cast on the fly.
params = {n: rng.standard_normal(a.shape).astype(jax.numpy.bfloat16).astype(np.float32)
          for n, a in abstract.items()}
tree = checkpoints.unflatten_params(params)
paths = {
    "t5x": checkpoints.save_t5x_checkpoint(tree, os.path.join(work, "t5x"), 1,
                                           dtype=jax.numpy.bfloat16),
    "t5x-orbax": write_t5x_orbax(tree, os.path.join(work, "orbax"), 2),
    "hf": checkpoints.save_hf_t5(cfg.replace(dtype="float32"), tree, os.path.join(work, "hf")),
}
out = {"devices": jax.device_count()}
for kind, path in paths.items():
    _, _, source = checkpoints.open_weights(path)
    loaded = checkpoints.flatten_params(trainer.params_from_source(source, path))
    want = checkpoints.flatten_params(trainer.layout.param_shardings)
    sharded = sum(1 for n in loaded if len(set(
        map(str, loaded[n].sharding.addressable_devices_indices_map(loaded[n].shape).values()))) > 1)
    out[kind] = {
        "same_shardings": all(loaded[n].sharding.is_equivalent_to(want[n], loaded[n].ndim) for n in loaded),
        "dtypes": sorted({str(v.dtype) for v in loaded.values()}),
        "stored_dtypes": sorted({str(t.dtype) for t in source.tensors.values()}),
        "max_abs_err": max(float(np.max(np.abs(np.asarray(loaded[n]) - params[n])))
                           for n in loaded),
        "bytes_read": source.bytes_read,
        "stored_bytes": sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in source.tensors.values()),
        "sharded_params": sharded,
    }
print("RESULT " + json.dumps(out))
"""


def test_every_format_loads_straight_into_the_shardings(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["TEST_DIR"] = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["devices"] == 8
    assert result["t5x"]["stored_dtypes"] == ["bfloat16"]  # cast on the fly
    for kind in ("t5x", "t5x-orbax", "hf"):
        r = result[kind]
        assert r["same_shardings"], kind
        assert r["dtypes"] == ["float32"], kind  # the model's parameter dtype
        assert r["max_abs_err"] == 0.0, kind
        assert r["sharded_params"] > 0, kind  # the model axis really splits parameters
        # Every distinct slice is read once: data-parallel replicas do not read again.
        assert r["bytes_read"] == r["stored_bytes"], (kind, r)
