"""Where a train step's time goes: gradients, optimizer update, the non-finite guard.

    python benchmarks/step_breakdown.py                      # T5.1.1-small, full, batch 8, 128 / 16
    python benchmarks/step_breakdown.py --method=prompt_tuning --rounds=20
    python benchmarks/step_breakdown.py --quick                 # tiny model: checks it runs
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/step_breakdown.py   # an XLA:CPU option

Three jitted programs on the same state and batch, timed in turn (one of each per
round, so a busy machine slows all three alike), medians over `--rounds`:

* **gradients**: loss and gradients of the trainable tree only;
* **step without guard**: gradients + Adafactor + the update, state donated;
* **step**: `Trainer.train_step`, which also rejects a step whose loss or new
  parameters are not finite (the state stays as it was).

The differences are the optimizer's share and the guard's share of a step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="T5.1.1 size")
    parser.add_argument("--method", default="model_tuning", choices=sorted(common.METHODS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="ACTIVATION_DTYPE")
    parser.add_argument("--rounds", type=int, default=12)
    common.add_quick_flag(parser)
    args = parser.parse_args(argv)
    common.apply_quick(
        args, size="tiny", batch_size=2, inputs_length=16, targets_length=4, rounds=2
    )

    import jax
    import numpy as np
    import optax

    from hyperprompt_jax import trainer as trainer_lib

    print(common.machine_header())
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    b, n_in, n_out = args.batch_size, args.inputs_length, args.targets_length
    trainer = common.build_trainer(
        f"models/t5_1_1_{args.size}.gin",
        args.method,
        b,
        {"inputs": n_in, "targets": n_out},
        bindings=["DROPOUT_RATE=0.0", f"ACTIVATION_DTYPE='{args.dtype}'"],
    )
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 32000, (b, n_out), dtype=np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(2, 32000, (b, n_in), dtype=np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets),
        "task_ids": np.zeros((b,), np.int32),
    }
    batch = {k: v for k, v in batch.items() if k in trainer.input_shapes}

    def loss_of(trainable, frozen):
        params = trainer_lib.merge_params(trainable, frozen)
        return trainer.model.loss_fn(params, batch, None)[0]

    gradients = jax.jit(jax.grad(loss_of))

    def unguarded(state):
        grads = jax.grad(loss_of)(state.trainable, state.frozen)
        updates, opt_state = trainer.optimizer.update(grads, state.opt_state, state.trainable)
        return trainer_lib.TrainState(
            step=state.step + 1,
            trainable=optax.apply_updates(state.trainable, updates),
            frozen=state.frozen,
            opt_state=opt_state,
        )

    unguarded_step = jax.jit(unguarded, donate_argnums=(0,))
    state = trainer.init_state()

    def run(name):
        nonlocal state
        start = time.perf_counter()
        if name == "gradients":
            jax.block_until_ready(gradients(state.trainable, state.frozen))
        elif name == "step without guard":
            state = unguarded_step(state)
            jax.block_until_ready(state.step)
        else:
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - start

    names = ["gradients", "step without guard", "step"]
    for name in names:  # Compile.
        common.progress(f"compiling {name}")
        run(name)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            times[name].append(run(name))
        common.progress(f"round {r + 1}/{args.rounds}: step {1000 * times['step'][-1]:.0f} ms")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"\nT5.1.1-{args.size} {args.method}, batch {b}, inputs {n_in}, targets {n_out}, "
        f"{args.dtype}; medians of {args.rounds} rounds\n"
    )
    rows = [[name, f"{1000 * med[name]:.0f}", f"{med[name] / med['step']:.2f}"] for name in names]
    print(common.markdown_table(["program", "ms", "of step"], rows))
    print(
        f"\noptimizer update: {1000 * (med['step without guard'] - med['gradients']):+.0f} ms; "
        f"guard: {1000 * (med['step'] - med['step without guard']):+.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
