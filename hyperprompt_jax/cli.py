"""The command-line layer every entry point shares: help, early checks, quiet output.

Each entry point (`train`, `eval`, `infer`, `plan`, `count_params`, `task_registry`)
starts with

    if __name__ == "__main__":
        from hyperprompt_jax import cli

        cli.preflight("train")

above its TensorFlow / JAX imports. `preflight` then, in well under a second:

* answers `--help` / `-h` (usage, where gin files are searched, the entry's main
  macros with their defaults, an example) and exits;
* appends `$HYPERPROMPT_EXTRA_FLAGS` to the command line (e.g. CI shortens the
  quickstart with `HYPERPROMPT_EXTRA_FLAGS=--gin.TRAIN_STEPS=40`);
* checks every `--gin.NAME=VALUE` value (a string without inner quotes is named with
  the quoting that works), and reads the gin files as text (`gin_scan`) to report *all* required
  settings still `%gin.REQUIRED` (and macros used but never defined) at once, plus
  local `CHECKPOINT_PATH`-like paths that do not exist, as one `error:` line;
* silences start-up noise: TensorFlow's C++ start-up lines (including `failed call to
  cuInit` on machines without a GPU; `TF_CPP_MIN_LOG_LEVEL=0` shows them), known
  harmless absl warnings, and warnings of processes other than 0.

`launch.run` calls `watch_compilation()`, which prints `compiling the train step...`
and the time it took (also for the evaluation and decoding steps; `(from the
compilation cache)` when XLA's part was read back, see `compilation_cache`), and `error_line`,
which turns an exception into the one line users see.

This module imports only the standard library at import time (gin and JAX are
imported inside the functions that need them), so help is instant.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import sys
import tempfile
import textwrap
import time
from typing import Callable, Iterator, Sequence

from hyperprompt_jax import gin_scan
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

EXTRA_FLAGS_ENV = "HYPERPROMPT_EXTRA_FLAGS"
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull")


# ------------------------------------------------------------------------------------
# The entry points
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """What `--help` says about one entry point and what `preflight` checks.

    Attributes:
      module: `python -m` module name.
      summary: one paragraph.
      usage: the usage line after `python -m MODULE`.
      run_file: the run gin file whose macros the help lists (defaults read from it).
      macros: `(NAME, meaning)` of the main macros.
      example: a command that works as written.
      roots: gin configurables (`hyperprompt_jax.train.train`) or macros (`%MODEL`)
        the entry evaluates; their required settings are checked before it starts.
      paths: macros naming local paths that must exist (None / gs:// are skipped).
      gin: the entry takes `--gin_file` / `--gin.NAME=VALUE` flags.
      options: `(flag, meaning)` of the entry's own flags.
    """

    module: str
    summary: str
    usage: str
    example: str
    run_file: str | None = None
    macros: tuple[tuple[str, str], ...] = ()
    roots: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    gin: bool = True
    options: tuple[tuple[str, str], ...] = ()


_GIN_USAGE = (
    "--gin_file=FILE [--gin_file=FILE ...] [--gin.NAME=VALUE ...] [--gin_search_paths=DIR,...]"
)

COMMANDS: dict[str, Command] = {
    "train": Command(
        module="hyperprompt_jax.train",
        summary=(
            "Train (or resume) a model configured by gin files: model size, method, run "
            "settings. Writes checkpoints, train_metrics.jsonl, eval_metrics.jsonl, "
            "TensorBoard events and config.gin to MODEL_DIR; re-running the same command "
            "resumes from the newest checkpoint there."
        ),
        usage=_GIN_USAGE,
        run_file="runs/finetune.gin",
        macros=(
            ("MODEL_DIR", "where the run writes (required; re-run to resume)"),
            ("MIXTURE_OR_TASK_NAME", "seqio task or mixture"),
            ("TASK_FEATURE_LENGTHS", "{'inputs': N, 'targets': M}"),
            ("TRAIN_STEPS", "train until this step"),
            ("BATCH_SIZE", "global batch"),
            ("INITIAL_CHECKPOINT_PATH", "t5x / Hugging Face / own checkpoint: the backbone"),
            ("EVAL_PERIOD", "evaluate every N steps (None: at the end)"),
            ("SAVE_PERIOD", "checkpoint every N steps"),
            ("LOG_PERIOD", "progress line every N steps"),
        ),
        example=(
            "python -m hyperprompt_jax.train --gin_file=quickstart.gin "
            "--gin.MODEL_DIR=\"'/tmp/quickstart'\""
        ),
        roots=("hyperprompt_jax.train.train",),
        paths=("INITIAL_CHECKPOINT_PATH",),
    ),
    "eval": Command(
        module="hyperprompt_jax.eval",
        summary=(
            "Evaluate one checkpoint with the tasks' seqio metrics; give the gin files the "
            "model was trained with, then runs/eval.gin. eval_metrics.jsonl is appended in "
            "EVAL_OUTPUT_DIR and a score table printed."
        ),
        usage=_GIN_USAGE,
        run_file="runs/eval.gin",
        macros=(
            (
                "CHECKPOINT_PATH",
                "model directory (latest checkpoint), checkpoint_<step>, t5x or HF",
            ),
            ("EVAL_OUTPUT_DIR", "where eval_metrics.jsonl is written"),
            ("EVAL_SPLIT", "dataset split"),
            ("EVAL_NUM_EXAMPLES", "only the first N examples per task"),
        ),
        example=(
            "python -m hyperprompt_jax.eval --gin_file=quickstart.gin --gin_file=runs/eval.gin "
            "--gin.CHECKPOINT_PATH=\"'/tmp/quickstart'\" "
            "--gin.EVAL_OUTPUT_DIR=\"'/tmp/quickstart/eval'\""
        ),
        roots=("hyperprompt_jax.eval.evaluate",),
        paths=("CHECKPOINT_PATH",),
    ),
    "infer": Command(
        module="hyperprompt_jax.infer",
        summary=(
            "Decode inputs with a checkpoint and write JSON lines: a dataset split of "
            "MIXTURE_OR_TASK_NAME, or INPUT_FILE (one input per line, or JSON lines "
            '{"inputs": ..., "task_id": ...}). Give the gin files the model was trained '
            "with, then runs/infer.gin."
        ),
        usage=_GIN_USAGE,
        run_file="runs/infer.gin",
        macros=(
            (
                "CHECKPOINT_PATH",
                "model directory (latest checkpoint), checkpoint_<step>, t5x or HF",
            ),
            ("INFER_OUTPUT_FILE", "JSON-lines predictions"),
            ("INPUT_FILE", "text / JSON-lines inputs (else the INFER_SPLIT of the task)"),
            ("TASK_ID", "task id of plain-text input lines"),
            ("INFER_SPLIT", "dataset split when INPUT_FILE is None"),
        ),
        example=(
            "python -m hyperprompt_jax.infer --gin_file=quickstart.gin --gin_file=runs/infer.gin "
            "--gin.CHECKPOINT_PATH=\"'/tmp/quickstart'\" --gin.INPUT_FILE=\"'inputs.txt'\" "
            "--gin.TASK_ID=1 --gin.INFER_OUTPUT_FILE=\"'/tmp/predictions.jsonl'\""
        ),
        roots=("hyperprompt_jax.infer.infer",),
        paths=("CHECKPOINT_PATH", "INPUT_FILE"),
    ),
    "plan": Command(
        module="hyperprompt_jax.plan",
        summary=(
            "Plan per-device memory of a training run on a device mesh (parameters, "
            "optimizer state, gradients, activations) and say whether it fits; "
            "--verify compiles the sharded step on fake CPU devices."
        ),
        usage=_GIN_USAGE + " (--tpu=v4-128 | --mesh=data:D,model:M | --num_devices=N) [options]",
        macros=(
            ("MODEL", "from a models/*.gin file"),
            ("NUM_PARTITIONS", "size of the model axis (partitioning/*.gin)"),
            ("BATCH_SIZE", "global batch (or --batch_size)"),
        ),
        example=(
            "python -m hyperprompt_jax.plan --gin_file=models/t5_1_1_base.gin "
            "--gin_file=methods/prompt_tuning.gin --tpu=v3-8 "
            "--task_feature_lengths=inputs:512,targets:8"
        ),
        roots=("%MODEL",),
        options=(
            ("--tpu=v3-256", "devices and per-device HBM of a Cloud TPU slice"),
            ("--mesh=data:D,model:M", "an explicit mesh"),
            ("--num_devices=N", "N devices; the model axis is NUM_PARTITIONS"),
            ("--device_memory_gb=G", "per-device memory (overrides --tpu's)"),
            ("--batch_size=B", "global batch (default: the gin's BATCH_SIZE)"),
            ("--task_feature_lengths=inputs:512,targets:8", "sequence lengths"),
            ("--verify[=depth]", "compile the real sharded step on fake CPU devices"),
        ),
    ),
    "count_params": Command(
        module="hyperprompt_jax.count_params",
        summary=(
            "Count a gin-configured model's trainable and total parameters by module, "
            "without allocating them; the last line is trainable_params=N total_params=M."
        ),
        usage=_GIN_USAGE,
        macros=(
            ("MODEL", "from a models/*.gin file"),
            ("TRAINABLE_PATTERNS", "regexes of trained parameters (set by the method)"),
        ),
        example=(
            "python -m hyperprompt_jax.count_params --gin_file=models/t5_1_1_large.gin "
            "--gin_file=methods/prompt_tuning.gin --gin.PROMPT_LENGTH=20"
        ),
        roots=("%MODEL",),
    ),
    "task_registry": Command(
        module="hyperprompt_jax.task_registry",
        summary="List, check and prepare (download with TFDS) the registered seqio tasks.",
        usage="{list [SUBSTRING] | check NAME [--split=S] | prepare NAME [--data_dir=DIR]}",
        example="python -m hyperprompt_jax.task_registry list synthetic",
        gin=False,
        options=(
            ("list [SUBSTRING]", "registered task / mixture names"),
            ("check NAME [--split=S]", "is the TFDS data of a task / mixture prepared?"),
            ("prepare NAME [--data_dir=DIR]", "download and prepare its TFDS data"),
        ),
    ),
}

_ENVIRONMENT = (
    (EXTRA_FLAGS_ENV, "flags appended to gin commands (e.g. --gin.TRAIN_STEPS=40)"),
    ("HYPERPROMPT_VOCAB", "local SentencePiece model for every T5 vocabulary (offline runs)"),
    ("TFDS_DATA_DIR", "where prepared TFDS datasets are read"),
    (
        "HYPERPROMPT_COMPILATION_CACHE",
        "XLA compilation cache (~/.cache/hyperprompt_jax/xla; 'off': none)",
    ),
    ("TF_CPP_MIN_LOG_LEVEL", "0 shows TensorFlow's C++ start-up lines (hidden by default)"),
)

# Example values shown when a required macro is missing.
_EXAMPLE_VALUES = {
    "MODEL_DIR": "\"'/path/to/model_dir'\"",
    "MIXTURE_OR_TASK_NAME": "\"'hp_super_glue_rte_v102'\"",
    "TASK_FEATURE_LENGTHS": "\"{'inputs': 512, 'targets': 8}\"",
    "TRAIN_STEPS": "1000",
    "CHECKPOINT_PATH": "\"'/path/to/model_dir'\"",
    "EVAL_OUTPUT_DIR": "\"'/path/to/eval_dir'\"",
    "INFER_OUTPUT_FILE": "\"'/path/to/predictions.jsonl'\"",
    "NUM_TASKS": "8",
}


def help_text(name: str) -> str:
    """The `--help` text of entry point `name` (no heavy imports)."""
    command = COMMANDS[name]
    lines = [f"usage: python -m {command.module} {command.usage}", ""]
    lines += [*textwrap.wrap(command.summary, 88), ""]
    if command.gin:
        from hyperprompt_jax import gin_utils

        lines += [
            "gin files are found by relative name in, in order:",
            f"  1. the current directory ({os.getcwd()})",
            "  2. the directories of --gin_search_paths=DIR,...",
            f"  3. the installed gin files: {gin_utils.PACKAGE_GIN_DIR}",
            "     (quickstart.gin, models/*.gin, methods/*.gin, runs/*.gin, partitioning/*.gin)",
            "Files apply in order, then --gin.NAME=VALUE flags. Values are Python literals:",
            "strings need inner quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run'\".",
            "",
        ]
    if command.macros:
        defaults = _run_file_defaults(command.run_file) if command.run_file else {}
        where = f" ({command.run_file})" if command.run_file else ""
        lines.append(f"main macros{where}:")
        width = max(len(n) for n, _ in command.macros) + 2
        for macro, meaning in command.macros:
            default = defaults.get(macro)
            shown = (
                "required" if default == "%gin.REQUIRED" else (f"= {default}" if default else "")
            )
            lines.append(f"  {macro:<{width}}{meaning}{f'  [{shown}]' if shown else ''}")
        lines.append("")
    if command.options:
        lines.append("options:" if command.gin else "subcommands:")
        width = max(len(o) for o, _ in command.options) + 2
        lines += [f"  {o:<{width}}{meaning}" for o, meaning in command.options]
        lines.append("")
    lines += ["example:", f"  {command.example}", "", "environment:"]
    width = max(len(e) for e, _ in _ENVIRONMENT) + 2
    lines += [f"  {e:<{width}}{meaning}" for e, meaning in _ENVIRONMENT]
    return "\n".join(lines)


def _run_file_defaults(run_file: str) -> dict[str, str]:
    """`{MACRO: value text}` of the top-level macro lines of an installed run gin file."""
    from hyperprompt_jax import gin_utils

    path = os.path.join(gin_utils.PACKAGE_GIN_DIR, run_file)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        match = re.match(r"([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*(#.*)?$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


# ------------------------------------------------------------------------------------
# Preflight: before TensorFlow / JAX are imported
# ------------------------------------------------------------------------------------


def preflight(name: str, argv: Sequence[str] | None = None) -> list[str]:
    """Runs the cheap part of an entry point: help, flag checks, quiet logging.

    Args:
      name: a key of `COMMANDS`.
      argv: the arguments (default `sys.argv[1:]`, which is updated in place with
        `$HYPERPROMPT_EXTRA_FLAGS`).

    Returns:
      The arguments the entry point should parse.

    Exits:
      0 after printing help; 1 after printing one `error:` line for a user mistake.
    """
    from_sys = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS[name]
    if command.gin:
        args += shlex.split(os.environ.get(EXTRA_FLAGS_ENV, ""))
        if from_sys:
            sys.argv[1:] = args
    # Subcommand CLIs answer `SUB --help` themselves (argparse); only top-level help here.
    asks_help = any(a in HELP_FLAGS for a in (args if command.gin else args[:1]))
    if asks_help or (not args and not command.gin):
        print(help_text(name))
        sys.exit(0)
    quiet_logging()
    if command.gin:
        try:
            check_gin_flags(command, args)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
    import_tensorflow_quietly()
    return args


def check_gin_flags(command: Command, argv: Sequence[str]) -> None:
    """Checks `--gin.NAME=VALUE` values and required settings, reading gin as text.

    Raises:
      UserError: naming every problem found (all at once).
    """
    from hyperprompt_jax import gin_utils

    gin_args = [a for a in argv if a.startswith("--gin")]
    try:
        files, bindings, paths = gin_utils.flags_to_gin(gin_args)
    except ValueError as error:
        raise UserError(str(error)) from None
    problems = [p for p in (binding_problem(b) for b in bindings) if p]
    if problems:
        raise UserError(" ".join(problems))
    if not files:
        raise UserError(f"no --gin_file given; e.g. {command.example} (see --help).")
    try:
        gin_utils.check_files_exist(files, paths)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        scan = gin_scan.GinScan(gin_utils.search_paths(paths))
        for f in files:
            scan.read_file(f)
        for b in bindings:
            scan.read_text(b, origin=f"--gin.{b}")
    except gin_scan.Unreadable:
        return  # gin itself will report it, with its own message.
    missing, undefined = scan.unset(command.roots)
    messages = []
    if missing:
        examples = " ".join(f"--gin.{m}={_EXAMPLE_VALUES.get(m, '...')}" for m in missing)
        messages.append(
            f"required gin setting{'s' if len(missing) > 1 else ''} not set: "
            f"{', '.join(missing)}. Set {'them' if len(missing) > 1 else 'it'} in a gin file or "
            f"with flags, e.g. {examples} (string values need the inner quotes)."
        )
    if undefined:
        messages.append(
            f"gin macro{'s' if len(undefined) > 1 else ''} {', '.join(undefined)} "
            f"{'are' if len(undefined) > 1 else 'is'} used but never defined (is a "
            "models/*.gin or methods/*.gin file missing from the --gin_file list?)."
        )
    for macro in command.paths:
        value = scan.literal(macro)
        if isinstance(value, str) and value and "://" not in value and not os.path.exists(value):
            messages.append(f"{macro} {value!r} does not exist.")
    if messages:
        raise UserError(" ".join(messages))


def binding_problem(binding: str) -> str | None:
    """Why a `NAME=VALUE` binding cannot be a gin value, or None if it looks fine.

    The commonest mistake is a string without inner quotes (`--gin.MODEL_DIR=/tmp/x`,
    or `--gin.MODEL_DIR='/tmp/x'`, whose quotes the shell removes).
    """
    name, _, value = binding.partition("=")
    name, value = name.strip(), value.strip()
    if not value:
        return f"--gin.{name}= has no value."
    if value.startswith(("@", "%")) or "@" in value or "%" in value:
        return None  # References and macros: gin checks them.
    try:
        ast.literal_eval(value)
        return None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if re.fullmatch(r"[^'\"\[\](){},]+", value):
        return (
            f"--gin.{name}={value}: gin values are Python literals, so a string needs quotes "
            f"inside the shell's: --gin.{name}=\"'{value}'\"."
        )
    return (
        f"--gin.{name}={value}: not a gin value (a Python literal, @configurable or %MACRO); "
        "strings need inner quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run'\"."
    )


# ------------------------------------------------------------------------------------
# Quiet logging
# ------------------------------------------------------------------------------------

# absl warnings that every run prints and that say nothing to act on here.
_NOISE = (
    # seqio, once per task of a mixture: the tasks here are in-memory / TFDS sources
    # read in a fixed, resumable order (DATA_SEED), which is what the warning is about.
    "Using an uncached FunctionDataset for training is not recommended",
    # seqio.Evaluator: the launcher writes eval_metrics.jsonl and TensorBoard itself.
    "'logger_cls' is empty so seqio.Evaluator will not log its results",
)

_process_index: int | None = None


def set_process_index(index: int) -> None:
    """Records this process's index (after `jax.distributed` started)."""
    global _process_index
    _process_index = index
    quiet_logging()  # Python warnings off on processes other than 0, now that it is known.


def process_index() -> int:
    """This process's index: recorded, else `$JAX_PROCESS_ID`, else 0."""
    if _process_index is not None:
        return _process_index
    try:
        return int(os.environ.get("JAX_PROCESS_ID", "0") or 0)
    except ValueError:
        return 0


class _QuietFilter(logging.Filter):
    """Drops known noise, and warnings of processes other than 0 (printed once, by 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if process_index() != 0:
            return False
        message = str(record.msg)
        return not any(message.startswith(n) for n in _NOISE)


_FILTER = _QuietFilter()


def quiet_logging() -> None:
    """Drops known absl noise, and warnings of processes other than 0 (idempotent)."""
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    if process_index() != 0:
        import warnings

        warnings.simplefilter("ignore")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ start-up lines dropped (unless they say more).

    TensorFlow 2.21 logs through C++ absl before its log level applies, so
    `TF_CPP_MIN_LOG_LEVEL` no longer silences its import; instead TensorFlow is imported
    (and kept off GPUs: it only feeds data, JAX owns the accelerators) with the
    process's stderr captured, and every captured line that is not known noise
    (`_CPP_NOISE`) is printed again. `TF_CPP_MIN_LOG_LEVEL=0` shows everything.
    """
    if "tensorflow" in sys.modules:
        return
    verbose = os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with _captured_stderr(keep=lambda line: verbose or not _CPP_NOISE.search(line)):
        import tensorflow as tf

        # Enumerating devices here also moves CUDA's `failed call to cuInit` on
        # machines without a GPU into the captured window.
        tf.config.set_visible_devices([], "GPU")


# C++ start-up lines of TensorFlow / XLA on machines without a GPU: facts about the
# build, nothing to act on.
_CPP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning: Could not find TensorRT"
)


@contextlib.contextmanager
def _captured_stderr(keep: Callable[[str], bool]) -> Iterator[None]:
    """Captures file descriptor 2 (C++ logs too); re-prints the lines `keep` accepts."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if keep(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------
# Compilation progress
# ------------------------------------------------------------------------------------

# jitted function name -> what the user is told is compiling (trainer.py's step names).
COMPILED_STEPS = {
    "_train_step_fn": "the train step",
    "eval_step": "the evaluation step",
    "predict_step": "the decoding step",
    "score_batch": "the scoring step",
}

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Recorded inside the compile event's window when XLA's work came from the persistent
# cache (`compilation_cache`); the next compile event is the one it belongs to.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_started: dict[str, float] = {}
_cache_hit = False
_watching = False


def _on_start(event: str, value: float, **kwargs) -> None:
    del value
    name = str(kwargs.get("fun_name", ""))
    if event == _TRACE_EVENT and name in COMPILED_STEPS and name not in _started:
        _started[name] = time.time()
        if process_index() == 0:
            logger.info("compiling %s...", COMPILED_STEPS[name])


def _on_event(event: str, **kwargs) -> None:
    del kwargs
    global _cache_hit
    if event == _CACHE_HIT_EVENT:
        _cache_hit = True


def _on_duration(event: str, duration: float, **kwargs) -> None:
    del duration
    global _cache_hit
    if event != _COMPILE_EVENT:
        return
    from_cache, _cache_hit = _cache_hit, False
    name = str(kwargs.get("fun_name", ""))
    name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
    if name in _started:
        elapsed = time.time() - _started.pop(name)
        if process_index() == 0:
            logger.info(
                "compiled %s in %.1f s%s",
                COMPILED_STEPS[name],
                elapsed,
                " (from the compilation cache)" if from_cache else "",
            )


def watch_compilation() -> None:
    """Logs `compiling the train step...` and its duration (also eval / decoding steps),
    and whether XLA's part came from the persistent compilation cache."""
    global _watching
    if _watching:
        return
    import jax.monitoring

    jax.monitoring.register_scalar_listener(_on_start)
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _watching = True


# ------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------

_GIN_CALL_SUFFIX = re.compile(r"\s*In call to configurable '[^']*' \(<[^>]*>\)\s*$")


def error_line(error: BaseException) -> str:
    """The one line printed for a user error (gin's `In call to configurable` dropped)."""
    from hyperprompt_jax import errors

    return f"error: {errors.message(error)}"
