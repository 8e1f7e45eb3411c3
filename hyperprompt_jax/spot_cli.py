"""Command line of SPoT: `python -m hyperprompt_jax.spot <subcommand> [flags]`.

Subcommands (run one with --help for its flags):

  export        a checkpoint's prompt -> LIBRARY/NAME.npy [L, E] + NAME.json metadata
  similarity    task similarity over a library (both metrics): CSVs, heatmap, dendrogram
  rank          the library's prompts ordered by similarity to a target prompt
  init          the top-k weighted average of the library -> an initial prompt .npy
  mixture       register and print a seqio mixture of the target plus the top-k sources
  best_of_topk  train a transfer from each of the top-k prompts, keep the best on validation

The target's embedding (`--target`) is a `.npy` prompt, or the model / checkpoint
directory of a short prompt-tuning run on the target task (the paper uses an early
checkpoint). The model's width and prompt length can be checked against `--emb_dim` /
`--length` or read from the model's gin files (`--gin_file=models/t5_1_1_base.gin
--gin_file=methods/spot.gin`). Errors in the inputs print one line and exit with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from hyperprompt_jax import spot


def _gin_dims(gin_files: Sequence[str], bindings: Sequence[str]) -> tuple[int, int | None]:
    """(emb_dim, prompt length or None) from the model (and method) gin files."""
    import gin
    from hyperprompt_jax import gin_utils

    gin_utils.parse_gin(gin_files, bindings, finalize=False)

    def query(name: str) -> Any:
        try:
            value = gin.query_parameter(name)
        except ValueError:
            return None
        # A macro binding (`length = %PROMPT_LENGTH`) queries as a reference to the macro.
        while str(value).startswith("%"):
            value = gin.query_parameter(str(value))
        return value

    emb_dim = query("config.T5Config.emb_dim")
    if emb_dim is None:
        raise ValueError(f"The gin files {list(gin_files)} do not set config.T5Config.emb_dim.")
    return int(emb_dim), query("prompts.SoftPrompt.length")


def _dims(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The expected (emb_dim, length) from flags, checked against the gin files if both."""
    emb_dim, length = args.emb_dim, getattr(args, "length", None)
    if args.gin_file:
        gin_emb, gin_len = _gin_dims(args.gin_file, args.gin_bindings)
        if emb_dim is not None and emb_dim != gin_emb:
            raise ValueError(f"--emb_dim={emb_dim} contradicts the gin files' emb_dim {gin_emb}.")
        emb_dim = gin_emb
        if length is None and hasattr(args, "length"):
            length = gin_len
    return emb_dim, length


def _int_or_name(value: str) -> int | str:
    return value if value in ("latest", "best") else int(value)


def _task_map(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--task_map expects NAME=TASK, got {p!r}.")
        name, task = p.split("=", 1)
        out[name] = task
    return out


def _library_and_ranking(args: argparse.Namespace):
    emb_dim, _ = _dims(args)
    library = spot.PromptLibrary.load(args.library, emb_dim=emb_dim)
    target = spot.load_target_prompt(
        args.target, step=args.target_step, prompt_index=args.prompt_index, emb_dim=emb_dim
    )
    exclude = set(args.exclude)
    if os.path.isfile(args.target):
        # A target saved inside the library would otherwise retrieve itself first.
        exclude |= {e.name for e in library if e.path and os.path.samefile(e.path, args.target)}
    if args.target_task:
        exclude |= {e.name for e in library if e.task == args.target_task}
    if exclude:
        library = library.without(exclude)
        print(f"Excluded from the sources: {', '.join(sorted(exclude))}")
    ranked = spot.rank_sources(library, target, args.metric)
    return library, target, ranked


def _print_ranking(library: spot.PromptLibrary, target: np.ndarray, ranked, metric: str) -> None:
    others = [m for m in spot.METRICS if m != metric]
    extra = {
        m: dict(zip(library.names, spot.get_metric(m)([target], library.prompts)[0], strict=True))
        for m in others
    }
    header = f"{'rank':>4}  {'name':<24} {metric + ' (ranked)':>34}" + "".join(
        f"{m:>28}" for m in others
    )
    print(header + "  task")
    for i, r in enumerate(ranked, 1):
        cols = "".join(f"{extra[m][r.name]:>28.4f}" for m in others)
        print(f"{i:>4}  {r.name:<24} {r.similarity:>34.4f}{cols}  {r.task or '-'}")


# ----------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    emb_dim, length = _dims(args)
    path, meta = spot.export_prompt(
        args.checkpoint,
        args.output,
        step=args.step,
        task=args.task,
        model=args.model,
        score=args.score,
        metric=args.metric,
        prompt_index=args.prompt_index,
        param_path=args.param_path,
    )
    # Validate after writing would leave a bad file behind: re-check and remove if so.
    try:
        spot.load_prompt_file(path, length=length, emb_dim=emb_dim)
    except ValueError:
        os.remove(path)
        os.remove(os.path.splitext(path)[0] + spot.METADATA_SUFFIX)
        raise
    print(f"Wrote {path} [{meta['length']}, {meta['emb_dim']}] and its .json:")
    print(json.dumps(meta, indent=2, sort_keys=True))


def cmd_similarity(args: argparse.Namespace) -> None:
    emb_dim, _ = _dims(args)
    library = spot.PromptLibrary.load(args.library, emb_dim=emb_dim)
    metrics = args.metric or list(spot.METRICS)
    report = spot.similarity_report(library, args.output_dir, metrics)
    for metric, m in report["matrices"].items():
        print(f"{metric}:")
        print(spot.format_matrix(report["names"], m))
        print()
    print("Wrote:\n  " + "\n  ".join(report["files"]))


def cmd_rank(args: argparse.Namespace) -> None:
    library, target, ranked = _library_and_ranking(args)
    _print_ranking(library, target, ranked, args.metric)
    if args.output:
        rows = [dataclasses.asdict(r) for r in ranked]
        with open(args.output, "w") as f:
            json.dump({"metric": args.metric, "target": args.target, "ranking": rows}, f, indent=2)
        print(f"Wrote {args.output}")


def cmd_init(args: argparse.Namespace) -> None:
    emb_dim, length = _dims(args)
    library, target, ranked = _library_and_ranking(args)
    prompt, weights = spot.top_k_weighted_average(
        library, ranked, args.k, weighting=args.weighting, length=length, emb_dim=emb_dim
    )
    sources = [
        {"name": r.name, "task": r.task, "similarity": r.similarity, "weight": float(w)}
        for r, w in zip(ranked[: args.k], weights, strict=True)
    ]
    path = spot.save_prompt(
        args.output,
        prompt,
        {
            "task": args.target_task,
            "kind": "spot_top_k_weighted_average",
            "metric": args.metric,
            "weighting": args.weighting,
            "k": args.k,
            "sources": sources,
        },
    )
    for s in sources:
        print(f"  {s['weight']:.4f} x {s['name']} (similarity {s['similarity']:.4f})")
    print(f"Wrote {path} {list(prompt.shape)}. Transfer with:")
    print(f"  --gin_file=methods/spot.gin --gin.SOURCE_PROMPT=\"'{os.path.abspath(path)}'\"")


def _import_modules(modules: Sequence[str]) -> None:
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ValueError(f"Cannot import task module {m!r}: {e}") from e


def cmd_mixture(args: argparse.Namespace) -> None:
    _import_modules(args.module)
    _, _, ranked = _library_and_ranking(args)
    sources = spot.source_tasks(ranked, args.k, _task_map(args.task_map))
    mixture = spot.register_topk_mixture(
        args.target_task,
        sources,
        name=args.name,
        rate=args.rate,
        maximum=args.maximum,
        temperature=args.temperature,
    )
    print(f"Registered seqio mixture {mixture.name!r} ({args.rate} rates):")
    for task in mixture.tasks:
        role = "target" if task.name == args.target_task else "source"
        rate = "examples-proportional" if args.rate == "examples" else "1.0"
        print(f"  {task.name:<40} {role}  rate={rate}")
    print(
        "It lives in this process only; to train on it, register it in your task module "
        "with hyperprompt_jax.spot.register_topk_mixture("
        f"{args.target_task!r}, {sources!r}, rate={args.rate!r})."
    )


def cmd_best_of_topk(args: argparse.Namespace) -> None:
    if not args.gin_file:
        # The training gin files describe the target model: check every candidate's
        # shape against them before the first run starts.
        args.gin_file, args.gin_bindings = args.train_gin_file, args.train_gin
    emb_dim, length = _dims(args)
    library, _, ranked = _library_and_ranking(args)
    result = spot.best_of_topk(
        library,
        ranked,
        args.k,
        model_dir=args.model_dir,
        gin_files=args.train_gin_file,
        gin_bindings=args.train_gin,
        task=args.target_task,
        metric=args.eval_metric,
        length=length,
        emb_dim=emb_dim,
        launcher=spot.in_process_launcher if args.in_process else spot.SubprocessLauncher(),
    )
    print(spot.format_best_of_topk(result))


# ----------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------


def _add_dims(p: argparse.ArgumentParser, length: bool) -> None:
    p.add_argument("--emb_dim", type=int, help="the target model's width; prompts must match")
    if length:
        p.add_argument("--length", type=int, help="the target prompt length (PROMPT_LENGTH)")
    p.add_argument(
        "--gin_file", action="append", default=[],
        help="model (and method) gin files to read emb_dim / prompt length from (repeatable)",
    )  # fmt: skip
    p.add_argument("--gin", dest="gin_bindings", action="append", default=[], help="gin binding")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", required=True, help="directory of NAME.npy (+ NAME.json)")
    p.add_argument(
        "--target", required=True,
        help="target prompt: a .npy, or a short training run's model/checkpoint directory",
    )  # fmt: skip
    p.add_argument("--target_step", type=_int_or_name, default=None, help="int, latest, best")
    p.add_argument("--prompt_index", type=int, help="prompt of a multi-task / SMoP target")
    p.add_argument(
        "--target_task", help="the target's seqio task (its library prompts are excluded)"
    )
    p.add_argument("--exclude", action="append", default=[], help="library entry to leave out")
    p.add_argument("--metric", default=spot.DEFAULT_METRIC, choices=list(spot.METRICS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hyperprompt_jax.spot",
        description="SPoT: prompts as task embeddings, retrieval and transfer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="a checkpoint's prompt -> .npy + .json")
    p.add_argument("--checkpoint", "--model_dir", dest="checkpoint", required=True,
                   help="model directory (checkpoint_<step>/ inside) or one checkpoint directory")  # fmt: skip
    p.add_argument("--output", required=True, help="LIBRARY/NAME.npy")
    p.add_argument("--step", type=_int_or_name, default=None, help="int, latest (default), best")
    p.add_argument("--task", help="seqio task (default: the run's MIXTURE_OR_TASK_NAME)")
    p.add_argument("--model", help="model name recorded in the metadata, e.g. t5_1_1_lm100k_base")
    p.add_argument("--score", type=float, help="score to record (default: eval_metrics.jsonl)")
    p.add_argument("--metric", help="eval metric to read (default: mean of non-loss metrics)")
    p.add_argument("--prompt_index", type=int, help="which prompt of a multi-task / SMoP prompt")
    p.add_argument("--param_path", help="explicit '/'-joined parameter path of the prompt")
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("similarity", help="similarity matrices, heatmap and dendrogram")
    p.add_argument("--library", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--metric", action="append", choices=list(spot.METRICS),
                   help="metric (repeatable; default both)")  # fmt: skip
    _add_dims(p, length=False)
    p.set_defaults(fn=cmd_similarity)

    p = sub.add_parser("rank", help="library prompts by similarity to the target")
    _add_target(p)
    p.add_argument("--output", help="write the ranking as JSON here")
    _add_dims(p, length=False)
    p.set_defaults(fn=cmd_rank)

    p = sub.add_parser("init", help="top-k weighted average -> initial prompt .npy")
    _add_target(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--weighting", default="similarity", choices=spot.WEIGHTINGS)
    p.add_argument("--output", required=True, help="the initial prompt .npy")
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("mixture", help="register a mixture of the target + top-k sources")
    _add_target(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--name", help="mixture name (default spot_<target>_top<k>_mixture)")
    p.add_argument("--rate", default="examples", choices=spot.MIXTURE_RATES)
    p.add_argument("--maximum", type=int, help="examples-proportional cap K")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--task_map", action="append", default=[], help="NAME=TASK for prompts without metadata"
    )
    p.add_argument("--module", action="append", default=["hyperprompt_jax.tasks"],
                   help="module to import to register tasks (repeatable)")  # fmt: skip
    _add_dims(p, length=False)
    p.set_defaults(fn=cmd_mixture)

    p = sub.add_parser("best_of_topk", help="train k transfers, keep the best on validation")
    _add_target(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--model_dir", required=True, help="parent directory; one run per candidate")
    p.add_argument("--train_gin_file", action="append", default=[], required=True,
                   help="the training gin files (e.g. a run file and methods/spot.gin)")  # fmt: skip
    p.add_argument("--train_gin", action="append", default=[], help="training gin binding")
    p.add_argument("--eval_metric", help="validation metric (default: mean of non-loss metrics)")
    p.add_argument(
        "--in_process", action="store_true",
        help="run the k trainings in this process instead of one process each",
    )  # fmt: skip
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_best_of_topk)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; input errors print `error: ...` and return 1 (as the launchers)."""
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
