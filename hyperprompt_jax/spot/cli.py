"""Command line of SPoT: `python -m hyperprompt_jax.spot <subcommand> [flags]`.

Subcommands (run one with --help for its flags):

  export            a run's prompt -> LIBRARY/NAME.npy (+ NAME.embedding.npy) + NAME.json,
                    or with --format=peft a PEFT prompt-tuning adapter + HF backbone
  import            a PEFT prompt-tuning adapter -> LIBRARY/NAME.npy + NAME.json
  similarity        task similarity over a library (both metrics): CSVs, heatmap, dendrogram
  rank              the library's entries ordered by similarity to a target prompt
  init              the top-k weighted average of the library -> an initial prompt .npy
  mixture           register and print a seqio mixture of the target plus the top-k sources
  mixture_transfer  prompt-tune on that mixture, then transfer the prompt to the target
  best_of_topk      train a transfer from each of the top-k prompts, keep the best

The target's embedding (`--target`) is a `.npy` prompt, a PEFT prompt-tuning adapter
directory, or the model / checkpoint directory of a short prompt-tuning run on the
target task (the paper uses an early checkpoint). The model's width and prompt length can be checked against `--emb_dim` /
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

from hyperprompt_jax import prompt_files
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.spot import core, export, mixtures, plots, transfer


def _gin_query(name: str) -> Any:
    """A gin parameter's value with macro references resolved (None if unset)."""
    import gin

    try:
        value = gin.query_parameter(name)
    except ValueError:
        return None
    # A macro binding (`length = %PROMPT_LENGTH`) queries as a reference to the macro.
    while str(value).startswith("%"):
        value = gin.query_parameter(str(value))
    return value


def _gin_config(gin_files: Sequence[str], bindings: Sequence[str]) -> Any:
    """The `T5Config` the model gin files describe (their `config.T5Config` bindings)."""
    import dataclasses as dc

    from hyperprompt_jax import gin_utils
    from hyperprompt_jax.config import T5Config

    gin_utils.parse_gin(gin_files, bindings, finalize=False)
    fields = {}
    for field in dc.fields(T5Config):
        value = _gin_query(f"config.T5Config.{field.name}")
        if value is not None:
            fields[field.name] = tuple(value) if isinstance(value, list) else value
    if "emb_dim" not in fields:
        raise UserError(f"The gin files {list(gin_files)} do not set config.T5Config.emb_dim.")
    return T5Config(**fields)


def _gin_dims(gin_files: Sequence[str], bindings: Sequence[str]) -> tuple[int, int | None]:
    """(emb_dim, prompt length or None) from the model (and method) gin files."""
    from hyperprompt_jax import gin_utils

    gin_utils.parse_gin(gin_files, bindings, finalize=False)
    emb_dim = _gin_query("config.T5Config.emb_dim")
    if emb_dim is None:
        raise UserError(f"The gin files {list(gin_files)} do not set config.T5Config.emb_dim.")
    return int(emb_dim), _gin_query("prompts.SoftPrompt.length")


def _dims(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The expected (emb_dim, length) from flags, checked against the gin files if both."""
    emb_dim, length = args.emb_dim, getattr(args, "length", None)
    if args.gin_file:
        gin_emb, gin_len = _gin_dims(args.gin_file, args.gin_bindings)
        if emb_dim is not None and emb_dim != gin_emb:
            raise UserError(f"--emb_dim={emb_dim} contradicts the gin files' emb_dim {gin_emb}.")
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
            raise UserError(f"--task_map expects NAME=TASK, got {p!r}.")
        name, task = p.split("=", 1)
        out[name] = task
    return out


def _library_and_ranking(args: argparse.Namespace):
    emb_dim, _ = _dims(args)
    library = core.PromptLibrary.load(args.library, emb_dim=emb_dim)
    target = export.load_target_prompt(
        args.target, step=args.target_step, prompt_index=args.prompt_index, emb_dim=emb_dim
    )
    exclude = set(args.exclude)
    if os.path.isfile(args.target) or prompt_files.is_peft_adapter(args.target):
        # A target saved inside the library would otherwise retrieve itself first.
        exclude |= {e.name for e in library if e.path and os.path.samefile(e.path, args.target)}
    if args.target_task:
        exclude |= {e.name for e in library if e.task == args.target_task}
    if exclude:
        library = library.without(exclude)
        print(f"Excluded from the sources: {', '.join(sorted(exclude))}")
    ranked = core.rank_sources(library, target, args.metric)
    return library, target, ranked


def _print_ranking(library: core.PromptLibrary, target: np.ndarray, ranked, metric: str) -> None:
    others = [m for m in core.METRICS if m != metric]
    extra = {
        m: dict(zip(library.names, core.get_metric(m)([target], library.prompts)[0], strict=True))
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
    if args.format == "peft":
        _export_peft(args)
        return
    if args.base_model:
        raise UserError("--base_model is for --format=peft.")
    emb_dim, length = _dims(args)
    path, meta = export.export_prompt(
        args.checkpoint,
        args.output,
        step=args.step,
        embedding_step=args.embedding_step,
        task=args.task,
        model=args.model,
        score=args.score,
        metric=args.metric,
        prompt_index=args.prompt_index,
        param_path=args.param_path,
    )
    # Validate after writing would leave a bad file behind: re-check and remove if so.
    embedding = os.path.join(os.path.dirname(path), meta["prompts"]["embedding"]["file"])
    try:
        prompt_files.load_prompt_file(path, length=length, emb_dim=emb_dim)
        prompt_files.load_prompt_file(embedding, emb_dim=emb_dim)
    except ValueError:
        for f in {path, embedding, os.path.splitext(path)[0] + prompt_files.METADATA_SUFFIX}:
            if os.path.exists(f):
                os.remove(f)
        raise
    print(f"Wrote {path} [{meta['length']}, {meta['emb_dim']}] and its .json:")
    print(json.dumps(meta, indent=2, sort_keys=True))


def _export_peft(args: argparse.Namespace) -> None:
    if args.embedding_step is not None:
        raise UserError("--embedding_step is for library entries (--format=npy).")
    config = None
    if args.base_model is None:
        if not args.gin_file:
            raise UserError(
                "--format=peft needs the backbone: --gin_file=models/<size>.gin (the run's "
                "model; its weights are exported from the checkpoint) or --base_model."
            )
        config = _gin_config(args.gin_file, args.gin_bindings)
    paths = export.export_peft(
        args.checkpoint, args.output, step=args.step, prompt_index=args.prompt_index,
        param_path=args.param_path, base_model=args.base_model, config=config,
        task=args.task, metric=args.metric,
    )  # fmt: skip
    print(
        f"Wrote the PEFT prompt-tuning adapter {paths['adapter']} (base model {paths['backbone']})."
    )
    print("Load it with: PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(")
    print(f"  {paths['backbone']!r}), {paths['adapter']!r})")


def cmd_import(args: argparse.Namespace) -> None:
    emb_dim, length = _dims(args)
    prompt_files.load_prompt_file(args.adapter, length=length, emb_dim=emb_dim)
    path, meta = export.import_peft(args.adapter, args.output, task=args.task)
    print(
        f"Wrote {path} [{meta['length']}, {meta['emb_dim']}] and its .json (from {args.adapter})."
    )


def cmd_similarity(args: argparse.Namespace) -> None:
    emb_dim, _ = _dims(args)
    library = core.PromptLibrary.load(args.library, emb_dim=emb_dim)
    metrics = args.metric or list(core.METRICS)
    report = plots.similarity_report(library, args.output_dir, metrics)
    for metric, m in report["matrices"].items():
        print(f"{metric}:")
        print(plots.format_matrix(report["names"], m))
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
    prompt, weights = core.top_k_weighted_average(
        library, ranked, args.k, weighting=args.weighting, length=length, emb_dim=emb_dim
    )
    sources = [
        {"name": r.name, "task": r.task, "similarity": r.similarity, "weight": float(w)}
        for r, w in zip(ranked[: args.k], weights, strict=True)
    ]
    path = prompt_files.save_prompt(
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


def cmd_mixture(args: argparse.Namespace) -> None:
    _require_target_task(args)
    mixtures.import_modules(args.module)
    _, _, ranked = _library_and_ranking(args)
    sources = mixtures.source_tasks(ranked, args.k, _task_map(args.task_map))
    mixture = mixtures.register_topk_mixture(
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
        "It lives in this process only. To train on it and transfer to the target in one "
        "command, use `mixture_transfer`; or train on it with this gin file:"
    )
    print(
        mixtures.mixture_gin(
            args.target_task, sources, name=mixture.name, rate=args.rate,
            maximum=args.maximum, temperature=args.temperature, modules=args.module[1:],
        )
    )  # fmt: skip


def _require_target_task(args: argparse.Namespace) -> None:
    if not args.target_task:
        raise UserError(f"`{args.command}` needs --target_task (the target's seqio task).")


def cmd_mixture_transfer(args: argparse.Namespace) -> None:
    _require_target_task(args)
    mixtures.import_modules(args.module)
    _, _, ranked = _library_and_ranking(args)
    result = transfer.mixture_transfer(
        ranked, args.k, target_task=args.target_task, model_dir=args.model_dir,
        gin_files=args.train_gin_file, gin_bindings=args.train_gin,
        mixture_gin_files=args.mixture_gin_file or ["methods/prompt_tuning.gin"],
        mixture_gin_bindings=args.mixture_gin,
        transfer_gin_files=args.transfer_gin_file or ["methods/spot.gin"],
        transfer_gin_bindings=args.transfer_gin, task_map=_task_map(args.task_map),
        modules=args.module[1:], rate=args.rate, maximum=args.maximum,
        temperature=args.temperature, metric=args.eval_metric,
        launcher=transfer.in_process_launcher if args.in_process else transfer.SubprocessLauncher(),
    )  # fmt: skip
    print(transfer.format_mixture_transfer(result))


def cmd_best_of_topk(args: argparse.Namespace) -> None:
    if not args.gin_file:
        # The training gin files describe the target model: check every candidate's
        # shape against them before the first run starts.
        args.gin_file, args.gin_bindings = args.train_gin_file, args.train_gin
    emb_dim, length = _dims(args)
    library, _, ranked = _library_and_ranking(args)
    result = transfer.best_of_topk(
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
        launcher=transfer.in_process_launcher if args.in_process else transfer.SubprocessLauncher(),
    )
    print(transfer.format_best_of_topk(result))


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
    p.add_argument(
        "--library", required=True,
        help="directory of NAME.npy (+ NAME.embedding.npy, NAME.json) and PEFT adapters",
    )  # fmt: skip
    p.add_argument(
        "--target", required=True,
        help="target prompt: a .npy, a PEFT adapter, or a short run's model/checkpoint dir",
    )  # fmt: skip
    p.add_argument("--target_step", type=_int_or_name, default=None, help="int, latest, best")
    p.add_argument("--prompt_index", type=int, help="prompt of a multi-task / SMoP target")
    p.add_argument(
        "--target_task", help="the target's seqio task (its library prompts are excluded)"
    )
    p.add_argument("--exclude", action="append", default=[], help="library entry to leave out")
    p.add_argument(
        "--metric", default=core.DEFAULT_METRIC, choices=list(core.METRICS),
        help=f"retrieval metric (default {core.DEFAULT_METRIC}: the paper's best for transfer)",
    )  # fmt: skip


def _add_mixture_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--rate", default="examples", choices=mixtures.MIXTURE_RATES)
    p.add_argument("--maximum", type=int, help="examples-proportional cap K")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--task_map", action="append", default=[], help="NAME=TASK for prompts without metadata"
    )
    p.add_argument("--module", action="append", default=["hyperprompt_jax.tasks"],
                   help="module to import to register tasks (repeatable)")  # fmt: skip


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train_gin_file", action="append", default=[], required=True,
                   help="the training gin files (e.g. a run file, a model file, methods/spot.gin)")  # fmt: skip
    p.add_argument("--train_gin", action="append", default=[], help="training gin binding")
    p.add_argument("--eval_metric", help="validation metric (default: mean of non-loss metrics)")
    p.add_argument(
        "--in_process", action="store_true",
        help="run the trainings in this process instead of one process each",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hyperprompt_jax.spot",
        description="SPoT: prompts as task embeddings, retrieval and transfer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="a run's prompt -> library entry, or a PEFT adapter")
    p.add_argument("--checkpoint", "--model_dir", dest="checkpoint", required=True,
                   help="model directory (checkpoint_<step>/ inside) or one checkpoint directory")  # fmt: skip
    p.add_argument(
        "--output", required=True, help="LIBRARY/NAME.npy, or a directory for --format=peft"
    )
    p.add_argument(
        "--format", default="npy", choices=("npy", "peft"),
        help="npy: a SPoT library entry; peft: OUTPUT/adapter (PEFT prompt tuning) + "
        "OUTPUT/backbone (Hugging Face T5, unless --base_model)",
    )  # fmt: skip
    p.add_argument("--base_model", help="--format=peft: the adapter's base model (dir or hub id)")
    p.add_argument(
        "--step", type=_int_or_name, default=None,
        help="the transfer prompt's step: int, latest (default), best",
    )  # fmt: skip
    p.add_argument(
        "--embedding_step", type=_int_or_name, default=None,
        help="also export the task embedding from this (early) step to NAME.embedding.npy",
    )  # fmt: skip
    p.add_argument("--task", help="seqio task (default: the run's MIXTURE_OR_TASK_NAME)")
    p.add_argument("--model", help="model name recorded in the metadata, e.g. t5_1_1_lm100k_base")
    p.add_argument("--score", type=float, help="score to record (default: eval_metrics.jsonl)")
    p.add_argument("--metric", help="eval metric to read (default: mean of non-loss metrics)")
    p.add_argument("--prompt_index", type=int, help="which prompt of a multi-task / SMoP prompt")
    p.add_argument("--param_path", help="explicit '/'-joined parameter path of the prompt")
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="a PEFT prompt-tuning adapter -> library entry")
    p.add_argument("--adapter", required=True, help="PEFT prompt-tuning adapter directory")
    p.add_argument("--output", required=True, help="LIBRARY/NAME.npy")
    p.add_argument("--task", help="seqio task to record (default: the adapter's, if any)")
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("similarity", help="similarity matrices, heatmap and dendrogram")
    p.add_argument("--library", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--metric", action="append", choices=list(core.METRICS),
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
    p.add_argument("--weighting", default="similarity", choices=core.WEIGHTINGS)
    p.add_argument("--output", required=True, help="the initial prompt .npy")
    _add_dims(p, length=True)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("mixture", help="register a mixture of the target + top-k sources")
    _add_target(p)
    _add_mixture_flags(p)
    p.add_argument("--name", help="mixture name (default spot_<target>_top<k>_mixture)")
    _add_dims(p, length=False)
    p.set_defaults(fn=cmd_mixture)

    p = sub.add_parser(
        "mixture_transfer", help="prompt-tune on target + top-k sources, transfer to the target"
    )
    _add_target(p)
    _add_mixture_flags(p)
    p.add_argument("--model_dir", required=True, help="parent directory of the two runs")
    _add_training_flags(p)
    p.add_argument("--mixture_gin_file", action="append", default=[],
                   help="method gin of the mixture run (default methods/prompt_tuning.gin)")  # fmt: skip
    p.add_argument("--mixture_gin", action="append", default=[], help="mixture-run binding")
    p.add_argument("--transfer_gin_file", action="append", default=[],
                   help="method gin of the target run (default methods/spot.gin)")  # fmt: skip
    p.add_argument("--transfer_gin", action="append", default=[], help="target-run binding")
    _add_dims(p, length=False)
    p.set_defaults(fn=cmd_mixture_transfer)

    p = sub.add_parser("best_of_topk", help="train k transfers, keep the best on validation")
    _add_target(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--model_dir", required=True, help="parent directory; one run per candidate")
    _add_training_flags(p)
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
