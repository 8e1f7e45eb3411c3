"""The quickstart's fair baseline data: task-name-prefixed copies of the synthetic tasks.

`hp_synthetic_<name>_prefixed` must hold exactly the examples of `hp_synthetic_<name>`
with `"<name>: "` in front of the input (T5's convention for naming the task), same
targets and task ids, within the feature length `quickstart_prefix_baseline.gin` sets.
"""

from __future__ import annotations

import seqio
from hyperprompt_jax.tasks import synthetic


def _examples(task: str, length: int):
    ds = seqio.get_mixture_or_task(task).get_dataset(
        {"inputs": length, "targets": 2}, split="validation", shuffle=False
    )
    return [
        (
            ex["inputs_pretokenized"].decode(),
            ex["inputs"],
            ex["targets_pretokenized"].decode(),
            int(ex["task_id"]),
        )
        for ex in ds.take(32).as_numpy_iterator()
    ]


def test_prefixed_tasks_name_the_task_and_keep_everything_else():
    mixture = seqio.get_mixture_or_task(synthetic.PREFIXED_MIXTURE_NAME)
    assert sorted(t.name for t in mixture.tasks) == sorted(synthetic.PREFIXED_TASK_NAMES)
    for rule, plain_name, prefixed_name in zip(
        synthetic.RULES, synthetic.TASK_NAMES, synthetic.PREFIXED_TASK_NAMES, strict=True
    ):
        plain = _examples(plain_name, synthetic.LENGTH + 1)
        prefixed = _examples(prefixed_name, synthetic.PREFIXED_INPUT_LENGTH)
        for (text, _, target, task_id), (p_text, p_ids, p_target, p_id) in zip(
            plain, prefixed, strict=True
        ):
            assert p_text == f"{rule}: {text}"
            assert (p_target, p_id) == (target, task_id)
            assert p_ids[-1] == 1 and len(p_ids) <= synthetic.PREFIXED_INPUT_LENGTH  # EOS kept
    assert synthetic.PREFIXED_INPUT_LENGTH == 16  # = quickstart_prefix_baseline.gin's inputs


def test_prefix_baseline_gin_is_the_quickstart_without_hyperprompt():
    import gin
    from hyperprompt_jax import gin_utils

    try:
        gin_utils.parse_gin(["quickstart_prefix_baseline.gin"], finalize=False)
        lengths = gin_utils.query_macro("TASK_FEATURE_LENGTHS")
        assert lengths["inputs"] == synthetic.PREFIXED_INPUT_LENGTH
        assert gin_utils.query_macro("MIXTURE_OR_TASK_NAME") == synthetic.PREFIXED_MIXTURE_NAME
        assert gin.query_parameter("network.Transformer.hyperprompt") is None
        assert gin_utils.query_macro("TRAIN_STEPS") == 2000  # as quickstart.gin
    finally:
        gin.clear_config()
