"""FLOPs and memory of every method's train and inference step, from XLA, side by side.

    python benchmarks/efficiency.py                       # T5-base and T5-large, all methods
    python benchmarks/efficiency.py --sizes=base --methods=prompt_tuning,smop
    python benchmarks/efficiency.py --quick               # tiny model: checks the script runs

For each model size and method the train step (`Trainer.compiled_train_step`: loss,
gradients of the trainable parameters only, Adafactor, the sharded update) and an
inference step are compiled ahead of time from abstract shapes (`jax.eval_shape`;
no weight is allocated, so T5-large costs compile time only), and XLA's
`cost_analysis()` FLOP count and `memory_analysis()` are printed.

The inference step is one teacher-forced forward pass: encode the inputs and run the
decoder over the `targets` length, then argmax. Its FLOPs equal those of greedy
decoding of that many tokens with a cache, up to the decoder self-attention over the
cache (a few positions). `predict_batch`'s decode loop is not used because XLA's cost
analysis counts a while-loop body once, whatever its trip count.

Then two comparisons:
* SMoP (4 x 5 tokens; each example gets one 5-token prompt) against 100-token prompt
  tuning, next to the SMoP paper's T5-large reductions, with a sweep over input
  lengths (inference FLOPs) that shows where the paper's numbers come from;
* each HyperPrompt variant against model tuning (the paper: little added compute);
* rematerialised layers (`--remat_policies`) against none, for `--remat_methods`.

Training *time* is not measured here (a T5-large step at batch 32 takes minutes on a
CPU); a step's FLOPs are its time on a compute-bound accelerator.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Reductions of SMoP (4 x 5) against 100-token prompt tuning on T5-large (Choi et al.,
# 2023, as the paper reports them): training time, training memory, inference FLOPs.
PAPER_SMOP_VS_PT_LARGE = {"train time": 14.6, "train memory": 22.9, "inference FLOPs": 27.2}


def inference_step(trainer: Any) -> Any:
    """The compiled forward pass (encode + teacher-forced decode + argmax)."""
    module = trainer.model.module
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "task_ids")
    shapes = {k: v for k, v in trainer.input_shapes.items() if k in keys}

    def infer(params, batch):
        logits = module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            task_ids=batch.get("task_ids"),
            enable_dropout=False,
        )
        return jnp.argmax(logits, axis=-1)

    jitted = trainer.partitioner.jit(
        infer,
        in_shardings=(trainer.layout.param_shardings, trainer.batch_shardings(shapes)),
        out_shardings=trainer.partitioner.replicated,
    )
    batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in shapes.items()}
    return jitted.lower(trainer.param_shapes, batch)


def measure(size: str, method: str, args: argparse.Namespace, remat: str = "none") -> dict:
    """Compiles one (size, method) pair (layers rematerialised by `remat`); its numbers."""
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    common.progress(f"compiling the train and inference steps of {size} {method} (remat {remat})")
    trainer = common.build_trainer(
        f"models/t5_1_1_{size}.gin",
        method,
        args.batch_size,
        lengths,
        bindings=[f"ACTIVATION_DTYPE='{args.dtype}'", f"REMAT_POLICY='{remat}'"],
    )
    from hyperprompt_jax import trainable

    n_train, n_total = trainable.count(trainer.param_shapes, trainer.trainable_patterns)
    train, train_s = common.timed(trainer.compiled_train_step)
    lowered = inference_step(trainer)
    infer, infer_s = common.timed(lowered.compile)
    row = dict(
        size=size,
        method=method,
        remat=remat,
        trainable=n_train,
        total=n_total,
        train_flops=common.flops_of(train),
        train_mem=common.memory_of(train),
        infer_flops=common.flops_of(infer),
        infer_mem=common.memory_of(infer),
        compile_s=(train_s, infer_s),
    )
    print(
        f"  {size:>5} {method:<20} remat {remat:<7} train {row['train_flops'] / 1e12:8.2f} TFLOP "
        f"peak {row['train_mem']['peak'] / common.GIB:6.2f} GiB | infer "
        f"{row['infer_flops'] / 1e9:9.1f} GFLOP | compile {train_s:.0f}+{infer_s:.0f} s",
        flush=True,
    )
    return row


def sweep_inference_flops(size: str, lengths: list[int], args: argparse.Namespace) -> list:
    """Inference GFLOPs of prompt tuning and SMoP for several input lengths.

    Uses the lowered (not yet optimised) program's cost analysis: no compile, so
    a sweep is cheap; its FLOP count matches the compiled one to within a few
    per cent (the optimiser removes little arithmetic from a forward pass).
    """
    rows = []
    for length in lengths:
        flops = {}
        for method in ("prompt_tuning", "smop"):
            trainer = common.build_trainer(
                f"models/t5_1_1_{size}.gin",
                method,
                args.batch_size,
                {"inputs": length, "targets": args.targets_length},
                bindings=[f"ACTIVATION_DTYPE='{args.dtype}'"],
            )
            analysis = inference_step(trainer).cost_analysis()
            if isinstance(analysis, (list, tuple)):
                analysis = analysis[0]
            flops[method] = float(analysis["flops"])
        reduction = 100.0 * (1.0 - flops["smop"] / flops["prompt_tuning"])
        rows.append((length, flops["prompt_tuning"] / 1e9, flops["smop"] / 1e9, reduction))
        print(f"  sweep {size} inputs {length}: SMoP -{reduction:.1f}% inference FLOPs", flush=True)
    return rows


def _gib(n: int) -> str:
    return f"{n / common.GIB:.2f}"


def remat_table(rows: list[dict]) -> str:
    """Train-step FLOPs and memory per remat policy, against no rematerialisation."""
    table = []
    for r in rows:
        base = next(
            b
            for b in rows
            if (b["size"], b["method"], b["remat"]) == (r["size"], r["method"], "none")
        )
        table.append(
            [
                f"{r['size']} {r['method']}",
                r["remat"],
                f"{r['train_flops'] / 1e12:.2f}",
                common.percent_change(r["train_flops"], base["train_flops"]),
                _gib(r["train_mem"]["temp"]),
                _gib(r["train_mem"]["peak"]),
                common.percent_change(r["train_mem"]["peak"], base["train_mem"]["peak"]),
            ]
        )
    return common.markdown_table(
        [
            "model, method",
            "remat",
            "train TFLOP/step",
            "FLOPs vs none",
            "train temp GiB",
            "train peak GiB",
            "peak vs none",
        ],
        table,
    )


def report(rows: list[dict], args: argparse.Namespace, sweep: dict, remat_rows=()) -> str:
    """The tables."""
    out = []
    for size in args.sizes:
        sized = {r["method"]: r for r in rows if r["size"] == size and r["remat"] == "none"}
        if not sized:
            continue
        out.append(
            f"\n### T5.1.1-{size}: batch {args.batch_size}, inputs {args.inputs_length}, "
            f"targets {args.targets_length}, activations {args.dtype}\n"
        )
        table = []
        for method, r in sized.items():
            table.append(
                [
                    method,
                    f"{r['trainable']:,}",
                    f"{r['train_flops'] / 1e12:.2f}",
                    _gib(r["train_mem"]["argument"]),
                    _gib(r["train_mem"]["temp"]),
                    _gib(r["train_mem"]["peak"]),
                    f"{r['infer_flops'] / 1e12:.3f}",
                    _gib(r["infer_mem"]["temp"]),
                    f"{r['compile_s'][0]:.0f} / {r['compile_s'][1]:.0f}",
                ]
            )
        out.append(
            common.markdown_table(
                [
                    "method",
                    "trainable params",
                    "train TFLOP/step",
                    "train args GiB",
                    "train temp GiB",
                    "train peak GiB",
                    "infer TFLOP/batch",
                    "infer temp GiB",
                    "compile s (train / infer)",
                ],
                table,
            )
        )
        pt, smop = sized.get("prompt_tuning"), sized.get("smop")
        if pt and smop:
            out.append(f"\nSMoP (4 x 5) vs prompt tuning (100 tokens), T5.1.1-{size}:\n")
            red = lambda new, old: f"{100.0 * (1 - new / old):.1f}%"  # noqa: E731
            paper = PAPER_SMOP_VS_PT_LARGE if size == "large" else {}
            table = [
                [
                    "train FLOPs (time on a compute-bound device)",
                    red(smop["train_flops"], pt["train_flops"]),
                    f"{paper['train time']}% (time)" if paper else "-",
                ],
                [
                    "train peak memory (weights + activations)",
                    red(smop["train_mem"]["peak"], pt["train_mem"]["peak"]),
                    f"{paper['train memory']}%" if paper else "-",
                ],
                [
                    "train temporaries (activations)",
                    red(smop["train_mem"]["temp"], pt["train_mem"]["temp"]),
                    "-",
                ],
                [
                    "inference FLOPs",
                    red(smop["infer_flops"], pt["infer_flops"]),
                    f"{paper['inference FLOPs']}%" if paper else "-",
                ],
            ]
            out.append(common.markdown_table(["reduction", "ours", "paper (T5-large)"], table))
        mt = sized.get("model_tuning")
        hps = [m for m in sized if m.startswith("hyperprompt")]
        if mt and hps:
            out.append(f"\nHyperPrompt vs model tuning, T5.1.1-{size}:\n")
            table = []
            for m in hps:
                r = sized[m]
                table.append(
                    [
                        m,
                        f"{r['trainable'] - mt['trainable']:+,}",
                        common.percent_change(r["train_flops"], mt["train_flops"]),
                        common.percent_change(r["infer_flops"], mt["infer_flops"]),
                        common.percent_change(r["train_mem"]["peak"], mt["train_mem"]["peak"]),
                    ]
                )
            out.append(
                common.markdown_table(
                    ["variant", "added params", "train FLOPs", "infer FLOPs", "train peak memory"],
                    table,
                )
            )
    for size, rows_ in sweep.items():
        out.append(
            f"\nInference FLOPs vs input length, T5.1.1-{size} (batch {args.batch_size}, "
            f"targets {args.targets_length}; lowered-program count):\n"
        )
        out.append(
            common.markdown_table(
                ["inputs", "prompt tuning GFLOP", "SMoP GFLOP", "SMoP reduction"],
                [[n, f"{a:,.0f}", f"{b:,.0f}", f"{c:.1f}%"] for n, a, b, c in rows_],
            )
        )
    if remat_rows:
        out.append(
            f"\nRematerialised layers (`REMAT_POLICY`), train step, batch {args.batch_size}, "
            f"inputs {args.inputs_length}, targets {args.targets_length}:\n"
        )
        out.append(remat_table(list(remat_rows)))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="base,large", help="comma-separated T5.1.1 sizes")
    parser.add_argument("--methods", default=",".join(common.METHODS), help="comma-separated")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", help="ACTIVATION_DTYPE")
    parser.add_argument(
        "--sweep_lengths",
        default="64,128,256,512",
        help="input lengths of the SMoP-vs-prompt-tuning inference sweep ('' = none)",
    )
    parser.add_argument("--sweep_sizes", default="large", help="sizes of the sweep")
    parser.add_argument(
        "--remat_policies",
        default="minimal,full",
        help="remat policies compared with 'none' ('' = no remat table)",
    )
    parser.add_argument(
        "--remat_methods", default="model_tuning,prompt_tuning", help="methods of the remat table"
    )
    common.add_quick_flag(parser)
    args = parser.parse_args(argv)
    common.apply_quick(
        args, sizes="tiny", methods="model_tuning,prompt_tuning,smop,hyperprompt_share",
        batch_size=2, inputs_length=32, targets_length=4, dtype="float32",
        sweep_lengths="32", sweep_sizes="tiny", remat_policies="minimal",
        remat_methods="prompt_tuning",
    )  # fmt: skip
    args.sizes = [s for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in common.METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(common.METHODS)}")
    print(common.machine_header())
    print(
        f"XLA:CPU ahead-of-time compiles; batch {args.batch_size}, inputs {args.inputs_length}, "
        f"targets {args.targets_length}, activations {args.dtype}, parameters float32.",
        flush=True,
    )
    rows = [measure(size, m, args) for size in args.sizes for m in methods]
    remat_rows = []
    policies = [p for p in args.remat_policies.split(",") if p and p != "none"]
    if policies:
        for size in args.sizes:
            for m in [m for m in args.remat_methods.split(",") if m]:
                none = [r for r in rows if (r["size"], r["method"]) == (size, m)]
                remat_rows += none or [measure(size, m, args)]
                remat_rows += [measure(size, m, args, remat=p) for p in policies]
    sweep = {}
    lengths = [int(n) for n in args.sweep_lengths.split(",") if n]
    if lengths:
        for size in [s for s in args.sweep_sizes.split(",") if s]:
            sweep[size] = sweep_inference_flops(size, lengths, args)
    print(report(rows, args, sweep, remat_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
