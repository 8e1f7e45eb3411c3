"""Time to the first train step with and without the persistent compilation cache.

    python benchmarks/compile_cache.py [--rounds=2] [--quick] [--workdir=DIR]

Each run is `python -m hyperprompt_jax.train --gin_file=quickstart.gin` (HyperPrompt-
Share on the synthetic mixture; evaluation off, a progress line every step) in a
fresh process, timed from the outside: the parent stamps each line the launcher
logs as it arrives. Per round, in this order:

1. **off**: `HYPERPROMPT_COMPILATION_CACHE=off`;
2. **first**: the cache on, in an empty directory (compiles and writes it);
3. **second**: the identical command again, into a new model directory (reads it);
4. **resumed**: the second run's model directory with one more step, so it restores
   checkpoint_1 and trains step 2 (reads the cache);
5. **resumed, off**: the same resume with the cache off.

Columns: *to first step*, from process start to the first step's progress line (so
also Python, TensorFlow and JAX imports, gin, the data pipeline and the state's
initialisation or restore, none of which the cache touches); *first step*, from the
launcher's `compiling the train step...` line to that progress line (tracing,
compiling or reading the executable back, and running it: the part the cache
shortens); and the compile time the launcher reports. By default the model is
T5.1.1-small-shaped (8+8 layers, width 512; byte vocabulary, random initialisation),
whose compilation is long next to the start-up; `--quick` keeps the quickstart's tiny
model and one round.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ENV = "HYPERPROMPT_COMPILATION_CACHE"

# T5.1.1-small's shapes on the quickstart (byte vocabulary: nothing to download).
SMALL = (
    "--gin.config.T5Config.emb_dim=512",
    "--gin.config.T5Config.num_heads=6",
    "--gin.config.T5Config.head_dim=64",
    "--gin.config.T5Config.num_encoder_layers=8",
    "--gin.config.T5Config.num_decoder_layers=8",
    "--gin.config.T5Config.mlp_dim=1024",
)

_COMPILING = "compiling the train step..."
_COMPILED = re.compile(r"compiled the train step in ([\d.]+) s")
_STEP = re.compile(r"\bstep (\d+)/\d+ \| loss")


@dataclasses.dataclass
class Run:
    name: str
    to_first_step: float  # process start -> first progress line (s)
    first_step: float  # `compiling the train step...` -> first progress line (s)
    compile_reported: float  # the launcher's "compiled the train step in X s"
    from_cache: bool
    total: float  # the whole process (s)


def train_command(model_dir: str, steps: int, model_flags: tuple[str, ...]) -> list[str]:
    return [
        sys.executable, "-m", "hyperprompt_jax.train", "--gin_file=quickstart.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
        "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=1", "--gin.SAVE_PERIOD=1",
        "--gin.train.eval_dataset_cfg=None", *model_flags,
    ]  # fmt: skip


def timed_run(name: str, command: list[str], cache: str) -> Run:
    """Runs `command` in a fresh process; stamps its log lines as they arrive."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", ENV: cache}
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    compiling = first = None
    compile_reported, from_cache, lines = float("nan"), False, []
    for line in process.stderr:
        now = time.perf_counter() - start
        lines.append(line)
        if compiling is None and _COMPILING in line:
            compiling = now
        elif (match := _COMPILED.search(line)) and first is None:
            compile_reported = float(match.group(1))
            from_cache = "from the compilation cache" in line
        elif first is None and _STEP.search(line):
            first = now
    process.wait()
    total = time.perf_counter() - start
    if process.returncode != 0 or first is None or compiling is None:
        raise RuntimeError(f"{name} run failed ({process.returncode}):\n{''.join(lines)[-3000:]}")
    return Run(name, first, first - compiling, compile_reported, from_cache, total)


def one_round(workdir: str, model_flags: tuple[str, ...]) -> list[Run]:
    """The five runs of one round, each in its own new directories."""
    os.makedirs(workdir, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="xla_cache_", dir=workdir)
    dirs = {n: tempfile.mkdtemp(prefix=f"{n}_", dir=workdir) for n in ("off", "first", "second")}
    plan = [
        ("off", dirs["off"], 1, "off"),
        ("first", dirs["first"], 1, cache),
        ("second", dirs["second"], 1, cache),
        ("resumed", dirs["second"], 2, cache),
        ("resumed, off", dirs["off"], 2, "off"),
    ]
    runs = []
    for name, model_dir, steps, cache_setting in plan:
        common.progress(f"  {name}: {'cache off' if cache_setting == 'off' else cache}")
        run = timed_run(name, train_command(model_dir, steps, model_flags), cache_setting)
        common.progress(
            f"    to first step {run.to_first_step:.1f} s, first step {run.first_step:.1f} s "
            f"(compile {run.compile_reported:.1f} s{', from the cache' if run.from_cache else ''})"
        )
        runs.append(run)
        if name == "first":
            entries = [n for n in os.listdir(cache) if n.endswith("-cache")]
            size = sum(os.path.getsize(os.path.join(cache, n)) for n in entries)
            common.progress(f"    the cache holds {len(entries)} entries, {size / 2**20:.1f} MiB")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", choices=("small", "tiny"), default="small")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    common.add_quick_flag(parser)
    args = parser.parse_args()
    common.apply_quick(args, rounds=1, model="tiny")
    print(common.machine_header())
    model_flags = SMALL if args.model == "small" else ()
    workdir = args.workdir or tempfile.mkdtemp(prefix="compile_cache_")
    by_name: dict[str, list[Run]] = {}
    try:
        for r in range(args.rounds):
            common.progress(f"round {r + 1}/{args.rounds} ({args.model} model)")
            for run in one_round(os.path.join(workdir, f"round_{r}"), model_flags):
                by_name.setdefault(run.name, []).append(run)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in by_name[name])

    def ratio(name: str, against: str | None, field: str) -> str:
        return f"{med(name, field) / med(against, field):.2f}x" if against else "-"

    rows = []
    for name, against in (
        ("off", None),
        ("first", "off"),
        ("second", "first"),
        ("resumed", "resumed, off"),
        ("resumed, off", None),
    ):
        rows.append([
            name,
            f"{med(name, 'to_first_step'):.1f}",
            f"{med(name, 'first_step'):.1f}",
            f"{med(name, 'compile_reported'):.1f}",
            f"{med(name, 'total'):.1f}",
            against or "-",
            ratio(name, against, "to_first_step"),
            ratio(name, against, "first_step"),
        ])  # fmt: skip
    print()
    print(
        f"{args.model} model (quickstart.gin{', T5.1.1-small shapes' if model_flags else ''}), "
        f"batch 8, medians of {args.rounds} round(s), each run a fresh process"
    )
    headers = [
        "run", "to first step s", "first step s", "compile reported s", "process s",
        "against", "to first step ratio", "first step ratio",
    ]  # fmt: skip
    print(common.markdown_table(headers, rows))
    print(
        "to first step: process start to the first step's progress line; first step: "
        "`compiling the train step...` to that line; compile reported: the launcher's "
        "`compiled the train step in X s`."
    )
    second, first = med("second", "first_step"), med("first", "first_step")
    print(f"second run's first step / first run's: {second / first:.2f}")


if __name__ == "__main__":
    main()
