"""Postprocessors: decoded model text (or the target example) -> what metrics compare.

seqio calls `postprocess_fn(text, example=ex, is_target=...)` on each prediction
(`is_target=False`) and on each target (`is_target=True`, with the full numpy example,
whose strings are bytes). The behaviour follows `t5.data.postprocessors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def string_to_float(string: str | bytes, default: float = -1.0, **unused_kwargs) -> float:
    """`"3.4"` -> 3.4; unparsable text -> `default` (scored as a wrong prediction)."""
    try:
        return float(_text(string))
    except ValueError:
        return default


def string_label_to_class_id(
    string_label: str | bytes, label_classes: Sequence[str], default: int = -1, **unused_kwargs
) -> int:
    """Index of the class name in `label_classes`, or `default` (-1) if not a class."""
    string_label = _text(string_label)
    return list(label_classes).index(string_label) if string_label in label_classes else default


def multirc(
    string_label: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> dict[str, Any]:
    """`{"value": 0/1/-1}`; targets also carry their question id as `group`."""
    result: dict[str, Any] = {"value": string_label_to_class_id(string_label, ("False", "True"))}
    if is_target:
        result["group"] = example["idx/question"]
    return result


def record(
    answer: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> dict[str, Any]:
    """Targets: all answers of the query plus its `(passage, query)` group id."""
    if is_target:
        return {
            "value": [_text(a) for a in example["answers"]],
            "group": (example["idx/passage"], example["idx/query"]),
        }
    return {"value": _text(answer)}


def qa(
    answer: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str | list[str]:
    """Targets: every reference answer (SQuAD is scored against the best match)."""
    if is_target:
        return [_text(a) for a in example["answers"]]
    return _text(answer)


_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those "
    "which whose your".split()
)


def wsc_simple(
    prediction: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> int:
    """WSC: 1 if the prediction names the candidate referent, else 0.

    Targets give the gold label (is the candidate the referent). A prediction names
    the candidate when, ignoring case and determiners, one word set contains the
    other ("fuzzy bunny" vs "bunny") and both or neither are possessive.
    """
    if is_target:
        return int(example["label"])

    def clean(text: str) -> str:
        return " ".join(w for w in text.strip().lower().split(" ") if w not in _DETERMINERS)

    referent = clean(_text(example["targets_pretokenized"]))
    prediction = clean(_text(prediction))
    if ("'" in prediction) != ("'" in referent):
        return 0
    prediction_words = set(prediction.split(" "))
    referent_words = set(referent.split(" "))
    return int(prediction_words <= referent_words or referent_words <= prediction_words)
