"""Every method inside real t5x (`t5x.train` / `t5x.eval` / `t5x.infer` through gin),
checked against this package's own training step, model and decoders.

t5x is not on the package registry, so these tests run only where it is importable:

    HYPERPROMPT_T5X_PATH=/path/to/t5x:/path/to/airio python -m pytest -q tests/test_t5x_bridge.py

`HYPERPROMPT_T5X_PATH` (os.pathsep-separated) is put in front of `sys.path`; t5x also
needs `pip install grain chex fiddle jaxtyping jestimator cached_property` (docs/t5x.md).
Without t5x the whole module is skipped with one reason.

Setup: t5x's own `t5_1_1/small.gin`, a t5x run file and `gin/t5x/<method>.gin`, then a
test gin file that shrinks t5x's `network.T5Config` (the path a user takes to change
the size) and uses the byte vocabulary of the built-in synthetic tasks. For each method:
* `t5x.train` trains 3 steps; its logged losses and final parameters must equal this
  package's `trainer.Trainer` (the launcher's step) run with the package's own method
  recipe (`gin/methods/*.gin`: `optim.adafactor`, learning-rate schedule,
  `TRAINABLE_PATTERNS`) on the same batches from the same initial parameters; one
  example per row, and (prompt tuning, SMoP, HyperPrompt-Share) with t5x's default
  packing of the training data (several examples per row, per-position task ids,
  prompt slots);
* t5x's optimizer state exists for every method parameter (and, for the prompt
  methods, for nothing else: the backbone is frozen and unchanged);
* the bridge model's logits equal this package's model's, and depend on the task ids;
* `t5x.infer` predictions on the trained checkpoint equal this package's model decoding
  the same data with its own beam search, and (HyperPrompt-Sep) `t5x.eval`'s accuracy equals
  the accuracy of those predictions.
One test also runs the literal `python -m t5x.train` command line of docs/t5x.md.
"""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

T5X_PATH_ENV = "HYPERPROMPT_T5X_PATH"
_T5X_PATHS = [p for p in os.environ.get(T5X_PATH_ENV, "").split(os.pathsep) if p]


def _import_t5x() -> str | None:
    """Imports t5x (with the one shim newer JAX needs); returns why not, or None."""
    for path in reversed(_T5X_PATHS):
        if path not in sys.path:
            sys.path.insert(0, path)
    if importlib.util.find_spec("t5x") is None:
        return "ModuleNotFoundError: No module named 't5x'"
    import jax.experimental.pjit as pjit_module

    # jestimator (a t5x dependency) imports PartitionSpec from where JAX no longer has it.
    if not hasattr(pjit_module, "PartitionSpec"):
        pjit_module.PartitionSpec = jax.sharding.PartitionSpec
    try:
        import t5x.eval  # noqa: F401
        import t5x.infer  # noqa: F401
        import t5x.train  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


_WHY_NOT = _import_t5x()
if _WHY_NOT is not None:
    pytest.skip(
        f"t5x is not importable ({_WHY_NOT}); set {T5X_PATH_ENV}=<t5x source>{os.pathsep}"
        "<airio source> to run the t5x bridge tests (docs/t5x.md).",
        allow_module_level=True,
    )

import jax.numpy as jnp  # noqa: E402
import seqio  # noqa: E402
import t5x  # noqa: E402
import t5x.decoding as t5x_decoding  # noqa: E402
import t5x.gin_utils as t5x_gin_utils  # noqa: E402
import t5x.utils as t5x_utils  # noqa: E402
import tensorflow as tf  # noqa: E402
from flax import traverse_util  # noqa: E402
from hyperprompt_jax.tasks import synthetic  # noqa: E402

import gin  # noqa: E402
from hyperprompt_jax import (  # noqa: E402
    checkpoints,
    decoding,
    gin_utils,
    models,
    optim,
    packing,
    partitioning,
    t5x_bridge,
    trainer,
)

T5X_SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(t5x.__file__)))
# In-process runs parse gin several times. t5x's small/large/... size files match
# `network.Transformer` by partial name (they are parsed without dynamic registration),
# which is ambiguous once hyperprompt_jax.network.Transformer is registered, i.e. from
# the second parse in one process on; base.gin names it through its import. The
# subprocess test below uses small.gin, as the docs do (one parse per process).
SIZE_FILE = "t5x/examples/t5/t5_1_1/base.gin"
LENGTHS = {"inputs": synthetic.LENGTH + 1, "targets": 2}
# Packed rows: 3 or 4 examples each (inputs of LENGTH + EOS, plus the prompt slots of
# the prompt methods; targets of one letter + EOS).
PACKED_LENGTHS = {"inputs": 40, "targets": 8}
BATCH = 4
STEPS = 3
EMB_DIM = 16
SEED = 0
METHOD_ROOTS = ("prompt", "hyperprompt")

TINY_GIN = f"""
from __gin__ import dynamic_registration
import seqio
import hyperprompt_jax.tasks.synthetic
from t5x.examples.t5 import network

VOCABULARY = @seqio.ByteVocabulary()
network.T5Config:
  vocab_size = 384
  emb_dim = {EMB_DIM}
  num_heads = 2
  num_encoder_layers = 1
  num_decoder_layers = 1
  head_dim = 8
  mlp_dim = 32
  dtype = 'float32'
"""

PROMPT_LENGTH = 3
_HYPERPROMPT = [
    f"NUM_TASKS = {len(synthetic.TASK_NAMES)}",
    "PROMPT_LENGTH = 2",
    "BOTTLENECK_DIM = 4",
    "LEARNING_RATE = 0.01",
]
# method -> (data, its own macros). SMoP's router noise is off (it draws from the
# dropout RNG, which t5x and this package derive differently); its schedule (warmup over
# WARMUP_FRACTION of TRAIN_STEPS, then decay to zero) is the method's own.
METHODS = {
    "prompt_tuning": ("hp_synthetic_first", [f"PROMPT_LENGTH = {PROMPT_LENGTH}"]),
    "spot": ("hp_synthetic_first", [f"PROMPT_LENGTH = {PROMPT_LENGTH}"]),
    "smop": (
        "hp_synthetic_first",
        ["NUM_PROMPTS = 2", "PROMPT_LENGTH = 2", "ROUTER_NOISE_STD = 0.0", "WARMUP_FRACTION = 0.4"],
    ),
    "hyperprompt_share": (synthetic.MIXTURE_NAME, _HYPERPROMPT),
    "hyperprompt_sep": (synthetic.MIXTURE_NAME, _HYPERPROMPT),
    "hyperprompt_global": (synthetic.MIXTURE_NAME, [*_HYPERPROMPT, "TASK_EMBED_DIM = 4"]),
}
# Task used for eval / infer: task id 1 in the mixture, so decoding must carry a
# non-zero task id for the multi-task methods.
PREDICT_TASK = synthetic.TASK_NAMES[1]
EVAL_METHODS = ("hyperprompt_sep",)
# Trained by t5x.train with its run file's packing (pretrain.gin: pack = True).
PACKED_METHODS = ("prompt_tuning", "smop", "hyperprompt_share")


# ----------------------------------------------------------------------------------------
# Running t5x's entry points in-process, exactly as `python -m t5x.<entry>` would
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5x_bridge")
    (root / "tiny.gin").write_text(TINY_GIN)
    source = np.random.RandomState(1).normal(size=(PROMPT_LENGTH, EMB_DIM)).astype(np.float32)
    np.save(root / "source_prompt.npy", source)
    return root


@pytest.fixture(scope="module", autouse=True)
def t5x_entry_points():
    """t5x's run files configure `__main__.train` / `evaluate` / `infer` (t5x's launchers
    run as `__main__`; t5x/main.py sets the same attributes)."""
    import t5x.eval
    import t5x.infer
    import t5x.train

    main = sys.modules["__main__"]
    entries = {"train": t5x.train.train, "evaluate": t5x.eval.evaluate, "infer": t5x.infer.infer}
    with pytest.MonkeyPatch.context() as patch:
        for name, fn in entries.items():
            patch.setattr(main, name, fn, raising=False)
        yield entries
    gin.clear_config()


def _parse(workdir, run_file: str, method: str, bindings: list[str], extra_files=()) -> None:
    gin.clear_config()
    t5x_gin_utils.parse_gin_flags(
        [T5X_SOURCE, gin_utils.PACKAGE_GIN_DIR],
        [SIZE_FILE, run_file, f"t5x/{method}.gin", *extra_files, str(workdir / "tiny.gin")],
        bindings,
    )


def _method_bindings(workdir, method: str) -> list[str]:
    bindings = list(METHODS[method][1])
    if method == "spot":
        bindings.append(f"SOURCE_PROMPT = '{workdir / 'source_prompt.npy'}'")
    return bindings


def _event_values(directory: str, tag: str) -> dict[int, float]:
    values = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def _flat(tree) -> dict[str, object]:
    tree = tree.unfreeze() if hasattr(tree, "unfreeze") else tree
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _is_method_param(path: str) -> bool:
    return path.split("/", 1)[0] in METHOD_ROOTS


class _Run:
    """One method trained by `t5x.train`, and what the checks need from it."""

    def __init__(self, workdir, method, entries, extra_gin_files=(), name=None, pack=False):
        self.method = method
        self.mixture = METHODS[method][0]
        self.pack = pack
        self.lengths = PACKED_LENGTHS if pack else LENGTHS
        self.model_dir = str(workdir / f"{name or method}{'_packed' if pack else ''}_model")
        # Packed: t5x's pretrain.gin packs the training data (nothing in the bridge's gin
        # files changes that); unpacked: the user's override.
        packing = [] if pack else ["train/utils.DatasetConfig.pack = False"]
        bindings = (
            _method_bindings(workdir, method)
            + packing
            + [
                f"MODEL_DIR = '{self.model_dir}'",
                f"MIXTURE_OR_TASK_NAME = '{self.mixture}'",
                f"TASK_FEATURE_LENGTHS = {self.lengths}",
                f"TRAIN_STEPS = {STEPS}",
                f"BATCH_SIZE = {BATCH}",
                "USE_CACHED_TASKS = False",
                "DROPOUT_RATE = 0.0",
                f"RANDOM_SEED = {SEED}",
                "SHUFFLE_TRAIN_EXAMPLES = False",
                "train/utils.DatasetConfig.seed = 0",
                # t5x logs the training loss once per "epoch"; with evaluation off an epoch
                # is the checkpoint period.
                "utils.SaveCheckpointConfig.period = 1",
                "train.train_eval_dataset_cfg = None",
            ]
        )
        _parse(workdir, "t5x/configs/runs/pretrain.gin", method, bindings, extra_gin_files)
        self.model = gin.query_parameter("%MODEL").scoped_configurable_fn()
        _, self.state = gin.get_configurable(entries["train"])()
        self.losses = _event_values(os.path.join(self.model_dir, "train"), "loss")
        # This package's recipe for the method, from the same gin config (the t5x file
        # includes gin/methods/<method>.gin, whose optim.* bindings the launcher uses).
        # (gin applies bindings when a configurable is called: build them now.)
        self.learning_rate_fn = gin.get_configurable(optim.create_learning_rate_scheduler)()
        self.optimizer = gin.get_configurable(optim.adafactor)(self.learning_rate_fn)
        self.trainable_patterns = gin.query_parameter("%TRAINABLE_PATTERNS")
        self.batches = self._batches()
        self.input_shapes = {k: v.shape for k, v in self.batches[0].items()}
        self.input_types = {k: v.dtype for k, v in self.batches[0].items()}
        # t5x.train: PRNGKey(RANDOM_SEED) split into (init, trainer) keys.
        init_rng = jax.random.split(jax.random.PRNGKey(SEED), 2)[0]
        self.initial_params = self.model.get_initial_variables(
            init_rng, self.input_shapes, self.input_types
        )["params"]
        self.hp_model = models.EncoderDecoderModel(
            module=self.model.module,
            input_vocabulary=self.model.input_vocabulary,
            output_vocabulary=self.model.output_vocabulary,
            z_loss=gin.query_parameter("%Z_LOSS"),
        )
        gin.clear_config()

    def _batches(self) -> list[dict[str, np.ndarray]]:
        """The batches t5x.train read (same DatasetConfig, same feature converter)."""
        cfg = t5x_utils.DatasetConfig(
            mixture_or_task_name=self.mixture,
            task_feature_lengths=self.lengths,
            split="train",
            batch_size=BATCH,
            shuffle=False,
            seed=0,
            use_cached=False,
            pack=self.pack,
        )
        ds = t5x_utils.get_dataset(cfg, 0, 1, self.model.FEATURE_CONVERTER_CLS)
        return [dict(b) for b in itertools.islice(ds.as_numpy_iterator(), STEPS)]


_RUNS: dict[tuple[str, bool], _Run] = {}


def _get_run(workdir, method, entries, pack=False) -> _Run:
    if (method, pack) not in _RUNS:
        _RUNS[method, pack] = _Run(workdir, method, entries, pack=pack)
    return _RUNS[method, pack]


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, workdir, t5x_entry_points):
    return _get_run(workdir, request.param, t5x_entry_points)


@pytest.fixture(scope="module", params=PACKED_METHODS)
def packed_run(request, workdir, t5x_entry_points):
    return _get_run(workdir, request.param, t5x_entry_points, pack=True)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def _reference_training(run: _Run):
    """This package's launcher step (trainer.Trainer) from t5x's initial parameters."""
    step = trainer.Trainer(
        model=run.hp_model,
        optimizer_def=lambda learning_rate_fn: run.optimizer,
        learning_rate_fn=run.learning_rate_fn,
        partitioner=partitioning.Partitioner(),
        input_shapes=run.input_shapes,
        trainable_patterns=run.trainable_patterns,
        seed=SEED,
        input_types=run.input_types,
    )
    state = step.init_state_from_params(jax.device_get(run.initial_params), "t5x init")
    losses = []
    for batch in run.batches:
        state, metrics = step.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


def _assert_t5x_training_equals_package_training(run: _Run) -> None:
    t5x_losses = [run.losses[s] for s in sorted(run.losses)]
    assert sorted(run.losses) == list(range(1, STEPS + 1)), run.losses
    ref_losses, ref_params = _reference_training(run)
    t5x_params = _flat(jax.device_get(run.state.params))
    ref_flat = _flat(ref_params)
    assert set(t5x_params) == set(ref_flat)
    if run.method.startswith("hyperprompt"):
        # Same first loss (same init and batch). Later steps differ slightly by design:
        # t5x's Adafactor scales and clips HyperPrompt's per-layer stacks ('layers' is a
        # BATCH factor axis in t5x) layer by layer; optim.adafactor per tensor.
        np.testing.assert_allclose(t5x_losses[0], ref_losses[0], rtol=1e-6)
        np.testing.assert_allclose(t5x_losses, ref_losses, rtol=2e-3)
        for name, value in t5x_params.items():
            np.testing.assert_allclose(value, ref_flat[name], atol=2e-3, err_msg=name)
    else:
        np.testing.assert_allclose(t5x_losses, ref_losses, rtol=1e-5)
        for name, value in t5x_params.items():
            np.testing.assert_allclose(value, ref_flat[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(t5x_losses[0], t5x_losses[-1]), "training did not move"


def test_t5x_train_equals_package_training(run):
    assert "encoder_segment_ids" not in run.batches[0]  # one example per row
    _assert_t5x_training_equals_package_training(run)


def test_t5x_train_with_packing_equals_package_training(packed_run):
    """t5x.train packs by default; the bridge trains on the packed rows (each example
    with its own task ids and prompt) exactly as this package's trainer does."""
    run = packed_run
    prompt_length = run.model.input_prompt_length
    assert prompt_length == {"prompt_tuning": PROMPT_LENGTH, "smop": 2}.get(run.method, 0)
    example_tasks = []
    for batch in run.batches:
        segments, positions = batch["encoder_segment_ids"], batch["encoder_positions"]
        assert (segments.max(axis=1) >= 3).all(), segments  # several examples per row
        # Prompt slots in front of every packed example's inputs, and only there.
        slots = (segments > 0) & (positions < prompt_length)
        np.testing.assert_array_equal(
            batch["encoder_input_tokens"] == packing.PROMPT_SLOT_ID, slots
        )
        for side in ("encoder", "decoder"):
            padding = batch[f"{side}_segment_ids"] == 0
            assert (batch[f"{side}_task_ids"][padding] == 0).all()
        # Every example has one task id, the same on its inputs and its targets.
        for row in range(BATCH):
            for segment in range(1, segments[row].max() + 1):
                tasks = {
                    int(task)
                    for side in ("encoder", "decoder")
                    for task in batch[f"{side}_task_ids"][row][
                        batch[f"{side}_segment_ids"][row] == segment
                    ]
                }
                assert len(tasks) == 1, (row, segment, tasks)
                example_tasks += tasks
    if run.method.startswith("hyperprompt"):
        assert len(set(example_tasks)) > 1, "the packed rows should mix tasks"
    _assert_t5x_training_equals_package_training(run)


def test_t5x_optimizer_state_for_every_method_parameter(run):
    params = _flat(jax.device_get(run.state.params))
    states = _flat(run.state.param_states)
    method_params = [p for p in params if _is_method_param(p)]
    assert method_params, "the method added no parameters"
    frozen = run.trainable_patterns is not None
    initial = _flat(jax.device_get(run.initial_params))
    for path in params:
        slots = {k: v for k, v in states.items() if k.startswith(path + "/") or k == path}
        has_state = any(v is not None for v in slots.values())
        if _is_method_param(path) or not frozen:
            assert has_state, f"no t5x optimizer state for {path}"
        else:
            assert not has_state, f"frozen {path} has optimizer state"
            # Unchanged (t5x's pjit-ed init may differ from ours in the last ulp).
            np.testing.assert_allclose(params[path], initial[path], atol=1e-6, err_msg=path)
    if run.method == "spot":  # the prompt started from the source prompt
        assert not np.allclose(params["prompt/prompt"], initial["prompt/prompt"])


def test_package_loads_the_checkpoints_t5x_train_wrote(run):
    """What `t5x.train` writes (its Orbax format, the default) loads in this package:
    `load_t5x_checkpoint`, the model directory as a checkpoint path (its newest
    checkpoint), and SPoT's prompt export, with parameters equal to t5x's state."""
    from hyperprompt_jax import spot

    step_dir = os.path.join(run.model_dir, f"checkpoint_{STEPS}")
    assert checkpoints.discovery.kind(step_dir) == checkpoints.discovery.T5X_ORBAX
    expected = _flat(jax.device_get(run.state.params))
    for path in (step_dir, run.model_dir):
        loaded = _flat(checkpoints.load_t5x_checkpoint(path))
        assert set(loaded) == set(expected), path
        for name, value in expected.items():
            np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), name)
    if "prompt/prompt" in expected:  # prompt tuning and SPoT: a SPoT source as it is
        got = spot.read_checkpoint_prompt(run.model_dir)
        assert got.step == STEPS
        np.testing.assert_array_equal(got.prompt, np.asarray(expected["prompt/prompt"]))


def test_bridge_logits_equal_package_model_and_use_task_ids(run):
    params = run.state.params
    batch = {k: jnp.asarray(v) for k, v in run.batches[0].items()}
    bridge = run.model._compute_logits(params, batch)
    ours = run.hp_model._compute_logits(params, batch)
    np.testing.assert_array_equal(np.asarray(bridge), np.asarray(ours))
    shifted = dict(batch, task_ids=(batch["task_ids"] + 1) % len(synthetic.TASK_NAMES))
    changed = not np.allclose(run.model._compute_logits(params, shifted), bridge)
    assert changed == run.method.startswith("hyperprompt"), "task ids not forwarded"
    scores = run.model.score_batch(params, batch)
    np.testing.assert_allclose(scores, run.hp_model.score_batch(params, batch), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Inference and evaluation
# ----------------------------------------------------------------------------------------


def _predict_bindings(run: _Run, workdir) -> list[str]:
    return _method_bindings(workdir, run.method) + [
        f"CHECKPOINT_PATH = '{run.model_dir}/checkpoint_{STEPS}'",
        f"MIXTURE_OR_TASK_NAME = '{PREDICT_TASK}'",
        f"TASK_FEATURE_LENGTHS = {LENGTHS}",
        "utils.DatasetConfig.split = 'validation'",
        "utils.DatasetConfig.batch_size = 64",
        "utils.RestoreCheckpointConfig.dtype = 'float32'",
        "DROPOUT_RATE = 0.0",
    ]


@functools.cache
def _package_predictions(run: _Run) -> tuple[list[str], list[str]]:
    """(predictions, targets) of this package's model on PREDICT_TASK's validation split."""
    ds = seqio.get_dataset(
        PREDICT_TASK,
        task_feature_lengths=LENGTHS,
        dataset_split="validation",
        shuffle=False,
        feature_converter=run.model.FEATURE_CONVERTER_CLS(pack=False),
        batch_size=64,
    )
    vocab = run.model.output_vocabulary
    predict = jax.jit(run.hp_model.predict_batch)
    predictions, targets = [], []
    for batch in ds.as_numpy_iterator():
        tokens = np.asarray(predict(run.state.params, batch))
        predictions += [vocab.decode(t.tolist()) for t in tokens]
        targets += [vocab.decode(t.tolist()) for t in batch["decoder_target_tokens"]]
    return predictions, targets


def test_t5x_infer_equals_package_decoding(run, workdir, t5x_entry_points):
    out = workdir / f"{run.method}_infer"
    _parse(
        workdir,
        "t5x/configs/runs/infer.gin",
        run.method,
        _predict_bindings(run, workdir) + [f"INFER_OUTPUT_DIR = '{out}'"],
    )
    gin.get_configurable(t5x_entry_points["infer"])()
    gin.clear_config()
    path = out / f"{PREDICT_TASK}-predict.jsonl-00000-of-00001"
    t5x_predictions = [json.loads(line)["prediction"] for line in open(path)]
    ours, _ = _package_predictions(run)
    assert t5x_predictions == ours

    if run.method in EVAL_METHODS:
        eval_dir = workdir / f"{run.method}_eval"
        _parse(
            workdir,
            "t5x/configs/runs/eval.gin",
            run.method,
            _predict_bindings(run, workdir) + [f"EVAL_OUTPUT_DIR = '{eval_dir}'"],
        )
        gin.get_configurable(t5x_entry_points["evaluate"])()
        gin.clear_config()
        (metrics_file,) = glob.glob(
            str(eval_dir / "inference_eval" / f"{PREDICT_TASK}-metrics.jsonl")
        )
        t5x_accuracy = json.loads(open(metrics_file).readlines()[-1])["accuracy"]
        predictions, targets = _package_predictions(run)
        ours_accuracy = 100.0 * np.mean([p == t for p, t in zip(predictions, targets, strict=True)])
        np.testing.assert_allclose(t5x_accuracy, ours_accuracy, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# This package's model and decoders in t5x's places
# ----------------------------------------------------------------------------------------

ADAPTER_METHOD = "hyperprompt_share"  # task ids, and every parameter trained


def test_package_decoders_as_t5x_decode_fn(workdir, t5x_entry_points):
    """t5x's model calls the decoders with its own arguments (cache_offset, eos_id, ...):
    this package's beam search / greedy sampling give t5x's decoders' results."""
    run = _get_run(workdir, ADAPTER_METHOD, t5x_entry_points)
    batch = {k: jnp.asarray(v) for k, v in run.batches[0].items()}

    def predict(decode_fn, **kwargs):
        model = copy.copy(run.model)
        model._decode_fn = decode_fn
        fn = jax.jit(functools.partial(model.predict_batch_with_aux, **kwargs))
        return jax.device_get(fn(run.state.params, batch))

    for ours, theirs, kwargs in (
        (decoding.beam_search, t5x_decoding.beam_search, {"num_decodes": 3}),
        (
            decoding.temperature_sample,
            t5x_decoding.temperature_sample,
            {"num_decodes": 1, "decoder_params": {"topk": 1}},
        ),
    ):
        tokens, aux = predict(ours, return_all_decodes=True, **kwargs)
        t5x_tokens, t5x_aux = predict(theirs, return_all_decodes=True, **kwargs)
        np.testing.assert_array_equal(tokens, t5x_tokens)
        if ours is decoding.beam_search:
            np.testing.assert_allclose(aux["scores"], t5x_aux["scores"], rtol=1e-5)


# (method, packed): one example per row, and packed rows with prompt slots.
ADAPTER_RUNS = ((ADAPTER_METHOD, False), ("smop", True))


@pytest.mark.parametrize("method,pack", ADAPTER_RUNS)
def test_package_model_as_t5x_model(workdir, t5x_entry_points, method, pack):
    """t5x.train with MODEL = this package's model (t5x/include/project_model.gin)
    trains exactly like the task-id bridge model (same data, init and optimizer), with
    and without t5x's packing."""
    bridge = _get_run(workdir, method, t5x_entry_points, pack=pack)
    adapted = _Run(
        workdir,
        method,
        t5x_entry_points,
        extra_gin_files=["t5x/include/project_model.gin"],
        name="adapter",
        pack=pack,
    )
    assert isinstance(adapted.model, t5x_bridge.ProjectModelAdapter)
    for ours, theirs in zip(adapted.batches, bridge.batches, strict=True):  # same rows
        assert set(ours) == set(theirs)
        for name, value in theirs.items():
            np.testing.assert_array_equal(ours[name], value, err_msg=name)
    np.testing.assert_allclose(
        [adapted.losses[s] for s in sorted(adapted.losses)],
        [bridge.losses[s] for s in sorted(bridge.losses)],
        rtol=1e-5,
    )
    ours, theirs = (
        _flat(jax.device_get(adapted.state.params)),
        _flat(jax.device_get(bridge.state.params)),
    )
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    accuracy = _event_values(os.path.join(adapted.model_dir, "train"), "accuracy")
    assert sorted(accuracy) == sorted(adapted.losses)  # clu metrics reached the summaries


# ----------------------------------------------------------------------------------------
# The documented command line
# ----------------------------------------------------------------------------------------

SHIM = """\
# The one shim t5x needs on current JAX (docs/t5x.md): jestimator imports PartitionSpec
# from jax.experimental.pjit, where JAX no longer defines it.
import jax.experimental.pjit, jax.sharding
jax.experimental.pjit.PartitionSpec = jax.sharding.PartitionSpec
"""


def test_python_m_t5x_train_command_line(workdir):
    """`python -m t5x.train` as in docs/t5x.md: t5x's small.gin and pretrain.gin, then
    gin/t5x/hyperprompt_share.gin, with the test's tiny size file after them."""
    shim = workdir / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    model_dir = workdir / "cli_model"
    gin_dir = subprocess.run(
        [sys.executable, "-m", "hyperprompt_jax.gin_utils", "--dir"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert gin_dir == gin_utils.PACKAGE_GIN_DIR
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(shim), *_T5X_PATHS, *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        sys.executable, "-m", "t5x.train",
        f"--gin_search_paths={T5X_SOURCE},{gin_dir}",
        "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
        "--gin_file=t5x/configs/runs/pretrain.gin",
        "--gin_file=t5x/hyperprompt_share.gin",
        f"--gin_file={workdir / 'tiny.gin'}",
        f"--gin.NUM_TASKS={len(synthetic.TASK_NAMES)}",
        f"--gin.MIXTURE_OR_TASK_NAME='{synthetic.MIXTURE_NAME}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.TRAIN_STEPS=2",
        f"--gin.BATCH_SIZE={BATCH}",
        "--gin.USE_CACHED_TASKS=False",
        "--gin.DROPOUT_RATE=0.1",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "checkpoint_2").is_dir()
    losses = _event_values(str(model_dir / "train"), "loss")
    assert sorted(losses) == [2] and np.isfinite(losses[2])
