"""SPoT's transfer runs, launched as a user would launch training (the CLI layer).

* `best_of_topk`: one prompt-tuning run on the target per retrieved source, each
  initialised from the source's transfer prompt (`methods/spot.gin`, SOURCE_PROMPT);
  the best on validation is kept.
* `mixture_transfer`: the paper's multi-task variant: prompt-tune on a mixture of the
  target and the top-k source tasks, then transfer the final prompt to the target.

Each run is `python -m hyperprompt_jax.train` with gin files and bindings, through a
`Launcher` (a fresh process per run by default; `in_process_launcher` for tests and
notebooks). This module sits above the library (core, discovery, export, mixtures) and
is imported only by the command line; no library module imports it or `train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Protocol, Sequence

from hyperprompt_jax import prompt_files
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.prompt_files import check_prompt
from hyperprompt_jax.spot import discovery, export, mixtures
from hyperprompt_jax.spot.core import PromptLibrary, RankedSource, check_k


class Launcher(Protocol):
    """Runs the training entry point on t5x-style flags; returns its exit code."""

    def __call__(self, argv: Sequence[str]) -> int: ...


@dataclasses.dataclass(frozen=True)
class SubprocessLauncher:
    """`python -m hyperprompt_jax.train ARGV` in a fresh process per run (default).

    A process per candidate frees the device memory of the previous run and keeps a
    failing run from taking the others down. `cwd` is where the process starts (gin
    files are also looked up there).
    """

    module: str = "hyperprompt_jax.train"
    cwd: str | None = None

    def __call__(self, argv: Sequence[str]) -> int:
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", self.module, *argv], cwd=self.cwd).returncode


def in_process_launcher(argv: Sequence[str]) -> int:
    """`hyperprompt_jax.train.main(argv)` in this process (no start-up cost per run)."""
    from hyperprompt_jax import train

    return train.main(list(argv))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One transfer of best-of-top-k: its source, run directory and validation score."""

    rank: int
    name: str
    task: str | None
    similarity: float
    source_prompt: str
    model_dir: str
    exit_code: int
    score: float | None = None
    score_step: int | None = None
    metric: str | None = None


@dataclasses.dataclass(frozen=True)
class BestOfTopK:
    """The k transfers, the best one, and where the summary (and best prompt) went."""

    candidates: tuple[Candidate, ...]
    best: Candidate
    summary_path: str
    best_prompt_path: str | None


SUMMARY_FILE = "best_of_topk.json"
BEST_PROMPT_FILE = "best_prompt.npy"


def _candidate_dir_name(rank: int, name: str) -> str:
    return f"top{rank}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def best_of_topk(
    library: PromptLibrary,
    ranked: Sequence[RankedSource],
    k: int,
    *,
    model_dir: str,
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    task: str | None = None,
    metric: str | None = None,
    length: int | None = None,
    emb_dim: int | None = None,
    launcher: Launcher | None = None,
    prompt_macro: str = "SOURCE_PROMPT",
) -> BestOfTopK:
    """Trains one transfer from each of the k most similar prompts; keeps the best.

    Candidate i (1-based rank) runs the launcher with `gin_files` (e.g. a run file, the
    model and `methods/spot.gin`), `gin_bindings`, `MODEL_DIR=model_dir/top<i>_<name>`
    and `SOURCE_PROMPT=<the source prompt file>`. Its score is its best validation score
    in `eval_metrics.jsonl` (see `discovery.best_eval_score`); the best candidate's best
    checkpoint's prompt is exported to `model_dir/best_prompt.npy` and everything is
    summarised in `model_dir/best_of_topk.json`. Re-running resumes each candidate
    (the launcher resumes from its checkpoints) and re-reads the scores.

    Args:
      library: the library `ranked` was computed on.
      ranked: `rank_sources` output.
      k: how many of the most similar sources to try.
      model_dir: parent directory of the candidates' runs.
      gin_files: the training gin files.
      gin_bindings: extra `NAME=VALUE` bindings for every candidate.
      task: the target task in `eval_metrics.jsonl` (needed if it logs several).
      metric: the validation metric to maximise (default: mean of non-loss metrics).
      length, emb_dim: the target prompt shape, checked before anything trains.
      launcher: how to run training (default `SubprocessLauncher()`).
      prompt_macro: the gin macro holding the initial prompt file.

    Raises:
      UserError: bad k, no gin files, bindings that would override the per-candidate
        ones, prompts that do not fit (all before training), or no candidate with a
        validation score.
    """
    if not gin_files:
        raise UserError("best_of_topk needs the training gin files (--train_gin_file).")
    check_k(k, len(ranked))
    for b in gin_bindings:
        if b.split("=", 1)[0].strip() in ("MODEL_DIR", prompt_macro):
            raise UserError(
                f"Binding {b!r} would override what best_of_topk sets per candidate "
                f"(MODEL_DIR, {prompt_macro}); pass --model_dir instead."
            )
    launcher = launcher or SubprocessLauncher()
    os.makedirs(model_dir, exist_ok=True)
    plan = []
    for i, r in enumerate(ranked[:k], 1):
        entry = library[r.name]
        check_prompt(entry.prompt, repr(r.name), length=length, emb_dim=emb_dim)
        run_dir = os.path.abspath(os.path.join(model_dir, _candidate_dir_name(i, r.name)))
        source = entry.path
        if source is None:  # An in-memory library: give the launcher a file.
            source = prompt_files.save_prompt(
                os.path.join(run_dir + "_source", f"{r.name}.npy"), entry.prompt
            )
        plan.append((i, r, os.path.abspath(source), run_dir))

    candidates = []
    for i, r, source, run_dir in plan:
        argv = [f"--gin_file={f}" for f in gin_files]
        argv += [f"--gin.{b}" for b in gin_bindings]
        argv += [f"--gin.MODEL_DIR={run_dir!r}", f"--gin.{prompt_macro}={source!r}"]
        code = int(launcher(argv))
        evals = discovery.best_eval_score(run_dir, task=task, metric=metric) if code == 0 else None
        candidates.append(
            Candidate(
                rank=i, name=r.name, task=r.task, similarity=r.similarity,
                source_prompt=source, model_dir=run_dir, exit_code=code,
                score=evals.score if evals else None,
                score_step=evals.step if evals else None,
                metric=evals.metric if evals else None,
            )
        )  # fmt: skip
    scored = [c for c in candidates if c.score is not None]
    if not scored:
        codes = {c.name: c.exit_code for c in candidates}
        raise UserError(
            f"No best-of-top-k candidate produced a validation score (exit codes {codes}); "
            "does the run gin evaluate (EVAL_PERIOD, a validation split)?"
        )
    # Ties go to the more similar source (lower rank).
    best = min(scored, key=lambda c: (-c.score, c.rank))
    best_prompt = None
    try:
        best_prompt, _ = export.export_prompt(
            best.model_dir,
            os.path.join(model_dir, BEST_PROMPT_FILE),
            step=best.score_step
            if best.score_step in discovery.checkpoint_steps(best.model_dir)
            else None,
            task=task,
            metric=metric,
            extra={"best_of_topk_source": best.name},
        )
    except ValueError as e:  # The scores stand even if the prompt cannot be exported.
        print(f"Could not export the best candidate's prompt: {e}")
    summary_path = os.path.join(model_dir, SUMMARY_FILE)
    with open(summary_path, "w") as f:
        json.dump(
            {
                "k": k,
                "best": dataclasses.asdict(best),
                "best_prompt": best_prompt,
                "candidates": [dataclasses.asdict(c) for c in candidates],
            },
            f,
            indent=2,
        )
        f.write("\n")
    return BestOfTopK(tuple(candidates), best, summary_path, best_prompt)


def format_best_of_topk(result: BestOfTopK) -> str:
    """A plain-text table of the candidates, the best marked."""
    lines = [f"{'rank':>4}  {'source':<24} {'similarity':>10} {'score':>9} {'@step':>6}  run"]
    for c in result.candidates:
        score = f"{c.score:9.3f}" if c.score is not None else f"{'exit ' + str(c.exit_code):>9}"
        mark = "  <- best" if c is result.best else ""
        step = c.score_step if c.score_step is not None else "-"
        lines.append(
            f"{c.rank:>4}  {c.name:<24} {c.similarity:>10.4f} {score} {step:>6}  {c.model_dir}{mark}"
        )
    lines.append(f"Summary: {result.summary_path}")
    if result.best_prompt_path:
        lines.append(f"Best prompt: {result.best_prompt_path}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The top-k multi-task mixture, then transfer to the target
# ----------------------------------------------------------------------------------------

MIXTURE_SUMMARY_FILE = "mixture_transfer.json"
MIXTURE_GIN_FILE = "spot_mixture.gin"
MIXTURE_PROMPT_FILE = "mixture_prompt.npy"


@dataclasses.dataclass(frozen=True)
class MixtureTransfer:
    """The two runs of a mixture transfer and the target's validation score."""

    mixture: str
    sources: tuple[str, ...]
    mixture_dir: str
    mixture_prompt: str
    target_dir: str
    score: float | None
    score_step: int | None
    metric: str | None
    summary_path: str


def _check_bindings(bindings: Sequence[str], reserved: Sequence[str], who: str) -> None:
    for b in bindings:
        if b.split("=", 1)[0].strip() in reserved:
            raise UserError(
                f"Binding {b!r} would override what {who} sets per run ({', '.join(reserved)}); "
                "pass --model_dir / --target_task instead."
            )


def _run(launcher: Launcher, files: Sequence[str], bindings: Sequence[str], what: str) -> None:
    argv = [f"--gin_file={f}" for f in files] + [f"--gin.{b}" for b in bindings]
    code = int(launcher(argv))
    if code != 0:
        raise UserError(f"The {what} run failed (exit code {code}); its error is printed above.")


def mixture_transfer(
    ranked: Sequence[RankedSource],
    k: int,
    *,
    target_task: str,
    model_dir: str,
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    mixture_gin_files: Sequence[str] = ("methods/prompt_tuning.gin",),
    mixture_gin_bindings: Sequence[str] = (),
    transfer_gin_files: Sequence[str] = ("methods/spot.gin",),
    transfer_gin_bindings: Sequence[str] = (),
    task_map: Mapping[str, str] | None = None,
    modules: Sequence[str] = (),
    rate: str = "examples",
    maximum: int | None = None,
    temperature: float = 1.0,
    metric: str | None = None,
    launcher: Launcher | None = None,
    prompt_macro: str = "SOURCE_PROMPT",
) -> MixtureTransfer:
    """Prompt-tunes on the target + top-k source mixture, then transfers to the target.

    1. Registers `spot_<target>_top<k>_mixture` here (to fail early on unknown tasks)
       and writes `model_dir/spot_mixture.gin`, which registers it again inside the
       training process and sets MIXTURE_OR_TASK_NAME to it.
    2. Trains `gin_files + mixture_gin_files + [spot_mixture.gin]` in
       `model_dir/mixture` and exports its final prompt to `model_dir/mixture_prompt.npy`.
    3. Trains `gin_files + transfer_gin_files` on `target_task` in `model_dir/target`,
       initialised from that prompt (SOURCE_PROMPT), and reads its best validation score.
    Re-running resumes both runs (the launcher resumes from checkpoints).

    Args:
      ranked: `rank_sources` output (the target's own entries excluded).
      k: how many of the most similar sources join the mixture.
      target_task: the target's registered seqio task.
      model_dir: parent directory of both runs.
      gin_files, gin_bindings: for both runs (run file, model, steps, ...).
      mixture_gin_files, mixture_gin_bindings: the mixture run only.
      transfer_gin_files, transfer_gin_bindings: the target run only.
      task_map: `{entry name: task}` for entries without a `task` in their metadata.
      modules: task modules to import (registering the source tasks).
      rate, maximum, temperature: the mixing rate (see `mixtures.register_topk_mixture`).
      metric: the target's validation metric (default: mean of non-loss metrics).
      launcher: how to run training (default `SubprocessLauncher()`).
      prompt_macro: the gin macro holding the initial prompt file.

    Raises:
      UserError: bad k, unknown tasks, bindings that override the per-run ones (all
        before training), or a failed run.
    """
    if not gin_files:
        raise UserError("mixture_transfer needs the training gin files (--train_gin_file).")
    reserved = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", prompt_macro)
    for bindings in (gin_bindings, mixture_gin_bindings, transfer_gin_bindings):
        _check_bindings(bindings, reserved, "mixture_transfer")
    sources = mixtures.source_tasks(ranked, k, task_map)
    name = mixtures.mixture_name(target_task, k)
    mixtures.import_modules(modules)
    mixtures.register_topk_mixture(
        target_task, sources, name=name, rate=rate, maximum=maximum, temperature=temperature
    )
    launcher = launcher or SubprocessLauncher()
    model_dir = os.path.abspath(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    mixture_file = os.path.join(model_dir, MIXTURE_GIN_FILE)
    with open(mixture_file, "w") as f:
        f.write(
            mixtures.mixture_gin(
                target_task, sources, name=name, rate=rate, maximum=maximum,
                temperature=temperature, modules=modules,
            )
        )  # fmt: skip

    mixture_dir = os.path.join(model_dir, "mixture")
    _run(
        launcher,
        [*gin_files, *mixture_gin_files, mixture_file],
        [*gin_bindings, *mixture_gin_bindings, f"MODEL_DIR={mixture_dir!r}"],
        f"mixture ({name})",
    )
    prompt_path, _ = export.export_prompt(
        mixture_dir, os.path.join(model_dir, MIXTURE_PROMPT_FILE), step="latest", task=name,
        extra={"kind": "spot_topk_mixture_prompt", "sources": list(sources)},
    )  # fmt: skip

    target_dir = os.path.join(model_dir, "target")
    _run(
        launcher,
        [*gin_files, *transfer_gin_files],
        [
            *gin_bindings, *transfer_gin_bindings, f"MODEL_DIR={target_dir!r}",
            f"MIXTURE_OR_TASK_NAME={target_task!r}", f"{prompt_macro}={prompt_path!r}",
        ],
        f"transfer ({target_task})",
    )  # fmt: skip
    evals = discovery.best_eval_score(target_dir, task=target_task, metric=metric)
    summary_path = os.path.join(model_dir, MIXTURE_SUMMARY_FILE)
    result = MixtureTransfer(
        mixture=name, sources=tuple(sources), mixture_dir=mixture_dir,
        mixture_prompt=prompt_path, target_dir=target_dir,
        score=evals.score if evals else None, score_step=evals.step if evals else None,
        metric=evals.metric if evals else None, summary_path=summary_path,
    )  # fmt: skip
    with open(summary_path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
        f.write("\n")
    return result


def format_mixture_transfer(result: MixtureTransfer) -> str:
    """A plain-text summary of a mixture transfer."""
    score = (
        f"{result.score:.3f} ({result.metric}) at step {result.score_step}"
        if result.score is not None
        else "no validation score (does the run gin evaluate?)"
    )
    return "\n".join(
        [
            f"Mixture {result.mixture}: target + {', '.join(result.sources)}",
            f"  mixture run:    {result.mixture_dir}",
            f"  mixture prompt: {result.mixture_prompt}",
            f"  target run:     {result.target_dir}",
            f"  target score:   {score}",
            f"Summary: {result.summary_path}",
        ]
    )
