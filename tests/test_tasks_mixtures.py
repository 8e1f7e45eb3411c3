"""Every task and mixture on mocked TFDS data; task ids; mixing rates; the converter.

`tasks.testing.mock_tfds` writes split metadata for the real TFDS builders and
serves random examples generated from their feature specs, so each registered
pipeline (text format, tokenization, EOS, task ids, mixing) runs without data.
"""

from __future__ import annotations

import collections

import hyperprompt_jax.tasks  # noqa: F401  (registers the tasks)
import numpy as np
import pytest
import seqio
import tensorflow as tf
from hyperprompt_jax.tasks import glue, mixtures, spot, super_glue, testing
from hyperprompt_jax.tasks.sources import PreparedTfdsSource

import gin
from hyperprompt_jax.feature_converters import EncDecTaskIdFeatureConverter

LENGTHS = {"inputs": 32, "targets": 8}
# Split sizes in the mock metadata (what example-count rates see); default 100.
NUM_EXAMPLES = {"c4/en": 10_000_000, "glue/rte": 2_490, "super_glue/boolq": 9_427, "snli": 550_152}


def _tfds_names(registry) -> list[str]:
    names = []
    for name in registry.names():
        if not name.startswith("hp_"):
            continue
        provider = registry.get(name)
        tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
        if all(isinstance(t.source, PreparedTfdsSource) for t in tasks):
            names.append(name)
    return sorted(names)


TASKS = _tfds_names(seqio.TaskRegistry)
MIXTURES = _tfds_names(seqio.MixtureRegistry)


@pytest.fixture(scope="module")
def mocked(fixtures, tmp_path_factory):
    vocab_file = fixtures / "t5_vocab" / "sentencepiece.model"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERPROMPT_VOCAB", str(vocab_file))
        data_dir = str(tmp_path_factory.mktemp("tfds"))
        with testing.mock_tfds(TASKS, data_dir, num_examples=NUM_EXAMPLES, num_random_examples=3):
            yield


def _first_split(task: seqio.Task) -> str:
    return "train" if "train" in task.splits else sorted(task.splits)[0]


def test_registry_has_every_benchmark_task():
    glue_names = {f"hp_glue_{n}_v002" for n in (
        "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched",
        "qnli", "rte", "wnli", "ax")}  # fmt: skip
    super_glue_names = {f"hp_super_glue_{n}_v102" for n in (
        "boolq", "cb", "copa", "multirc", "record", "rte", "wic", "axb", "axg")}  # fmt: skip
    super_glue_names |= {
        "hp_super_glue_wsc_v102_simple_train",
        "hp_super_glue_wsc_v102_simple_eval",
    }
    assert glue_names | super_glue_names | {"hp_dpr_v001_simple"} <= set(TASKS)
    assert set(spot.SPOT_SOURCES.values()) <= set(TASKS) | set(MIXTURES)
    assert len(spot.mix_members()) == len(set(spot.mix_members())) == 53  # C4 + 52 labelled


def test_every_task_produces_examples(mocked):
    # The `_task_id` copies run the same pipeline plus `add_task_id`; they are read in
    # test_task_ids_follow_documented_order.
    for name in (n for n in TASKS if not n.endswith("_task_id")):
        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(LENGTHS, split=_first_split(task), shuffle=False, num_epochs=1)
        example = next(ds.as_numpy_iterator(), None)
        assert example is not None, f"{name} produced no example"
        for feature in ("inputs", "targets"):
            tokens = example[feature]
            assert tokens.dtype == np.int32 and 1 <= len(tokens) <= LENGTHS[feature], (
                name,
                feature,
            )
            assert tokens[-1] == 1, (name, feature)  # EOS after trimming


def test_every_mixture_produces_batches(mocked):
    for name in MIXTURES:
        ds = seqio.get_mixture_or_task(name).get_dataset(
            LENGTHS, split="train", shuffle=False, num_epochs=None
        )
        batch = next(ds.padded_batch(4).as_numpy_iterator())
        assert batch["inputs"].shape[0] == 4 and batch["inputs"].shape[1] <= LENGTHS["inputs"], name
        assert ("task_id" in batch) == name.endswith("_multitask"), name


@pytest.mark.parametrize("mixture", ["hp_glue_v002_multitask", "hp_super_glue_v102_multitask"])
def test_multitask_batches_carry_task_ids(mocked, mixture):
    ds = seqio.get_dataset(
        mixture, LENGTHS, dataset_split="train", shuffle=False, num_epochs=None,
        feature_converter=EncDecTaskIdFeatureConverter(num_tasks=8), batch_size=16,
    )  # fmt: skip
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (16, LENGTHS["inputs"])
    assert batch["task_ids"].shape == (16,) and batch["task_ids"].dtype == np.int32
    assert batch["task_ids"].min() >= 0 and batch["task_ids"].max() < 8
    assert len(set(batch["task_ids"])) > 1  # several tasks in one batch


@pytest.mark.parametrize(
    "mixture,order,members",
    [
        ("hp_glue_v002_multitask", mixtures.GLUE_TASK_ORDER, mixtures.GLUE_MEMBERS),
        (
            "hp_super_glue_v102_multitask",
            mixtures.SUPER_GLUE_TASK_ORDER,
            mixtures.SUPER_GLUE_MEMBERS,
        ),
    ],
)
def test_task_ids_follow_documented_order(mocked, mixture, order, members):
    assert mixtures.task_order(mixture) == order
    documented = {
        "hp_glue_v002_multitask": ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"),
        "hp_super_glue_v102_multitask": ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"),
    }  # fmt: skip
    assert order == documented[mixture]
    mix = seqio.get_mixture_or_task(mixture)
    assert {t.name for t in mix.tasks} == {f"hp_{m}_task_id" for m in members}
    for member, key in members.items():
        task = seqio.get_mixture_or_task(f"hp_{member}_task_id")
        example = next(
            task.get_dataset(LENGTHS, split=_first_split(task), shuffle=False).as_numpy_iterator()
        )
        assert example["task_id"] == order.index(key), member
        assert example["task_id"].dtype == np.int32


def test_proportional_rates_are_t5_weights():
    for mixture, weights in (
        ("hp_glue_v002_proportional", glue.GLUE_WEIGHTS),
        ("hp_super_glue_v102_proportional", super_glue.SUPER_GLUE_WEIGHTS),
    ):
        mix = seqio.get_mixture_or_task(mixture)
        rates = {t.name: mix.get_rate(t) for t in mix.tasks}
        assert rates == {f"hp_{name}": w for name, w in weights.items()}
    assert glue.GLUE_WEIGHTS["glue_mnli_v002"] == 392_702 and glue.GLUE_WEIGHTS["glue_ax_v002"] == 0
    assert super_glue.SUPER_GLUE_WEIGHTS["super_glue_record_v102"] == 138_854


def test_multitask_rates_use_temperature():
    mix = seqio.get_mixture_or_task("hp_glue_v002_multitask")
    by_member = {t.name: t for t in mix.tasks}
    qqp, rte = by_member["hp_glue_qqp_v002_task_id"], by_member["hp_glue_rte_v002_task_id"]
    assert mix.get_rate(qqp) == 363_849 and mix.get_rate(rte) == 2_490  # T = 1: proportional
    with gin.unlock_config():
        gin.bind_parameter(
            "temperature_test/hyperprompt_jax.tasks.mixture_temperature.temperature", 2.0
        )
    with gin.config_scope("temperature_test"):
        assert mix.get_rate(qqp) == pytest.approx(363_849**0.5)
        assert mix.get_rate(rte) == pytest.approx(2_490**0.5)
        assert mix.get_rate(by_member["hp_glue_mnli_matched_v002_task_id"]) == 0.0  # eval only
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mixtures.mixture_temperature(0.0)


def test_sampling_frequencies_match_rates(mocked):
    """Examples drawn from the mixture follow the rates (T = 4), counted by task id."""
    with gin.unlock_config():
        gin.bind_parameter(
            "sampling_test/hyperprompt_jax.tasks.mixture_temperature.temperature", 4.0
        )
    num_samples = 3000
    with gin.config_scope("sampling_test"):
        mix = seqio.get_mixture_or_task("hp_glue_v002_multitask")
        train_tasks = [t for t in mix.tasks if "train" in t.splits]
        rates = collections.Counter()
        for task in train_tasks:
            rates[mixtures.task_id(task.name)] += mix.get_rate(task)
        ds = mix.get_dataset(LENGTHS, split="train", shuffle=False, seed=0)
        ids = np.array([ex["task_id"] for ex in ds.take(num_samples).as_numpy_iterator()])
    total = sum(rates.values())
    for task_id, rate in rates.items():
        p = rate / total
        frequency = np.mean(ids == task_id)
        assert abs(frequency - p) < 5 * np.sqrt(p * (1 - p) / num_samples), (task_id, frequency, p)


def test_spot_mix_rates_are_capped_example_counts(mocked):
    mix = seqio.get_mixture_or_task("hp_spot_mix")
    by_name = {t.name: t for t in mix.tasks}
    assert set(by_name) == set(spot.mix_members())
    assert mix.get_rate(by_name["hp_c4_v220_prefix_lm"]) == 2**19  # 10M capped at K
    assert mix.get_rate(by_name["hp_spot_snli"]) == 2**19  # 550,152 capped
    assert mix.get_rate(by_name["hp_glue_rte_v002"]) == 2_490
    assert mix.get_rate(by_name["hp_super_glue_boolq_v102"]) == 9_427
    assert mix.get_rate(by_name["hp_spot_piqa"]) == 100  # mock_tfds default split size
    with gin.unlock_config():
        gin.bind_parameter("cap_test/hyperprompt_jax.tasks.spot_mix_maximum.maximum", 5_000)
    with gin.config_scope("cap_test"):
        assert mix.get_rate(by_name["hp_super_glue_boolq_v102"]) == 5_000
        assert mix.get_rate(by_name["hp_glue_rte_v002"]) == 2_490


# ------------------------------------------------------------------ feature converter


def _examples(with_task_id: bool) -> tf.data.Dataset:
    rows = [([7, 8, 1], [3, 1], 3), ([9, 1], [4, 5, 1], 0)]
    data = {
        "inputs": tf.ragged.constant([r[0] for r in rows], dtype=tf.int32),
        "targets": tf.ragged.constant([r[1] for r in rows], dtype=tf.int32),
    }
    if with_task_id:
        data["task_id"] = tf.constant([r[2] for r in rows], tf.int32)
    return tf.data.Dataset.from_tensor_slices(data).map(
        lambda ex: {
            k: v.to_tensor() if isinstance(v, tf.RaggedTensor) else v for k, v in ex.items()
        }
    )


def _convert(converter, ds) -> dict[str, np.ndarray]:
    return next(converter(ds, {"inputs": 5, "targets": 4}).batch(2).as_numpy_iterator())


def test_converter_passes_task_ids_and_matches_seqio_features():
    batch = _convert(EncDecTaskIdFeatureConverter(), _examples(with_task_id=True))
    np.testing.assert_array_equal(batch["task_ids"], [3, 0])
    np.testing.assert_array_equal(batch["encoder_input_tokens"], [[7, 8, 1, 0, 0], [9, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_target_tokens"], [[3, 1, 0, 0], [4, 5, 1, 0]])
    # Targets shifted right by one behind BOS (id 0), EOS included.
    np.testing.assert_array_equal(batch["decoder_input_tokens"], [[0, 3, 1, 0], [0, 4, 5, 1]])
    np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    reference = _convert(seqio.EncDecFeatureConverter(pack=False), _examples(with_task_id=True))
    assert set(batch) == set(reference) | {"task_ids"}
    for key, value in reference.items():
        np.testing.assert_array_equal(batch[key], value)


def test_converter_without_task_ids_uses_default_or_fails_clearly():
    np.testing.assert_array_equal(
        _convert(EncDecTaskIdFeatureConverter(), _examples(False))["task_ids"], [0, 0]
    )
    np.testing.assert_array_equal(
        _convert(EncDecTaskIdFeatureConverter(default_task_id=2, num_tasks=4), _examples(False))[
            "task_ids"
        ],
        [2, 2],
    )
    with pytest.raises(ValueError, match="has no 'task_id' feature and default_task_id is None"):
        _convert(EncDecTaskIdFeatureConverter(default_task_id=None), _examples(False))
    with pytest.raises(ValueError, match="default_task_id must be a non-negative int"):
        EncDecTaskIdFeatureConverter(default_task_id=-1)


def test_converter_packing():
    """Packed rows keep seqio's packing and give every position its example's task id
    (tasks 3 and 0 share a row; 0 on padding; a task without ids gets the default)."""

    def packed(converter, ds):
        rows = converter(ds, {"inputs": 8, "targets": 8}).batch(1).as_numpy_iterator()
        return next(rows)

    reference = packed(seqio.EncDecFeatureConverter(pack=True), _examples(False))
    batch = packed(EncDecTaskIdFeatureConverter(pack=True), _examples(with_task_id=True))
    assert "task_ids" not in batch
    assert set(batch) == set(reference) | {"encoder_task_ids", "decoder_task_ids"}
    for key, value in reference.items():
        np.testing.assert_array_equal(batch[key], value)
    np.testing.assert_array_equal(batch["encoder_segment_ids"], [[1, 1, 1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["encoder_task_ids"], [[3, 3, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["decoder_task_ids"], [[3, 3, 0, 0, 0, 0, 0, 0]])
    default = packed(EncDecTaskIdFeatureConverter(pack=True, default_task_id=2), _examples(False))
    np.testing.assert_array_equal(default["encoder_task_ids"], [[2, 2, 2, 2, 2, 0, 0, 0]])


def test_converter_checks_task_id_range():
    converter = EncDecTaskIdFeatureConverter(num_tasks=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="task_id must be < num_tasks=3"):
        _convert(converter, _examples(with_task_id=True))  # task id 3 is out of range


def test_model_input_shapes():
    converter = EncDecTaskIdFeatureConverter()
    shapes = converter.model_input_shapes({"inputs": 16, "targets": 4}, batch_size=8)
    assert shapes == {
        "encoder_input_tokens": (8, 16),
        "decoder_target_tokens": (8, 4),
        "decoder_input_tokens": (8, 4),
        "decoder_loss_weights": (8, 4),
        "task_ids": (8,),
    }
