"""Where a train step's time and compilation go, ours (XLA:CPU) and Hugging Face's (PyTorch).

    python benchmarks/step_profile.py                       # T5.1.1-small, full, batch 8, 128 / 16
    python benchmarks/step_profile.py --max_isa=AVX2        # as on an AVX2-only CPU
    python benchmarks/step_profile.py --method=prompt --top=25
    python benchmarks/step_profile.py --quick               # tiny model: checks it runs

Each framework runs in its own subprocess, on the same model and batch as
`throughput.py`. Ours: the first step is split into tracing (Python, Flax), lowering
to StableHLO and XLA's compilation, each timed; then `--steps` steps run under
`jax.profiler.trace` with XLA:CPU's per-thunk trace events on
(`--xla_cpu_enable_xprof_traceme`), and the events of the step's own program are
summed per HLO instruction (a fusion, a dot, a gather, ...) and per kind. Hugging
Face: `torch.profiler` over the same number of steps, self CPU time per ATen
operator. Both tables give milliseconds per step and the share of the step; the
trace's per-op times are wall time on the thread that ran them, so with 2 threads
the shares can add to more than the step.

What the kinds mean (ours): `dot (YNNPACK / oneDNN)` (library matmul kernels with any
fused element-wise work), `dot` (XLA's own, Eigen), `fusion` (XLA's generated loops:
element-wise, reductions, Adafactor's arithmetic), `gather` / `scatter` (the embedding
lookup and the scatter-add of its gradient), `copy / transpose (layout changes)`
(operands moved into the layout a dot wants), `other`. `--hlo_out=FILE` writes the
optimised HLO, to look an instruction up.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import throughput  # noqa: E402  (the same model, batch and optimizer settings)


def _kind(name: str) -> str:
    """A coarse kind of an XLA:CPU thunk from its HLO instruction name."""
    lowered = name.lower()
    if lowered.startswith(("ynn_fusion", "xnn_fusion", "onednn")):
        return "dot (YNNPACK / oneDNN)"
    if lowered.startswith("copy") or "transpose" in lowered:
        return "copy / transpose (layout changes)"
    for kind in ("dot", "gather", "scatter", "transpose", "copy", "reduce", "convolution"):
        if kind in lowered:
            return kind
    if "fusion" in lowered:
        return "fusion"
    return "other"


def worker_ours(args: argparse.Namespace) -> dict:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_xprof_traceme=true".strip()
    import jax

    method = "model_tuning" if args.method == "full" else "prompt_tuning"
    bindings = ["DROPOUT_RATE=0.0", f"ACTIVATION_DTYPE='{args.dtype}'", *args.gin]
    if method == "prompt_tuning":
        bindings.append(f"PROMPT_LENGTH={throughput.PROMPT_LENGTH}")
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    trainer = common.build_trainer(
        f"models/t5_1_1_{args.size}.gin", method, args.batch_size, lengths, bindings=bindings
    )
    batch = throughput.device_batch(
        trainer, args.batch_size, args.inputs_length, args.targets_length
    )
    state = trainer.init_state()
    partitioned = trainer._jitted_train_step()
    with trainer.partitioner.context():
        start = time.perf_counter()
        traced = partitioned._jitted.trace(state, batch)
        t_trace = time.perf_counter() - start
        start = time.perf_counter()
        lowered = traced.lower()
        t_lower = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    t_compile = time.perf_counter() - start
    hlo = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    t_first_run = time.perf_counter() - start
    times = []
    for _ in range(2):  # Warm.
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
    trace_dir = tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    per_op = collections.defaultdict(float)
    threads = collections.defaultdict(float)
    instructions = set(re.findall(r"%([\w.\-]+) = ", hlo))
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    per_op[event.name] += event.duration_ns / 1e6 / args.steps
                    threads[line.name] += event.duration_ns / 1e6 / args.steps
    shapes = {}
    for m in re.finditer(r"%([\w.\-]+) = (\S+) ", hlo):
        shapes[m.group(1)] = m.group(2)[:60]
    return dict(
        trace=t_trace,
        lower=t_lower,
        compile=t_compile,
        first_run=t_first_run,
        times=times,
        per_op=per_op,
        shapes=shapes,
        threads=threads,
        hlo_instructions=len(instructions),
    )


def worker_hf(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = throughput.hf_model_and_optimizer(
        args.size, args.method == "prompt", args.torch_threads
    )
    enc, dec_in, tgt = throughput._batch_numpy(
        args.batch_size, args.inputs_length, args.targets_length
    )
    inputs = dict(
        input_ids=torch.from_numpy(enc).long(),
        attention_mask=torch.ones(enc.shape, dtype=torch.long),
        decoder_input_ids=torch.from_numpy(dec_in).long(),
        labels=torch.from_numpy(tgt).long(),
    )

    def step():
        with torch.profiler.record_function("forward"):
            out = model(**inputs)
        with torch.profiler.record_function("backward"):
            out.loss.backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    per_op, phases = {}, {}
    for e in prof.key_averages():
        if e.key in ("forward", "backward", "optimizer"):
            phases[e.key] = e.cpu_time_total / 1e3 / args.steps
        else:
            per_op[e.key] = e.self_cpu_time_total / 1e3 / args.steps
    return dict(first_run=first, times=times, per_op=per_op, phases=phases)


def run_worker(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind}"]
    for name in ("method", "size", "batch_size", "inputs_length", "targets_length", "steps",
                 "torch_threads", "dtype", "hlo_out"):  # fmt: skip
        cmd.append(f"--{name}={getattr(args, name)}")
    cmd += [f"--gin={g}" for g in args.gin]
    result = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"worker {kind} failed:\n{result.stderr[-4000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="full", choices=["full", "prompt"])
    parser.add_argument("--size", default="small", choices=sorted(throughput.SHAPES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="our ACTIVATION_DTYPE")
    parser.add_argument("--gin", action="append", default=[], help="extra gin binding (ours)")
    parser.add_argument("--top", type=int, default=20, help="operations listed per framework")
    parser.add_argument("--frameworks", default="ours,hf")
    parser.add_argument("--hlo_out", default="", help="write our optimised HLO to this file")
    parser.add_argument("--max_isa", default="", help="emulate an older CPU (common.cap_isa)")
    common.add_quick_flag(parser)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        fn = {"ours": worker_ours, "hf": worker_hf}[args.worker]
        print(json.dumps(fn(args)))
        return 0
    common.apply_quick(args, size="tiny", batch_size=2, inputs_length=16, targets_length=4, steps=2)
    if args.max_isa:
        common.cap_isa(args.max_isa)
    print(common.machine_header(("jax", "jaxlib", "torch", "transformers", "peft")))
    print(
        f"T5.1.1-{args.size} shape, {args.method}, batch {args.batch_size}, inputs "
        f"{args.inputs_length}, targets {args.targets_length}; {args.steps} profiled steps; "
        f"gin {args.gin or '-'}"
    )
    frameworks = args.frameworks.split(",")
    if "ours" in frameworks:
        common.progress("ours: compiling and profiling")
        ours = run_worker("ours", args)
        step_ms = 1e3 * sorted(ours["times"])[len(ours["times"]) // 2]
        print(
            f"\nours: step {step_ms:.0f} ms (median, under the profiler); first step = trace "
            f"{ours['trace']:.1f} s + lower {ours['lower']:.1f} s + XLA compile "
            f"{ours['compile']:.1f} s + run {ours['first_run']:.1f} s; "
            f"{ours['hlo_instructions']} HLO instructions after optimisation\n"
        )
        by_kind = collections.defaultdict(float)
        for name, ms in ours["per_op"].items():
            by_kind[_kind(name)] += ms
        print(
            common.markdown_table(
                ["kind (ours)", "ms/step", "share of step"],
                [
                    [k, f"{v:.1f}", f"{100 * v / step_ms:.1f}%"]
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
                ],
            )
        )
        print()
        top = sorted(ours["per_op"].items(), key=lambda kv: -kv[1])[: args.top]
        print(
            common.markdown_table(
                ["HLO instruction (ours)", "result shape", "ms/step", "share"],
                [
                    [n, ours["shapes"].get(n, "?"), f"{ms:.1f}", f"{100 * ms / step_ms:.1f}%"]
                    for n, ms in top
                ],
            )
        )
        print("\nbusy time per thread (ms/step): " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(ours["threads"].items(), key=lambda kv: -kv[1])[:6]
        ))  # fmt: skip
    if "hf" in frameworks:
        common.progress("HF: profiling")
        hf = run_worker("hf", args)
        step_ms = 1e3 * sorted(hf["times"])[len(hf["times"]) // 2]
        phases = ", ".join(f"{k} {v:.0f} ms" for k, v in hf["phases"].items())
        print(
            f"\nHF: step {step_ms:.0f} ms (median, under the profiler; {phases}); first step "
            f"{hf['first_run']:.1f} s\n"
        )
        top = sorted(hf["per_op"].items(), key=lambda kv: -kv[1])[: args.top]
        print(
            common.markdown_table(
                ["ATen operator (HF)", "self ms/step", "share"],
                [[n, f"{ms:.1f}", f"{100 * ms / step_ms:.1f}%"] for n, ms in top],
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
