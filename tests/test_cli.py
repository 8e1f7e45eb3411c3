"""The command-line layer: instant help, early gin checks, quiet output, `prepare`.

Each entry point is run as a user runs it (`python -m ...` in a subprocess) where the
point is what happens before TensorFlow / JAX load; the rest is tested in-process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from hyperprompt_jax import cli, gin_scan, launch

ENTRIES = ["train", "eval", "infer", "plan", "count_params", "task_registry"]


def _run(module: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"hyperprompt_jax.{module}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def _imported(result: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages imported by the process (from `-X importtime` lines)."""
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize("entry", ENTRIES)
def test_help_answers_before_tensorflow_and_jax(entry):
    result = _run(entry, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m hyperprompt_jax.{entry}")
    assert "example:" in result.stdout
    assert not {"tensorflow", "jax", "seqio", "flax"} & _imported(result)


def test_train_help_lists_search_paths_and_required_macros():
    text = cli.help_text("train")
    assert "--gin_search_paths" in text and os.getcwd() in text
    for macro in ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS"):
        line = next(line for line in text.splitlines() if line.strip().startswith(macro))
        assert line.endswith("[required]"), line
    assert "BATCH_SIZE" in text and "[= 128]" in text  # defaults read from runs/finetune.gin


def test_all_missing_required_macros_at_once_before_heavy_imports(tmp_path):
    result = _run(
        "train",
        "--gin_file=models/t5_1_1_small.gin",
        "--gin_file=methods/prompt_tuning.gin",
        "--gin_file=runs/finetune.gin",
        "--gin.TRAIN_STEPS=10",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert line.startswith("error: required gin settings not set: ")
    for macro in ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"):
        assert macro in line and f"--gin.{macro}=" in line
    assert "TRAIN_STEPS" not in line  # set by the flag
    assert not {"tensorflow", "jax"} & _imported(result)
    assert os.listdir(tmp_path) == []


def test_unquoted_string_names_the_flag_and_the_quoting(tmp_path):
    result = _run("train", "--gin_file=quickstart.gin", "--gin.MODEL_DIR=/tmp/x", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert "--gin.MODEL_DIR=/tmp/x" in line and "--gin.MODEL_DIR=\"'/tmp/x'\"" in line


@pytest.mark.parametrize("entry", ["train", "eval", "infer", "plan", "count_params"])
def test_no_or_unknown_gin_file_is_one_line_before_heavy_imports(entry, tmp_path):
    result = _run(entry, cwd=tmp_path)
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert line.startswith("error: no --gin_file given; e.g. python -m hyperprompt_jax.")
    result = _run(entry, "--gin_file=quickstrat.gin", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert "'quickstrat.gin' not found" in line and "Did you mean: quickstart.gin" in line
    assert not {"tensorflow", "jax"} & _imported(result)


def test_quickstart_requires_model_dir(tmp_path):
    result = _run("train", "--gin_file=quickstart.gin", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert "required gin setting not set: MODEL_DIR" in line


def test_eval_of_a_missing_checkpoint_says_so_and_creates_nothing(tmp_path):
    result = _run(
        "eval",
        "--gin_file=quickstart.gin",
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{tmp_path}/nothing_here'",
        f"--gin.EVAL_OUTPUT_DIR='{tmp_path}/nothing_here/eval'",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    (line,) = _error_lines(result)
    assert f"CHECKPOINT_PATH '{tmp_path}/nothing_here' does not exist." in line
    assert os.listdir(tmp_path) == []


def test_gin_scan_required_parameters_scopes_and_overrides(tmp_path):
    (tmp_path / "a.gin").write_text(
        "from __gin__ import dynamic_registration\n"
        "import some.module as m\n"
        "X = %gin.REQUIRED\n"
        "Y = %gin.REQUIRED\n"
        "UNUSED = %gin.REQUIRED\n"
        "m.run:\n"
        "  data = @train/m.Data()\n"
        "  x = %X\n"
        "m.Data.path = %gin.REQUIRED\n"
        "train/m.Data.size = {'a': %Y,\n"
        "    'b': 2}  # a comment\n"
    )
    scan = gin_scan.GinScan([str(tmp_path)])
    scan.read_file("a.gin")
    # gin rejects every REQUIRED left anywhere (UNUSED too), so all are reported.
    assert scan.unset(["some.module.run"]) == (["X", "Y", "UNUSED", "m.Data.path"], [])
    scan.read_text("X=1", origin="--gin.X=1")
    scan.read_text("m.Data.path='p'", origin="flag")
    scan.read_text("m.run.z=%NOPE", origin="flag")
    assert scan.unset(["some.module.run"]) == (["Y", "UNUSED"], ["NOPE"])


def test_binding_problems():
    assert cli.binding_problem("TRAIN_STEPS=10") is None
    assert cli.binding_problem("MODEL_DIR='/tmp/x'") is None
    assert cli.binding_problem("network.Transformer.hyperprompt=None") is None
    assert cli.binding_problem("MODEL=@models.EncoderDecoderModel()") is None
    assert "--gin.NAME=\"'hello world'\"" in cli.binding_problem("NAME=hello world")
    assert "not a gin value" in cli.binding_problem("L={'inputs': 512")


def test_error_line_drops_gins_call_suffix():
    error = ValueError(
        "MODEL_DIR '/x' is not writable.\n  In call to configurable 'train' "
        "(<function train at 0x7f00deadbeef>)"
    )
    assert cli.error_line(error) == "error: MODEL_DIR '/x' is not writable."


def test_captured_stderr_drops_only_known_noise(capfd):
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795983970.342106    7443 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1795983974.150195    7443 cuda_platform.cc:52] failed call to cuInit: x",
    ]
    with cli._captured_stderr(keep=lambda line: not cli._CPP_NOISE.search(line)):
        for line in [*noise, "E0000 something that matters"]:
            os.write(2, (line + "\n").encode())
    err = capfd.readouterr().err
    assert err == "E0000 something that matters\n"


def test_warnings_only_from_process_zero(caplog):
    absl_logger = logging.getLogger("absl")
    cli.quiet_logging()
    try:
        with caplog.at_level(logging.WARNING, logger="absl"):
            absl_logger.warning(
                "Using an uncached FunctionDataset for training is not recommended ..."
            )
            absl_logger.warning("a warning that matters")
            cli.set_process_index(1)
            absl_logger.warning("from process 1")
            absl_logger.error("an error of process 1")
    finally:
        cli.set_process_index(0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a warning that matters", "an error of process 1"]


def test_compilation_is_announced_with_its_duration():
    import jax
    import jax.numpy as jnp

    launch.setup_logging()
    cli.watch_compilation()

    def _train_step_fn(x):
        return x * 3

    # A handler of our own: other tests may leave pytest's capture handlers behind.
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("hyperprompt_jax")
    handler = Collect(logging.INFO)
    logger.addHandler(handler)
    try:
        jax.jit(_train_step_fn)(jnp.ones(7))
    finally:
        logger.removeHandler(handler)
    assert messages[0] == "compiling the train step..."
    assert messages[1].startswith("compiled the train step in ")
    assert len(messages) == 2


def test_prepare_imports_what_tfds_needs(tmp_path):
    """tensorflow-datasets 4.9.10 imports importlib_resources lazily, on first use."""
    import importlib.metadata

    import tensorflow_datasets as tfds

    builder = tfds.builder("super_glue/rte", data_dir=str(tmp_path))
    assert builder.code_path is not None  # the lazy `import importlib_resources`
    requires = importlib.metadata.requires("hyperprompt-jax") or []
    assert any(r.split(";")[0].strip().startswith("importlib_resources") for r in requires)


def test_prepare_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    import requests
    import tensorflow_datasets as tfds

    from hyperprompt_jax import task_registry

    def offline(self, *args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    code = task_registry.main(["prepare", "hp_super_glue_rte_v102", f"--data_dir={tmp_path}"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: downloading 'super_glue/rte")
    assert "ConnectionError: Failed to resolve" in line
    assert "TFDS_DATA_DIR" in line and f"{tmp_path}/downloads/manual" in line
