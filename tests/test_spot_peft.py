"""Soft prompts <-> Hugging Face PEFT prompt-tuning adapters, checked against `peft`.

* Export: a prompt-tuning prompt, and one task's prompt of a multi-task SoftPrompt read
  from a train-state checkpoint, written as a PEFT adapter next to the HF export of
  the backbone: `PeftModel.from_pretrained(T5ForConditionalGeneration...)` gives our
  logits to float32 tolerance and the same greedy tokens as our model.
* Import: an adapter (ours, and one `peft` itself saved) is accepted wherever a `.npy`
  prompt is (library entries with its metadata, `FromFile`, `WeightedFiles`, `rank`,
  `init`), with identical arrays.
* SMoP and HyperPrompt checkpoints: one `error:` line saying there is no PEFT form.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hyperprompt_jax import network, prompt_files, prompts, spot  # noqa: E402
from hyperprompt_jax.config import T5Config  # noqa: E402
from hyperprompt_jax.errors import UserError  # noqa: E402
from hyperprompt_jax.spot import cli, export  # noqa: E402

CONFIG = T5Config(
    vocab_size=64, emb_dim=32, num_heads=4, head_dim=6, mlp_dim=48,
    num_encoder_layers=2, num_decoder_layers=2, mlp_activations=("gelu", "linear"),
    dropout_rate=0.0, logits_via_embedding=False,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
)  # fmt: skip
LENGTH, NUM_TASKS, BATCH, ENC_LEN, DEC_LEN = 3, 2, 3, 7, 5
ATOL = RTOL = 1e-4


def _batch():
    """Encoder tokens (row 0 padded) and decoder inputs (start token 0, then tokens);
    the targets have no padding, so our decoder masks nothing that HF attends to."""
    rng = np.random.RandomState(0)
    enc = rng.randint(2, CONFIG.vocab_size, size=(BATCH, ENC_LEN))
    enc[0, 5:] = 0
    tgt = rng.randint(2, CONFIG.vocab_size, size=(BATCH, DEC_LEN))
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int64), tgt[:, :-1]], 1)
    return enc, dec_in


@functools.cache
def _model(num_tasks: int | None):
    """Our network with a soft prompt and its (random) parameters; layer norms and the
    prompt get non-trivial values so the comparison is not vacuous."""
    module = network.Transformer(
        CONFIG, prompt=prompts.SoftPrompt(length=LENGTH, num_tasks=num_tasks)
    )
    enc, dec_in = _batch()
    init = jax.jit(functools.partial(module.init, enable_dropout=False))
    params = init(jax.random.PRNGKey(3), enc, dec_in, dec_in, task_ids=np.zeros(BATCH, np.int32))[
        "params"
    ]
    rng = np.random.RandomState(1)

    def perturb(path, leaf):
        leaf = np.array(leaf, np.float32)
        if "scale" in jax.tree_util.keystr(path):
            leaf += 0.2 * rng.normal(size=leaf.shape).astype(np.float32)
        return leaf

    params = jax.tree_util.tree_map_with_path(perturb, dict(nn.unbox(params)))
    params["prompt"]["prompt"] = rng.normal(size=params["prompt"]["prompt"].shape).astype(
        np.float32
    )

    @jax.jit
    def forward(params, enc, dec_in, task_ids):
        # Targets only mask the decoder where they are 0 (padding): pass all-ones.
        return module.apply(
            {"params": params}, enc, dec_in, jnp.ones_like(dec_in), task_ids=task_ids,
            enable_dropout=False,
        )  # fmt: skip

    return module, params, forward


def _our_greedy(forward, params, enc, task_ids, steps=DEC_LEN):
    """Greedy decoding by full forward passes; tokens after EOS (1) become padding (0),
    as Hugging Face's `generate` pads finished rows."""
    dec = np.zeros((enc.shape[0], steps + 1), np.int64)
    for t in range(steps):
        logits = np.asarray(forward(params, enc, dec[:, :-1], task_ids))
        dec[:, t + 1] = logits[:, t].argmax(-1)
    out = dec[:, 1:]
    for row in out:
        eos = np.flatnonzero(row == 1)
        if eos.size:
            row[eos[0] + 1 :] = 0
    return out


def _peft_model(paths):
    base = transformers.T5ForConditionalGeneration.from_pretrained(paths["backbone"]).eval()
    return peft.PeftModel.from_pretrained(base, paths["adapter"]).eval()


def _compare_with_peft(peft_model, forward, params, task_ids):
    enc, dec_in = _batch()
    mask = torch.tensor((enc > 0).astype(np.int64))
    with torch.no_grad():
        theirs = peft_model(
            input_ids=torch.tensor(enc), attention_mask=mask, decoder_input_ids=torch.tensor(dec_in)
        ).logits.numpy()
    ours = np.asarray(forward(params, enc, dec_in, task_ids))
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        generated = peft_model.generate(
            input_ids=torch.tensor(enc), attention_mask=mask, max_new_tokens=DEC_LEN,
            do_sample=False, num_beams=1,
        ).numpy()  # fmt: skip
    ours_greedy = _our_greedy(forward, params, enc, task_ids)
    # HF's output starts with the decoder start token and may stop early at EOS.
    generated = generated[:, 1:]
    np.testing.assert_array_equal(ours_greedy[:, : generated.shape[1]], generated)
    assert not ours_greedy[:, generated.shape[1] :].any()
    # The prompt matters: without it HF's logits differ (the check is not vacuous).
    with torch.no_grad():
        plain = peft_model.get_base_model()(
            input_ids=torch.tensor(enc), attention_mask=mask, decoder_input_ids=torch.tensor(dec_in)
        ).logits.numpy()
    assert np.abs(plain - theirs).max() > 1e-2
    return float(np.abs(ours - theirs).max())


def test_prompt_tuning_exports_to_peft(tmp_path):
    _, params, forward = _model(None)
    backbone = {k: v for k, v in params.items() if k != "prompt"}
    paths = export.write_peft_export(
        str(tmp_path / "out"), params["prompt"]["prompt"], config=CONFIG, backbone=backbone,
        metadata={"task": "hp_toy"},
    )  # fmt: skip
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_virtual_tokens"] == LENGTH
    assert config["base_model_name_or_path"] == str(tmp_path / "out" / "backbone")
    diff = _compare_with_peft(_peft_model(paths), forward, params, np.zeros(BATCH, np.int32))
    print(f"prompt tuning vs PEFT: max |logits diff| = {diff:.2e}")

    # Import: the adapter is a prompt file with identical values and its metadata.
    adapter = paths["adapter"]
    np.testing.assert_array_equal(
        prompt_files.load_prompt_file(adapter), params["prompt"]["prompt"]
    )
    meta = prompt_files.read_metadata(adapter)
    assert meta["task"] == "hp_toy" and meta["format"] == "peft"
    assert meta["peft"]["num_virtual_tokens"] == LENGTH
    with pytest.raises(UserError, match="exactly|shape"):
        prompts.FromFile(adapter)(jax.random.PRNGKey(0), (LENGTH + 1, CONFIG.emb_dim))


def test_one_task_of_a_multi_task_checkpoint_exports_to_peft(tmp_path, capsys):
    import orbax.checkpoint as ocp

    _, params, forward = _model(NUM_TASKS)
    # The launcher's train-state layout: trainable prompt, frozen backbone.
    state = {
        "step": np.int32(7),
        "trainable": {"prompt": params["prompt"]},
        "frozen": {k: v for k, v in params.items() if k != "prompt"},
        "opt_state": {"v": {"prompt": {"prompt": np.zeros_like(params["prompt"]["prompt"])}}},
    }
    with ocp.StandardCheckpointer() as c:
        c.save(os.path.abspath(tmp_path / "run" / "checkpoint_7"), state)
    with pytest.raises(UserError, match="multi-task prompt with 2 prompts.*--prompt_index"):
        export.export_peft(str(tmp_path / "run"), str(tmp_path / "x"), config=CONFIG)
    paths = export.export_peft(
        str(tmp_path / "run"), str(tmp_path / "task1"), prompt_index=1, config=CONFIG,
        task="hp_task1",
    )  # fmt: skip
    diff = _compare_with_peft(_peft_model(paths), forward, params, np.ones(BATCH, np.int32))
    print(f"multi-task prompt (task 1) vs PEFT: max |logits diff| = {diff:.2e}")
    meta = prompt_files.read_metadata(paths["adapter"])
    assert meta["prompt_index"] == 1 and meta["step"] == 7 and meta["task"] == "hp_task1"

    # The command line with --base_model writes only the adapter, pointing at it.
    out = tmp_path / "cli"
    assert cli.main(
        ["export", "--format=peft", f"--checkpoint={tmp_path / 'run'}", f"--output={out}",
         "--prompt_index=0", f"--base_model={paths['backbone']}"]
    ) == 0  # fmt: skip
    assert not (out / "backbone").exists()
    np.testing.assert_array_equal(
        prompt_files.load_prompt_file(str(out / "adapter")), params["prompt"]["prompt"][0]
    )
    capsys.readouterr()  # Drop what loading the models printed.
    code = cli.main(["export", "--format=peft", f"--checkpoint={tmp_path / 'run'}",
                     f"--output={out}", "--prompt_index=0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--format=peft needs the backbone" in err


@pytest.mark.parametrize(
    "method,state",
    [
        ("SMoP", {"prompt": {"prompts": np.ones((3, 2, 8), np.float32),
                             "router": {"kernel": np.ones((8, 3), np.float32)}}}),
        ("HyperPrompt", {"hyperprompt": {"global_prompts": np.ones((2, 3, 8), np.float32)}}),
    ],
)  # fmt: skip
def test_smop_and_hyperprompt_have_no_peft_form(tmp_path, capsys, method, state):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        c.save(os.path.abspath(tmp_path / "run" / "checkpoint_1"), {"params": state})
    code = cli.main(["export", "--format=peft", f"--checkpoint={tmp_path / 'run'}",
                     f"--output={tmp_path / 'out'}", "--base_model=t5-small", "--prompt_index=0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {method} has no PEFT equivalent")
    assert not (tmp_path / "out").exists()


def test_peft_saved_adapters_are_prompt_files(tmp_path, capsys):
    # An adapter written by peft itself (seq2seq default: two submodules, so
    # 2 * num_virtual_tokens rows, of which the encoder uses the first half).
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
        num_decoder_layers=1, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config)
    model = peft.get_peft_model(
        base, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    table = model.prompt_encoder["default"].embedding.weight.detach().numpy().copy()
    assert table.shape == (8, 16)
    lib = tmp_path / "lib"
    model.save_pretrained(str(lib / "peft_src"))
    prompt = table[:4]
    np.testing.assert_array_equal(prompt_files.load_prompt_file(str(lib / "peft_src")), prompt)

    # Library entries: a .npy and the adapter side by side; rank, init, FromFile,
    # WeightedFiles all take the adapter.
    rng = np.random.default_rng(0)
    other = rng.normal(size=(4, 16)).astype(np.float32)
    np.save(lib / "other.npy", other)
    library = spot.PromptLibrary.load(str(lib))
    assert library.names == ["other", "peft_src"]
    np.testing.assert_array_equal(library["peft_src"].prompt, prompt)
    assert library["peft_src"].metadata["peft"]["peft_type"] == "PROMPT_TUNING"
    assert library["peft_src"].metadata["format"] == "peft"

    target = prompt + 0.01 * rng.normal(size=prompt.shape).astype(np.float32)
    np.save(tmp_path / "target.npy", target)
    ranking = tmp_path / "ranking.json"
    assert cli.main(["rank", f"--library={lib}", f"--target={tmp_path / 'target.npy'}",
                     f"--output={ranking}"]) == 0  # fmt: skip
    assert json.loads(ranking.read_text())["ranking"][0]["name"] == "peft_src"
    capsys.readouterr()
    assert cli.main(["rank", f"--library={lib}", f"--target={lib / 'peft_src'}"]) == 0
    assert "Excluded from the sources: peft_src" in capsys.readouterr().out
    init = tmp_path / "init.npy"
    assert cli.main(["init", f"--library={lib}", f"--target={tmp_path / 'target.npy'}",
                     "--k=1", f"--output={init}"]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(init), prompt)

    # `import` makes a .npy entry whose .json carries the adapter's metadata.
    imported = tmp_path / "lib2" / "from_peft.npy"
    assert cli.main(["import", f"--adapter={lib / 'peft_src'}", f"--output={imported}",
                     "--task=hp_x", "--emb_dim=16", "--length=4"]) == 0  # fmt: skip
    entry = spot.PromptLibrary.load(str(tmp_path / "lib2"))["from_peft"]
    np.testing.assert_array_equal(entry.prompt, prompt)
    assert entry.task == "hp_x" and entry.metadata["source"] == str(lib / "peft_src")
    assert entry.metadata["peft"]["num_virtual_tokens"] == 4
    assert entry.metadata["format"] == "peft"
    capsys.readouterr()
    assert cli.main(["import", f"--adapter={lib}", f"--output={imported}"]) == 1
    assert "is a directory but not a PEFT prompt-tuning adapter" in capsys.readouterr().err

    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(
        np.asarray(prompts.FromFile(str(lib / "peft_src"))(key, (4, 16))), prompt
    )
    mixed = prompts.WeightedFiles([str(lib / "peft_src"), str(lib / "other.npy")], [3.0, 1.0])
    np.testing.assert_allclose(
        np.asarray(mixed(key, (4, 16))), (3 * prompt + other) / 4, rtol=1e-6, atol=1e-6
    )
