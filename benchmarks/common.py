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


# /proc/cpuinfo flags that decide which kernels the libraries pick (x86 vector and matrix
# extensions); printed in the header because the same code runs at different speeds
# with and without them (AVX-512 doubles the float32 FMA width of AVX2).
_VECTOR_FLAG_PREFIXES = ("avx", "amx", "fma")

# Environment variables that cap the instruction set a library uses, and what they cap.
ISA_CAP_VARIABLES = {
    "ATEN_CPU_CAPABILITY": "PyTorch's own kernels",
    "ONEDNN_MAX_CPU_ISA": "oneDNN (PyTorch's mkldnn ops)",
    "MKL_ENABLE_INSTRUCTIONS": "MKL (PyTorch's float32 matmuls)",
}


def cpu_vector_extensions() -> list[str]:
    """The CPU's vector / matrix extensions (`avx2`, `avx512f`, `amx_bf16`, ...), sorted."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(_VECTOR_FLAG_PREFIXES))
    except OSError:
        pass
    return []


def isa_caps() -> list[str]:
    """Instruction-set caps in effect: `--xla_cpu_max_isa` in XLA_FLAGS and the
    PyTorch / oneDNN / MKL variables of `ISA_CAP_VARIABLES`, as `NAME=value`."""
    caps = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if flag.startswith("--xla_cpu_max_isa")
    ]
    caps += [f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name)]
    return caps


def cap_isa(isa: str) -> None:
    """Caps this process's (and its children's) libraries at `isa` (e.g. `AVX2`), to
    emulate an older CPU: XLA's code generation (`--xla_cpu_max_isa`), PyTorch's
    kernels, oneDNN and MKL.

    Not capped: XNNPACK / YNNPACK, which XLA:CPU uses for its dots and which choose
    their kernels from the CPU itself (a 2048-square float32 `jnp.dot` runs at the same
    rate with and without `--xla_cpu_max_isa=AVX2` on an AVX-512 CPU). Under the cap our
    matmuls still use AVX-512 while PyTorch's do not; the emulation is closest for
    everything around the matmuls.
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_cpu_max_isa" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_cpu_max_isa={isa.upper()}"])
    os.environ["ATEN_CPU_CAPABILITY"] = isa.lower()
    os.environ["ONEDNN_MAX_CPU_ISA"] = isa.upper()
    os.environ["MKL_ENABLE_INSTRUCTIONS"] = isa.upper()


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
    """A few lines naming the machine, its vector extensions and any caps on them, its
    load and the library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    load = load_average()
    versions = ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {_cpu_model()}, {cores} cores, "
        + (f"{memory:.0f} GiB RAM" if memory else "RAM unknown")
        + f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "vector extensions: " + (" ".join(cpu_vector_extensions()) or "unknown"),
        "instruction-set caps: " + (" ".join(isa_caps()) or "none"),
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
        partitioner or partitioning.Partitioner(),
        batch_size,
        lengths,
        pack=False,
        use_feature_converter=False,
    )


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def machine_busy(seconds: float = 2.0) -> float:
    """Fraction of all cores busy over the next `seconds` (0 = idle machine)."""
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_quiet(max_busy: float, timeout: float) -> float:
    """Waits (up to `timeout` s) until the machine is at most `max_busy` busy; returns it.

    Says what it waits for when it has to wait, and when it gives up.
    """
    start = time.time()
    busy = machine_busy()
    if busy > max_busy:
        progress(
            f"waiting for an idle CPU: {busy:.0%} busy, measuring starts at <= {max_busy:.0%} "
            f"(at most {timeout:.0f} s; --max_busy / --wait_timeout change this)"
        )
    while busy > max_busy and time.time() - start < timeout:
        busy = machine_busy(min(5.0, max(0.5, timeout - (time.time() - start))))
    if busy > max_busy:
        progress(
            f"CPU still {busy:.0%} busy after {time.time() - start:.0f} s; measuring anyway "
            "(runs on a busy machine are reported but left out of the tables if quiet ones exist)"
        )
    return busy


def run_json_worker(cmd: Sequence[str], what: str) -> dict:
    """Runs a worker subprocess whose last `{...}` stdout line is its JSON result.

    Returns that dict plus `others_busy`: the share of the machine's CPU time that other
    processes used while the worker ran (machine busy time minus the worker's own).

    Raises:
      RuntimeError: the worker printed no JSON (its stderr's tail is in the message).
    """
    import json
    import resource
    import subprocess

    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = _cpu_jiffies()
    result = subprocess.run(list(cmd), capture_output=True, text=True)
    busy1, total1 = _cpu_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    own = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    others = max(0.0, (busy1 - busy0) / hz - own) / max((total1 - total0) / hz, 1e-9)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["others_busy"] = others
            return out
    raise RuntimeError(f"{what} failed:\n{result.stderr[-4000:]}")


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
