"""SPoT source tasks: C4 prefix LM, SQuAD, the labelled source datasets and MIX.

SPoT (Vu et al., 2022) trains a source prompt on one of: C4 with the prefix-LM
objective, MNLI, SQuAD, the GLUE or SuperGLUE mixture, a family mixture (NLI,
paraphrase / similarity, sentiment, MRQA, RAINBOW, translation, summarisation, GEM),
or MIX, C4 plus all labelled source datasets. `SPOT_SOURCES` maps those names to
registered tasks / mixtures. Datasets that TFDS does not provide are listed, with the
reason, in `tasks/README.md`.

Formats: C4, SQuAD, GLUE, SuperGLUE use the t5 library's (`hp_c4_v220_prefix_lm`,
`hp_squad_v010_allanswers`); the other datasets use SPoT-style text formats
(`"<task> <field>: <text> ..."`, see `preprocessors`), under `hp_spot_<dataset>`.

Family mixtures and MIX sample examples-proportionally with a cap (T5's multi-task
recipe): rate = min(#train examples, K), K = 2**19 by default, set by gin
`hyperprompt_jax.tasks.spot_mix_maximum.maximum`; counts come from the TFDS metadata of
the prepared datasets.
"""

from __future__ import annotations

import functools

import seqio
from hyperprompt_jax.tasks import metrics, postprocessors, preprocessors
from hyperprompt_jax.tasks.glue import GLUE_WEIGHTS
from hyperprompt_jax.tasks.specs import TaskSpec, register_mixture

import gin

C4_TFDS_NAME = "c4/en:3.1.0"
SQUAD_TFDS_NAME = "squad/v1.1:3.0.0"

C4_PREFIX_LM = TaskSpec(
    name="hp_c4_v220_prefix_lm",
    tfds_name=C4_TFDS_NAME,
    text_preprocessors=(
        functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
    ),
    token_preprocessors=(preprocessors.prefix_lm,),
)
SQUAD = TaskSpec(
    name="hp_squad_v010_allanswers",
    tfds_name=SQUAD_TFDS_NAME,
    text_preprocessors=(preprocessors.squad,),
    metric_fns=(metrics.squad,),
    postprocess_fn=postprocessors.qa,
)

_NLI3 = ("entailment", "neutral", "contradiction")
_POLARITY = ("negative", "positive")
_GOEMOTIONS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip
_LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


def _classification(name, tfds_name, text_keys, labels, **kwargs) -> TaskSpec:
    return TaskSpec(
        name=f"hp_spot_{name}",
        tfds_name=tfds_name,
        text_preprocessors=(
            functools.partial(
                preprocessors.text_classification,
                task_name=name,
                text_keys=text_keys,
                label_names=labels,
                **kwargs,
            ),
        ),
        metric_fns=(metrics.accuracy,),
    )


def _choice(name, tfds_name, splits=None, **kwargs) -> TaskSpec:
    return TaskSpec(
        name=f"hp_spot_{name}",
        tfds_name=tfds_name,
        text_preprocessors=(
            functools.partial(preprocessors.multiple_choice, task_name=name, **kwargs),
        ),
        splits=splits,
        metric_fns=(metrics.accuracy,),
    )


def _mrqa(name) -> TaskSpec:
    return TaskSpec(
        name=f"hp_spot_mrqa_{name}",
        tfds_name=f"mrqa/{name}:1.0.0",
        text_preprocessors=(functools.partial(preprocessors.extractive_qa, task_name=name),),
        metric_fns=(metrics.squad,),
        postprocess_fn=postprocessors.qa,
    )


def _generation(name, tfds_name, source_key, target_key, prefix, **kwargs) -> TaskSpec:
    # No ROUGE / BLEU here (their packages are not dependencies): source tasks only
    # train prompts; their metric_fns are empty.
    return TaskSpec(
        name=f"hp_spot_{name}",
        tfds_name=tfds_name,
        text_preprocessors=(
            functools.partial(
                preprocessors.text_generation,
                source_key=source_key,
                target_key=target_key,
                prefix=prefix,
                **kwargs,
            ),
        ),
    )


def _translation(name, tfds_name, source, target) -> TaskSpec:
    return TaskSpec(
        name=f"hp_spot_{name}",
        tfds_name=tfds_name,
        text_preprocessors=(
            functools.partial(
                preprocessors.translate,
                source_language=source,
                target_language=target,
                names=_LANGUAGES,
            ),
        ),
    )


# Family -> specs of the datasets only SPoT uses (GLUE / SuperGLUE / SQuAD are
# registered elsewhere and joined in below).
SPOT_FAMILY_SPECS: dict[str, tuple[TaskSpec, ...]] = {
    "nli": (
        *(_classification(f"anli_r{r}", f"anli/r{r}:0.1.0", ("hypothesis", "context"), _NLI3) for r in (1, 2, 3)),
        _classification("doc_nli", "doc_nli:1.0.0", ("hypothesis", "premise"), ("not_entailment", "entailment")),
        _classification("snli", "snli:1.1.0", ("hypothesis", "premise"), _NLI3),
    ),
    "sentiment": (
        TaskSpec(
            name="hp_spot_goemotions",
            tfds_name="goemotions:0.1.0",
            text_preprocessors=(
                functools.partial(
                    preprocessors.multi_label_classification,
                    task_name="goemotions",
                    text_key="comment_text",
                    label_keys=_GOEMOTIONS,
                ),
            ),
            metric_fns=(metrics.accuracy,),
        ),
        _classification("imdb_reviews", "imdb_reviews/plain_text:1.0.0", ("text",), _POLARITY),
        # Sentiment140 codes polarity as 0 / 2 / 4.
        _classification(
            "sentiment140", "sentiment140:1.0.0", ("text",), ("negative", "neutral", "positive"),
            label_key="polarity", label_divisor=2,
        ),
        _classification("yelp_polarity_reviews", "yelp_polarity_reviews:0.2.0", ("text",), _POLARITY),
    ),
    "mrqa": tuple(_mrqa(n) for n in ("news_qa", "trivia_qa", "search_qa", "hotpot_qa", "natural_questions")),
    "rainbow": (
        _choice("cosmos_qa", "cosmos_qa:1.0.0", question_key="question", context_key="context",
                choice_keys=("answer0", "answer1", "answer2", "answer3")),
        _choice("hellaswag", "hellaswag:1.1.0", question_key="context", choices_key="endings"),
        _choice("piqa", "piqa:1.0.0", question_key="goal", choice_keys=("sol1", "sol2")),
        _choice("winogrande", "winogrande:1.2.0", question_key="sentence",
                choice_keys=("option1", "option2"),
                splits={"train": "train_xl", "validation": "validation", "test": "test"}),
    ),
    "translation": (
        _translation("wmt14_ende", "wmt14_translate/de-en:1.0.0", "en", "de"),
        _translation("wmt14_enfr", "wmt14_translate/fr-en:1.0.0", "en", "fr"),
        _translation("wmt16_enro", "wmt16_translate/ro-en:1.0.0", "en", "ro"),
    ),
    "summarization": (
        _generation("aeslc", "aeslc:1.0.0", "email_body", "subject_line", "summarize:"),
        _generation("billsum", "billsum:3.0.0", "text", "summary", "summarize:"),
        _generation("cnn_dailymail", "cnn_dailymail:3.4.0", "article", "highlights", "summarize:"),
        _generation("gigaword", "gigaword:1.2.0", "document", "summary", "summarize:"),
        _generation("multi_news", "multi_news:2.1.0", "document", "summary", "summarize:"),
        _generation("newsroom", "newsroom:1.0.0", "text", "summary", "summarize:"),
        _generation("samsum", "samsum:1.0.0", "dialogue", "summary", "summarize:"),
        _generation("xsum", "xsum:1.1.0", "document", "summary", "summarize:"),
    ),
    "gem": (
        _generation("gem_common_gen", "gem/common_gen:1.1.0", "concepts", "target", "common_gen:"),
        _generation("gem_dart", "gem/dart:1.1.0", "tripleset", "target", "dart:"),
        _generation("gem_e2e_nlg", "gem/e2e_nlg:1.1.0", "meaning_representation", "target", "e2e_nlg:"),
        _generation("gem_web_nlg_en", "gem/web_nlg_en:1.1.0", "input", "target", "web_nlg_en:"),
        _generation("gem_wiki_auto_asset_turk", "gem/wiki_auto_asset_turk:1.1.0", "source", "target", "simplify:"),
        _generation("gem_wiki_lingua_english_en", "gem/wiki_lingua_english_en:1.1.0", "source", "target", "summarize:"),
    ),
}  # fmt: skip

# GLUE / SuperGLUE members of the families and of MIX (training tasks only).
_GLUE_TRAIN = tuple(f"hp_{n}" for n, w in GLUE_WEIGHTS.items() if w > 0)
_SUPER_GLUE_TRAIN = (
    "hp_super_glue_boolq_v102", "hp_super_glue_cb_v102", "hp_super_glue_copa_v102",
    "hp_super_glue_multirc_v102", "hp_super_glue_record_v102", "hp_super_glue_rte_v102",
    "hp_super_glue_wic_v102", "hp_super_glue_wsc_v102_simple_train",
)  # fmt: skip
_FAMILY_EXTRA_MEMBERS = {
    "nli": ("hp_glue_mnli_v002", "hp_glue_qnli_v002", "hp_glue_rte_v002", "hp_super_glue_cb_v102"),
    "paraphrase": ("hp_glue_mrpc_v002", "hp_glue_qqp_v002", "hp_glue_stsb_v002"),
    "sentiment": ("hp_glue_sst2_v002",),
    "mrqa": ("hp_squad_v010_allanswers",),
}

SPOT_FAMILIES = (
    "nli", "paraphrase", "sentiment", "mrqa", "rainbow", "translation", "summarization", "gem",
)  # fmt: skip

# The paper's source names -> registered task or mixture.
SPOT_SOURCES: dict[str, str] = {
    "c4": C4_PREFIX_LM.name,
    "mnli": "hp_glue_mnli_v002",
    "squad": SQUAD.name,
    "glue": "hp_glue_v002_proportional",
    "super_glue": "hp_super_glue_v102_proportional",
    **{family: f"hp_spot_{family}" for family in SPOT_FAMILIES},
    "mix": "hp_spot_mix",
}


@gin.configurable(module="hyperprompt_jax.tasks")
def spot_mix_maximum(maximum: int = 2**19) -> int:
    """Cap K on a dataset's rate in the SPoT family mixtures and MIX."""
    if maximum <= 0:
        raise ValueError(f"The examples-proportional cap must be > 0, got {maximum}.")
    return int(maximum)


def examples_rate(task: seqio.Task) -> float:
    """min(#train examples in the TFDS metadata, K) (read when the dataset is built)."""
    return seqio.mixing_rate_num_examples(task, maximum=spot_mix_maximum())


def mix_members() -> tuple[str, ...]:
    """Names of MIX's tasks: C4 first, then every labelled source dataset."""
    labelled = [*_GLUE_TRAIN, *_SUPER_GLUE_TRAIN, SQUAD.name]
    for specs in SPOT_FAMILY_SPECS.values():
        labelled += [spec.name for spec in specs]
    return (C4_PREFIX_LM.name, *labelled)


def register() -> None:
    """Registers the SPoT source tasks, the family mixtures and MIX."""
    C4_PREFIX_LM.register()
    SQUAD.register()
    for specs in SPOT_FAMILY_SPECS.values():
        for spec in specs:
            spec.register()
    for family in SPOT_FAMILIES:
        members = [s.name for s in SPOT_FAMILY_SPECS.get(family, ())]
        members += _FAMILY_EXTRA_MEMBERS.get(family, ())
        register_mixture(f"hp_spot_{family}", members, default_rate=examples_rate)
    register_mixture("hp_spot_mix", list(mix_members()), default_rate=examples_rate)


register()
