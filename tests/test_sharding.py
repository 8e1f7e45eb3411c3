"""Sharded training equals single-device training, for every method.

In a subprocess with 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`
must be set before JAX starts, and the rest of the suite stays on one device), three
train steps on a `data=4 x model=2` mesh give the same losses as on one device, for
model tuning, prompt tuning, SMoP and HyperPrompt (dropout and SMoP's router noise on,
so the random streams must not depend on the sharding either), and the trained
parameters agree too. The child also reports how a weight and the batch were placed,
to show the mesh was really used.

Run directly (`python tests/test_sharding.py`), this file is the child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

METHODS = ("model_tuning", "prompt_tuning", "smop", "hyperprompt")
STEPS = 3


def _child() -> dict:
    import jax
    import jax.numpy as jnp

    from hyperprompt_jax import config as config_lib
    from hyperprompt_jax import hyperprompt, models, network, optim, partitioning, prompts, smop
    from hyperprompt_jax import trainer as trainer_lib

    class Vocab:
        eos_id = 1

    batch_size, in_len, out_len, num_tasks = 8, 12, 4, 2
    cfg = config_lib.T5Config(
        vocab_size=128, emb_dim=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
        head_dim=8, mlp_dim=64, mlp_activations=("gelu", "linear"), dropout_rate=0.1,
    )  # fmt: skip
    methods = {
        "model_tuning": (dict(), None),
        "prompt_tuning": (dict(prompt=prompts.SoftPrompt(length=4)), ["prompt/.*"]),
        "smop": (dict(prompt=smop.SMoP(num_prompts=4, length=2)), ["prompt/.*"]),
        "hyperprompt": (
            dict(hyperprompt=hyperprompt.HyperPrompt(
                num_tasks=num_tasks, prompt_length=2, bottleneck_dim=8,
                hypernetworks=hyperprompt.PerLayer(),
            )),
            None,
        ),
    }  # fmt: skip
    shapes = {
        "encoder_input_tokens": (batch_size, in_len),
        "decoder_input_tokens": (batch_size, out_len),
        "decoder_target_tokens": (batch_size, out_len),
        "decoder_loss_weights": (batch_size, out_len),
        "task_ids": (batch_size,),
    }
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(STEPS):
        targets = rng.randint(2, 128, size=(batch_size, out_len)).astype(np.int32)
        batches.append({
            "encoder_input_tokens": rng.randint(2, 128, size=(batch_size, in_len)).astype(np.int32),
            "decoder_input_tokens": np.concatenate(
                [np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch_size, out_len), np.int32),
            "task_ids": rng.randint(0, num_tasks, size=(batch_size,)).astype(np.int32),
        })  # fmt: skip
    meshes = {
        "one_device": partitioning.Partitioner(devices=jax.devices()[:1]),
        "data4_model2": partitioning.Partitioner(num_partitions=2),
    }
    out = {"device_count": jax.device_count(), "losses": {}, "params": {}, "placement": {}}
    for method, (hooks, patterns) in methods.items():
        model = models.EncoderDecoderModel(
            network.Transformer(cfg, **hooks), Vocab(), Vocab(), z_loss=1e-4
        )
        for mesh_name, partitioner in meshes.items():
            trainer = trainer_lib.Trainer(
                model, optim.adafactor, optim.create_learning_rate_scheduler("constant", 0.05),
                partitioner, shapes, trainable_patterns=patterns, seed=3,
            )  # fmt: skip
            state = trainer.init_state()
            initial = jax.device_get(state.trainable)
            losses = []
            for batch in batches:
                global_batch = {
                    k: jax.make_array_from_callback(
                        v.shape, partitioner.batch_sharding(v.ndim), lambda i, v=v: v[i]
                    )
                    for k, v in batch.items()
                }
                state, metrics = trainer.train_step(state, global_batch)
                losses.append(float(jnp.asarray(metrics["loss"])))
            out["losses"].setdefault(method, {})[mesh_name] = losses
            final = jax.device_get(state.trainable)
            if mesh_name == "one_device":
                reference = final
                moved = max(
                    float(np.max(np.abs(a - b)))
                    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(initial), strict=True)
                )
                out["params"][method] = {"max_update": moved}
            else:
                out["params"][method]["max_diff_between_meshes"] = max(
                    float(np.max(np.abs(a - b)))
                    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(reference), strict=True)
                )
            if method == "model_tuning":
                kernel = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
                out["placement"][mesh_name] = {
                    "mlp_kernel_spec": list(kernel.sharding.spec),
                    "mlp_kernel_shards": len({str(s.index) for s in kernel.addressable_shards}),
                    "batch_spec": list(global_batch["encoder_input_tokens"].sharding.spec),
                }
    return out


@pytest.fixture(scope="module")
def child_result(tmp_path_factory) -> dict:
    env = dict(os.environ)
    # Both meshes compile with the same (cheaper) settings: the comparison stays fair and
    # the eight compilations take half the time.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true"
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        cwd=tmp_path_factory.mktemp("sharding"),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_child_used_a_data_model_mesh(child_result):
    assert child_result["device_count"] == 8
    sharded = child_result["placement"]["data4_model2"]
    assert sharded["mlp_kernel_spec"] == [None, "model"]
    assert sharded["mlp_kernel_shards"] == 2
    assert sharded["batch_spec"] == ["data", None]
    assert child_result["placement"]["one_device"]["mlp_kernel_shards"] == 1


@pytest.mark.parametrize("method", METHODS)
def test_sharded_losses_equal_single_device(child_result, method):
    losses = child_result["losses"][method]
    single, sharded = np.asarray(losses["one_device"]), np.asarray(losses["data4_model2"])
    assert single.shape == (STEPS,)
    assert np.all(np.isfinite(single))
    np.testing.assert_allclose(sharded, single, rtol=2e-5, atol=1e-5)
    params = child_result["params"][method]
    assert params["max_update"] > 1e-3, "the three steps did not move the trainable parameters"
    assert params["max_diff_between_meshes"] < 1e-4 * max(1.0, params["max_update"])


if __name__ == "__main__":
    print(json.dumps(_child()))
