"""Checkpoint import/export: the real t5x fixture, round trips, and helpful errors.

References are independent of the code under test: the msgpack file is decoded with
the plain `msgpack` package (t5x's extension type 1 is `(shape, dtype, bytes)`) and
every zarr array is read directly with TensorStore; Hugging Face files are written
with `transformers` / `torch` / `safetensors`.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
import tensorstore as ts

from hyperprompt_jax import checkpoints, config, network

# The fixture's architecture (its README): emb 4, 2 heads of 2, mlp 8, 2+2 layers,
# 4 relative-position buckets, T5.1.1 (GeGLU, untied logits), vocab 32128.
FIXTURE_CONFIG = config.t5_1_1(
    "base",
    emb_dim=4,
    num_heads=2,
    head_dim=2,
    mlp_dim=8,
    num_encoder_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=4,
)
# A small random model for the Hugging Face direction.
HF_CONFIG = config.T5Config(
    vocab_size=64,
    emb_dim=16,
    num_heads=2,
    head_dim=4,
    mlp_dim=24,
    num_encoder_layers=2,
    num_decoder_layers=1,
    mlp_activations=("gelu", "linear"),
    relative_attention_num_buckets=8,
    dropout_rate=0.0,
)


# ---------------------------------------------------------------------------------------
# Independent readers
# ---------------------------------------------------------------------------------------


def _decode_ext(code, data):
    if code == 1:  # flax.serialization's ndarray: msgpack of (shape, dtype name, bytes)
        shape, dtype, buffer = msgpack.unpackb(data)
        dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)
    raise AssertionError(f"unexpected msgpack extension type {code}")


def _raw_msgpack(ckpt_dir) -> dict:
    with open(os.path.join(ckpt_dir, "checkpoint"), "rb") as f:
        return msgpack.unpackb(f.read(), ext_hook=_decode_ext, strict_map_key=False)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) and "driver" not in tree:
        for key, value in tree.items():
            yield from _leaves(value, prefix + (key,))
    else:
        yield "/".join(prefix), tree


def _copy(src, dst):
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):  # the fixture files are read-only
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    return str(dst)


@pytest.fixture(scope="module")
def fixture_params(tiny_t5x_checkpoint):
    return checkpoints.load_t5x_checkpoint(str(tiny_t5x_checkpoint))


# ---------------------------------------------------------------------------------------
# The real t5x checkpoint
# ---------------------------------------------------------------------------------------


def test_fixture_arrays_equal_their_files(tiny_t5x_checkpoint, fixture_params):
    raw = _raw_msgpack(tiny_t5x_checkpoint)
    assert raw["version"] == 3
    flat = checkpoints.flatten_params(fixture_params)
    leaves = dict(_leaves(raw["optimizer"]["target"]))
    assert set(leaves) == set(flat)
    kinds = {"zarr": 0, "inline": 0}
    for name, leaf in leaves.items():
        assert flat[name].dtype == np.float32
        if isinstance(leaf, dict):
            kinds["zarr"] += 1
            directory = os.path.join(tiny_t5x_checkpoint, leaf["kvstore"]["path"])
            spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": directory}}
            expected = ts.open(spec, open=True).result().read().result()
        else:
            kinds["inline"] += 1
            expected = leaf
        np.testing.assert_array_equal(flat[name], np.asarray(expected, np.float32), err_msg=name)
    # Both storage kinds are exercised: kernels/embedding in zarr, norms/relpos inline.
    assert kinds == {"zarr": 38, "inline": 14}


def test_fixture_runs_with_its_config(fixture_params):
    checkpoints.check_params_match(fixture_params, checkpoints.t5_param_shapes(FIXTURE_CONFIG))
    model = network.Transformer(FIXTURE_CONFIG)
    enc = jnp.array([[5, 9, 200, 31000, 1, 0], [17, 3, 1, 0, 0, 0]])
    dec = jnp.array([[0, 12, 7, 1], [0, 44, 1, 0]])
    tgt = jnp.array([[12, 7, 1, 0], [44, 1, 0, 0]])
    logits = model.apply({"params": fixture_params}, enc, dec, tgt, enable_dropout=False)
    assert logits.shape == (2, 4, 32128)
    assert np.isfinite(np.asarray(logits)).all()
    assert float(jnp.std(logits)) > 0


def test_fixture_logits_equal_transformers_after_export(fixture_params, tmp_path):
    """The real t5x weights, exported to HF, give the same logits in PyTorch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = checkpoints.save_hf_t5(FIXTURE_CONFIG, fixture_params, str(tmp_path / "hf"))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    enc = np.array([[5, 9, 200, 31000, 1, 0], [17, 3, 1, 0, 0, 0]])
    tgt = np.array([[12, 7, 1, 0], [44, 1, 0, 0]])
    dec = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
    with torch.no_grad():
        reference = hf(
            input_ids=torch.tensor(enc),
            attention_mask=torch.tensor(enc > 0).long(),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(tgt > 0).long(),
        ).logits.numpy()
    ours = network.Transformer(FIXTURE_CONFIG).apply(
        {"params": fixture_params}, enc, dec, tgt, enable_dropout=False
    )
    real = tgt > 0
    np.testing.assert_allclose(np.asarray(ours)[real], reference[real], atol=1e-4, rtol=1e-4)


def test_path_forms_resolve_to_the_latest_step(tiny_t5x_checkpoint, fixture_params, tmp_path):
    model_dir = tmp_path / "model"
    checkpoints.save_t5x_checkpoint(fixture_params, str(model_dir), 2)
    shifted = jax.tree_util.tree_map(lambda x: x + 1.0, fixture_params)
    written = checkpoints.save_t5x_checkpoint(shifted, str(model_dir), 10)
    assert written == str(model_dir / "checkpoint_10")
    assert checkpoints.find_t5x_checkpoint_dir(str(model_dir)) == written  # 10 > 2 numerically
    latest = checkpoints.load_t5x_checkpoint(str(model_dir))
    np.testing.assert_array_equal(
        latest["encoder"]["encoder_norm"]["scale"],
        fixture_params["encoder"]["encoder_norm"]["scale"] + 1.0,
    )
    via_file = checkpoints.load_t5x_checkpoint(str(tiny_t5x_checkpoint / "checkpoint"))
    np.testing.assert_array_equal(
        via_file["token_embedder"]["embedding"], fixture_params["token_embedder"]["embedding"]
    )


# ---------------------------------------------------------------------------------------
# Writing t5x checkpoints
# ---------------------------------------------------------------------------------------


def test_save_load_round_trip_and_layout(tiny_t5x_checkpoint, fixture_params, tmp_path):
    written = checkpoints.save_t5x_checkpoint(fixture_params, str(tmp_path), 3)
    # Same layout as t5x wrote for the fixture: the same zarr directories.
    assert sorted(os.listdir(written)) == sorted(os.listdir(tiny_t5x_checkpoint))
    loaded = checkpoints.load_t5x_checkpoint(written)
    a, b = checkpoints.flatten_params(fixture_params), checkpoints.flatten_params(loaded)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)

    ours, theirs = _raw_msgpack(written), _raw_msgpack(tiny_t5x_checkpoint)
    assert ours["version"] == 3

    # The zero Adafactor state has the shapes of the state t5x wrote (so t5x's
    # Checkpointer can restore it into a default train state).
    def shapes(tree):
        return {k: np.shape(v) for k, v in _leaves(tree) if not isinstance(v, dict)}

    assert shapes(ours["optimizer"]["state"]) == shapes(theirs["optimizer"]["state"])
    assert int(ours["optimizer"]["state"]["step"]) == 3
    # Every zarr spec is relative to the checkpoint directory and readable directly.
    for name, leaf in _leaves(ours["optimizer"]["target"]):
        if isinstance(leaf, dict):
            assert not os.path.isabs(leaf["kvstore"]["path"])
            spec = {
                "driver": "zarr",
                "kvstore": {
                    "driver": "file",
                    "path": os.path.join(written, leaf["kvstore"]["path"]),
                },
            }
            direct = ts.open(spec, open=True).result().read().result()
            np.testing.assert_array_equal(direct, a[name])


def test_save_bfloat16_and_refuse_overwrite(fixture_params, tmp_path):
    written = checkpoints.save_t5x_checkpoint(fixture_params, str(tmp_path), 1, dtype=jnp.bfloat16)
    meta = json.load(open(os.path.join(written, "target.token_embedder.embedding", ".zarray")))
    assert meta["dtype"] == "bfloat16"
    loaded = checkpoints.load_t5x_checkpoint(written)
    expected = fixture_params["token_embedder"]["embedding"].astype(ml_dtypes.bfloat16)
    assert loaded["token_embedder"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded["token_embedder"]["embedding"], expected.astype(np.float32)
    )
    with pytest.raises(ValueError, match="already exists"):
        checkpoints.save_t5x_checkpoint(fixture_params, str(tmp_path), 1)


# ---------------------------------------------------------------------------------------
# Helpful errors (t5x)
# ---------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load_t5x_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a t5x checkpoint"):
        checkpoints.load_t5x_checkpoint(str(tmp_path))


def test_missing_array_directory(tiny_t5x_checkpoint, tmp_path):
    ckpt = _copy(tiny_t5x_checkpoint, tmp_path / "checkpoint_3")
    shutil.rmtree(os.path.join(ckpt, "target.encoder.layers_0.mlp.wo.kernel"))
    with pytest.raises(ValueError, match=r"'encoder/layers_0/mlp/wo/kernel'.*layers_0\.mlp\.wo"):
        checkpoints.load_t5x_checkpoint(ckpt)


def test_missing_chunk_file(tiny_t5x_checkpoint, tmp_path):
    # A missing zarr chunk would otherwise read as zeros.
    ckpt = _copy(tiny_t5x_checkpoint, tmp_path / "checkpoint_3")
    os.remove(os.path.join(ckpt, "target.token_embedder.embedding", "3.0"))
    with pytest.raises(ValueError, match=r"'token_embedder/embedding'.*\['3\.0'\] missing"):
        checkpoints.load_t5x_checkpoint(ckpt)


def test_truncated_chunk_file(tiny_t5x_checkpoint, tmp_path):
    ckpt = _copy(tiny_t5x_checkpoint, tmp_path / "checkpoint_3")
    chunk = os.path.join(ckpt, "target.decoder.logits_dense.kernel", "0.5")
    data = open(chunk, "rb").read()
    open(chunk, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"'decoder/logits_dense/kernel'.*damaged or truncated"):
        checkpoints.load_t5x_checkpoint(ckpt)


def test_truncated_msgpack(tiny_t5x_checkpoint, tmp_path):
    ckpt = _copy(tiny_t5x_checkpoint, tmp_path / "checkpoint_3")
    path = os.path.join(ckpt, "checkpoint")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:1000])
    with pytest.raises(ValueError, match="not a valid t5x msgpack checkpoint"):
        checkpoints.load_t5x_checkpoint(ckpt)


def test_shapes_that_do_not_fit_the_config(tiny_t5x_checkpoint):
    wrong = FIXTURE_CONFIG.replace(vocab_size=32100, num_decoder_layers=3)
    with pytest.raises(ValueError) as info:
        checkpoints.load_t5x_checkpoint(str(tiny_t5x_checkpoint), config=wrong)
    message = str(info.value)
    assert "token_embedder/embedding: expected (32100, 4), found (32128, 4)" in message
    assert "decoder/logits_dense/kernel: expected (4, 32100), found (4, 32128)" in message
    assert "decoder/layers_2/mlp/wo/kernel (expected shape (8, 4))" in message
    assert str(tiny_t5x_checkpoint) in message


def test_check_params_match_lists_everything():
    expected = {"a": {"kernel": (2, 3)}, "b": (4,), "c": (1,)}
    params = {"a": {"kernel": np.zeros((3, 2))}, "b": np.zeros(4), "d": np.zeros(5)}
    with pytest.raises(ValueError) as info:
        checkpoints.check_params_match(params, expected, source="INITIAL_CHECKPOINT_PATH x")
    message = str(info.value)
    assert "INITIAL_CHECKPOINT_PATH x" in message
    assert "a/kernel: expected (2, 3), found (3, 2)" in message
    assert "c (expected shape (1,))" in message and "d (shape (5,))" in message
    checkpoints.check_params_match(
        params, {"a": {"kernel": (3, 2)}, "b": (4,)}, allow_unexpected=True
    )


# ---------------------------------------------------------------------------------------
# Hugging Face files
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    params = network.init_params(network.Transformer(HF_CONFIG), jax.random.PRNGKey(3))["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    path = str(tmp_path_factory.mktemp("hf") / "model")
    checkpoints.save_hf_t5(HF_CONFIG, params, path)
    return path, params


def _assert_same_params(a, b):
    fa, fb = checkpoints.flatten_params(a), checkpoints.flatten_params(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(fb[name], fa[name], err_msg=name)


def test_hf_round_trip(hf_dir):
    path, params = hf_dir
    loaded_config, loaded = checkpoints.load_hf_t5(path)
    assert loaded_config == HF_CONFIG
    _assert_same_params(params, loaded)


def test_hf_pytorch_bin_sharded_and_bfloat16_files(hf_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import safetensors.torch

    path, params = hf_dir
    model = transformers.T5ForConditionalGeneration.from_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    bin_dir = _copy(path, tmp_path / "bin")
    os.remove(os.path.join(bin_dir, "model.safetensors"))
    torch.save(state, os.path.join(bin_dir, "pytorch_model.bin"))
    _assert_same_params(params, checkpoints.load_hf_t5(bin_dir)[1])

    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="4KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    _assert_same_params(params, checkpoints.load_hf_t5(sharded)[1])

    bf16_dir = _copy(path, tmp_path / "bf16")
    safetensors.torch.save_file(
        {
            k: v.to(torch.bfloat16)
            for k, v in state.items()
            if k != "encoder.embed_tokens.weight" and k != "decoder.embed_tokens.weight"
        },
        os.path.join(bf16_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    rounded = jax.tree_util.tree_map(
        lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params
    )
    _assert_same_params(rounded, checkpoints.load_hf_t5(bf16_dir)[1])


def test_hf_transformers_4_output_layer_flags(hf_dir, tmp_path):
    """transformers<5 configs have no `scale_decoder_outputs`: `tie_word_embeddings`
    alone says whether the output is scaled (and tied)."""
    path, params = hf_dir
    legacy = _copy(path, tmp_path / "legacy")
    config_path = os.path.join(legacy, "config.json")
    hf_config = json.load(open(config_path))
    del hf_config["scale_decoder_outputs"]
    json.dump(hf_config, open(config_path, "w"))
    loaded_config, loaded = checkpoints.load_hf_t5(legacy)  # untied, unscaled (v1.1)
    assert loaded_config == HF_CONFIG
    _assert_same_params(params, loaded)

    hf_config["tie_word_embeddings"] = True  # now scaled by d_model**-0.5, lm_head kept
    json.dump(hf_config, open(config_path, "w"))
    loaded_config, loaded = checkpoints.load_hf_t5(legacy)
    assert not loaded_config.logits_via_embedding  # lm_head differs from the embedding
    np.testing.assert_allclose(
        loaded["decoder"]["logits_dense"]["kernel"],
        params["decoder"]["logits_dense"]["kernel"] * HF_CONFIG.emb_dim**-0.5,
        rtol=1e-6,
    )


def _edit_config(path, tmp_path, **changes):
    copy = _copy(path, tmp_path / "edited")
    config_path = os.path.join(copy, "config.json")
    hf_config = json.load(open(config_path))
    hf_config.update(changes)
    json.dump(hf_config, open(config_path, "w"))
    return copy


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (dict(feed_forward_proj="gelu"), r"feed_forward_proj 'gelu' is not supported"),
        (dict(model_type="bart"), r"model_type 'bart' is not supported"),
        (dict(model_type="umt5"), r"relative attention bias in every layer"),
        (dict(layer_norm_epsilon=1e-5), r"layer_norm_epsilon 1e-05 is not supported"),
        (dict(is_gated_act=False), r"is_gated_act=False contradicts feed_forward_proj"),
        (dict(d_ff=30), r"wi_0.weight: found \(24, 16\), expected \(30, 16\)"),
        (dict(num_layers=3), r"Missing weights.*encoder\.block\.2\."),
        (dict(num_layers=1), r"unexpected weights.*encoder\.block\.1\."),
    ],
)
def test_hf_config_errors(hf_dir, tmp_path, changes, pattern):
    path, _ = hf_dir
    edited = _edit_config(path, tmp_path, **changes)
    with pytest.raises(ValueError, match=pattern) as info:
        checkpoints.load_hf_t5(edited)
    assert edited in str(info.value)


def test_hf_missing_and_truncated_files(hf_dir, tmp_path):
    path, _ = hf_dir
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load_hf_t5(str(tmp_path / "nope"))
    no_weights = _copy(path, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match="No weights in .*model.safetensors"):
        checkpoints.load_hf_t5(no_weights)
    truncated = _copy(path, tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated: tensor"):
        checkpoints.load_hf_t5(truncated)
    no_config = _copy(path, tmp_path / "no_config")
    os.remove(os.path.join(no_config, "config.json"))
    with pytest.raises(ValueError, match="has no config.json"):
        checkpoints.load_hf_t5(no_config)


def test_save_hf_rejects_params_that_do_not_fit(hf_dir, tmp_path):
    _, params = hf_dir
    with pytest.raises(ValueError, match=r"token_embedder/embedding: expected \(65, 16\)"):
        checkpoints.save_hf_t5(HF_CONFIG.replace(vocab_size=65), params, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="have no Hugging Face feed_forward_proj"):
        checkpoints.save_hf_t5(
            HF_CONFIG.replace(mlp_activations=("gelu", "gelu")), params, str(tmp_path / "y")
        )
