"""The persistent compilation cache: where it is, how it turns off, and that it is used.

Where: an explicit directory (the entry points pass gin's `COMPILATION_CACHE_DIR`) >
`$HYPERPROMPT_COMPILATION_CACHE` > JAX's own setting > `$XDG_CACHE_HOME/...` >
`~/.cache/...`; `off` or empty turns it off. That it is used is checked across
processes, as users meet it: a second process compiling the same program reads it
from the directory the first one wrote (JAX's `cache_hits` / `cache_misses` monitoring
events, no timing), and a resumed run of the real launcher reads its train step back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import gin
from hyperprompt_jax import compilation_cache, gin_utils
from hyperprompt_jax.errors import UserError

ENV = compilation_cache.ENV


# ------------------------------------------------------------------------------------
# Where the cache is
# ------------------------------------------------------------------------------------


def test_explicit_directory_beats_environment_beats_jax_beats_xdg(tmp_path):
    environ = {ENV: str(tmp_path / "env"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    jax_dir = str(tmp_path / "jax")
    arg = str(tmp_path / "arg")
    assert compilation_cache.resolve(arg, environ, jax_dir) == arg
    assert compilation_cache.resolve(None, environ, jax_dir) == str(tmp_path / "env")
    del environ[ENV]
    assert compilation_cache.resolve(None, environ, jax_dir) == jax_dir
    assert compilation_cache.resolve(None, environ, None) == str(
        tmp_path / "xdg" / "hyperprompt_jax" / "xla"
    )


def test_default_is_the_users_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.resolve(None, {}, None) == str(
        tmp_path / ".cache" / "hyperprompt_jax" / "xla"
    )


def test_relative_and_home_paths_become_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert compilation_cache.resolve("~/xla", {}) == str(tmp_path / "xla")
    assert compilation_cache.resolve("rel/xla", {}) == str(tmp_path / "rel" / "xla")
    assert compilation_cache.resolve("gs://bucket/xla", {}) == "gs://bucket/xla"


@pytest.mark.parametrize("off", ["off", "OFF", " off ", ""])
def test_off_or_empty_turns_it_off_wherever_it_is_set(off, tmp_path):
    assert compilation_cache.resolve(off, {ENV: str(tmp_path)}, str(tmp_path)) is None
    assert compilation_cache.resolve(None, {ENV: off}, str(tmp_path)) is None
    # An explicit directory still wins over an `off` environment.
    assert compilation_cache.resolve(str(tmp_path), {ENV: off}) == str(tmp_path)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize(
    "binding, expected",
    [
        (None, None),  # unset: the environment decides
        ("COMPILATION_CACHE_DIR = '/tmp/xla'", "/tmp/xla"),
        ("COMPILATION_CACHE_DIR = None", "off"),
        ("COMPILATION_CACHE_DIR = ''", "off"),
        ("COMPILATION_CACHE_DIR = 'off'", "off"),
    ],
)
def test_gin_macro(clean_gin, binding, expected):
    if binding is not None:
        gin.parse_config(binding)
        # Read by code, not by a binding: the launcher's typo check must let it through.
        gin_utils.check_macro_bindings([binding.replace(" ", "")])
    assert compilation_cache.gin_setting() == expected


def test_gin_macro_of_the_wrong_type_is_a_user_error(clean_gin):
    gin.parse_config("COMPILATION_CACHE_DIR = 3")
    with pytest.raises(UserError, match="COMPILATION_CACHE_DIR must be a directory string"):
        compilation_cache.gin_setting()


# ------------------------------------------------------------------------------------
# Across processes
# ------------------------------------------------------------------------------------

# Turns the cache on as the entry points do, compiles one small program, and reports
# JAX's cache events.
_PROBE = """
import json
import jax, jax.numpy as jnp
from hyperprompt_jax import compilation_cache

events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
path = compilation_cache.enable()
y = jax.jit(lambda x: jnp.sin(x) * 2.0 + jnp.cumsum(x))(jnp.linspace(0.0, 1.0, 5))
print(json.dumps({
    "path": path,
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "misses": events.count("/jax/compilation_cache/cache_misses"),
    "y": y.tolist(),
}))
"""


def _probe(tmp_path, **env: str) -> tuple[dict, list[str]]:
    """Runs `_PROBE` in a fresh process; returns its report and its stderr lines."""
    environ = {k: v for k, v in os.environ.items() if k not in (ENV, "JAX_COMPILATION_CACHE_DIR")}
    environ.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], env=environ, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr.splitlines()


def _entries(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith("-cache"))


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "cache"
    first, _ = _probe(tmp_path, **{ENV: str(cache)})
    assert first["path"] == str(cache)
    assert first["hits"] == 0 and first["misses"] >= 1
    written = _entries(cache)
    assert any(n.startswith("jit__lambda-") for n in written), written

    second, _ = _probe(tmp_path, **{ENV: str(cache)})
    assert second["hits"] >= 1
    assert second["misses"] == 0  # nothing compiled anew
    assert _entries(cache) == written
    assert second["y"] == first["y"]


def test_the_default_directory_is_used_when_nothing_is_set(tmp_path):
    report, _ = _probe(tmp_path)
    default = tmp_path / "xdg" / "hyperprompt_jax" / "xla"
    assert report["path"] == str(default)
    assert _entries(default)


def test_off_writes_nothing_even_where_jax_is_told_to(tmp_path):
    jax_dir = tmp_path / "jax_dir"
    for _ in range(2):
        report, _ = _probe(tmp_path, **{ENV: "off", "JAX_COMPILATION_CACHE_DIR": str(jax_dir)})
        assert report["path"] is None
        assert report["hits"] == 0 and report["misses"] == 0
    assert not jax_dir.exists()
    assert not (tmp_path / "xdg").exists()


def test_an_unwritable_directory_is_one_warning_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    unwritable = blocker / "cache"  # cannot be created, even by root
    reference, _ = _probe(tmp_path, **{ENV: "off"})
    report, stderr = _probe(tmp_path, **{ENV: str(unwritable)})
    assert report["path"] is None
    assert report["hits"] == 0 and report["misses"] == 0
    assert report["y"] == reference["y"]
    warnings = [line for line in stderr if "compilation cache" in line]
    assert len(warnings) == 1, stderr
    assert f"cannot write {unwritable}" in warnings[0] and ENV in warnings[0]


# ------------------------------------------------------------------------------------
# The launcher: a resumed run does not recompile its train step
# ------------------------------------------------------------------------------------


def _train(model_dir, cache, steps: int) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", ENV: str(cache)}
    result = subprocess.run(
        [
            sys.executable, "-m", "hyperprompt_jax.train", "--gin_file=quickstart.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=1", "--gin.SAVE_PERIOD=1",
            "--gin.train.eval_dataset_cfg=None",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_a_resumed_run_reads_its_train_step_from_the_cache(tmp_path):
    cache, model_dir = tmp_path / "cache", tmp_path / "run"
    first = _train(model_dir, cache, steps=1)
    assert f"XLA compilation cache: {cache}" in first
    compiled = re.findall(r"compiled the train step in [\d.]+ s.*", first)
    assert compiled and "from the compilation cache" not in compiled[0], first
    assert any(n.startswith("jit__train_step_fn-") for n in _entries(cache))

    resumed = _train(model_dir, cache, steps=2)  # resumes from checkpoint_1
    assert "step 2/2" in resumed
    compiled = re.findall(r"compiled the train step in [\d.]+ s.*", resumed)
    assert compiled and compiled[0].endswith("(from the compilation cache)"), resumed
