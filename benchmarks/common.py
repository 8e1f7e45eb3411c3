"""Shared pieces of the benchmark scripts: the machine header, tables, gin-built trainers.

Every benchmark prints `machine_header()` first (CPU, cores, memory, load, library
versions), so a table is never separated from where and with what it was measured,
then Markdown tables (`markdown_table`) that paste into docs/benchmarks.md unchanged.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

GIB = 2**30

# Method name -> (method gin file, extra gin bindings). Prompt tuning uses the paper's
# 100 tokens, SMoP its 4 prompts x 5 tokens (both the gin files' defaults, restated so
# the tables do not silently change if a default does); HyperPrompt needs a task count
# (8: the GLUE mixture the HyperPrompt paper trains on).
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model_tuning": ("methods/model_tuning.gin", ()),
    "prompt_tuning": ("methods/prompt_tuning.gin", ("PROMPT_LENGTH=100",)),
    "smop": (
        "methods/smop.gin",
        # Its schedule follows the run's length (runs/finetune.gin binds it in training).
        (
            "NUM_PROMPTS=4",
            "PROMPT_LENGTH=5",
            "optim.create_learning_rate_scheduler.total_steps=1000",
        ),
    ),
    "hyperprompt_share": ("methods/hyperprompt_share.gin", ("NUM_TASKS=8",)),
    "hyperprompt_sep": ("methods/hyperprompt_sep.gin", ("NUM_TASKS=8",)),
    "hyperprompt_global": ("methods/hyperprompt_global.gin", ("NUM_TASKS=8",)),
}


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """`{name: version}` of importable packages ('-' when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            out[name] = "-"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where unavailable)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def machine_header(packages: Sequence[str] = ("jax", "jaxlib", "flax", "optax", "numpy")) -> str:
    """A few lines naming the machine, its load and the library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    load = load_average()
    versions = ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {_cpu_model()}, {cores} cores, "
        + (f"{memory:.0f} GiB RAM" if memory else "RAM unknown")
        + f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"python {platform.python_version()} ({sys.platform}); {versions}",
    ]
    if os.environ.get("XLA_FLAGS"):
        lines.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    numeric = [
        all(_is_number(r[i]) for r in cells) if cells else False for i in range(len(headers))
    ]

    def line(values):
        out = []
        for v, w, num in zip(values, widths, numeric, strict=True):
            out.append(v.rjust(w) if num else v.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2))
            for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def _is_number(text: str) -> bool:
    text = text.replace(",", "").replace("%", "").replace("x", "").replace("+", "").strip()
    try:
        float(text)
        return True
    except ValueError:
        return text in ("", "-")


def percent_change(new: float, old: float) -> str:
    """`+12.3%` / `-4.0%` of `new` relative to `old`."""
    return f"{100.0 * (new - old) / old:+.1f}%"


def flops_of(compiled: Any) -> float:
    """XLA's FLOP count of a compiled computation (`cost_analysis` is a dict or a list)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def memory_of(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis: argument, output, alias, temp and peak bytes.

    `peak` = arguments + outputs - aliased (donated buffers reused for outputs) +
    temporaries: what the step holds at once under XLA's buffer assignment.
    """
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _proc_status_bytes(field: str) -> Optional[int]:
    """A `kB` field of `/proc/self/status` (e.g. `VmRSS`) in bytes; None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's current resident memory (`VmRSS`), in bytes (0 if unknown)."""
    return _proc_status_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Resets this process's `VmHWM` to its current RSS (Linux `clear_refs` 5).

    Lets a benchmark measure the peak of a later phase (training steps) apart from an
    earlier one (XLA compilation). Returns False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory (`VmHWM`), in bytes."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_trainer(
    model_gin: str,
    method: str,
    batch_size: int,
    lengths: Mapping[str, int],
    bindings: Sequence[str] = (),
    partitioner: Any = None,
):
    """A single-device `Trainer` from `model_gin` + `METHODS[method]` + `bindings`.

    Uses `hyperprompt_jax.plan.trainer_from_gin`, i.e. the same gin reading as
    `python -m hyperprompt_jax.plan`; nothing is allocated until a step runs. The input
    shapes are written out (no feature converter, no dataset), but the model gin's
    vocabulary (the task package's T5 vocabulary) still imports seqio and with it
    TensorFlow (~700 MB of resident memory).
    """
    from hyperprompt_jax import partitioning, plan

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    method_gin, method_bindings = METHODS[method]
    plan.parse_run_gin([model_gin, method_gin], [*method_bindings, *bindings], import_tasks=False)
    return plan.trainer_from_gin(
        partitioner or partitioning.Partitioner(), batch_size, lengths, use_feature_converter=False
    )


QUICK_HELP = (
    "tiny model (models/t5_1_1_tiny.gin), tiny batch, few steps: runs the whole script in "
    "seconds to a minute to check it works; its numbers mean nothing"
)


def add_quick_flag(parser: Any) -> None:
    """Adds `--quick` (see `QUICK_HELP`) to an `argparse` parser."""
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)


def apply_quick(args: Any, **tiny: Any) -> None:
    """With `--quick`, overrides the settings named in `tiny` and says so."""
    if getattr(args, "quick", False):
        for name, value in tiny.items():
            setattr(args, name, value)
        shown = ", ".join(f"{k}={v}" for k, v in tiny.items())
        progress(f"--quick: {shown} (a check that the script runs; the numbers mean nothing)")


def progress(message: str) -> None:
    """A timestamped progress line, flushed at once (benchmarks are long and quiet)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(fn, *args) -> tuple[Any, float]:
    """`(fn(*args), seconds)`."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
