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
import platform

import jax

import gin
from hyperprompt_jax import gin_utils, optim, partitioning, utils
from hyperprompt_jax import trainer as trainer_lib

METHODS = {
    "model_tuning": "methods/model_tuning.gin",
    "prompt_tuning": "methods/prompt_tuning.gin",
}


def make_shapes(b: int, i: int, t: int) -> dict:
    return {
        "encoder_input_tokens": (b, i),
        "decoder_input_tokens": (b, t),
        "decoder_target_tokens": (b, t),
        "decoder_loss_weights": (b, t),
        "task_ids": (b,),
    }


def report(model_gin: str, method_gin: str, shapes: dict) -> dict:
    utils.import_task_modules()
    gin_utils.parse_gin([model_gin, method_gin], [])
    model = gin_utils.configured("MODEL")
    trainer = trainer_lib.Trainer(
        model,
        gin.get_configurable(optim.adafactor),
        gin.get_configurable(optim.create_learning_rate_scheduler)(),
        partitioning.Partitioner(devices=jax.devices()[:1]),
        shapes,
        trainable_patterns=gin_utils.query_macro("TRAINABLE_PATTERNS", None),
    )
    return trainer.memory_report()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/t5_1_1_base.gin")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=16)
    parser.add_argument("--prompt_in_budget", action="store_true")
    args = parser.parse_args()
    b, i, t = args.batch_size, args.inputs_length, args.targets_length
    rows = {
        "model_tuning": report(args.model, METHODS["model_tuning"], make_shapes(b, i, t)),
        "prompt_tuning": report(
            args.model,
            METHODS["prompt_tuning"],
            make_shapes(b, i - 100 if args.prompt_in_budget else i, t),
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
