"""A catalogue of bad inputs: each ends with one `error: ...` line, exit code 1, nothing lost.

Every row is (entry point, arguments, expected substring of the one error line). The
entry points run in-process (`train.main(argv)` etc., exactly what `python -m` calls),
so the table costs no subprocess start-up. For every row the test checks:

* exit code 1 and exactly one `error:` line on stderr, naming the bad value;
* no traceback and no gin call-site noise (`In call to configurable ... 0x7f...`);
* nothing lost on disk: the trained model directory's checkpoints, `config.gin` and
  metric files are byte-identical afterwards (and no lock is left behind).

Where the validation must come before any heavy work, the row runs with
`Trainer.__init__` (training) or `predict_step` (decoding) made to fail the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import pytest

from hyperprompt_jax import count_params, errors, launch, plan, train
from hyperprompt_jax import eval as eval_entry
from hyperprompt_jax import infer as infer_entry
from hyperprompt_jax import model_dir as model_dir_lib
from hyperprompt_jax import trainer as trainer_lib

# MODEL_DIR is required; rows that must fail before writing anything point it here.
_SCRATCH = tempfile.mkdtemp(prefix="hp_bad_inputs_")
QUICK = [
    "--gin_file=quickstart.gin",
    f"--gin.MODEL_DIR='{_SCRATCH}/model'",
    "--gin.TRAIN_STEPS=2",
    "--gin.SAVE_PERIOD=2",
    "--gin.LOG_PERIOD=1",
    "--gin.BATCH_SIZE=8",
    "--gin.EVAL_NUM_EXAMPLES=8",
    "--gin.EVAL_PERIOD=None",
]
NO_EVAL = "--gin.train.eval_dataset_cfg=None"


def snapshot(directory) -> dict:
    """`{relative path: sha1}` of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step quickstart run (the directory every row must leave intact)."""
    model_dir = tmp_path_factory.mktemp("bad_inputs") / "model"
    assert train.main([*QUICK, f"--gin.MODEL_DIR='{model_dir}'", NO_EVAL]) == 0
    return model_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    out = {"dir": d}
    for name, content in {
        "id99.jsonl": '{"inputs": "abcdefgh", "task_id": 0}\n{"inputs": "x", "task_id": 99}\n',
        "idneg.jsonl": '{"inputs": "abcdefgh", "task_id": -1}\n',
        "idnull.jsonl": '{"inputs": "abcdefgh", "task_id": null}\n',
        "idtwo.jsonl": '\n{"inputs": "abcdefgh", "task_id": "two"}\n',
        "idfloat.jsonl": '{"inputs": "abcdefgh", "task_id": 1.7}\n',
        "badjson.jsonl": '{"inputs": "abc",\n',
        "noinputs.jsonl": '{"text": "abc"}\n',
        "plain.txt": "abcdefgh\n",
    }.items():
        (d / name).write_text(content)
    (d / "latin1.txt").write_bytes(b"abc\nd\xe9f\n")
    (d / "malformed.gin").write_text("include 'quickstart.gin'\nTRAIN_STEPS = = 3\n")
    (d / "unknown_configurable.gin").write_text("include 'quickstart.gin'\nnot_a_thing.x = 3\n")
    (d / "a_file").write_text("not a directory")
    (d / "out_dir").mkdir()
    return out


def infer_args(model_dir, *extra):
    return [
        "--gin_file=quickstart.gin",
        "--gin_file=runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        "--gin.BATCH_SIZE=8",
        *extra,
    ]


def eval_args(model_dir, *extra):
    return [
        "--gin_file=quickstart.gin",
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        "--gin.BATCH_SIZE=8",
        "--gin.EVAL_NUM_EXAMPLES=8",
        *extra,
    ]


# (id, entry, argv(model_dir, files), expected substring, heavy work forbidden)
T, E, INF, C, P = train.main, eval_entry.main, infer_entry.main, count_params.main, plan.main
PLAN = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=methods/prompt_tuning.gin"]
CASES = [
    # -- flags and gin --------------------------------------------------------------
    ("no_gin_file", T, lambda m, f: [], "No --gin_file given", True),
    ("unknown_flag", T, lambda m, f: [*QUICK, "--steps=3"], "Unknown flag '--steps=3'", True),
    ("binding_without_value", T, lambda m, f: [*QUICK, "--gin.TRAIN_STEPS"], "Malformed binding", True),
    ("unclosed_bracket", T, lambda m, f: [*QUICK, "--gin.TRAIN_STEPS=[1,"], "TRAIN_STEPS=[1,", True),
    ("unknown_gin_file", T, lambda m, f: ["--gin_file=quickstrat.gin"], "Did you mean: quickstart.gin", True),
    ("malformed_gin_file", T, lambda m, f: [f"--gin_file={f['dir']}/malformed.gin"], "malformed.gin", True),
    ("unknown_configurable_in_file", T, lambda m, f: [f"--gin_file={f['dir']}/unknown_configurable.gin"], "unknown_configurable.gin", True),
    ("misspelt_macro", T, lambda m, f: [*QUICK, "--gin.TRAIN_STEPZ=3"], "Did you mean TRAIN_STEPS", True),
    ("unknown_parameter", T, lambda m, f: [*QUICK, "--gin.adafactor.decay_rat=0.5"], "decay_rat", True),
    # -- run settings ------------------------------------------------------------------
    ("train_steps_zero", T, lambda m, f: [*QUICK, "--gin.TRAIN_STEPS=0"], "TRAIN_STEPS must be a positive int, got 0", True),
    ("save_period_float", T, lambda m, f: [*QUICK, "--gin.SAVE_PERIOD=2.5"], "SAVE_PERIOD must be a positive int, got 2.5", True),
    ("batch_size_zero", T, lambda m, f: [*QUICK, "--gin.BATCH_SIZE=0", "--gin.EVAL_BATCH_SIZE=8"], "BATCH_SIZE must be a positive int, got 0", True),
    ("eval_batch_size_named", T, lambda m, f: [*QUICK, "--gin.EVAL_BATCH_SIZE=-4"], "EVAL_BATCH_SIZE must be a positive int, got -4", True),
    ("data_shards_not_dividing", T, lambda m, f: [*QUICK, "--gin.DATA_SHARDS=3"], "DATA_SHARDS must be a positive int dividing BATCH_SIZE=8, got 3", True),
    ("lengths_without_targets", T, lambda m, f: [*QUICK, "--gin.TASK_FEATURE_LENGTHS={'inputs': 9}"], "TASK_FEATURE_LENGTHS must map 'inputs' and 'targets'", True),
    ("learning_rate_string", T, lambda m, f: [*QUICK, "--gin.LEARNING_RATE='fast'"], "learning-rate schedule fails at step 0", True),
    ("patience_zero", T, lambda m, f: [*QUICK, "--gin.EARLY_STOPPING_PATIENCE=0"], "EARLY_STOPPING_PATIENCE must be a positive int", True),
    ("unknown_task", T, lambda m, f: [*QUICK, "--gin.MIXTURE_OR_TASK_NAME='hp_synthetic_multitsk'"], "hp_synthetic_multitask", True),
    ("num_tasks_below_mixture", T, lambda m, f: [*QUICK, "--gin.NUM_TASKS=2"], "task ids 0..3, but the model has NUM_TASKS=2", True),
    ("model_dir_is_file", T, lambda m, f: [*QUICK, f"--gin.MODEL_DIR='{f['dir']}/a_file/model'"], "cannot be written", True),
    # -- the trained model directory ---------------------------------------------------
    ("train_steps_below_checkpoint", T, lambda m, f: [*QUICK, f"--gin.MODEL_DIR='{m}'", "--gin.TRAIN_STEPS=1"], "holds checkpoint_2, beyond TRAIN_STEPS=1", False),
    # -- inference inputs --------------------------------------------------------------
    ("infer_task_id_99", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/id99.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "id99.jsonl:2: task_id 99 is out of range: expected 0 <= task_id < NUM_TASKS=4", True),
    ("infer_task_id_negative", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/idneg.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "idneg.jsonl:1: task_id -1 is out of range", True),
    ("infer_task_id_null", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/idnull.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "idnull.jsonl:1: task_id must be an integer, got None", True),
    ("infer_task_id_string", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/idtwo.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "idtwo.jsonl:2: task_id must be an integer, got 'two'", True),
    ("infer_task_id_float", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/idfloat.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "idfloat.jsonl:1: task_id must be an integer, got 1.7", True),
    ("infer_TASK_ID_out_of_range", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/plain.txt'", "--gin.TASK_ID=7", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "TASK_ID: task_id 7 is out of range", True),
    ("infer_not_utf8", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/latin1.txt'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "latin1.txt:2: not UTF-8", True),
    ("infer_bad_json", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/badjson.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "badjson.jsonl:1: invalid JSON", True),
    ("infer_json_without_inputs", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/noinputs.jsonl'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "expected a string 'inputs' field", True),
    ("infer_missing_input_file", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/nope.txt'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "nope.txt' does not exist", True),
    ("infer_input_file_is_dir", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/out_dir'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "is a directory; expected a text file", True),
    ("infer_output_is_dir", INF, lambda m, f: infer_args(m, f"--gin.INPUT_FILE='{f['dir']}/plain.txt'", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/out_dir'"), "INFER_OUTPUT_FILE", True),
    ("infer_nothing_to_decode", INF, lambda m, f: infer_args(m, "--gin.MIXTURE_OR_TASK_NAME=None", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "Nothing to decode", True),
    ("infer_num_tasks_below_mixture", INF, lambda m, f: infer_args(m, "--gin.NUM_TASKS=3", f"--gin.INFER_OUTPUT_FILE='{f['dir']}/p.jsonl'"), "but the model has NUM_TASKS=3", True),
    # -- evaluation --------------------------------------------------------------------
    ("eval_output_dir_is_file", E, lambda m, f: eval_args(m, f"--gin.EVAL_OUTPUT_DIR='{f['dir']}/a_file'"), "EVAL_OUTPUT_DIR", True),
    ("eval_batch_size_zero", E, lambda m, f: eval_args(m, f"--gin.EVAL_OUTPUT_DIR='{f['dir']}/ev'", "--gin.BATCH_SIZE=0"), "BATCH_SIZE must be a positive int, got 0", True),
    ("eval_unknown_task", E, lambda m, f: eval_args(m, f"--gin.EVAL_OUTPUT_DIR='{f['dir']}/ev'", "--gin.MIXTURE_OR_TASK_NAME='nope'"), "Unknown task or mixture 'nope'", True),
    # -- count_params shares the launcher's gin checks ---------------------------------
    ("count_params_misspelt_macro", C, lambda m, f: ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=methods/prompt_tuning.gin", "--gin.PROMPT_LENGHT=20"], "Did you mean PROMPT_LENGTH", False),
    ("count_params_unknown_gin_file", C, lambda m, f: ["--gin_file=models/t5_1_1_tny.gin"], "'models/t5_1_1_tny.gin' not found", False),
    ("count_params_no_gin_file", C, lambda m, f: [], "usage: python -m hyperprompt_jax.count_params", False),
    # -- plan --------------------------------------------------------------------------
    ("plan_batch_size_not_int", P, lambda m, f: [*PLAN, "--mesh=data:1,model:1", "--batch_size=x"], "--batch_size must be an integer, got 'x'", False),
    ("plan_bad_mesh", P, lambda m, f: [*PLAN, "--mesh=data:1,modle:1", "--batch_size=8"], "Bad --mesh 'data:1,modle:1'", False),
]  # fmt: skip


@pytest.fixture
def forbid_heavy_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("heavy work started before the bad input was reported")

    monkeypatch.setattr(trainer_lib.Trainer, "__init__", refuse)
    monkeypatch.setattr(trainer_lib.Trainer, "predict_step", refuse)


@pytest.mark.parametrize("name,entry,argv,expected,light", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(name, entry, argv, expected, light, trained, files, capsys, request):
    if light:
        request.getfixturevalue("forbid_heavy_work")
    before = snapshot(trained)
    code = entry(argv(trained, files))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert expected in err, err[-2000:]
    assert "Traceback" not in err and "In call to configurable" not in err, err[-2000:]
    assert snapshot(trained) == before
    assert not os.path.exists(os.path.join(trained, model_dir_lib.LOCK_FILE))


def test_a_bug_keeps_its_traceback():
    """Only UserError is a one-liner: any other ValueError (e.g. inside JAX) propagates."""

    def bug():
        raise ValueError("shape mismatch inside some library")

    with pytest.raises(ValueError, match="shape mismatch"):
        launch.report_errors(bug)
    assert launch.report_errors(lambda: (_ for _ in ()).throw(errors.UserError("x"))) == 1


def test_gin_call_suffix_is_dropped():
    proxy_text = "bad value\n  In call to configurable 'train' (<function train at 0x7f31af0a4cc0>)"
    assert errors.message(ValueError(proxy_text)) == "bad value"


def test_finished_run_rerun_does_nothing(trained, capsys):
    """Re-running a finished run neither trains, evaluates nor appends a record."""
    before = snapshot(trained)
    assert train.main([*QUICK, f"--gin.MODEL_DIR='{trained}'", NO_EVAL]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert snapshot(trained) == before


def test_model_dir_in_use_stops_at_once(trained, tmp_path, capsys, forbid_heavy_work):
    """A live holder (another process, fresh heartbeat) blocks a second run."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = os.path.join(trained, model_dir_lib.LOCK_FILE)
        with open(lock, "w") as f:
            json.dump({"pid": holder.pid, "host": os.uname().nodename, "started": 0}, f)
        before = snapshot(trained)
        code = train.main([*QUICK, f"--gin.MODEL_DIR='{trained}'"])
        err = capsys.readouterr().err
        assert code == 1
        assert f"is in use by another run (process {holder.pid}" in err
        assert snapshot(trained) == before  # The lock stays with its holder.
    finally:
        holder.kill()
        holder.wait()
        os.remove(lock)


def test_stale_lock_is_taken_over(tmp_path):
    """A lock whose process is gone (same host) or whose heartbeat stopped is stale."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / model_dir_lib.LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": 0}))
    with model_dir_lib.RunLock(str(tmp_path)) as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
    assert not lock.exists()
    # Another host's lock with an old heartbeat.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    old = os.path.getmtime(lock) - model_dir_lib.STALE_SECONDS - 5
    os.utime(lock, (old, old))
    with model_dir_lib.RunLock(str(tmp_path)):
        pass
    # ... and with a fresh one: in use.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(errors.UserError, match="in use by another run .process 1 on elsewhere"):
        model_dir_lib.RunLock(str(tmp_path)).acquire()


def test_truncate_records_keeps_steps_up_to_the_checkpoint(tmp_path):
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 3, 4)]
    (tmp_path / "train_metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo'
    )
    assert model_dir_lib.truncate_records(str(tmp_path), 2) == 5
    kept = model_dir_lib.read_records(str(tmp_path), "train_metrics.jsonl")
    assert [r["step"] for r in kept] == [1, 2]


def test_over_long_inputs_are_counted_once(trained, files, capsys):
    (files["dir"] / "long.txt").write_text("abcdefgh\n" + "abcdefghijklmnopqrstuvwxyz\n" * 3)
    out = files["dir"] / "long_out.jsonl"
    code = infer_entry.main(
        infer_args(
            trained,
            f"--gin.INPUT_FILE='{files['dir']}/long.txt'",
            f"--gin.INFER_OUTPUT_FILE='{out}'",
        )
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "truncated" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "3 of 4 inputs are longer than TASK_FEATURE_LENGTHS['inputs']=9 tokens (with EOS) "
        "and were truncated."
    )
    assert len(out.read_text().splitlines()) == 4


def test_over_long_split_examples_are_counted_once_per_task(trained, files, capsys):
    out = files["dir"] / "split_out.jsonl"
    code = infer_entry.main(
        infer_args(
            trained,
            "--gin.INFER_NUM_EXAMPLES=3",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 5, 'targets': 2}",
            f"--gin.INFER_OUTPUT_FILE='{out}'",
        )
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if "are truncated" in line]
    assert len(warnings) == 4, err[-2000:]  # one per task of the mixture
    assert all(
        "3 of 3 examples have more than TASK_FEATURE_LENGTHS['inputs']=5 tokens" in w
        for w in warnings
    )
    assert len(out.read_text().splitlines()) == 12
