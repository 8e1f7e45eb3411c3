"""A built-in synthetic multi-task mixture where the task decides what an input means.

Used by the quickstart (`gin/quickstart.gin`) and the launcher tests: no downloads,
byte vocabulary (`seqio.ByteVocabulary`), generated deterministically in memory.

Every task reads the *same* inputs, strings of `LENGTH` letters drawn from
`ALPHABET` (e.g. `"hbcfaegd"`), and answers with one letter:

| task id | task | answer for "hbcfaegd" |
|---:|---|---|
| 0 | `hp_synthetic_first` | `h` (first letter) |
| 1 | `hp_synthetic_last` | `d` (last letter) |
| 2 | `hp_synthetic_min` | `a` (alphabetically smallest) |
| 3 | `hp_synthetic_max` | `h` (alphabetically largest) |

The mixture `hp_synthetic_multitask` samples the four equally and every example
carries `task_id` (int32). Since the input text never names the task, a model without
task conditioning can at best guess which rule applies (the four answers agree only by
chance), while a task-conditioned model (HyperPrompt, multi-task prompts) can solve
all four. Metric: `accuracy` (exact match, percent).

The fair multi-task baseline (the HyperPrompt paper's, T5's convention) names the task
in the input text instead: `hp_synthetic_multitask_prefixed` mixes
`hp_synthetic_<name>_prefixed`, whose inputs are `"<name>: <letters>"` (e.g.
`"first: hbcfaegd"`, at most `PREFIXED_INPUT_LENGTH` bytes with EOS), same targets,
same task ids (`gin/quickstart_prefix_baseline.gin`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import seqio
import tensorflow as tf
from hyperprompt_jax.tasks import metrics as hp_metrics

ALPHABET = "abcdefgh"
LENGTH = 8
NUM_EXAMPLES = {"train": 20000, "validation": 256, "test": 256}
# Distinct seeds per split so validation strings are (almost surely) unseen in training.
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
MIXTURE_NAME = "hp_synthetic_multitask"
PREFIXED_MIXTURE_NAME = "hp_synthetic_multitask_prefixed"

# name -> rule; the order fixes the task ids.
RULES: Mapping[str, Callable[[str], str]] = {
    "first": lambda s: s[0],
    "last": lambda s: s[-1],
    "min": min,
    "max": max,
}
TASK_NAMES = tuple(f"hp_synthetic_{name}" for name in RULES)
PREFIXED_TASK_NAMES = tuple(f"hp_synthetic_{name}_prefixed" for name in RULES)
# Longest prefixed input in bytes, EOS included: "first: " + LENGTH letters + EOS.
PREFIXED_INPUT_LENGTH = max(len(name) for name in RULES) + 2 + LENGTH + 1

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    # Declared so the mixture keeps it; never tokenized (size-0 pass-through vocabulary).
    "task_id": seqio.Feature(
        vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.int32, rank=0
    ),
}


def make_inputs(split: str) -> list[str]:
    """The split's input strings (identical for every task)."""
    if split not in NUM_EXAMPLES:
        raise ValueError(f"Unknown split {split!r}; expected one of {sorted(NUM_EXAMPLES)}.")
    rng = np.random.RandomState(_SPLIT_SEEDS[split])
    letters = rng.randint(0, len(ALPHABET), size=(NUM_EXAMPLES[split], LENGTH))
    return ["".join(ALPHABET[i] for i in row) for row in letters]


def _dataset_fn(rule: Callable[[str], str], task_id: int, prefix: str = ""):
    def dataset_fn(
        split: str, shuffle_files: bool = False, seed: int | None = None
    ) -> tf.data.Dataset:
        del shuffle_files, seed  # One in-memory "file"; seqio shuffles examples.
        inputs = make_inputs(split)
        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": [prefix + s for s in inputs],
                "targets": [rule(s) for s in inputs],
                "task_id": np.full(len(inputs), task_id, np.int32),
            }
        )

    return dataset_fn


def _decode(text: str, **unused_kwargs) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


def register() -> None:
    """Registers the four tasks, their task-name-prefixed copies and both mixtures
    (idempotent)."""
    tasks = [
        (task_name, rule, task_id, prefix)
        for names, with_prefix in ((TASK_NAMES, False), (PREFIXED_TASK_NAMES, True))
        for task_id, (task_name, (rule_name, rule)) in enumerate(
            zip(names, RULES.items(), strict=True)
        )
        for prefix in [f"{rule_name}: " if with_prefix else ""]
    ]
    for task_name, rule, task_id, prefix in tasks:
        if task_name in seqio.TaskRegistry.names():
            continue
        seqio.TaskRegistry.add(
            task_name,
            source=seqio.FunctionDataSource(
                _dataset_fn(rule, task_id, prefix),
                splits=tuple(NUM_EXAMPLES),
                num_input_examples=NUM_EXAMPLES,
            ),
            preprocessors=[
                seqio.preprocessors.tokenize,
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            postprocess_fn=_decode,
            output_features=OUTPUT_FEATURES,
            metric_fns=[hp_metrics.accuracy],
        )
    for mixture, names in (
        (MIXTURE_NAME, TASK_NAMES),
        (PREFIXED_MIXTURE_NAME, PREFIXED_TASK_NAMES),
    ):
        if mixture not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(mixture, [(name, 1.0) for name in names])


register()
