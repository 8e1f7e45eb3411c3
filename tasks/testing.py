"""Run the registered tasks on fake TFDS data: no download, real builders and metadata.

`mock_tfds(names, data_dir)` writes split metadata (`dataset_info.json`) for every
TFDS dataset the named tasks / mixtures read, so seqio sees real split names and
example counts (mixture rates work), and then serves examples through
`tfds.testing.mock_data(policy=USE_FILES)`: random examples generated from each real
builder's feature spec, or hand-written ones (`examples={"glue/rte": [...]}`; missing
fields are filled with empty values). WSC and DPR get small valid defaults, because
random text cannot satisfy their span indices.

Used by the tests; also useful to smoke-test a training configuration offline.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

# Real split names where they differ from train / validation / test (keyed by the
# TFDS name without version).
_SPLITS: dict[str, tuple[str, ...]] = {
    "glue/mnli": (
        "train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched",
    ),
    "glue/mnli_matched": ("validation", "test"),
    "glue/mnli_mismatched": ("validation", "test"),
    "glue/ax": ("test",),
    "super_glue/axb": ("test",),
    "super_glue/axg": ("test",),
    "c4/en": ("train", "validation"),
    "squad/v1.1": ("train", "validation"),
    "definite_pronoun_resolution": ("train", "test"),
    "winogrande": ("train_xs", "train_s", "train_m", "train_l", "train_xl", "validation", "test"),
    "sentiment140": ("train", "test"),
    "yelp_polarity_reviews": ("train", "test"),
    "imdb_reviews/plain_text": ("train", "test", "unsupervised"),
    "piqa": ("train", "validation"),
}  # fmt: skip
_DEFAULT_SPLITS = ("train", "validation", "test")

# Valid examples for datasets whose preprocessing asserts consistency of spans.
DEFAULT_EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "super_glue/wsc.fixed": [
        {
            "text": "Mitchell asked Tom if he could lend some money .",
            "span1_text": "Tom", "span1_index": 2, "span2_text": "he", "span2_index": 4,
            "label": 1, "idx": 0,
        },
        {
            "text": "The trophy does not fit into the suitcase because it is too large .",
            "span1_text": "the suitcase", "span1_index": 6, "span2_text": "it",
            "span2_index": 9, "label": 0, "idx": 1,
        },
        {
            "text": "The city councilmen refused the demonstrators a permit because they feared violence .",
            "span1_text": "The city councilmen", "span1_index": 0, "span2_text": "they",
            "span2_index": 9, "label": 1, "idx": 2,
        },
    ],
    "definite_pronoun_resolution": [
        {
            "sentence": "Bob asked Tom if he can lend some money.",
            "pronoun": "he", "candidates": ["Bob", "Tom"], "label": 1,
        },
        {
            "sentence": "The cat chased the mouse because it was hungry.",
            "pronoun": "it", "candidates": ["The cat", "the mouse"], "label": 0,
        },
    ],
}  # fmt: skip


def _unversioned(tfds_name: str) -> str:
    return tfds_name.split(":")[0]


def tfds_names(provider_names: Iterable[str]) -> list[str]:
    """The versioned TFDS names read by the given tasks / mixtures (sorted, unique)."""
    names = set()
    for provider_name in provider_names:
        provider = seqio.get_mixture_or_task(provider_name)
        tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
        # Tasks that do not read TFDS (e.g. the synthetic quickstart tasks) need no mock.
        names.update(
            task.source.tfds_dataset.name
            for task in tasks
            if isinstance(task.source, seqio.TfdsDataSource)
        )
    return sorted(names)


def write_mock_metadata(
    names: Iterable[str],
    data_dir: str,
    num_examples: int | Mapping[str, int] = 100,
    splits: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Writes `dataset_info.json` with split sizes, as if the datasets were prepared.

    Args:
      names: versioned TFDS names (`"glue/rte:2.0.0"`).
      data_dir: TFDS data directory to write into.
      num_examples: examples per split, or per unversioned TFDS name (default 100).
      splits: split names per unversioned TFDS name (default: the real ones).
    """
    for name in names:
        key = _unversioned(name)
        count = num_examples if isinstance(num_examples, int) else num_examples.get(key, 100)
        split_names = (splits or {}).get(key) or _SPLITS.get(key, _DEFAULT_SPLITS)
        builder = tfds.builder(name, data_dir=data_dir)
        builder.info.set_splits(
            tfds.core.SplitDict(
                [
                    tfds.core.SplitInfo(name=s, shard_lengths=[count], num_bytes=0)
                    for s in split_names
                ]
            )
        )
        builder.data_path.mkdir(parents=True, exist_ok=True)
        builder.info.write_to_directory(builder.data_path)


def _empty_like(spec: Any) -> Any:
    if isinstance(spec, Mapping):
        return {k: _empty_like(v) for k, v in spec.items()}
    shape = [0 if d is None else d for d in spec.shape]
    if spec.dtype == tf.string:
        return np.full(shape, b"", dtype=object) if shape else b""
    return np.zeros(shape, dtype=spec.dtype.as_numpy_dtype)


def _complete(example: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fills features missing from a hand-written example with empty values."""
    full = {}
    for key, sub_spec in spec.items():
        if key not in example:
            full[key] = _empty_like(sub_spec)
        elif isinstance(sub_spec, Mapping):
            full[key] = _complete(example[key], sub_spec)
        else:
            full[key] = example[key]
    return full


def _builder_key(builder: tfds.core.DatasetBuilder) -> str:
    config = builder.builder_config
    return f"{builder.name}/{config.name}" if config is not None else builder.name


def _dataset_fn(examples: Mapping[str, Sequence[Mapping[str, Any]]], num_random: int):
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del split, decoders, read_config, shuffle_files  # Every split gets the same data.
        # Dense specs (as tfds' own mock uses): nested sequences are rectangular here.
        spec = tf.nest.map_structure(
            lambda info: tf.TensorSpec(info.shape, info.dtype), self.info.features.get_tensor_info()
        )
        key = _builder_key(self)
        if key in examples:
            rows = [_complete(ex, spec) for ex in examples[key]]
            return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec)
        generator = mocking.RandomFakeGenerator(
            self.info.features, num_examples=num_random, seed=zlib.crc32(key.encode())
        )
        return tf.data.Dataset.from_generator(lambda: iter(generator), output_signature=spec)

    return as_dataset


def clear_builder_cache() -> None:
    """Forgets TFDS builders seqio memoized (they remember their data_dir)."""
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()  # noqa: SLF001


@contextlib.contextmanager
def mock_tfds(
    provider_names: Iterable[str],
    data_dir: str,
    num_examples: int | Mapping[str, int] = 100,
    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    num_random_examples: int = 4,
) -> Iterator[None]:
    """Serves fake data to the named tasks / mixtures through the real TFDS builders.

    Args:
      provider_names: registered tasks or mixtures that will be read.
      data_dir: an empty directory for the metadata.
      num_examples: split sizes written to the metadata (what mixture rates see).
      examples: hand-written examples per unversioned TFDS name (`"glue/rte"`).
      num_random_examples: random examples served for each other dataset and split.

    Yields:
      Nothing; inside the context `task.get_dataset(...)` reads the fake data.
    """
    write_mock_metadata(tfds_names(provider_names), data_dir, num_examples)
    all_examples = {**DEFAULT_EXAMPLES, **(examples or {})}
    clear_builder_cache()
    try:
        with tfds.testing.mock_data(
            policy=tfds.testing.MockPolicy.USE_FILES,
            data_dir=data_dir,
            as_dataset_fn=_dataset_fn(all_examples, num_random_examples),
        ):
            yield
    finally:
        clear_builder_cache()
