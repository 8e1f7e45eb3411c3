"""SPoT's method core and command line: metrics, libraries, retrieval, transfer init.

* Both metrics equal naive loops over token pairs (random prompts of different
  lengths); matrices are symmetric, the first metric's diagonal is 1, the per-token
  metric's diagonal is the prompt's own mean token-pair cosine.
* The real released prompts (SST-2, MRPC, RTE; T5.1.1 LM-adapted base): the CSVs the
  `similarity` command writes equal a float64 NumPy loop over token pairs written here
  (read back with the csv module, not the package); `rank` orders the entries as that
  reference does; `init` writes the reference's similarity-weighted average.
* Library entries with a task embedding and a transfer prompt: ranking compares the
  embeddings, the weighted average combines the transfer prompts; one-file entries
  serve as both.
* Bad input (NaN / inf, wrong rank, width or length mismatches, empty library,
  negative similarities, bad k, an output directory that is a file) raises UserError
  naming the problem; the command line prints it as one `error:` line.
Export, mixtures and transfers: tests/test_spot_transfer.py; PEFT: tests/test_spot_peft.py.
"""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hyperprompt_jax import spot
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.spot import cli
from tests.helpers import write_prompt_library as _write_library

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
    with pytest.raises(UserError, match="positive similarities.*a_far.*smaller k"):
        spot.top_k_weighted_average(lib, ranked, 3)
    with pytest.raises(UserError, match=r"k must be an int in \[1, 3\]"):
        spot.top_k_weighted_average(lib, ranked, 4)
    with pytest.raises(UserError, match="has length 5 but the prompt length is 7"):
        spot.top_k_weighted_average(lib, ranked, 2, length=7)


def test_weighted_average_needs_one_shape():
    rng = np.random.default_rng(4)
    target, p, q = _random_prompts(rng, [4, 4, 6])
    lib = spot.PromptLibrary.from_prompts({"p": p, "q": q})
    ranked = spot.rank_sources(lib, target)  # Ranking works across lengths...
    with pytest.raises(UserError, match="must share one shape"):  # ...averaging does not.
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


FIXTURE_NAMES = ["mrpc", "rte", "sst2"]
NAIVE = {
    "cosine_of_average_tokens": _naive_average_tokens,
    "per_token_average_cosine": _naive_per_token,
}


@pytest.fixture(scope="module")
def naive_fixture_matrices(released_prompts) -> dict[str, np.ndarray]:
    """Both metrics on the released prompts, by float64 loops over token pairs."""
    p = {n: np.load(released_prompts / f"{n}.npy").astype(np.float64) for n in FIXTURE_NAMES}
    return {
        metric: np.array([[naive(p[a], p[b]) for b in FIXTURE_NAMES] for a in FIXTURE_NAMES])
        for metric, naive in NAIVE.items()
    }


def _read_csv(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def test_similarity_on_released_prompts(released_prompts, naive_fixture_matrices, tmp_path, capsys):
    out = tmp_path / "similarity"
    args = ["similarity", f"--library={released_prompts}", f"--output_dir={out}", "--emb_dim=768"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for metric, want in naive_fixture_matrices.items():
        names, matrix = _read_csv(out / f"similarity_{metric}.csv")
        assert names == FIXTURE_NAMES and metric in printed
        # The CSV holds 6 decimals.
        np.testing.assert_allclose(matrix, want, rtol=0, atol=6e-7)
    # The reference's own facts: cosine-of-averages diagonal is 1, per-token's is not.
    np.testing.assert_allclose(np.diag(naive_fixture_matrices["cosine_of_average_tokens"]), 1)
    assert np.all(np.diag(naive_fixture_matrices["per_token_average_cosine"]) < 0.1)

    import matplotlib.image

    for png in ("heatmap.png", "dendrogram.png"):
        path = out / png
        assert path.stat().st_size > 20_000, png
        image = matplotlib.image.imread(str(path))
        assert image.shape[0] > 300 and image.shape[1] > 600, (png, image.shape)
        assert image[..., :3].std() > 0.05, f"{png} looks blank"


@pytest.mark.parametrize("metric", sorted(NAIVE))
def test_rank_on_released_prompts_follows_the_numpy_reference(
    released_prompts, naive_fixture_matrices, metric
):
    lib = spot.PromptLibrary.load(str(released_prompts), emb_dim=768, length=100)
    assert lib.names == FIXTURE_NAMES and all(not e.metadata for e in lib)
    for i, target in enumerate(FIXTURE_NAMES):
        ranked = spot.rank_sources(lib.without([target]), lib[target].prompt, metric)
        want = {n: naive_fixture_matrices[metric][i, j] for j, n in enumerate(FIXTURE_NAMES)}
        del want[target]
        assert [r.name for r in ranked] == sorted(want, key=lambda n: -want[n])
        for r in ranked:
            assert r.similarity == pytest.approx(want[r.name], rel=1e-9, abs=1e-12)


def test_cli_module_entry_point_rank_and_init(released_prompts, naive_fixture_matrices, tmp_path):
    # `python -m hyperprompt_jax.spot`, run from an unrelated directory as a user would.
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
    # The default metric (per-token average cosine) of the NumPy reference: RTE's
    # similarities to MRPC and SST-2 give the weights.
    s = naive_fixture_matrices["per_token_average_cosine"][1]
    w = np.array([s[0], s[2]]) / (s[0] + s[2])
    assert meta["metric"] == "per_token_average_cosine"
    assert [s["name"] for s in meta["sources"]] == ["mrpc", "sst2"]
    np.testing.assert_allclose([s["weight"] for s in meta["sources"]], w, rtol=1e-9)
    mrpc = np.load(released_prompts / "mrpc.npy").astype(np.float64)
    sst2 = np.load(released_prompts / "sst2.npy").astype(np.float64)
    np.testing.assert_allclose(np.load(init), w[0] * mrpc + w[1] * sst2, rtol=1e-5, atol=1e-6)
    assert meta["task"] == "hp_glue_rte_v002" and meta["k"] == 2

    ranking = tmp_path / "ranking.json"
    assert cli.main(
        ["rank", f"--library={released_prompts}", f"--target={released_prompts / 'sst2.npy'}",
         "--metric=per_token_average_cosine", f"--output={ranking}"]
    ) == 0  # fmt: skip
    rows = json.loads(ranking.read_text())["ranking"]
    s = naive_fixture_matrices["per_token_average_cosine"][2]  # SST-2 vs mrpc, rte, sst2
    want = sorted([("mrpc", s[0]), ("rte", s[1])], key=lambda x: -x[1])
    assert [r["name"] for r in rows] == [n for n, _ in want]
    np.testing.assert_allclose([r["similarity"] for r in rows], [v for _, v in want], rtol=1e-9)


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
    with pytest.raises(UserError, match=r"\(inf\)"):
        spot.check_prompt(inf, "x")
    with pytest.raises(UserError, match=r"expected a 2-D \[length, emb_dim\].*--prompt_index"):
        spot.check_prompt(np.ones((2, 4, 8), np.float32), "x")
    with pytest.raises(UserError, match="squeeze"):
        spot.check_prompt(np.ones((1, 4, 8), np.float32), "x")
    with pytest.raises(UserError, match="expected a float array"):
        spot.check_prompt(np.ones((4, 8), np.int32), "x")
    with pytest.raises(UserError, match="width 8 but the model's emb_dim is 768"):
        spot.check_prompt(good, "x", emb_dim=768)
    with pytest.raises(UserError, match="length 4 but the prompt length is 100"):
        spot.check_prompt(good, "x", length=100)
    zero_token = good.copy()
    zero_token[1] = 0
    with pytest.raises(UserError, match="row 1 has zero norm"):
        spot.per_token_average_cosine([zero_token], [good])

    # Libraries: empty, missing, mixed widths, a NaN file, bad metadata.
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .npy prompts"):
        spot.PromptLibrary.load(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is not a directory"):
        spot.PromptLibrary.load(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="library is empty"):
        spot.PromptLibrary(())
    mixed = _write_library(tmp_path / "mixed", {"a": good, "b": np.ones((4, 6), np.float32)})
    with pytest.raises(UserError, match=r"share emb_dim.*'a': 8, 'b': 6"):
        spot.PromptLibrary.load(mixed)
    bad = _write_library(tmp_path / "nan", {"a": good, "b": nan})
    with pytest.raises(UserError, match=r"b\.npy.*non-finite"):
        spot.PromptLibrary.load(bad)
    meta = _write_library(tmp_path / "meta", {"a": good})
    (tmp_path / "meta" / "a.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        spot.PromptLibrary.load(meta)
    lib = spot.PromptLibrary.from_prompts({"a": good})
    with pytest.raises(
        ValueError, match="target prompt has width 6 but the library's prompts have emb_dim 8"
    ):
        spot.rank_sources(lib, np.ones((4, 6), np.float32))
    with pytest.raises(UserError, match="Unknown similarity metric 'cosine'"):
        spot.get_metric("cosine")
    with pytest.raises(UserError, match="leaves the prompt library empty"):
        lib.without(["a"])


def test_cli_reports_bad_input_as_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    target = tmp_path / "t.npy"
    np.save(target, np.ones((4, 8), np.float32))
    code = cli.main(["rank", f"--library={tmp_path / 'empty'}", f"--target={target}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: Prompt library") and "Traceback" not in err
    lib = _write_library(tmp_path / "lib", {"a": np.ones((4, 8), np.float32)})
    code = cli.main(["similarity", f"--library={lib}", f"--output_dir={tmp_path}", "--emb_dim=16"])
    assert code == 1 and "emb_dim is 16" in capsys.readouterr().err
    # An output directory that is a file: one line, nothing written.
    code = cli.main(["similarity", f"--library={lib}", f"--output_dir={target}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is a file; expected a directory" in err


# ----------------------------------------------------------------------------------------
# Task embedding vs transfer prompt (the paper's protocol)
# ----------------------------------------------------------------------------------------


def test_rank_uses_embeddings_and_init_uses_transfer_prompts(tmp_path, capsys):
    rng = np.random.default_rng(11)
    target = rng.normal(size=(4, 8)).astype(np.float32) + 1
    # "a" looks like the target early (its embedding) but its transfer prompt does not;
    # "b" is the other way round. "old" is a one-file entry (serves as both).
    early_a = target + 0.1 * rng.normal(size=(4, 8)).astype(np.float32)
    late_a = rng.normal(size=(4, 8)).astype(np.float32)
    early_b = -target
    late_b = target.copy()
    old = target + 0.5 * rng.normal(size=(4, 8)).astype(np.float32)
    lib_dir = tmp_path / "lib"
    _write_library(lib_dir, {"a": late_a, "b": late_b, "old": old})
    np.save(lib_dir / "a.embedding.npy", early_a)
    np.save(lib_dir / "b.embedding.npy", early_b)
    lib = spot.PromptLibrary.load(str(lib_dir))
    np.testing.assert_array_equal(lib["a"].task_embedding, early_a)
    np.testing.assert_array_equal(lib["a"].prompt, late_a)
    assert lib["old"].embedding is None and lib["old"].task_embedding is lib["old"].prompt

    for metric, naive in NAIVE.items():
        ranked = spot.rank_sources(lib, target, metric)
        want = {"a": naive(target, early_a), "b": naive(target, early_b), "old": naive(target, old)}
        assert [r.name for r in ranked] == sorted(want, key=lambda n: -want[n]), metric
        assert {r.name: r.similarity for r in ranked} == pytest.approx(want, rel=1e-6)
    ranked = spot.rank_sources(lib, target)
    assert [r.name for r in ranked][:2] == ["a", "old"]
    init, w = spot.top_k_weighted_average(lib, ranked, 2)
    np.testing.assert_allclose(init, w[0] * late_a + w[1] * old, rtol=1e-5, atol=1e-6)

    # The similarity report compares embeddings too.
    report = spot.similarity_report(lib, str(tmp_path / "out"), ["cosine_of_average_tokens"])
    m = report["matrices"]["cosine_of_average_tokens"]
    assert m[0, 1] == pytest.approx(_naive_average_tokens(early_a, early_b), rel=1e-6)

    # An embedding without its transfer prompt is refused, naming the file.
    np.save(lib_dir / "orphan.embedding.npy", early_a)
    with pytest.raises(UserError, match=r"orphan.embedding.npy.*has no transfer prompt orphan.npy"):
        spot.PromptLibrary.load(str(lib_dir))


def test_synthetic_related_source_ranks_above_unrelated(tmp_path):
    # The experiment harness (benchmarks/spot_synthetic.py, small configuration: real
    # training through the launcher), in its own process started outside the repository.
    out = tmp_path / "result.json"
    script = REPO_ROOT / "benchmarks" / "spot_synthetic.py"
    cmd = [sys.executable, str(script), f"--workdir={tmp_path}", "--config=small", f"--json={out}"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    for metric, ranking in result["ranking"].items():
        names = [name for name, _ in ranking]
        assert names == ["max_short", "first"], (metric, ranking)
        assert ranking[0][1] > ranking[1][1], (metric, ranking)


# ----------------------------------------------------------------------------------------
# The recipes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spot_source", "spot_transfer"])
def test_spot_recipes_hold_the_papers_numbers(method):
    import gin
    from hyperprompt_jax import gin_utils

    gin.clear_config()
    try:
        files = ["runs/finetune.gin", "models/t5_1_1_base.gin", f"methods/{method}.gin"]
        gin_utils.parse_gin(files, ["SOURCE_PROMPT='x.npy'"], finalize=False)
        # Paper: 2^18 steps, batch 32; prompt tuning's length 100, constant LR 0.3.
        assert gin.query_parameter("%TRAIN_STEPS") == 262144 == 2**18
        assert gin.query_parameter("%BATCH_SIZE") == 32
        assert gin.query_parameter("%PROMPT_LENGTH") == 100
        assert gin.query_parameter("%LEARNING_RATE") == 0.3
        assert gin.query_parameter("optim.create_learning_rate_scheduler.factors") == "constant"
        init = gin.query_parameter("prompts.SoftPrompt.prompt_init")
        if method == "spot_source":  # Sampled vocabulary, the 5,000 most common tokens.
            assert init.configurable.name == "SampledVocab"
            assert gin.query_parameter("prompts.SampledVocab.population_size") == 5000
        else:  # The transfer starts from the source prompt.
            assert init.configurable.name == "FromFile"
    finally:
        gin.clear_config()


def test_init_statistics_of_the_recipes():
    import jax

    from hyperprompt_jax import prompts

    key = jax.random.PRNGKey(0)
    # SampledVocab(5000): 100 distinct rows of the table's first 5,000 (rows are their
    # own index, so the sampled ids can be read back).
    table = np.repeat(np.arange(32128, dtype=np.float32)[:, None], 4, axis=1)
    rows = np.asarray(prompts.SampledVocab(5000)(key, (100, 4), embedding_table=table))[:, 0]
    assert len(set(rows.tolist())) == 100 and rows.max() < 5000 and rows.min() >= 0
    # Uniform: the paper's [-0.5, 0.5] (ours) and the released configs' [0, 0.5).
    paper = np.asarray(prompts.Uniform(0.5)(key, (200_000,)))
    released = np.asarray(prompts.Uniform(0.5, symmetric=False)(key, (200_000,)))
    assert -0.5 <= paper.min() < -0.499 and 0.499 < paper.max() <= 0.5
    assert abs(paper.mean()) < 0.005 and abs(paper.std() - 1 / np.sqrt(12)) < 0.005
    assert 0 <= released.min() < 0.001 and 0.499 < released.max() < 0.5
    assert abs(released.mean() - 0.25) < 0.005 and abs(released.std() - 0.5 / np.sqrt(12)) < 0.005


@pytest.mark.parametrize("module", ["hyperprompt_jax.spot", "hyperprompt_jax.spot_cli"])
def test_top_level_help_lists_the_subcommands(module):
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    for command in ("export", "import", "similarity", "rank", "init", "mixture",
                    "mixture_transfer", "best_of_topk"):  # fmt: skip
        assert f"\n  {command} " in run.stdout, command
