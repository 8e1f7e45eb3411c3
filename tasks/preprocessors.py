"""Text-to-text preprocessors: the t5 library's formats, written anew for seqio 0.0.20.

The `t5` package cannot be installed next to seqio 0.0.20, so the formats of
`t5.data.preprocessors` that GLUE, SuperGLUE, SQuAD and C4 use are re-implemented
here with the same TensorFlow string ops, so that the text (and therefore published
T5 numbers) match exactly:

- `glue`: `"<benchmark> <key1>: <text1> <key2>: <text2>"` with the feature keys sorted
  (or in a given order), the label as its class name, `"<unk>"` for unlabelled test
  examples; MultiRC drops `<br>` / `<b>` markup and keeps its three ids for grouping.
- `stsb`: the similarity rounded to the nearest 0.2 with `tf.round` (half to even,
  so 2.5 -> "2.4") and printed with one decimal.
- `record`: one example per answer (`"<unk>"` when there is none); `@highlight` lines
  joined into sentences.
- `wsc_simple` / `definite_pronoun_resolution_simple`: the pronoun marked with `*`,
  the referent as target (the "simple" WSC of the t5 library).
- `squad`: `"question: <q> context: <c>"` with punctuation padded by spaces.
- `prefix_lm`: C4 prefix language modelling (random split point, prefix -> rest).

Plus the formats of the SPoT source datasets that the t5 library does not cover
(`text_classification`, `multiple_choice`, `extractive_qa`, `text_generation`,
`translate`) and `add_task_id` for multi-task mixtures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
UNKNOWN_LABEL = "<unk>"


# --------------------------------------------------------------------------- helpers


def _label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """Class name of `label`; `"<unk>"` for -1 (unlabelled test sets) or out of range."""
    label = tf.cast(label, tf.int64)
    names = tf.constant(list(label_names))
    valid = tf.logical_and(label >= 0, label < len(label_names))
    # Clamp before gathering: both branches of tf.where are evaluated.
    safe = tf.clip_by_value(label, 0, len(label_names) - 1)
    return tf.where(valid, tf.gather(names, safe), UNKNOWN_LABEL)


def pad_punctuation(text: tf.Tensor) -> tf.Tensor:
    """Puts spaces around every non-word character and collapses whitespace."""
    text = tf.strings.regex_replace(text, r"(\W)", r" \1 ")
    return tf.strings.regex_replace(text, r"\s+", " ")


def string_join(parts: Sequence[tf.Tensor | str]) -> tf.Tensor:
    """Joins on single spaces, collapsing runs of whitespace."""
    joined = tf.strings.join(list(parts), separator=" ")
    return tf.strings.regex_replace(joined, r"\s+", " ")


# ------------------------------------------------------------------------ GLUE-style


@seqio.map_over_dataset
def glue(
    x: Mapping[str, tf.Tensor],
    benchmark_name: str,
    label_names: Sequence[str],
    feature_names: Sequence[str] | None = None,
    id_key: str | None = "idx",
) -> dict[str, tf.Tensor]:
    """A GLUE / SuperGLUE classification example as text.

    Args:
      x: a TFDS example with text features, `label` (int) and `idx`.
      benchmark_name: the first word of the input (`"rte"`, `"mnli"`, ...).
      label_names: class names indexed by `label`.
      feature_names: order of the text features; default: sorted keys except
        `label` and `idx`.
      id_key: key of the example id copied to `idx` (None: no id).

    Returns:
      `{"inputs", "targets", "idx"}`; MultiRC gives `idx/paragraph`,
      `idx/question`, `idx/answer` instead of `idx`.
    """
    keys = list(feature_names or sorted(set(x.keys()) - {"label", "idx"}))
    parts = [benchmark_name]
    for key in keys:
        parts += [f"{key}:", x[key]]
    joined = tf.strings.join(parts, separator=" ")
    ex = {}
    if benchmark_name == "multirc":
        joined = tf.strings.regex_replace(joined, "<br>", " ")
        joined = tf.strings.regex_replace(joined, "<(/)?b>", "")
        for part in ("paragraph", "question", "answer"):
            ex[f"idx/{part}"] = x["idx"][part]
    elif id_key:
        ex["idx"] = x[id_key]
    ex["inputs"] = joined
    ex["targets"] = _label_name(x["label"], label_names)
    return ex


@seqio.map_over_dataset
def stsb(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """STS-B: similarity in [0, 5] rounded to a multiple of 0.2 and printed ("3.4")."""
    inputs = tf.strings.join(
        ["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]], separator=" "
    )
    # tf.round rounds half to even, exactly as the t5 library does.
    target = tf.as_string(tf.round(x["label"] * 5) / 5, precision=1)
    return {"inputs": inputs, "targets": target, "idx": x["idx"]}


# ------------------------------------------------------------------------------ WSC

# Two WSC texts whose span2_index does not point at the pronoun; the t5 library
# replaces them with these hand-fixed strings.
_WSC_FIXES = (
    (
        "The boy continued to whip the pony , and eventually the pony threw him over. "
        'John laughed out quite loud. "Good for him," he said. ',
        "The boy continued to whip the pony , and eventually the pony threw him over. "
        'John laughed out quite loud. "Good for X ," he said.',
    ),
    (
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley "
        "put the magic pebble in an iron safe . Some day they might want to use it , but "
        "really for now, what more could they wish for?",
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley "
        "put the magic pebble in an iron safe . Some day they might want to use X , but "
        "really for now, what more could they wish for?",
    ),
)


def _wsc_blank_pronoun(x: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The WSC text with the pronoun (word `span2_index`) replaced by `X`."""
    text = x["text"]
    words = tf.strings.split([text], sep=" ").values
    index = tf.cast(x["span2_index"], tf.int32)

    def blank() -> tf.Tensor:
        # The t5 library asserts these; a violation means corrupt data.
        checks = [
            tf.debugging.assert_greater(index, 0, message="WSC pronoun is the first word"),
            tf.debugging.assert_less(index, tf.size(words), message="WSC index out of text"),
        ]
        with tf.control_dependencies(checks):
            checked = tf.identity(index)
        with tf.control_dependencies([tf.debugging.assert_equal(words[checked], x["span2_text"])]):
            return tf.strings.join(
                [
                    tf.strings.reduce_join(words[:checked], separator=" "),
                    "X",
                    tf.strings.reduce_join(words[checked + 1 :], separator=" "),
                ],
                separator=" ",
            )

    # tf.cond (not tf.where) so the assertions in `blank` only run on normal texts.
    (text_a, fixed_a), (text_b, fixed_b) = _WSC_FIXES
    return tf.cond(
        tf.equal(text, text_a),
        lambda: tf.constant(fixed_a),
        lambda: tf.cond(tf.equal(text, text_b), lambda: tf.constant(fixed_b), blank),
    )


def wsc_simple(
    dataset: tf.data.Dataset, label: str = "wsc:", correct_referent_only: bool = False
) -> tf.data.Dataset:
    """SuperGLUE WSC as "which noun does the marked pronoun refer to".

    `"wsc: Mitchell asked Tom if *he* could lend some money."` -> `"Tom"`: the
    target is always `span1_text`; with `correct_referent_only` (training) only
    examples whose label says span1 is the referent are kept. `label` (0/1) and `idx`
    are passed on for the `wsc_simple` postprocessor.
    """

    def fn(x):
        marked = tf.strings.regex_replace(
            _wsc_blank_pronoun(x), r" X ", tf.strings.join([" *", x["span2_text"], "* "])
        )
        return {
            "inputs": tf.strings.join([label, marked], separator=" "),
            "targets": tf.reshape(x["span1_text"], []),
            "label": x.get("label", tf.constant(0, tf.int64)),
            "idx": x["idx"],
        }

    if correct_referent_only:
        dataset = dataset.filter(lambda x: tf.cast(x.get("label", False), tf.bool))
    return dataset.map(fn, num_parallel_calls=AUTOTUNE)


@seqio.map_over_dataset
def definite_pronoun_resolution_simple(
    x: Mapping[str, tf.Tensor], label: str = "wsc:"
) -> dict[str, tf.Tensor]:
    """DPR in the simple WSC format: the first occurrence of the pronoun marked."""
    marked = tf.strings.regex_replace(
        x["sentence"],
        tf.strings.join([r" (", x["pronoun"], r")( |\.|,)"]),
        r" *\1*\2",
        replace_global=False,
    )
    return {
        "inputs": tf.strings.join([label, marked], separator=" "),
        "targets": x["candidates"][x["label"]],
    }


# --------------------------------------------------------------------------- ReCoRD


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD: one example per answer, all answers kept for evaluation.

    `"record query: <query> entities: <e1>, <e2> passage: <passage>"` -> an answer.
    """

    def one_per_answer(x):
        num_answers = tf.size(x["answers"])
        copies = tf.maximum(num_answers, 1)

        def repeat(t):
            return tf.broadcast_to(t, tf.concat([[copies], tf.shape(t)], axis=0))

        ex = {k: repeat(v) for k, v in x.items() if k != "idx"}
        ex["targets"] = tf.cond(
            num_answers > 0, lambda: x["answers"], lambda: tf.constant([UNKNOWN_LABEL])
        )
        ex["idx"] = {"passage": repeat(x["idx"]["passage"]), "query": repeat(x["idx"]["query"])}
        return ex

    def to_text(x):
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(
            [
                "record query:",
                x["query"],
                "entities:",
                tf.strings.reduce_join(x["entities"], separator=", "),
                "passage:",
                passage,
            ],
            separator=" ",
        )
        return {
            "idx/passage": x["idx"]["passage"],
            "idx/query": x["idx"]["query"],
            "inputs": inputs,
            "targets": x["targets"],
            "answers": x["answers"],
        }

    dataset = dataset.map(one_per_answer, num_parallel_calls=AUTOTUNE).unbatch()
    return dataset.map(to_text, num_parallel_calls=AUTOTUNE)


# ---------------------------------------------------------------------------- SQuAD


@seqio.map_over_dataset
def squad(x: Mapping[str, tf.Tensor], include_context: bool = True) -> dict[str, tf.Tensor]:
    """SQuAD: `"question: <q> context: <c>"` -> first answer (punctuation padded)."""
    answers = pad_punctuation(x["answers"]["text"])
    question = pad_punctuation(x["question"])
    context = pad_punctuation(x["context"])
    if include_context:
        inputs = string_join(["question:", question, "context:", context])
    else:
        inputs = string_join(["squad trivia question:", question])
    return {
        "inputs": inputs,
        "targets": answers[0],
        "id": x["id"],
        "context": context,
        "question": question,
        "answers": answers,
    }


# ------------------------------------------------------------------- C4 prefix LM


def _select_random_chunk(dataset: tf.data.Dataset, max_length: int) -> tf.data.Dataset:
    """Keeps one random window of at most `max_length` tokens per document."""

    @seqio.map_over_dataset(num_seeds=1)
    def chunk(x, seed):
        tokens = x["targets"]
        n = tf.size(tokens)
        num_windows = (n + max_length - 1) // max_length
        # Windows start at multiples of max_length so every token is equally likely.
        start = max_length * tf.random.stateless_uniform(
            [], seed=seed, maxval=num_windows, dtype=tf.int32
        )
        return {"targets": tokens[start : start + max_length]}

    return chunk(dataset.filter(lambda x: tf.size(x["targets"]) > 0))


def _split_tokens(dataset: tf.data.Dataset, max_tokens: int) -> tf.data.Dataset:
    """Splits each token sequence into pieces of `max_tokens` (the last may be shorter)."""

    def split(x):
        tokens = x["targets"]
        n = tf.size(tokens)
        num_pieces = (n + max_tokens - 1) // max_tokens
        padded = tf.pad(tokens, [[0, num_pieces * max_tokens - n]])
        pieces = tf.reshape(padded, [num_pieces, max_tokens])
        lengths = tf.minimum(max_tokens, n - max_tokens * tf.range(num_pieces))
        return tf.data.Dataset.from_tensor_slices((pieces, lengths)).map(
            lambda piece, length: {"targets": piece[:length]}
        )

    return dataset.filter(lambda x: tf.size(x["targets"]) > 0).flat_map(split)


def prefix_lm(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
    """Prefix LM (Raffel et al.): a random prefix is the input, the rest the target.

    Token preprocessor (after `tokenize`): documents are cut to one random window of
    65,536 tokens, split into pieces that fit `inputs` (leaving room for EOS), and each
    piece of n tokens is split after k ~ Uniform{1, ..., n-1} tokens.
    """
    max_tokens = sequence_length["inputs"] - int(output_features["inputs"].add_eos)
    dataset = _select_random_chunk(dataset, max_length=65536)
    dataset = _split_tokens(dataset, max_tokens)

    @seqio.map_over_dataset(num_seeds=1)
    def split_prefix(x, seed):
        tokens = x["targets"]
        n = tf.size(tokens)
        high = n - 1
        low = tf.minimum(high, 1)
        k = tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high + 1, dtype=tf.int32)
        return {"inputs": tokens[:k], "targets": tokens[k:]}

    return split_prefix(dataset)


# ---------------------------------------------------------------- SPoT source formats


@seqio.map_over_dataset
def text_classification(
    x: Mapping[str, tf.Tensor],
    task_name: str,
    text_keys: Sequence[str],
    label_names: Sequence[str],
    label_key: str = "label",
    label_offset: int = 0,
    label_divisor: int = 1,
) -> dict[str, tf.Tensor]:
    """`"<task> <key1>: <text1> [<key2>: <text2>]"` -> class name (SPoT's format).

    `label_divisor` maps coded labels to indices (Sentiment140 polarity 0/2/4 -> 0/1/2).
    """
    parts: list = [task_name]
    for key in text_keys:
        parts += [f"{key}:", x[key]]
    label = (tf.cast(x[label_key], tf.int64) - label_offset) // label_divisor
    return {"inputs": string_join(parts), "targets": _label_name(label, label_names)}


@seqio.map_over_dataset
def multi_label_classification(
    x: Mapping[str, tf.Tensor], task_name: str, text_key: str, label_keys: Sequence[str]
) -> dict[str, tf.Tensor]:
    """Boolean label features -> the names of the true ones, comma separated (GoEmotions)."""
    flags = tf.stack([tf.cast(x[k], tf.bool) for k in label_keys])
    names = tf.boolean_mask(tf.constant(list(label_keys)), flags)
    return {
        "inputs": string_join([task_name, f"{text_key}:", x[text_key]]),
        "targets": tf.strings.reduce_join(names, separator=", "),
    }


@seqio.map_over_dataset
def multiple_choice(
    x: Mapping[str, tf.Tensor],
    task_name: str,
    question_key: str,
    choice_keys: Sequence[str] = (),
    choices_key: str | None = None,
    context_key: str | None = None,
    label_key: str = "label",
) -> dict[str, tf.Tensor]:
    """`"<task> [context: c] question: q choice0: a choice1: b ..."` -> the right choice.

    Choices come from separate features (`choice_keys`) or one sequence feature
    (`choices_key`, e.g. HellaSwag's `endings`).
    """
    if choices_key is not None:
        choices = x[choices_key]
    else:
        choices = tf.stack([x[k] for k in choice_keys])
    parts: list = [task_name]
    if context_key is not None:
        parts += ["context:", x[context_key]]
    parts += ["question:", x[question_key]]
    numbered = tf.strings.join(
        ["choice" + tf.strings.as_string(tf.range(tf.size(choices))) + ":", choices],
        separator=" ",
    )
    parts.append(tf.strings.reduce_join(numbered, separator=" "))
    label = tf.cast(x[label_key], tf.int32)
    valid = tf.logical_and(label >= 0, label < tf.size(choices))
    target = tf.where(
        valid, tf.gather(choices, tf.clip_by_value(label, 0, tf.size(choices) - 1)), UNKNOWN_LABEL
    )
    return {"inputs": string_join(parts), "targets": target}


@seqio.map_over_dataset
def extractive_qa(x: Mapping[str, tf.Tensor], task_name: str) -> dict[str, tf.Tensor]:
    """MRQA: `"<task> question: <q> context: <c>"` -> first answer; all answers kept."""
    answers = x["answers"]
    first = tf.cond(tf.size(answers) > 0, lambda: answers[0], lambda: tf.constant(""))
    return {
        "inputs": string_join([task_name, "question:", x["question"], "context:", x["context"]]),
        "targets": first,
        "answers": answers,
    }


@seqio.map_over_dataset
def text_generation(
    x: Mapping[str, tf.Tensor],
    source_key: str,
    target_key: str,
    prefix: str,
    source_nested_key: str | None = None,
    target_nested_key: str | None = None,
    separator: str = " ; ",
) -> dict[str, tf.Tensor]:
    """`"<prefix> <source>"` -> target (summarisation, data-to-text, simplification).

    Sequence sources (GEM's concept sets, triples) are joined with `separator`.
    """
    source = x[source_key]
    target = x[target_key]
    if source_nested_key is not None:
        source = source[source_nested_key]
    if target_nested_key is not None:
        target = target[target_nested_key]
    if source.shape.rank:
        source = tf.strings.reduce_join(source, separator=separator)
    return {"inputs": string_join([prefix, source]), "targets": target}


@seqio.map_over_dataset
def translate(
    x: Mapping[str, tf.Tensor], source_language: str, target_language: str, names: Mapping[str, str]
) -> dict[str, tf.Tensor]:
    """`"translate English to German: <text>"` -> translation (the t5 library's format)."""
    prompt = f"translate {names[source_language]} to {names[target_language]}: "
    return {"inputs": tf.strings.join([prompt, x[source_language]]), "targets": x[target_language]}


# ----------------------------------------------------------------------- task ids


@seqio.map_over_dataset
def add_task_id(x: Mapping[str, tf.Tensor], task_id: int) -> dict[str, tf.Tensor]:
    """Adds `task_id`, an int32 scalar: the task's index in its mixture's order."""
    return {**x, "task_id": tf.constant(task_id, tf.int32)}
