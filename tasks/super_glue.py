"""SuperGLUE: `hp_super_glue_<name>_v102` tasks, WSC / DPR, and the proportional mixture.

As in the t5 library:

- boolq, cb, copa, multirc, record, rte, wic, axb, axg use the GLUE-style format
  (`boolq passage: ... question: ...`); MultiRC orders its fields question, answer,
  paragraph and WiC sentence1, sentence2, word; the diagnostics AX-b / AX-g are cast
  as RTE (AX-b's `sentence1/2` renamed to `premise/hypothesis`), test split only.
- ReCoRD becomes one example per answer; its metric keeps one copy per query.
- WSC is trained and evaluated in the "simple" format (`wsc: ... *he* ...` -> the
  referent): `hp_super_glue_wsc_v102_simple_train` keeps only correct referents of
  the train split, `..._simple_eval` scores validation / test with the `wsc_simple`
  postprocessor; `hp_dpr_v001_simple` adds the Definite Pronoun Resolution data.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow_datasets as tfds
from hyperprompt_jax.tasks import metrics, postprocessors, preprocessors
from hyperprompt_jax.tasks.specs import TaskSpec, register_mixture

SUPER_GLUE_TFDS_VERSION = "1.0.2"
DPR_TFDS_NAME = "definite_pronoun_resolution:1.1.0"

# The t5 library's mixing weights (training-set sizes); 0 = evaluation only.
SUPER_GLUE_WEIGHTS: dict[str, float] = {
    "dpr_v001_simple": 1_322.0,
    "super_glue_wsc_v102_simple_train": 259.0,
    "super_glue_wsc_v102_simple_eval": 0.0,
    "super_glue_boolq_v102": 9_427.0,
    "super_glue_cb_v102": 250.0,
    "super_glue_copa_v102": 400.0,
    "super_glue_multirc_v102": 27_243.0,
    "super_glue_record_v102": 138_854.0,
    "super_glue_rte_v102": 2_490.0,
    "super_glue_wic_v102": 5_428.0,
    "super_glue_axb_v102": 0.0,
    "super_glue_axg_v102": 0.0,
}

_METRICS = {
    "cb": (metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy),
    "multirc": (
        metrics.multirc_f1_over_all_answers,
        metrics.mean_group_metric(metrics.all_match),
    ),
    "record": (metrics.deduplicate_metric(metrics.squad),),
    "axb": (),  # Only a test split.
    "axg": (),
}
_FIELD_ORDER = {
    "multirc": ("question", "answer", "paragraph"),
    "wic": ("sentence1", "sentence2", "word"),
}


def _super_glue_spec(config: tfds.core.BuilderConfig) -> TaskSpec:
    name = config.name
    steps = []
    if name == "axb":
        steps.append(
            functools.partial(
                seqio.preprocessors.rekey,
                key_map={
                    "premise": "sentence1",
                    "hypothesis": "sentence2",
                    "label": "label",
                    "idx": "idx",
                },
            )
        )
    if name == "record":
        steps.append(preprocessors.record)
        postprocess_fn = postprocessors.record
    else:
        steps.append(
            functools.partial(
                preprocessors.glue,
                benchmark_name="rte" if name in ("axb", "axg") else name,
                label_names=config.label_classes,
                feature_names=_FIELD_ORDER.get(name),
            )
        )
        if name == "multirc":
            postprocess_fn = postprocessors.multirc
        else:
            postprocess_fn = functools.partial(
                postprocessors.string_label_to_class_id, label_classes=config.label_classes
            )
    return TaskSpec(
        name=f"hp_super_glue_{name}_v102",
        tfds_name=f"super_glue/{name}:{SUPER_GLUE_TFDS_VERSION}",
        text_preprocessors=tuple(steps),
        splits=("test",) if name in ("axb", "axg") else None,
        metric_fns=_METRICS.get(name, (metrics.accuracy,)),
        postprocess_fn=postprocess_fn,
    )


_WSC_TFDS_NAME = f"super_glue/wsc.fixed:{SUPER_GLUE_TFDS_VERSION}"

SUPER_GLUE_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in map(
        _super_glue_spec,
        # The plain WSC configs are replaced by the simple WSC tasks below.
        (c for c in tfds.builder_cls("super_glue").builder_configs.values() if "wsc" not in c.name),
    )
}
SUPER_GLUE_SPECS.update(
    {
        spec.name: spec
        for spec in (
            TaskSpec(
                name="hp_super_glue_wsc_v102_simple_train",
                tfds_name=_WSC_TFDS_NAME,
                text_preprocessors=(
                    functools.partial(preprocessors.wsc_simple, correct_referent_only=True),
                ),
                splits=("train",),
            ),
            TaskSpec(
                name="hp_super_glue_wsc_v102_simple_eval",
                tfds_name=_WSC_TFDS_NAME,
                text_preprocessors=(
                    functools.partial(preprocessors.wsc_simple, correct_referent_only=False),
                ),
                splits=("validation", "test"),
                metric_fns=(metrics.accuracy,),
                postprocess_fn=postprocessors.wsc_simple,
            ),
            TaskSpec(
                name="hp_dpr_v001_simple",
                tfds_name=DPR_TFDS_NAME,
                text_preprocessors=(preprocessors.definite_pronoun_resolution_simple,),
                metric_fns=(metrics.accuracy,),
            ),
        )
    }
)


def register() -> None:
    """Registers every SuperGLUE task and the t5 library's SuperGLUE mixtures."""
    for spec in SUPER_GLUE_SPECS.values():
        spec.register()
    register_mixture(
        "hp_super_glue_v102_proportional",
        [(f"hp_{name}", w) for name, w in SUPER_GLUE_WEIGHTS.items()],
    )
    wsc_dpr = (
        "dpr_v001_simple",
        "super_glue_wsc_v102_simple_train",
        "super_glue_wsc_v102_simple_eval",
    )
    register_mixture(
        "hp_wsc_dpr_simple_proportional", [(f"hp_{n}", SUPER_GLUE_WEIGHTS[n]) for n in wsc_dpr]
    )


register()
