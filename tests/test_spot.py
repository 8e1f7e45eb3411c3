"""SPoT: task-embedding metrics, libraries, retrieval, transfer init, export, mixtures.

* Both metrics equal naive loops over token pairs (random prompts of different
  lengths); matrices are symmetric, the first metric's diagonal is 1, the per-token
  metric's diagonal is the prompt's own mean token-pair cosine.
* The real released prompts (SST-2, MRPC, RTE; T5.1.1 LM-adapted base): the
  `similarity` command writes both CSVs and both PNGs; RTE retrieves MRPC (the other
  sentence-pair task) before SST-2 under both metrics.
* The top-k weighted average equals the hand-computed combination.
* `export` reads prompts from orbax checkpoints written here (CheckpointManager and
  plain StandardCheckpointer layouts, optimizer moments that mirror the prompt's path,
  SMoP and multi-task prompts, no prompt at all), with scores from eval_metrics.jsonl.
* `mixture` registers the target plus the top-k source tasks and refuses unknown tasks.
* Bad input (NaN / inf, wrong rank, width or length mismatches, empty library,
  negative similarities, bad k) raises ValueError naming the problem; the command line
  prints it as one `error:` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hyperprompt_jax import spot, spot_cli

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _naive_average_tokens(p: np.ndarray, q: np.ndarray) -> float:
    return _cos(p.mean(0), q.mean(0))


def _naive_per_token(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for i in range(p.shape[0]):
        for j in range(q.shape[0]):
            total += _cos(p[i], q[j])
    return total / (p.shape[0] * q.shape[0])


def _random_prompts(rng, lengths, emb_dim=16):
    # A shared offset makes the similarities non-trivial (not all near 0).
    offset = rng.normal(size=emb_dim)
    return [(rng.normal(size=(n, emb_dim)) + offset).astype(np.float32) for n in lengths]


def _write_library(directory, prompts, metadata=None):
    os.makedirs(directory, exist_ok=True)
    for name, p in prompts.items():
        np.save(os.path.join(directory, f"{name}.npy"), p)
        if metadata and name in metadata:
            with open(os.path.join(directory, f"{name}.json"), "w") as f:
                json.dump(metadata[name], f)
    return str(directory)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,naive",
    [
        ("cosine_of_average_tokens", _naive_average_tokens),
        ("per_token_average_cosine", _naive_per_token),
    ],
)
def test_metrics_match_naive_loops(name, naive):
    rng = np.random.default_rng(0)
    a = _random_prompts(rng, [5, 7, 3])
    b = _random_prompts(rng, [4, 6])
    got = spot.get_metric(name)(a, b)
    want = np.array([[naive(p, q) for q in b] for p in a])
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_similarity_matrix_symmetric_with_expected_diagonal():
    rng = np.random.default_rng(1)
    prompts = _random_prompts(rng, [6, 6, 9, 4])
    avg = spot.similarity_matrix(prompts, spot.cosine_of_average_tokens)
    per = spot.similarity_matrix(prompts, spot.per_token_average_cosine)
    for m in (avg, per):
        np.testing.assert_array_equal(m, m.T)
        assert np.all(np.abs(m) <= 1 + 1e-9)
    np.testing.assert_allclose(np.diag(avg), 1.0, atol=1e-12)
    # Per-token: a prompt vs itself averages its distinct token pairs too (< 1).
    np.testing.assert_allclose(np.diag(per), [_naive_per_token(p, p) for p in prompts], rtol=1e-6)
    assert np.all(np.diag(per) < 1)


def test_metric_is_scale_invariant_and_detects_identical_tasks():
    rng = np.random.default_rng(2)
    p, q = _random_prompts(rng, [8, 8])
    for metric in spot.METRICS.values():
        np.testing.assert_allclose(metric([p], [q]), metric([3.0 * p], [q]), rtol=1e-6)
    # The same prompt in the library is its own best match.
    lib = spot.PromptLibrary.from_prompts({"same": p, "other": q})
    assert spot.rank_sources(lib, p)[0].name == "same"


# ----------------------------------------------------------------------------------------
# Retrieval and the weighted-average initialisation
# ----------------------------------------------------------------------------------------


def test_rank_orders_by_similarity_and_weighted_average_is_hand_computed():
    rng = np.random.default_rng(3)
    target = rng.normal(size=(5, 8)).astype(np.float32) + 1.0
    near = (target + 0.3 * rng.normal(size=(5, 8))).astype(np.float32)
    mid = (target + 1.5 * rng.normal(size=(5, 8))).astype(np.float32)
    far = (-target + 0.5 * rng.normal(size=(5, 8))).astype(np.float32)
    lib = spot.PromptLibrary.from_prompts({"a_far": far, "b_mid": mid, "c_near": near})
    for metric in spot.METRICS:
        ranked = spot.rank_sources(lib, target, metric)
        assert [r.name for r in ranked] == ["c_near", "b_mid", "a_far"], metric
        assert ranked[0].similarity > ranked[1].similarity > ranked[2].similarity

    ranked = spot.rank_sources(lib, target)
    s_near, s_mid = ranked[0].similarity, ranked[1].similarity
    init, weights = spot.top_k_weighted_average(lib, ranked, 2, length=5, emb_dim=8)
    want = (s_near * near.astype(np.float64) + s_mid * mid) / (s_near + s_mid)
    np.testing.assert_allclose(weights, [s_near / (s_near + s_mid), s_mid / (s_near + s_mid)])
    np.testing.assert_allclose(init, want, rtol=1e-6)
    assert init.dtype == np.float32 and init.shape == (5, 8)
    uniform, w = spot.top_k_weighted_average(lib, ranked, 2, weighting="uniform")
    np.testing.assert_allclose(uniform, (near + mid) / 2, rtol=1e-6)
    np.testing.assert_allclose(w, [0.5, 0.5])

    # The far prompt is anti-similar: a similarity-weighted average over it is refused.
    with pytest.raises(ValueError, match="positive similarities.*a_far.*smaller k"):
        spot.top_k_weighted_average(lib, ranked, 3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        spot.top_k_weighted_average(lib, ranked, 4)
    with pytest.raises(ValueError, match="has length 5 but the prompt length is 7"):
        spot.top_k_weighted_average(lib, ranked, 2, length=7)


def test_weighted_average_needs_one_shape():
    rng = np.random.default_rng(4)
    target, p, q = _random_prompts(rng, [4, 4, 6])
    lib = spot.PromptLibrary.from_prompts({"p": p, "q": q})
    ranked = spot.rank_sources(lib, target)  # Ranking works across lengths...
    with pytest.raises(ValueError, match="must share one shape"):  # ...averaging does not.
        spot.top_k_weighted_average(lib, ranked, 2, weighting="uniform")


# ----------------------------------------------------------------------------------------
# The real released prompts
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released_prompts(fixtures) -> pathlib.Path:
    path = fixtures / "pretrained_prompts" / "t5_1_1_lm100k_base"
    if not path.is_dir():
        pytest.fail(f"The fixtures folder {fixtures} exists but lacks {path}.")
    return path


def test_similarity_on_released_prompts(released_prompts, tmp_path, capsys):
    out = tmp_path / "similarity"
    assert (
        spot_cli.main(
            ["similarity", f"--library={released_prompts}", f"--output_dir={out}", "--emb_dim=768"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lib = spot.PromptLibrary.load(str(released_prompts), emb_dim=768, length=100)
    assert lib.names == ["mrpc", "rte", "sst2"] and all(not e.metadata for e in lib)
    for metric in spot.METRICS:
        names, matrix = spot.read_matrix_csv(str(out / f"similarity_{metric}.csv"))
        assert names == lib.names and metric in printed
        want = spot.similarity_matrix(lib.prompts, spot.get_metric(metric))
        np.testing.assert_allclose(matrix, want, atol=1e-6)
        np.testing.assert_array_equal(matrix, matrix.T)
    # Real task embeddings are far from orthogonal on average but clearly distinct.
    _, avg = spot.read_matrix_csv(str(out / "similarity_cosine_of_average_tokens.csv"))
    off = avg[~np.eye(3, dtype=bool)]
    assert np.all(off > 0.3) and np.all(off < 0.9)

    import matplotlib.image

    for png in ("heatmap.png", "dendrogram.png"):
        path = out / png
        assert path.stat().st_size > 20_000, png
        image = matplotlib.image.imread(str(path))
        assert image.shape[0] > 300 and image.shape[1] > 600, (png, image.shape)
        assert image[..., :3].std() > 0.05, f"{png} looks blank"

    # RTE (entailment, sentence pairs) retrieves MRPC (paraphrase, sentence pairs) before
    # SST-2 (single-sentence sentiment) under both metrics.
    target = spot.load_prompt_file(str(released_prompts / "rte.npy"))
    for metric in spot.METRICS:
        ranked = spot.rank_sources(lib.without(["rte"]), target, metric)
        assert [r.name for r in ranked] == ["mrpc", "sst2"], metric


def test_cli_module_entry_point_rank_and_init(released_prompts, tmp_path):
    # `python -m hyperprompt_jax.spot` (run where no local `gin/` can shadow packages).
    init = tmp_path / "rte_init.npy"
    cmd = [
        sys.executable, "-m", "hyperprompt_jax.spot", "init", f"--library={released_prompts}",
        f"--target={released_prompts / 'rte.npy'}", "--k=2", f"--output={init}",
        "--length=100", "--emb_dim=768", "--target_task=hp_glue_rte_v002",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Excluded" in run.stdout and "rte" in run.stdout  # The target itself.
    assert "methods/spot.gin" in run.stdout and "SOURCE_PROMPT" in run.stdout
    meta = json.loads(init.with_suffix(".json").read_text())
    assert [s["name"] for s in meta["sources"]] == ["mrpc", "sst2"]
    mrpc = np.load(released_prompts / "mrpc.npy").astype(np.float64)
    sst2 = np.load(released_prompts / "sst2.npy").astype(np.float64)
    w = [s["weight"] for s in meta["sources"]]
    np.testing.assert_allclose(np.load(init), w[0] * mrpc + w[1] * sst2, rtol=1e-5, atol=1e-4)
    assert meta["task"] == "hp_glue_rte_v002" and meta["k"] == 2

    ranking = tmp_path / "ranking.json"
    assert spot_cli.main(
        ["rank", f"--library={released_prompts}", f"--target={released_prompts / 'sst2.npy'}",
         "--metric=per_token_average_cosine", f"--output={ranking}"]
    ) == 0  # fmt: skip
    rows = json.loads(ranking.read_text())["ranking"]
    assert [r["name"] for r in rows] == ["rte", "mrpc"]
    assert rows[0]["similarity"] >= rows[1]["similarity"]


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_prompts_raise_clear_errors(tmp_path):
    good = np.ones((4, 8), np.float32)
    nan = good.copy()
    nan[2, 3] = np.nan
    with pytest.raises(
        ValueError, match=r"1 non-finite value\(s\) \(NaN\), first at token 2, dimension 3"
    ):
        spot.check_prompt(nan, "x")
    inf = good.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\(inf\)"):
        spot.check_prompt(inf, "x")
    with pytest.raises(ValueError, match=r"expected a 2-D \[length, emb_dim\].*--prompt_index"):
        spot.check_prompt(np.ones((2, 4, 8), np.float32), "x")
    with pytest.raises(ValueError, match="squeeze"):
        spot.check_prompt(np.ones((1, 4, 8), np.float32), "x")
    with pytest.raises(ValueError, match="expected a float array"):
        spot.check_prompt(np.ones((4, 8), np.int32), "x")
    with pytest.raises(ValueError, match="width 8 but the model's emb_dim is 768"):
        spot.check_prompt(good, "x", emb_dim=768)
    with pytest.raises(ValueError, match="length 4 but the prompt length is 100"):
        spot.check_prompt(good, "x", length=100)
    zero_token = good.copy()
    zero_token[1] = 0
    with pytest.raises(ValueError, match="row 1 has zero norm"):
        spot.per_token_average_cosine([zero_token], [good])

    # Libraries: empty, missing, mixed widths, a NaN file, bad metadata.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .npy prompts"):
        spot.PromptLibrary.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is not a directory"):
        spot.PromptLibrary.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="library is empty"):
        spot.PromptLibrary(())
    mixed = _write_library(tmp_path / "mixed", {"a": good, "b": np.ones((4, 6), np.float32)})
    with pytest.raises(ValueError, match=r"share emb_dim.*'a': 8, 'b': 6"):
        spot.PromptLibrary.load(mixed)
    bad = _write_library(tmp_path / "nan", {"a": good, "b": nan})
    with pytest.raises(ValueError, match=r"b\.npy.*non-finite"):
        spot.PromptLibrary.load(bad)
    meta = _write_library(tmp_path / "meta", {"a": good})
    (tmp_path / "meta" / "a.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        spot.PromptLibrary.load(meta)
    lib = spot.PromptLibrary.from_prompts({"a": good})
    with pytest.raises(
        ValueError, match="target prompt has width 6 but the library's prompts have emb_dim 8"
    ):
        spot.rank_sources(lib, np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match="Unknown similarity metric 'cosine'"):
        spot.get_metric("cosine")
    with pytest.raises(ValueError, match="leaves the prompt library empty"):
        lib.without(["a"])


def test_cli_reports_bad_input_as_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    target = tmp_path / "t.npy"
    np.save(target, np.ones((4, 8), np.float32))
    code = spot_cli.main(["rank", f"--library={tmp_path / 'empty'}", f"--target={target}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: Prompt library") and "Traceback" not in err
    lib = _write_library(tmp_path / "lib", {"a": np.ones((4, 8), np.float32)})
    code = spot_cli.main(
        ["similarity", f"--library={lib}", f"--output_dir={tmp_path}", "--emb_dim=16"]
    )
    assert code == 1 and "emb_dim is 16" in capsys.readouterr().err


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

    with pytest.raises(ValueError, match=r"No checkpoint at step 15.*\[10, 20, 30\]"):
        spot.export_prompt(str(model_dir), str(out), step=15)
    with pytest.raises(ValueError, match="Unknown eval metric 'bleu'"):
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
    assert spot_cli.main(
        ["export", f"--checkpoint={tmp_path / 'plain'}", f"--output={out}", "--task=hp_x",
         "--emb_dim=8", "--length=4"]
    ) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(out), prompt)
    assert json.loads(out.with_suffix(".json").read_text())["step"] == 7
    # A checkpoint whose prompt does not fit the model is not left behind.
    assert spot_cli.main(
        ["export", f"--checkpoint={tmp_path / 'plain'}", f"--output={tmp_path / 'no.npy'}",
         "--emb_dim=16"]
    ) == 1  # fmt: skip
    assert "emb_dim is 16" in capsys.readouterr().err and not (tmp_path / "no.npy").exists()

    # SMoP: prompt/prompts [k, l, d]; one prompt is exported with --prompt_index.
    smop = rng.normal(size=(3, 4, 8)).astype(np.float32)
    save(tmp_path / "smop" / "checkpoint_1", {"params": {"prompt": {
        "prompts": smop, "router": {"kernel": np.ones((8, 3), np.float32)}}}})  # fmt: skip
    with pytest.raises(ValueError, match=r"an SMoP checkpoint with 3 prompts.*--prompt_index"):
        spot.read_checkpoint_prompt(str(tmp_path / "smop"))
    got = spot.read_checkpoint_prompt(str(tmp_path / "smop"), prompt_index=2)
    np.testing.assert_array_equal(got.prompt, smop[2])
    with pytest.raises(ValueError, match="out of range for 3 prompts"):
        spot.read_checkpoint_prompt(str(tmp_path / "smop"), prompt_index=3)

    # Multi-task prompt tuning: prompt/prompt [tasks, l, d].
    save(tmp_path / "mt" / "checkpoint_1", {"params": {"prompt": {"prompt": smop}}})
    with pytest.raises(ValueError, match="a multi-task prompt with 3 prompts"):
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
    with pytest.raises(ValueError, match="non-finite"):
        spot.read_checkpoint_prompt(str(tmp_path / "nan"))
    (tmp_path / "raw" / "checkpoint_2").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no orbax PyTree checkpoint"):
        spot.read_checkpoint_prompt(str(tmp_path / "raw"))
    with pytest.raises(ValueError, match="is not a directory"):
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
    with pytest.raises(ValueError, match=r"eval_metrics.jsonl:2 is not valid JSON"):
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
    import ast

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
    ranked = spot.rank_sources(lib, target)
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
    result = spot.best_of_topk(
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
    assert "<- best" in spot.format_best_of_topk(result)

    with pytest.raises(ValueError, match="would override what best_of_topk sets"):
        spot.best_of_topk(lib, ranked, 1, model_dir=str(out), gin_files=["a.gin"],
                          gin_bindings=["SOURCE_PROMPT='x.npy'"], launcher=fake_launcher)  # fmt: skip
    with pytest.raises(ValueError, match="length 4 but the prompt length is 100"):
        spot.best_of_topk(lib, ranked, 1, model_dir=str(out), gin_files=["a.gin"],
                          length=100, launcher=fake_launcher)  # fmt: skip
    assert len(calls) == 3  # Nothing ran for the bad requests.
    with pytest.raises(ValueError, match="No best-of-top-k candidate produced a validation score"):
        spot.best_of_topk(lib, ranked[1:], 1, model_dir=str(tmp_path / "b2"),
                          gin_files=["a.gin"], launcher=fake_launcher)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Top-k multi-task mixture
# ----------------------------------------------------------------------------------------


def test_topk_mixture_registration(tmp_path):
    import seqio
    import tensorflow as tf

    def register(name):
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files: tf.data.Dataset.from_tensors({"inputs": "x", "targets": "y"}),
                splits=("train", "validation"),
                num_input_examples={"train": 10 if name.endswith("target") else 1000},
            ),
            output_features={},
        )  # fmt: skip

    for name in ("spot_test_target", "spot_test_near", "spot_test_mid", "spot_test_far"):
        register(name)
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
    ranked = spot.rank_sources(lib, target)
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

    with pytest.raises(ValueError, match=r"task of library prompt\(s\) \['nometa'\] is unknown"):
        spot.source_tasks(ranked, 4)
    with pytest.raises(ValueError, match=r"'spot_test_nera' \(did you mean spot_test_near"):
        spot.register_topk_mixture("spot_test_target", ["spot_test_nera"])


# ----------------------------------------------------------------------------------------
# Synthetic tasks: retrieval and transfer through the real launcher
# ----------------------------------------------------------------------------------------
#
# A tiny T5 (byte vocabulary) is first model-tuned on instructions "<rule>: <letters>"
# for four rules (first / last / min / max letter), so the frozen backbone "knows" the
# rules when told. Prompts are then tuned on inputs WITHOUT the instruction, so a
# prompt has to say which rule applies:
#   target     syn_max        max letter of 8 letters
#   related    syn_max_short  the same rule on 6-letter strings (another domain)
#   unrelated  syn_first      first letter of 8 letters
# The target's embedding comes from a short prompt-tuning run on the target (as in the
# paper). Sources and probe start from different random prompts (different seeds).
#
# The test runs the small configuration and asserts the ranking; the full
# configuration also trains the transfers (best_of_topk over both sources) and a fresh
# prompt, and prints the numbers reported in the README (SPoT):
#   python tests/test_spot.py --workdir=/tmp/spot_synthetic --config=full

_SYN_RULES = {"first": lambda s: s[0], "last": lambda s: s[-1], "min": min, "max": max}
_SYN_SIZES = {"train": 20000, "validation": 256}
# name -> (rule, string length, data seed)
_SYN_PROMPT_TASKS = {
    "syn_max": ("max", 8, 1),
    "syn_max_short": ("max", 6, 2),
    "syn_first": ("first", 8, 3),
}
_SYN_CONFIGS = {
    # The test: about a minute of training on 2 CPU cores, no evaluation.
    "small": dict(backbone_steps=600, source_steps=150, probe_steps=30, transfer_steps=0),
    # The README numbers: evaluation every 5 steps of the transfers.
    "random_backbone": dict(backbone_steps=0, source_steps=150, probe_steps=30, transfer_steps=0),
    "full": dict(backbone_steps=1500, source_steps=300, probe_steps=30, transfer_steps=150),
}
_SYN_GIN = """from __gin__ import dynamic_registration
import seqio
include 'runs/finetune.gin'
include 'models/t5_1_1_tiny.gin'
VOCABULARY = @seqio.ByteVocabulary()
NUM_EMBEDDINGS = 384
TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 2}
BATCH_SIZE = 32
LOG_PERIOD = 100
SAVE_PERIOD = 100000
KEEP = 1
"""

_SYN_NO_EVAL_GIN = """from __gin__ import dynamic_registration
import hyperprompt_jax.train as train_script
train_script.train.eval_dataset_cfg = None
"""


def _register_synthetic_tasks() -> None:
    import seqio
    import tensorflow as tf
    from hyperprompt_jax.tasks import metrics as hp_metrics

    vocab = seqio.ByteVocabulary()
    features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}

    def add(name, rule, length, data_seed, prefix=None):
        def dataset_fn(split, shuffle_files=False, seed=None):
            del shuffle_files, seed  # In memory; seqio shuffles.
            rng = np.random.RandomState(data_seed + (0 if split == "train" else 1000))
            letters = rng.randint(0, 8, size=(_SYN_SIZES[split], length))
            strings = ["".join("abcdefgh"[i] for i in row) for row in letters]
            inputs = [f"{prefix}: {s}" if prefix else s for s in strings]
            targets = [_SYN_RULES[rule](s) for s in strings]
            return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                dataset_fn, splits=tuple(_SYN_SIZES), num_input_examples=_SYN_SIZES
            ),
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            postprocess_fn=lambda t, **_: t.decode() if isinstance(t, bytes) else t,
            output_features=features,
            metric_fns=[hp_metrics.accuracy],
        )

    for rule in _SYN_RULES:
        add(f"syn_pre_{rule}", rule, 8, 10, prefix=rule)
    seqio.MixtureRegistry.remove("syn_pre")
    seqio.MixtureRegistry.add("syn_pre", [(f"syn_pre_{r}", 1.0) for r in _SYN_RULES])
    for name, (rule, length, data_seed) in _SYN_PROMPT_TASKS.items():
        add(name, rule, length, data_seed)


def _steps_to_reach(rows: list, threshold: float):
    for r in sorted(rows, key=lambda r: r["step"]):
        if r["accuracy"] >= threshold:
            return r["step"]
    return None


def run_synthetic_experiment(workdir: str, config: str = "small") -> dict:
    """Backbone -> source prompts -> library -> target probe -> ranking (-> transfers).

    Runs every training in this process through the launcher (`train.main`). Returns
    the rankings (and, for 'full', the transfer curves and steps to 99% accuracy).
    """
    import time

    import jax
    import orbax.checkpoint as ocp

    from hyperprompt_jax import checkpoints, train
    from hyperprompt_jax import trainer as trainer_lib

    cfg = _SYN_CONFIGS[config]
    os.makedirs(workdir, exist_ok=True)
    # Every prompt-tuning run compiles the same programs: reuse them across runs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    _register_synthetic_tasks()
    gin_file = os.path.join(workdir, "synthetic.gin")
    with open(gin_file, "w") as f:
        f.write(_SYN_GIN)
    no_eval_file = os.path.join(workdir, "no_eval.gin")
    with open(no_eval_file, "w") as f:
        f.write(_SYN_NO_EVAL_GIN)
    no_eval = f"--gin_file={no_eval_file}"
    timings = {}

    def run(name, method, task, steps, *flags):
        start = time.time()
        code = train.main([
            f"--gin_file={gin_file}", f"--gin_file=methods/{method}.gin",
            f"--gin.MODEL_DIR={os.path.join(workdir, name)!r}",
            f"--gin.MIXTURE_OR_TASK_NAME={task!r}", f"--gin.TRAIN_STEPS={steps}", *flags,
        ])  # fmt: skip
        timings[name] = round(time.time() - start, 1)
        if code != 0:
            raise RuntimeError(f"Training run {name} failed (exit {code}).")
        return os.path.join(workdir, name)

    # 1. The backbone, converted to a t5x checkpoint for INITIAL_CHECKPOINT_PATH.
    steps = cfg["backbone_steps"]
    prompt_flags = ["--gin.PROMPT_LENGTH=8"]
    if steps:
        backbone = run(
            "backbone", "model_tuning", "syn_pre", steps, "--gin.LEARNING_RATE=0.01", no_eval
        )
        tree = ocp.PyTreeCheckpointer().restore(
            os.path.abspath(os.path.join(backbone, f"checkpoint_{steps}", "default"))
        )
        params = trainer_lib.merge_params(tree["trainable"], tree.get("frozen") or {})
        backbone_t5x = checkpoints.save_t5x_checkpoint(
            params, os.path.join(workdir, "backbone_t5x"), steps
        )
        prompt_flags.append(f"--gin.INITIAL_CHECKPOINT_PATH={backbone_t5x!r}")

    # 2. Source prompts -> the library (export reads the launcher's checkpoints).
    library = os.path.join(workdir, "library")
    evaluate = [] if config == "small" else [f"--gin.EVAL_PERIOD={cfg['source_steps']}"]
    for seed, (name, task) in enumerate(
        (("max_short", "syn_max_short"), ("first", "syn_first")), 1
    ):
        run_dir = run(
            f"source_{name}", "prompt_tuning", task, cfg["source_steps"], *prompt_flags,
            f"--gin.RANDOM_SEED={seed}", *(evaluate or [no_eval]),
        )  # fmt: skip
        assert spot_cli.main(
            ["export", f"--checkpoint={run_dir}", f"--output={os.path.join(library, name)}.npy",
             "--model=tiny_bytes", "--emb_dim=64", "--length=8"]
        ) == 0  # fmt: skip

    # 3. The target's embedding: a short prompt-tuning run on the target.
    probe = run(
        "target_probe", "prompt_tuning", "syn_max", cfg["probe_steps"], *prompt_flags,
        "--gin.RANDOM_SEED=3", no_eval,
    )  # fmt: skip
    result: dict = {"config": config, "ranking": {}, "timings": timings}
    for metric in spot.METRICS:
        out = os.path.join(workdir, f"ranking_{metric}.json")
        assert spot_cli.main(
            ["rank", f"--library={library}", f"--target={probe}", f"--metric={metric}",
             f"--output={out}", "--emb_dim=64"]
        ) == 0  # fmt: skip
        with open(out) as f:
            rows = json.load(f)["ranking"]
        result["ranking"][metric] = [(r["name"], r["similarity"]) for r in rows]
    if not cfg["transfer_steps"]:
        return result

    # 4. Transfers: best of top-2 (both sources) and a fresh prompt, same settings.
    lib = spot.PromptLibrary.load(library)
    ranked = spot.rank_sources(lib, spot.load_target_prompt(probe))
    transfer = [
        f"{flag[len('--gin.'):]}" for flag in prompt_flags
    ] + ["MIXTURE_OR_TASK_NAME='syn_max'", f"TRAIN_STEPS={cfg['transfer_steps']}",
         "EVAL_PERIOD=5", "RANDOM_SEED=4", "LEARNING_RATE=0.01"]  # fmt: skip
    best = spot.best_of_topk(
        lib, ranked, 2, model_dir=os.path.join(workdir, "best_of_top2"),
        gin_files=[gin_file, "methods/spot.gin"], gin_bindings=transfer, task="syn_max",
        launcher=spot.in_process_launcher,
    )  # fmt: skip
    print(spot.format_best_of_topk(best))
    fresh = run(
        "fresh", "prompt_tuning", "syn_max", cfg["transfer_steps"], *prompt_flags,
        "--gin.RANDOM_SEED=4", "--gin.EVAL_PERIOD=5", "--gin.LEARNING_RATE=0.01",
    )  # fmt: skip
    runs = {f"from {c.name}": c.model_dir for c in best.candidates} | {"fresh prompt": fresh}
    result["best_of_top2"] = best.best.name
    result["curves"] = {}
    for label, run_dir in runs.items():
        rows = spot.read_eval_metrics(run_dir)
        result["curves"][label] = {
            "accuracy_at": {r["step"]: r["accuracy"] for r in rows},
            "steps_to_99": _steps_to_reach(rows, 99.0),
            "final_accuracy": max(rows, key=lambda r: r["step"])["accuracy"],
        }
    return result


def test_synthetic_related_source_ranks_above_unrelated(tmp_path):
    # Its own process, started outside the repository: the repository's `gin/` folder
    # must not shadow the gin-config package, and the JAX compilation cache stays local.
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.abspath(__file__), f"--workdir={tmp_path}", "--config=small",
           f"--json={out}"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    for metric, ranking in result["ranking"].items():
        names = [name for name, _ in ranking]
        assert names == ["max_short", "first"], (metric, ranking)
        assert ranking[0][1] > ranking[1][1], (metric, ranking)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SPoT synthetic retrieval/transfer experiment")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="full", choices=sorted(_SYN_CONFIGS))
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    outcome = run_synthetic_experiment(args.workdir, args.config)
    print(json.dumps(outcome, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome, f, indent=2)
