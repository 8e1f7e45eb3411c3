"""GLUE: `hp_glue_<name>_v002` tasks and `hp_glue_v002_proportional`.

One task per TFDS `glue` config, with the t5 library's text format, postprocessor
and metrics (names keep the t5 library's `v002`):

| task | text (first word, fields) | metrics |
|---|---|---|
| cola, sst2 | `cola sentence: ...` | Matthews corr. / accuracy |
| mrpc, qqp | `mrpc sentence1: ... sentence2: ...` | F1, accuracy |
| stsb | `stsb sentence1: ... sentence2: ...` -> `"3.4"` | Pearson, Spearman |
| mnli (+ matched, mismatched), ax | `mnli hypothesis: ... premise: ...` | accuracy (ax: none, test only) |
| qnli, rte, wnli | `qnli question: ... sentence: ...` | accuracy |

Labels are TFDS's class names, so WNLI's targets follow its own order
(`not_entailment`, `entailment`), the reverse of RTE's.
"""

from __future__ import annotations

import functools

import tensorflow_datasets as tfds
from hyperprompt_jax.tasks import metrics, postprocessors, preprocessors
from hyperprompt_jax.tasks.specs import TaskSpec, register_mixture

GLUE_TFDS_VERSION = "2.0.0"

# The t5 library's mixing weights (training-set sizes); 0 = evaluation only.
# WNLI is left out, as in the t5 library (it is trained through WSC / DPR instead).
GLUE_WEIGHTS: dict[str, float] = {
    "glue_cola_v002": 8_551.0,
    "glue_sst2_v002": 67_349.0,
    "glue_mrpc_v002": 3_668.0,
    "glue_qqp_v002": 363_849.0,
    "glue_stsb_v002": 5_749.0,
    "glue_mnli_v002": 392_702.0,
    "glue_qnli_v002": 104_743.0,
    "glue_rte_v002": 2_490.0,
    "glue_mnli_mismatched_v002": 0.0,
    "glue_mnli_matched_v002": 0.0,
    "glue_ax_v002": 0.0,
}

_METRICS = {
    "cola": (metrics.matthews_corrcoef,),
    "sst2": (metrics.accuracy,),
    "mrpc": (metrics.f1_score_with_invalid, metrics.accuracy),
    "qqp": (metrics.f1_score_with_invalid, metrics.accuracy),
    "stsb": (metrics.pearson_corrcoef, metrics.spearman_corrcoef),
    "ax": (),  # Only a test split.
}


def _glue_spec(config: tfds.core.BuilderConfig) -> TaskSpec:
    name = config.name
    if name == "stsb":
        text_preprocessor = preprocessors.stsb
        postprocess_fn = postprocessors.string_to_float
    else:
        # The MNLI dev sets and the diagnostic set are cast as MNLI.
        benchmark = "mnli" if ("mnli" in name or name == "ax") else name
        text_preprocessor = functools.partial(
            preprocessors.glue, benchmark_name=benchmark, label_names=config.label_classes
        )
        postprocess_fn = functools.partial(
            postprocessors.string_label_to_class_id, label_classes=config.label_classes
        )
    return TaskSpec(
        name=f"hp_glue_{name}_v002",
        tfds_name=f"glue/{name}:{GLUE_TFDS_VERSION}",
        text_preprocessors=(text_preprocessor,),
        splits=("test",) if name == "ax" else None,
        metric_fns=_METRICS.get(name, (metrics.accuracy,)),
        postprocess_fn=postprocess_fn,
    )


GLUE_SPECS: dict[str, TaskSpec] = {
    spec.name: spec for spec in map(_glue_spec, tfds.builder_cls("glue").builder_configs.values())
}


def register() -> None:
    """Registers every GLUE task and the t5 library's GLUE mixtures."""
    for spec in GLUE_SPECS.values():
        spec.register()
    register_mixture(
        "hp_glue_v002_proportional", [(f"hp_{name}", w) for name, w in GLUE_WEIGHTS.items()]
    )
    register_mixture(
        "hp_glue_mnli_and_dev_v002",
        [f"hp_{name}" for name in GLUE_WEIGHTS if "mnli" in name],
        default_rate=1.0,
    )


register()
