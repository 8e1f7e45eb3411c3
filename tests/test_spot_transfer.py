"""SPoT's runs: export from checkpoints, validation scores, best-of-top-k, mixtures.

* `export` reads prompts from orbax checkpoints written here (CheckpointManager and
  plain StandardCheckpointer layouts, optimizer moments that mirror the prompt's path,
  SMoP and multi-task prompts, no prompt at all), with scores from eval_metrics.jsonl;
  with `--embedding_step` it writes the early task embedding beside the transfer
  prompt, and the metadata says which is which.
* `best_of_topk` and `mixture_transfer` call the launcher with the flags a user would
  type (a stand-in launcher checks them and writes what training would); the mixture
  gin file they write registers the mixture when gin evaluates it.
* `mixture` registers the target plus the top-k source tasks and refuses unknown tasks.
"""

from __future__ import annotations

import ast
import json
import os

import numpy as np
import pytest

from hyperprompt_jax import spot
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.spot import cli, mixtures, transfer
from tests.helpers import write_prompt_library as _write_library

# ----------------------------------------------------------------------------------------
# Export from orbax checkpoints
# ----------------------------------------------------------------------------------------


def _save_manager(model_dir, step, state):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    with ocp.CheckpointManager(os.path.abspath(model_dir), options=options) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()


def test_export_from_checkpoint_manager_layout(tmp_path):
    rng = np.random.default_rng(5)
    model_dir = tmp_path / "run"
    prompts = {}
    for step in (10, 20, 30):
        prompts[step] = rng.normal(size=(6, 8)).astype(np.float32)
        state = {
            "step": np.int32(step),
            "params": {
                "prompt": {"prompt": prompts[step]},
                "encoder": {"layers_0": {"mlp": {"wi": np.ones((8, 16), np.float32)}}},
            },
            # Optimizer moments mirror the parameter tree (same path ending, same shape).
            "opt_state": {"mu": {"prompt": {"prompt": np.zeros((6, 8), np.float32)}}},
        }
        _save_manager(model_dir, step, state)
    with open(model_dir / "eval_metrics.jsonl", "w") as f:
        for step, acc, f1 in ((10, 0.5, 0.4), (20, 0.9, 0.8), (30, 0.7, 0.6)):
            f.write(json.dumps({"step": step, "task": "hp_toy", "accuracy": acc, "f1": f1,
                                "loss": 0.1}) + "\n")  # fmt: skip
    (model_dir / "config.gin").write_text("MIXTURE_OR_TASK_NAME = 'hp_toy'\n")

    out = tmp_path / "library" / "toy.npy"
    path, meta = spot.export_prompt(str(model_dir), str(out), model="tiny")
    np.testing.assert_array_equal(np.load(path), prompts[30])  # Latest, not the moments.
    assert meta["step"] == 30 and meta["task"] == "hp_toy" and meta["model"] == "tiny"
    assert meta["param_path"] == "params/prompt/prompt"
    assert meta["score"] == pytest.approx(0.65) and meta["score_metric"] == "mean(accuracy,f1)"
    assert (meta["length"], meta["emb_dim"]) == (6, 8)

    path, meta = spot.export_prompt(str(model_dir), str(out), step="best", metric="accuracy")
    np.testing.assert_array_equal(np.load(path), prompts[20])
    assert meta["step"] == 20 and meta["score"] == pytest.approx(0.9)
    path, meta = spot.export_prompt(str(model_dir / "checkpoint_10"), str(out), score=77.0)
    np.testing.assert_array_equal(np.load(path), prompts[10])
    assert meta["step"] == 10 and meta["score"] == 77.0

    # The exported file is a library entry with its metadata.
    entry = spot.PromptLibrary.load(str(tmp_path / "library"))["toy"]
    assert entry.task == "hp_toy" and entry.metadata["step"] == 10
    assert entry.embedding is None  # One prompt: it serves as both.
    assert entry.metadata["prompts"]["embedding"] == {"file": "toy.npy", "step": 10}

    # The paper's protocol: the task embedding from an early step, the transfer prompt
    # from the best one.
    path, meta = spot.export_prompt(str(model_dir), str(out), step="best", embedding_step=10)
    assert meta["prompts"] == {
        "transfer": {"file": "toy.npy", "step": 20},
        "embedding": {"file": "toy.embedding.npy", "step": 10},
    }
    entry = spot.PromptLibrary.load(str(tmp_path / "library"))["toy"]
    np.testing.assert_array_equal(entry.prompt, prompts[20])
    np.testing.assert_array_equal(entry.embedding, prompts[10])
    # A later one-prompt export removes the stale embedding.
    spot.export_prompt(str(model_dir), str(out), step=30)
    assert not (tmp_path / "library" / "toy.embedding.npy").exists()
    assert cli.main(
        ["export", f"--checkpoint={model_dir}", f"--output={out}", "--step=30",
         "--embedding_step=10", "--emb_dim=8", "--length=6"]
    ) == 0  # fmt: skip
    entry = spot.PromptLibrary.load(str(tmp_path / "library"))["toy"]
    np.testing.assert_array_equal(entry.embedding, prompts[10])
    np.testing.assert_array_equal(entry.prompt, prompts[30])

    with pytest.raises(UserError, match=r"No checkpoint at step 15.*\[10, 20, 30\]"):
        spot.export_prompt(str(model_dir), str(out), step=15)
    with pytest.raises(UserError, match="Unknown eval metric 'bleu'"):
        spot.export_prompt(str(model_dir), str(out), metric="bleu")
    # A target prompt straight from a (short) run's directory.
    np.testing.assert_array_equal(spot.load_target_prompt(str(model_dir), step=20), prompts[20])


def test_export_other_layouts_and_bad_checkpoints(tmp_path, capsys):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(6)
    prompt = rng.normal(size=(4, 8)).astype(np.float32)

    def save(directory, state):
        with ocp.StandardCheckpointer() as c:
            c.save(os.path.abspath(directory), state)

    # This package's TrainState layout: `trainable` / `frozen`, optimizer moments in lists.
    save(tmp_path / "ts" / "checkpoint_3", {
        "step": np.int32(3),
        "trainable": {"prompt": {"prompt": prompt}},
        "frozen": {"token_embedder": {"embedding": np.ones((16, 8), np.float32)}},
        "opt_state": [{"v_row": {"prompt": {"prompt": np.ones((4,), np.float32)}}},
                      {"mu": {"prompt": {"prompt": np.zeros((4, 8), np.float32)}}}],
    })  # fmt: skip
    got = spot.read_checkpoint_prompt(str(tmp_path / "ts"))
    np.testing.assert_array_equal(got.prompt, prompt)
    assert got.param_path == "trainable/prompt/prompt" and got.step == 3

    # A plain checkpoint directory with the train state under `state`.
    save(tmp_path / "plain" / "checkpoint_7", {"state": {"params": {"prompt": {"prompt": prompt}}}})
    out = tmp_path / "out.npy"
    assert cli.main(
        ["export", f"--checkpoint={tmp_path / 'plain'}", f"--output={out}", "--task=hp_x",
         "--emb_dim=8", "--length=4"]
    ) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(out), prompt)
    assert json.loads(out.with_suffix(".json").read_text())["step"] == 7
    # A newer, incomplete checkpoint (an interrupted save) is skipped, not used or deleted.
    (tmp_path / "plain" / "checkpoint_9").mkdir()
    assert spot.read_checkpoint_prompt(str(tmp_path / "plain")).step == 7
    assert (tmp_path / "plain" / "checkpoint_9").is_dir()
    # A checkpoint whose prompt does not fit the model is not left behind.
    assert cli.main(
        ["export", f"--checkpoint={tmp_path / 'plain'}", f"--output={tmp_path / 'no.npy'}",
         "--emb_dim=16"]
    ) == 1  # fmt: skip
    assert "emb_dim is 16" in capsys.readouterr().err and not (tmp_path / "no.npy").exists()

    # SMoP: prompt/prompts [k, l, d]; one prompt is exported with --prompt_index.
    smop = rng.normal(size=(3, 4, 8)).astype(np.float32)
    save(tmp_path / "smop" / "checkpoint_1", {"params": {"prompt": {
        "prompts": smop, "router": {"kernel": np.ones((8, 3), np.float32)}}}})  # fmt: skip
    with pytest.raises(UserError, match=r"an SMoP checkpoint with 3 prompts.*--prompt_index"):
        spot.read_checkpoint_prompt(str(tmp_path / "smop"))
    got = spot.read_checkpoint_prompt(str(tmp_path / "smop"), prompt_index=2)
    np.testing.assert_array_equal(got.prompt, smop[2])
    with pytest.raises(UserError, match="out of range for 3 prompts"):
        spot.read_checkpoint_prompt(str(tmp_path / "smop"), prompt_index=3)

    # Multi-task prompt tuning: prompt/prompt [tasks, l, d].
    save(tmp_path / "mt" / "checkpoint_1", {"params": {"prompt": {"prompt": smop}}})
    with pytest.raises(UserError, match="a multi-task prompt with 3 prompts"):
        spot.read_checkpoint_prompt(str(tmp_path / "mt"))

    # No prompt (HyperPrompt / model tuning), NaN prompt, not a checkpoint, no checkpoints.
    save(tmp_path / "hp" / "checkpoint_1",
         {"params": {"hyperprompt": {"global_prompts": np.ones((2, 3), np.float32)}}})  # fmt: skip
    with pytest.raises(
        ValueError, match=r"No soft prompt.*hyperprompt/global_prompts.*HyperPrompt"
    ):
        spot.read_checkpoint_prompt(str(tmp_path / "hp"))
    nan = prompt.copy()
    nan[0, 0] = np.nan
    save(tmp_path / "nan" / "checkpoint_1", {"params": {"prompt": {"prompt": nan}}})
    with pytest.raises(UserError, match="non-finite"):
        spot.read_checkpoint_prompt(str(tmp_path / "nan"))
    (tmp_path / "raw" / "checkpoint_2").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no orbax PyTree checkpoint"):
        spot.read_checkpoint_prompt(str(tmp_path / "raw"))
    with pytest.raises(UserError, match="is not a directory"):
        spot.read_checkpoint_prompt(str(tmp_path / "nowhere"))


def test_best_eval_score(tmp_path):
    rows = [
        {"step": 1, "task": "a", "accuracy": 0.2},
        {"step": 2, "task": "a", "accuracy": 0.6},
        {"step": 2, "task": "b", "accuracy": 0.9},
    ]
    (tmp_path / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Several tasks (a mixture's run): the mean over the tasks evaluated at each step;
    # step 1 (only task a) is not comparable with step 2 (both) and is left out.
    both = spot.best_eval_score(str(tmp_path))
    assert (both.score, both.step, both.by_step) == (
        pytest.approx(0.75),
        2,
        {2: pytest.approx(0.75)},
    )
    assert both.metric == "mean over 2 tasks of accuracy"
    best = spot.best_eval_score(str(tmp_path), task="a")
    assert (best.score, best.step, best.metric, best.ranking) == (0.6, 2, "accuracy", [2, 1])
    assert spot.best_eval_score(str(tmp_path / "none")) is None
    (tmp_path / "eval_metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"eval_metrics.jsonl:2 is not valid JSON"):
        spot.best_eval_score(str(tmp_path))


# ----------------------------------------------------------------------------------------
# Best of top-k (orchestration, with a stand-in launcher)
# ----------------------------------------------------------------------------------------


def _parse_argv(argv):
    flags = {}
    for a in argv:
        name, value = a.split("=", 1)
        flags.setdefault(name, []).append(value)
    return flags


def test_best_of_topk_runs_each_candidate_and_keeps_the_best(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(8)
    target = rng.normal(size=(4, 8)).astype(np.float32) + 1
    prompts = {
        "near": target + 0.2 * rng.normal(size=(4, 8)).astype(np.float32),
        "mid": target + 1.0 * rng.normal(size=(4, 8)).astype(np.float32),
        "broken": target + 0.6 * rng.normal(size=(4, 8)).astype(np.float32),
        "far": -target,
    }
    lib = spot.PromptLibrary.load(_write_library(tmp_path / "lib", prompts))
    ranked = spot.rank_sources(lib, target, "cosine_of_average_tokens")
    assert [r.name for r in ranked] == ["near", "broken", "mid", "far"]
    final_score = {"near": 70.0, "broken": None, "mid": 85.0}
    calls = []

    def fake_launcher(argv):
        # Stands in for `python -m hyperprompt_jax.train`: checks what it was given,
        # "trains" (the prompt moves), logs two evaluations and saves a checkpoint.
        flags = _parse_argv(argv)
        calls.append(flags)
        model_dir = ast.literal_eval(flags["--gin.MODEL_DIR"][0])
        source = ast.literal_eval(flags["--gin.SOURCE_PROMPT"][0])
        name = os.path.basename(source)[: -len(".npy")]
        if final_score[name] is None:
            return 1
        os.makedirs(model_dir, exist_ok=True)
        trained = np.load(source) + 1.0
        with ocp.StandardCheckpointer() as c:
            c.save(
                os.path.join(model_dir, "checkpoint_20"),
                {"trainable": {"prompt": {"prompt": trained}}},
            )
        with open(os.path.join(model_dir, "eval_metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 10, "task": "hp_t", "accuracy": 50.0}) + "\n")
            f.write(json.dumps({"step": 20, "task": "hp_t", "accuracy": final_score[name]}) + "\n")
        return 0

    out = tmp_path / "bot"
    result = transfer.best_of_topk(
        lib, ranked, 3, model_dir=str(out), gin_files=["runs/x.gin", "methods/spot.gin"],
        gin_bindings=["TRAIN_STEPS=20"], task="hp_t", length=4, emb_dim=8,
        launcher=fake_launcher,
    )  # fmt: skip
    assert len(calls) == 3
    for i, (flags, r) in enumerate(zip(calls, ranked[:3], strict=True), 1):
        assert flags["--gin_file"] == ["runs/x.gin", "methods/spot.gin"]
        assert flags["--gin.TRAIN_STEPS"] == ["20"]
        assert ast.literal_eval(flags["--gin.MODEL_DIR"][0]) == str(out / f"top{i}_{r.name}")
        assert ast.literal_eval(flags["--gin.SOURCE_PROMPT"][0]) == str(
            tmp_path / "lib" / f"{r.name}.npy"
        )
    by_name = {c.name: c for c in result.candidates}
    assert by_name["broken"].exit_code == 1 and by_name["broken"].score is None
    assert by_name["near"].score == 70.0 and by_name["mid"].score == 85.0
    # The best on validation wins even though it was ranked lower.
    assert result.best.name == "mid" and result.best.score_step == 20
    np.testing.assert_array_equal(np.load(result.best_prompt_path), prompts["mid"] + 1.0)
    summary = json.loads((out / "best_of_topk.json").read_text())
    assert summary["best"]["name"] == "mid" and len(summary["candidates"]) == 3
    assert "<- best" in transfer.format_best_of_topk(result)

    with pytest.raises(UserError, match="would override what best_of_topk sets"):
        transfer.best_of_topk(lib, ranked, 1, model_dir=str(out), gin_files=["a.gin"],
                          gin_bindings=["SOURCE_PROMPT='x.npy'"], launcher=fake_launcher)  # fmt: skip
    with pytest.raises(UserError, match="length 4 but the prompt length is 100"):
        transfer.best_of_topk(lib, ranked, 1, model_dir=str(out), gin_files=["a.gin"],
                          length=100, launcher=fake_launcher)  # fmt: skip
    assert len(calls) == 3  # Nothing ran for the bad requests.
    with pytest.raises(UserError, match="No best-of-top-k candidate produced a validation score"):
        transfer.best_of_topk(lib, ranked[1:], 1, model_dir=str(tmp_path / "b2"),
                          gin_files=["a.gin"], launcher=fake_launcher)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Top-k multi-task mixture
# ----------------------------------------------------------------------------------------


def test_topk_mixture_registration(tmp_path):
    import seqio

    names = ("spot_test_target", "spot_test_near", "spot_test_mid", "spot_test_far")
    _register_toy_tasks(names, {n: 10 if n.endswith("target") else 1000 for n in names})
    rng = np.random.default_rng(7)
    target = rng.normal(size=(4, 8)).astype(np.float32) + 1
    prompts = {
        "near": target + 0.1 * rng.normal(size=(4, 8)).astype(np.float32),
        "mid": target + 1.0 * rng.normal(size=(4, 8)).astype(np.float32),
        "far": -target,
        "nometa": target + 5.0 * rng.normal(size=(4, 8)).astype(np.float32),
    }
    meta = {n: {"task": f"spot_test_{n}"} for n in ("near", "mid", "far")}
    lib = spot.PromptLibrary.load(_write_library(tmp_path / "lib", prompts, meta))
    ranked = spot.rank_sources(lib, target, "cosine_of_average_tokens")
    assert [r.name for r in ranked[:2]] == ["near", "mid"]

    sources = spot.source_tasks(ranked, 2)
    mixture = spot.register_topk_mixture("spot_test_target", sources)
    assert mixture.name == "spot_spot_test_target_top2_mixture"
    assert seqio.MixtureRegistry.get(mixture.name) is mixture
    assert sorted(t.name for t in mixture.tasks) == [
        "spot_test_mid", "spot_test_near", "spot_test_target"
    ]  # fmt: skip
    # Examples-proportional: the 1000-example sources outweigh the 10-example target.
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates["spot_test_near"] == 1000 and rates["spot_test_target"] == 10
    equal = spot.register_topk_mixture("spot_test_target", sources, rate="equal", name="spot_eq")
    assert {equal.get_rate(t) for t in equal.tasks} == {1.0}

    with pytest.raises(UserError, match=r"task of library prompt\(s\) \['nometa'\] is unknown"):
        spot.source_tasks(ranked, 4)
    with pytest.raises(UserError, match=r"'spot_test_nera' \(did you mean spot_test_near"):
        spot.register_topk_mixture("spot_test_target", ["spot_test_nera"])


def _register_toy_tasks(names, sizes):
    import seqio
    import tensorflow as tf

    for name in names:
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensors({"inputs": "x", "targets": "y"}),
                splits=("train", "validation"),
                num_input_examples={"train": sizes.get(name, 100)},
            ),
            output_features={},
        )  # fmt: skip


def test_mixture_transfer_trains_on_the_mixture_then_transfers(tmp_path):
    import orbax.checkpoint as ocp

    import gin
    from hyperprompt_jax import gin_utils

    _register_toy_tasks(["mt_target", "mt_near", "mt_far"], {"mt_target": 10, "mt_near": 500})
    rng = np.random.default_rng(9)
    target = rng.normal(size=(4, 8)).astype(np.float32) + 1
    prompts = {"near": target + 0.1 * rng.normal(size=(4, 8)).astype(np.float32), "far": -target}
    meta = {n: {"task": f"mt_{n}"} for n in prompts}
    lib = spot.PromptLibrary.load(_write_library(tmp_path / "lib", prompts, meta))
    ranked = spot.rank_sources(lib, target)
    calls = []

    def fake_launcher(argv):
        # Stands in for `python -m hyperprompt_jax.train`: parses the gin files it is
        # given (the mixture file must register the mixture and name it), then writes
        # a checkpoint whose prompt is the initial prompt + 1, and an evaluation.
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
        flags = dict(a[len("--gin.") :].split("=", 1) for a in argv if a.startswith("--gin."))
        calls.append((files, flags))
        model_dir = ast.literal_eval(flags["MODEL_DIR"])
        if files[-1].endswith(transfer.MIXTURE_GIN_FILE):
            import seqio

            seqio.MixtureRegistry.remove("spot_mt_target_top1_mixture")
            # As the launcher reads it: a configurable that takes %MIXTURE_OR_TASK_NAME
            # (here `mixture_name`, which echoes it back in its result).
            gin.clear_config()
            echo = tmp_path / "echo.gin"
            echo.write_text(
                "from __gin__ import dynamic_registration\n"
                "from hyperprompt_jax.spot import mixtures\n"
                "mixtures.mixture_name.target_task = %MIXTURE_OR_TASK_NAME\n"
            )
            gin_utils.parse_gin([files[-1], str(echo)], [], finalize=False)
            echoed = gin.get_configurable(mixtures.mixture_name)(k=9)
            gin.clear_config()
            name = echoed[len("spot_") : -len("_top9_mixture")]
            assert name == "spot_mt_target_top1_mixture"
            members = sorted(t.name for t in seqio.MixtureRegistry.get(name).tasks)
            assert members == ["mt_near", "mt_target"]
            start = np.zeros((4, 8), np.float32)
        else:
            start = np.load(ast.literal_eval(flags["SOURCE_PROMPT"]))
        os.makedirs(model_dir, exist_ok=True)
        with ocp.StandardCheckpointer() as c:
            c.save(
                os.path.join(model_dir, "checkpoint_5"),
                {"trainable": {"prompt": {"prompt": start + 1}}},
            )
        with open(os.path.join(model_dir, "eval_metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 5, "task": "mt_target", "accuracy": 60.0}) + "\n")
        return 0

    out = tmp_path / "mt"
    result = transfer.mixture_transfer(
        ranked, 1, target_task="mt_target", model_dir=str(out), gin_files=["runs/x.gin"],
        gin_bindings=["TRAIN_STEPS=5"], mixture_gin_bindings=["LEARNING_RATE=0.3"],
        launcher=fake_launcher,
    )  # fmt: skip
    (mix_files, mix_flags), (tgt_files, tgt_flags) = calls
    assert mix_files == ["runs/x.gin", "methods/prompt_tuning.gin", str(out / "spot_mixture.gin")]
    assert mix_flags["TRAIN_STEPS"] == "5" and mix_flags["LEARNING_RATE"] == "0.3"
    assert tgt_files == ["runs/x.gin", "methods/spot.gin"] and "LEARNING_RATE" not in tgt_flags
    assert ast.literal_eval(tgt_flags["MIXTURE_OR_TASK_NAME"]) == "mt_target"
    # The target starts from the mixture run's final prompt.
    source = ast.literal_eval(tgt_flags["SOURCE_PROMPT"])
    assert source == str(out / "mixture_prompt.npy")
    np.testing.assert_array_equal(np.load(source), np.ones((4, 8), np.float32))
    assert result.sources == ("mt_near",) and result.score == 60.0
    assert json.loads((out / "mixture_transfer.json").read_text())["mixture"] == result.mixture

    with pytest.raises(UserError, match="would override what mixture_transfer sets"):
        transfer.mixture_transfer(
            ranked, 1, target_task="mt_target", model_dir=str(out), gin_files=["a.gin"],
            gin_bindings=["MIXTURE_OR_TASK_NAME='x'"], launcher=fake_launcher,
        )  # fmt: skip
    with pytest.raises(UserError, match=r"'mt_nope' \(did you mean"):
        transfer.mixture_transfer(
            ranked, 1, target_task="mt_nope", model_dir=str(out), gin_files=["a.gin"],
            launcher=fake_launcher,
        )  # fmt: skip
    assert len(calls) == 2  # Nothing ran for the bad requests.
