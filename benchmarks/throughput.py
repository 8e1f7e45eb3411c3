"""Training throughput and peak memory on this CPU: ours (JAX) vs Hugging Face (PyTorch).

    python benchmarks/throughput.py                  # T5.1.1-small shape, batch 8, 128 / 16
    python benchmarks/throughput.py --rounds=5 --steps=10 --variants=float32,bfloat16
    python benchmarks/throughput.py --quick          # tiny model, ~1 minute: checks it runs
    python benchmarks/throughput.py --max_isa=AVX2   # emulate an AVX2-only CPU (see common.cap_isa)

Both frameworks train the same thing: a randomly initialised T5.1.1-small-shaped
encoder-decoder (d 512, 6 heads x 64, GeGLU MLP 1024, 8 + 8 layers, vocabulary 32128,
untied output layer, no dropout), the same batch of random tokens (no padding), the
same lengths, with Adafactor in both (t5x's settings: decay 0.8, update clipping 1.0;
model tuning with parameter scaling and learning rate 1e-3, prompt tuning without,
weight decay 1e-5, learning rate 0.3; `transformers.optimization.Adafactor` with the
matching arguments):

* **full**: every parameter trained (`methods/model_tuning.gin` / a plain
  `T5ForConditionalGeneration`);
* **prompt**: a 100-token soft prompt, backbone frozen (`methods/prompt_tuning.gin` /
  `peft.PromptTuningConfig(num_virtual_tokens=100, task_type=SEQ_2_SEQ_LM)`).

Every measurement runs in its own subprocess so peak resident memory (`VmHWM`) is
that framework's alone, and runs alternate (ours, HF, HF, ours, ...). The machine is
shared: before each run the script waits until at most `--max_busy` of the CPU is
busy, it records the share other processes took during each run, and the tables use
only runs during which that share stayed at most `--max_busy` (all runs if none did).
PyTorch's OpenMP threads degrade far more than XLA's under contention (on a loaded
machine HF slowed down up to 15x, ours about 2x), so only quiet runs are comparable.
Per run: one step to compile / warm up, then `--steps` timed steps, each waited for
(`block_until_ready` / synchronous PyTorch). Reported: the median over runs of each
run's median step time, as examples per second; the process's peak resident memory,
and the peak during the timed steps alone (`VmHWM` reset after the first step, so
XLA's compilation is excluded) above the memory with the libraries loaded.

Model FLOPs utilisation: the machine's matmul peak is measured (a large float32 and
bfloat16 `jnp.dot`, best of several; MFU uses the better), and each framework's
achieved FLOP/s is XLA's FLOP count
of our train step divided by its step time (the same model FLOPs for both, since
both run the same computation).

`--variants` adds our step with other settings (performance work), e.g. `bfloat16`
activations, `onehot` (t5x's one-hot embedding matmul instead of a gather) or
`remat_minimal` / `remat_full` (rematerialised layers: the time they cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6)
# The shape of models/t5_1_1_tiny.gin (--quick).
TINY = dict(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
SHAPES = {"small": SMALL, "tiny": TINY}
PROMPT_LENGTH = 100

# Our variants: name -> extra gin bindings.
VARIANTS = {
    "float32": ("ACTIVATION_DTYPE='float32'",),
    "bfloat16": ("ACTIVATION_DTYPE='bfloat16'",),
    "onehot": ("ACTIVATION_DTYPE='float32'", "config.T5Config.one_hot_embedding=True"),
    "remat_minimal": ("ACTIVATION_DTYPE='float32'", "REMAT_POLICY='minimal'"),
    "remat_full": ("ACTIVATION_DTYPE='float32'", "REMAT_POLICY='full'"),
}


def _batch_numpy(batch_size: int, inputs: int, targets: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    enc = rng.integers(2, SMALL["vocab_size"], (batch_size, inputs), dtype=np.int32)
    tgt = rng.integers(2, SMALL["vocab_size"], (batch_size, targets), dtype=np.int32)
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
    return enc, dec_in, tgt


def device_batch(trainer, batch_size: int, inputs_length: int, targets_length: int) -> dict:
    """`_batch_numpy`'s batch as the model features `trainer` takes, on its devices."""
    import jax
    import numpy as np

    enc, dec_in, tgt = _batch_numpy(batch_size, inputs_length, targets_length)
    batch = {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones_like(tgt),
        "task_ids": np.zeros((batch_size,), np.int32),
    }
    batch = {k: v for k, v in batch.items() if k in trainer.input_shapes}
    return jax.device_put(batch, trainer.batch_shardings(trainer.input_shapes))


machine_busy = common.machine_busy
wait_until_quiet = common.wait_until_quiet


# ----------------------------------------------------------------------------------------
# Workers (each in its own process)
# ----------------------------------------------------------------------------------------


def worker_ours(args: argparse.Namespace) -> dict:
    import jax

    method = "model_tuning" if args.method == "full" else "prompt_tuning"
    bindings = ["DROPOUT_RATE=0.0", *VARIANTS[args.variant]]
    if method == "prompt_tuning":
        bindings.append(f"PROMPT_LENGTH={PROMPT_LENGTH}")
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    trainer = common.build_trainer(
        f"models/t5_1_1_{args.size}.gin", method, args.batch_size, lengths, bindings=bindings
    )
    # Libraries loaded (including TensorFlow, which seqio brings in with the model gin's
    # vocabulary), nothing allocated yet.
    baseline = common.rss_bytes()
    batch = device_batch(trainer, args.batch_size, args.inputs_length, args.targets_length)
    state = trainer.init_state()
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    first = time.perf_counter() - start
    with_compile = common.peak_rss_bytes()
    common.reset_peak_rss()  # From here on: the steady-state training peak.
    times, losses, cpu = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        losses.append(float(metrics["loss"]))
    steps_peak = common.peak_rss_bytes()  # Before the extra compile below.
    flops = common.flops_of(trainer.compiled_train_step())
    return dict(
        times=times,
        cpu=cpu,
        first=first,
        losses=losses,
        flops=flops,
        baseline=baseline,
        peak=max(with_compile, steps_peak),
        steps_peak=steps_peak,
    )


def hf_model_and_optimizer(size: str, prompt: bool, torch_threads: int) -> tuple:
    """The Hugging Face side of every training comparison: `(model, optimizer)`.

    A randomly initialised `T5ForConditionalGeneration` of `SHAPES[size]` (T5.1.1:
    gated GELU, untied output layer, no dropout), wrapped in a 100-token
    `peft.PromptTuningConfig` when `prompt`; `transformers.optimization.Adafactor` with
    t5x's settings (decay 0.8, clipping 1.0; model tuning: parameter scaling, lr 1e-3;
    prompt tuning: lr 0.3, weight decay 1e-5), over the trainable parameters only.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.optimization import Adafactor

    torch.set_num_threads(torch_threads)
    torch.manual_seed(0)
    config = T5Config(
        **SHAPES[size],
        num_decoder_layers=SHAPES[size]["num_layers"],
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = T5ForConditionalGeneration(config)
    if prompt:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=PROMPT_LENGTH),
        )
        optimizer_args = dict(lr=0.3, scale_parameter=False, weight_decay=1e-5)
    else:
        optimizer_args = dict(lr=1e-3, scale_parameter=True, weight_decay=0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = Adafactor(
        params,
        relative_step=False,
        warmup_init=False,
        decay_rate=-0.8,
        clip_threshold=1.0,
        **optimizer_args,
    )
    return model, optimizer


def worker_hf(args: argparse.Namespace) -> dict:
    import torch

    if args.method == "prompt":
        import peft  # noqa: F401 (loaded before the baseline, like our libraries)
    baseline = common.rss_bytes()

    model, optimizer = hf_model_and_optimizer(
        args.size, args.method == "prompt", args.torch_threads
    )
    enc, dec_in, tgt = _batch_numpy(args.batch_size, args.inputs_length, args.targets_length)
    input_ids = torch.from_numpy(enc).long()
    attention_mask = torch.ones_like(input_ids)
    decoder_input_ids = torch.from_numpy(dec_in).long()
    labels = torch.from_numpy(tgt).long()

    def step() -> float:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            labels=labels,
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    first_peak = common.peak_rss_bytes()
    common.reset_peak_rss()
    times, losses, cpu = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return dict(
        times=times,
        cpu=cpu,
        first=first,
        losses=losses,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        baseline=baseline,
        peak=max(first_peak, common.peak_rss_bytes()),
        steps_peak=common.peak_rss_bytes(),
    )


def worker_peak(args: argparse.Namespace) -> dict:
    """Best FLOP/s of an n x n matmul in float32 and bfloat16 (JAX, this CPU)."""
    import jax
    import jax.numpy as jnp

    out = {}
    n = args.peak_size
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        best = float("inf")
        for _ in range(args.peak_repeats):
            start = time.perf_counter()
            f(a, a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        out[dtype] = 2.0 * n**3 / best
    return out


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------


def step_time(runs: list[dict], max_busy: float) -> float:
    """Median over runs of each run's median step time, using only the runs during
    which other processes took at most `max_busy` of the CPU (all runs if none did)."""
    quiet = [r for r in runs if r["others_busy"] <= max_busy] or runs
    return statistics.median(statistics.median(r["times"]) for r in quiet)


def run_worker(kind: str, args: argparse.Namespace, **overrides) -> dict:
    """Runs one worker subprocess and returns its JSON result plus its peak RSS."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}"]
    settings = dict(
        method=args.method if hasattr(args, "method") else "full",
        variant="float32",
        batch_size=args.batch_size,
        inputs_length=args.inputs_length,
        targets_length=args.targets_length,
        steps=args.steps,
        torch_threads=args.torch_threads,
        peak_size=args.peak_size,
        peak_repeats=args.peak_repeats,
        size=args.size,
    )
    settings.update(overrides)
    cmd += [f"--{k}={v}" for k, v in settings.items()]
    return common.run_json_worker(cmd, f"worker {kind} {overrides}")


def _worker_main(args: argparse.Namespace) -> int:
    fn = {"ours": worker_ours, "hf": worker_hf, "peak": worker_peak}[args.worker]
    out = fn(args)
    out["peak_rss"] = out.get("peak", common.peak_rss_bytes())
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per framework and method")
    parser.add_argument("--methods", default="full,prompt")
    parser.add_argument("--variants", default="", help="extra runs of ours: bfloat16,onehot")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--peak_size", type=int, default=2048)
    parser.add_argument("--peak_repeats", type=int, default=10)
    parser.add_argument(
        "--max_busy",
        type=float,
        default=0.2,
        help="before each run, wait until at most this fraction of the CPU is busy",
    )
    parser.add_argument(
        "--wait_timeout", type=float, default=900.0, help="longest wait for an idle CPU, seconds"
    )
    parser.add_argument("--size", default="small", choices=sorted(SHAPES), help="model shape")
    parser.add_argument(
        "--max_isa",
        default="",
        help="emulate an older CPU, e.g. AVX2: caps XLA's code generation, PyTorch, oneDNN "
        "and MKL at it (common.cap_isa says what stays uncapped)",
    )
    common.add_quick_flag(parser)
    # Worker-only flags.
    parser.add_argument("--worker", choices=["ours", "hf", "peak"], help=argparse.SUPPRESS)
    parser.add_argument("--method", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args)
    common.apply_quick(
        args, size="tiny", batch_size=2, inputs_length=16, targets_length=4, steps=2, rounds=1,
        peak_size=256, peak_repeats=2, wait_timeout=10.0,
    )  # fmt: skip
    if args.max_isa:
        common.cap_isa(args.max_isa)  # The workers inherit the environment.

    print(
        common.machine_header(("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"))
    )
    print(
        f"T5.1.1-{args.size} shape, batch {args.batch_size}, inputs {args.inputs_length}, targets "
        f"{args.targets_length}; {args.steps} timed steps x {args.rounds} runs per row; "
        f"torch threads {args.torch_threads}; JAX on CPU.",
        flush=True,
    )
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    results: dict[tuple, list] = {}
    loads = []
    for r in range(args.rounds):
        for method in methods:
            runs = [("ours", "float32"), ("hf", "-")] + [
                ("ours", v) for v in variants if v != "float32"
            ]
            if r % 2:
                runs = runs[::-1]  # Alternate who goes first.
            for kind, variant in runs:
                busy_before = wait_until_quiet(args.max_busy, args.wait_timeout)
                common.progress(f"round {r + 1}/{args.rounds}: {method} {kind} {variant}")
                overrides = dict(method=method)
                if kind == "ours":
                    overrides["variant"] = variant
                out = run_worker(kind, args, **overrides)
                loads.append(out["others_busy"])
                results.setdefault((method, kind, variant), []).append(out)
                print(
                    f"  round {r} {method:<6} {kind:<4} {variant:<8} "
                    f"{args.batch_size / statistics.median(out['times']):6.2f} ex/s  "
                    f"peak RSS {out['peak_rss'] / common.GIB:.2f} GiB  CPU busy before "
                    f"{busy_before:.0%}, other processes during the run {out['others_busy']:.0%}",
                    flush=True,
                )
    peaks = []
    for _ in range(2):
        wait_until_quiet(args.max_busy, args.wait_timeout)
        common.progress("measuring the matmul peak")
        peaks.append(run_worker("peak", args))
    peak = {k: max(p[k] for p in peaks) for k in ("float32", "bfloat16")}
    # The machine's best matmul rate, whichever dtype reaches it, bounds every step.
    best = max(peak.values())

    def memory(runs: list[dict]) -> tuple[str, str]:
        top = max(runs, key=lambda r: r["peak_rss"])
        steps = max(r["steps_peak"] - r["baseline"] for r in runs)
        return f"{top['peak_rss'] / common.GIB:.2f}", f"{steps / common.GIB:.2f}"

    rows, mfu_rows = [], []

    def mfu_row(name: str, flops: float, t: float) -> list[str]:
        return [
            name,
            f"{flops / 1e9:.1f}",
            f"{flops / t / 1e9:.1f}",
            f"{100 * flops / t / best:.1f}%",
        ]

    def add(
        label: str, mfu_name: str, runs: list[dict], hf_t: float, hf_runs: Optional[list]
    ) -> None:
        t = step_time(runs, args.max_busy)
        hf_mem = memory(hf_runs) if hf_runs else ("-", "-")
        rows.append(
            [
                label,
                f"{args.batch_size / t:.2f}",
                f"{args.batch_size / hf_t:.2f}" if hf_runs else "-",
                f"{hf_t / t:.2f}x",
                *memory(runs),
                *hf_mem,
                f"{statistics.median(o['first'] for o in runs):.1f}"
                + (f" / {statistics.median(o['first'] for o in hf_runs):.1f}" if hf_runs else ""),
            ]
        )
        mfu_rows.append(mfu_row(mfu_name, runs[0]["flops"], t))

    for method in methods:
        ours = results[(method, "ours", "float32")]
        hf = results[(method, "hf", "-")]
        hf_t = step_time(hf, args.max_busy)
        add(method, f"{method}, ours float32", ours, hf_t, hf)
        for v in variants:
            if v != "float32":
                label = f"{method} (ours {v})"
                add(label, label, results[(method, "ours", v)], hf_t, None)
        # HF runs the same computation: our XLA FLOP count is its model FLOPs too.
        mfu_rows.append(mfu_row(f"{method}, HF", ours[0]["flops"], hf_t))
    print(
        "\nCPU share used by other processes during the runs: min "
        f"{min(loads):.0%}, median {statistics.median(loads):.0%}, max {max(loads):.0%}\n"
    )
    print(
        common.markdown_table(
            [
                "method",
                "ours ex/s",
                "HF ex/s",
                "speed-up",
                "ours peak RSS GiB",
                "ours steps GiB",
                "HF peak RSS GiB",
                "HF steps GiB",
                "first step s (ours / HF)",
            ],
            rows,
        )
    )
    print(
        "\npeak RSS: the whole process (ours includes XLA compilation and ~0.7 GiB of "
        "TensorFlow that seqio loads with the model gin's vocabulary); steps GiB: the peak "
        "during the timed steps (after the first step, VmHWM reset) minus the RSS with the "
        "libraries loaded and nothing built."
    )
    print(
        f"\nMatmul peak ({args.peak_size}^2, JAX, best of {args.peak_repeats}): float32 "
        f"{peak['float32'] / 1e9:.1f} GFLOP/s, bfloat16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s; "
        "MFU is against the better of the two.\n"
    )
    print(
        common.markdown_table(
            ["train step", "GFLOP/step (XLA)", "achieved GFLOP/s", "MFU"],
            mfu_rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
