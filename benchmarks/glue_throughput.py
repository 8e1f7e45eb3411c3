"""Useful training tokens per second on GLUE-shaped data: unpacked, packed, Hugging Face.

    python benchmarks/glue_throughput.py                        # GLUE, T5.1.1-small, 64 examples
    python benchmarks/glue_throughput.py --benchmark=super_glue --methods=model_tuning
    python benchmarks/glue_throughput.py --quick                # tiny model: checks it runs

The same `--examples` examples, with input and target lengths drawn from the GLUE (or
SuperGLUE) tasks' length distributions in T5 tokens (`glue_shapes.py`: from TFDS data
when prepared, else from published statistics; the header says which), uniformly over
the tasks, random token ids, are trained on by:

* **ours unpacked**: one example per row, every row padded to the feature lengths the
  recipes use (`--inputs_length` 512, `--targets_length` 8), `pack=False`;
* **ours packed**: `EncDecTaskIdFeatureConverter(pack=True, prompt_length=P)`, several
  examples per row of the same inputs length (targets `--packed_targets_length`),
  each with its own task id (and its own prompt: P prompt positions per example);
* **HF**: `transformers` T5 (+ `peft` prompt tuning), each batch of `--batch_size`
  examples padded to its own longest input and target (`DataCollatorForSeq2Seq`'s
  dynamic padding), examples in the same order.

Examples are truncated to `--inputs_length` / the target length first (EOS kept), the
same for everyone, so every framework sees the same tokens. *Useful tokens* are the
non-padding input and target tokens actually trained on (counted from each
framework's own batches, prompts not included); useful tokens per second is the fair
unit when rows hold different numbers of examples. Model tuning and prompt tuning
(100 tokens) run in all three; SMoP (4 x 5) and HyperPrompt-Global only in ours (HF
has no equivalent). Same model shape, optimizer and settings as `throughput.py`.

Each run is its own process (one warm-up / compile step on the first batch, whose
time is reported as "first step", then one timed pass over every batch); runs
alternate between the frameworks over `--rounds`, each waiting for an idle CPU
(`--max_busy`); the table uses the median of the runs during which other processes
used at most `--max_busy` of the CPU (all runs if none did).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import glue_shapes  # noqa: E402
import throughput  # noqa: E402 (model shapes and the HF model / optimizer settings)

PROMPT_LENGTH = throughput.PROMPT_LENGTH
# Method -> the input prompt length a packed example carries (SMoP: one 5-token
# prompt routed per example; HyperPrompt and model tuning: none in the inputs).
PACKED_PROMPT_LENGTH = {
    "model_tuning": 0,
    "prompt_tuning": PROMPT_LENGTH,
    "smop": 5,
    "hyperprompt_global": 0,
}
HF_METHODS = ("model_tuning", "prompt_tuning")


def make_examples(args: argparse.Namespace, targets_length: int):
    """The benchmark's examples: lists of int32 token arrays (EOS-terminated) and task ids.

    Deterministic in `--seed`, so every worker builds the same ones. Lengths are
    truncated to `--inputs_length` / `targets_length`, keeping the EOS (as seqio's
    `append_eos_after_trim` does).
    """
    import numpy as np

    names = glue_shapes.GLUE_TASKS if args.benchmark == "glue" else glue_shapes.SUPER_GLUE_TASKS
    n_in, n_out, task_ids, source = glue_shapes.sample_examples(names, args.examples, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    vocab = throughput.SHAPES[args.size]["vocab_size"]
    inputs, targets = [], []
    for li, lo in zip(n_in, n_out, strict=True):
        li, lo = min(int(li), args.inputs_length), min(int(lo), targets_length)
        inputs.append(np.append(rng.integers(3, min(vocab, 32000), li - 1), 1).astype(np.int32))
        targets.append(np.append(rng.integers(3, min(vocab, 32000), lo - 1), 1).astype(np.int32))
    return inputs, targets, task_ids, names, source


# ----------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------


def packing_available() -> bool:
    """True once `EncDecTaskIdFeatureConverter` takes `prompt_length` (packing with task
    ids, issue 18 item 1)."""
    from hyperprompt_jax import feature_converters

    params = inspect.signature(feature_converters.EncDecTaskIdFeatureConverter).parameters
    return "prompt_length" in params


def _our_batches(args, method: str, pack: bool):
    """Model-feature batches (numpy) of all examples through our feature converter."""
    import numpy as np
    import tensorflow as tf

    from hyperprompt_jax import feature_converters

    targets_length = args.packed_targets_length if pack else args.targets_length
    inputs, targets, task_ids, names, _ = make_examples(args, args.targets_length)

    def gen():
        for i, t, k in zip(inputs, targets, task_ids, strict=True):
            yield {"inputs": i, "targets": t, "task_id": np.int32(k)}

    ds = tf.data.Dataset.from_generator(
        gen,
        output_signature={
            "inputs": tf.TensorSpec([None], tf.int32),
            "targets": tf.TensorSpec([None], tf.int32),
            "task_id": tf.TensorSpec([], tf.int32),
        },
    )
    kwargs = {"pack": pack}
    if pack:
        kwargs["prompt_length"] = PACKED_PROMPT_LENGTH[method]
    converter = feature_converters.EncDecTaskIdFeatureConverter(**kwargs)
    ds = converter(ds, {"inputs": args.inputs_length, "targets": targets_length})
    rows = list(ds.as_numpy_iterator())
    batches = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        missing = args.batch_size - len(chunk)
        if missing:  # An all-padding tail keeps one compiled shape.
            batch = {
                k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()
            }
        batches.append(batch)
    return batches, len(rows), len(names)


def worker_ours(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from hyperprompt_jax import packing, partitioning, plan
    from hyperprompt_jax import trainer as trainer_lib

    method = args.method
    pack = args.mode == "packed"
    batches, rows, num_tasks = _our_batches(args, method, pack)
    method_gin, method_bindings = common.METHODS[method]
    bindings = [*method_bindings, "DROPOUT_RATE=0.0", "ACTIVATION_DTYPE='float32'"]
    if method.startswith("hyperprompt"):
        bindings = [b for b in bindings if not b.startswith("NUM_TASKS")]
        bindings.append(f"NUM_TASKS={num_tasks}")
    if method == "prompt_tuning":
        bindings.append(f"PROMPT_LENGTH={PROMPT_LENGTH}")
    plan.parse_run_gin([f"models/t5_1_1_{args.size}.gin", method_gin], bindings, import_tasks=False)
    shapes = {k: v.shape for k, v in batches[0].items()}
    partitioner = partitioning.Partitioner()
    trainer = trainer_lib.from_gin(
        shapes, partitioner=partitioner, trainable_patterns=trainer_lib.FROM_GIN
    )
    # Non-padding tokens of the examples; packed prompt slots (token
    # packing.PROMPT_SLOT_ID; the examples' random tokens are >= 3) are not useful work.
    slot = packing.PROMPT_SLOT_ID
    useful = sum(
        int(((b["encoder_input_tokens"] > 0) & (b["encoder_input_tokens"] != slot)).sum())
        + int((b["decoder_target_tokens"] > 0).sum())
        for b in batches
    )
    batches = [
        jax.device_put(b, trainer.batch_shardings({k: v.shape for k, v in b.items()}))
        for b in batches
    ]
    state = trainer.init_state()
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics["loss"])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches:
        state, metrics = trainer.train_step(state, b)
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        first=first,
        useful=useful,
        rows=rows,
        steps=len(batches),
        examples=args.examples,
        loss=float(metrics["loss"]),
        row_shape=[int(x) for x in np.shape(batches[0]["encoder_input_tokens"])],
    )


def worker_hf(args: argparse.Namespace) -> dict:
    import torch

    model, optimizer = throughput.hf_model_and_optimizer(
        args.size, args.method == "prompt_tuning", args.torch_threads
    )
    inputs, targets, _, _, _ = make_examples(args, args.targets_length)
    batches, useful = [], 0
    for start in range(0, len(inputs), args.batch_size):
        ins, outs = (
            inputs[start : start + args.batch_size],
            targets[start : start + args.batch_size],
        )
        li, lo = max(map(len, ins)), max(map(len, outs))
        ids = torch.zeros(len(ins), li, dtype=torch.long)
        labels = torch.full((len(ins), lo), -100, dtype=torch.long)
        for r, (i, o) in enumerate(zip(ins, outs, strict=True)):
            ids[r, : len(i)] = torch.from_numpy(i)
            labels[r, : len(o)] = torch.from_numpy(o)
        mask = (ids != 0).long()
        useful += int(mask.sum() + (labels != -100).sum())
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels))

    def step(batch) -> float:
        out = model(**batch)  # labels -> decoder inputs shifted right, -100 ignored
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    start = time.perf_counter()
    step(batches[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches:
        loss = step(b)
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds,
        first=first,
        useful=useful,
        rows=len(inputs),
        steps=len(batches),
        examples=args.examples,
        loss=loss,
    )


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------

WORKER_FLAGS = (
    "benchmark", "size", "examples", "batch_size", "inputs_length", "targets_length",
    "packed_targets_length", "seed", "torch_threads",
)  # fmt: skip


def run_worker(kind: str, method: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}"]
    cmd += [f"--method={method}", f"--mode={mode}"]
    cmd += [f"--{name}={getattr(args, name)}" for name in WORKER_FLAGS]
    return common.run_json_worker(cmd, f"{kind} {method} {mode}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="glue", choices=["glue", "super_glue"])
    parser.add_argument("--size", default="small", choices=sorted(throughput.SHAPES))
    parser.add_argument("--examples", type=int, default=64, help="examples per run")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step")
    parser.add_argument("--inputs_length", type=int, default=512)
    parser.add_argument("--targets_length", type=int, default=8, help="unpacked (and HF cap)")
    parser.add_argument("--packed_targets_length", type=int, default=64)
    parser.add_argument("--methods", default="model_tuning,prompt_tuning,smop,hyperprompt_global")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--max_busy", type=float, default=0.2)
    parser.add_argument("--wait_timeout", type=float, default=600.0)
    parser.add_argument("--max_isa", default="", help="emulate an older CPU (common.cap_isa)")
    common.add_quick_flag(parser)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--method", default="model_tuning", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="unpacked", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        out = {"ours": worker_ours, "hf": worker_hf}[args.worker](args)
        print(json.dumps(out))
        return 0
    common.apply_quick(
        args, size="tiny", examples=16, batch_size=4, inputs_length=128, targets_length=8,
        packed_targets_length=32, wait_timeout=5.0,
    )  # fmt: skip
    if args.max_isa:
        common.cap_isa(args.max_isa)
    print(common.machine_header(("jax", "jaxlib", "flax", "torch", "transformers", "peft")))
    _, _, _, names, source = make_examples(args, args.targets_length)

    n_in, n_out, _, _ = glue_shapes.sample_examples(names, args.examples, args.seed)
    print(
        f"T5.1.1-{args.size} shape; {args.examples} {args.benchmark} examples ({', '.join(names)}; "
        f"lengths from {source}), input tokens mean {n_in.mean():.0f} / max {n_in.max()}, "
        f"target tokens mean {n_out.mean():.1f}; unpacked rows {args.inputs_length} / "
        f"{args.targets_length}, packed rows {args.inputs_length} / "
        f"{args.packed_targets_length}, {args.batch_size} rows per step",
        flush=True,
    )
    packed = packing_available()
    if not packed:
        common.progress(
            "packing with task ids is not in this checkout yet (EncDecTaskIdFeatureConverter "
            "has no prompt_length): the packed rows are skipped"
        )
    methods = [m for m in args.methods.split(",") if m]
    runs = []
    for method in methods:
        runs.append(("ours", method, "unpacked"))
        if packed:
            runs.append(("ours", method, "packed"))
        if method in HF_METHODS:
            runs.append(("hf", method, "dynamic"))
    results: dict[tuple, list] = {}
    for r in range(args.rounds):
        for kind, method, mode in runs if r % 2 == 0 else runs[::-1]:
            busy = common.wait_until_quiet(args.max_busy, args.wait_timeout)
            common.progress(f"round {r + 1}/{args.rounds}: {method} {kind} {mode}")
            out = run_worker(kind, method, mode, args)
            results.setdefault((kind, method, mode), []).append(out)
            print(
                f"  {method:<18} {kind:<4} {mode:<8} {out['useful'] / out['seconds']:8.0f} "
                f"useful tok/s, {out['steps']} steps of {out['rows'] / out['steps']:.1f} rows, "
                f"first step {out['first']:.1f} s; CPU busy before {busy:.0%}, others during "
                f"{out['others_busy']:.0%}",
                flush=True,
            )

    def median(key) -> tuple[float, dict]:
        outs = results[key]
        quiet = [o for o in outs if o["others_busy"] <= args.max_busy] or outs
        rate = statistics.median(o["useful"] / o["seconds"] for o in quiet)
        return rate, quiet[0]

    rows = []
    for method in methods:
        base, base_out = median(("ours", method, "unpacked"))
        hf = median(("hf", method, "dynamic")) if method in HF_METHODS else None
        for kind, mode in (("ours", "unpacked"), ("ours", "packed"), ("hf", "dynamic")):
            key = (kind, method, mode)
            if key not in results:
                continue
            rate, out = median(key)
            per_row = args.examples / out["rows"] if mode == "packed" else 1.0
            rows.append([
                method, f"{'ours' if kind == 'ours' else 'HF'} {mode}", out["useful"],
                f"{per_row:.1f}", out["steps"], f"{rate:,.0f}",
                f"{args.examples / (out['useful'] / rate):.2f}",
                f"{rate / base:.2f}x", f"{rate / hf[0]:.2f}x" if hf else "-",
                f"{statistics.median(o['first'] for o in results[key]):.1f}",
            ])  # fmt: skip
    loads = [o["others_busy"] for outs in results.values() for o in outs]
    print(
        f"\nCPU share used by other processes during the runs: min {min(loads):.0%}, median "
        f"{statistics.median(loads):.0%}, max {max(loads):.0%}\n"
    )
    print(
        common.markdown_table(
            [
                "method",
                "run",
                "useful tokens",
                "examples / row",
                "steps",
                "useful tok/s",
                "examples/s",
                "vs ours unpacked",
                "vs HF",
                "first step s",
            ],
            rows,
        )  # fmt: skip
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
