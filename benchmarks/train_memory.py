"""Optimizer state, train-step memory and FLOPs: prompt tuning vs model tuning (one device).

Builds the sharded train state abstractly (nothing is allocated) and compiles the
train step for each method, then prints XLA's memory analysis side by side:

  python benchmarks/train_memory.py --model=models/t5_1_1_base.gin \
      --batch_size=8 --inputs_length=512 --targets_length=16 [--prompt_in_budget]

With `--prompt_in_budget`, prompt tuning gets `inputs_length - 100` input tokens, so
both encoders see the same number of positions (prompt tuning's own recipe counts the
prompt in the encoder budget); without it, prompt tuning's encoder is 100 longer.

Numbers are bytes on one device (parameters are float32; activations in the model
gin's dtype). `step_temp` holds activations and gradients; `alias` is the donated
state updated in place.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def report(model_gin: str, method: str, batch_size: int, lengths: dict) -> dict:
    """`Trainer.memory_report()` of `method` (a `common.METHODS` name) on one device."""
    from hyperprompt_jax import partitioning

    common.progress(f"compiling the {method} train step of {model_gin}")
    trainer = common.build_trainer(
        model_gin,
        method,
        batch_size,
        lengths,
        partitioner=partitioning.Partitioner(devices=jax.devices()[:1]),
    )
    return trainer.memory_report()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/t5_1_1_base.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=16)
    parser.add_argument("--prompt_in_budget", action="store_true")
    common.add_quick_flag(parser)
    args = parser.parse_args()
    common.apply_quick(
        args, model="models/t5_1_1_tiny.gin", batch_size=2, inputs_length=128, targets_length=4
    )
    b, i, t = args.batch_size, args.inputs_length, args.targets_length
    rows = {
        "model_tuning": report(args.model, "model_tuning", b, {"inputs": i, "targets": t}),
        "prompt_tuning": report(
            args.model,
            "prompt_tuning",
            b,
            {"inputs": i - 100 if args.prompt_in_budget else i, "targets": t},
        ),
    }
    print(f"prompt in the encoder budget: {args.prompt_in_budget}")
    print(
        f"{args.model}, batch {b}, lengths {i}/{t}; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {platform.processor() or platform.machine()}"
    )
    keys = list(rows["model_tuning"])
    print(f"{'':28s}" + "".join(f"{n:>18s}" for n in rows) + f"{'ratio MT/PT':>14s}")
    for k in keys:
        mt, pt = rows["model_tuning"][k], rows["prompt_tuning"][k]
        if "bytes" in k:
            fmt = lambda v: f"{v / 2**20:16.1f}MB"  # noqa: E731
        elif "flops" in k:
            fmt = lambda v: f"{v / 1e9:12.1f} GFLOP"  # noqa: E731
        else:
            fmt = lambda v: f"{v:18,d}"  # noqa: E731
        ratio = f"{mt / pt:14.1f}" if pt else f"{'inf':>14s}"
        print(f"{k:28s}{fmt(mt)}{fmt(pt)}{ratio}")


if __name__ == "__main__":
    main()
