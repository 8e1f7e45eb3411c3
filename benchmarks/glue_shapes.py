"""GLUE- and SuperGLUE-shaped examples: per-task length statistics in T5 tokens, sampled.

    python benchmarks/glue_shapes.py            # prints the table in T5 SentencePiece tokens

The benchmarks need examples whose lengths look like the real tasks', but no dataset
can be downloaded here. Each task's input is its t5-library text format
(`rte sentence1: ... sentence2: ...`, built by `tasks/glue.py` / `tasks/super_glue.py`)
whose fixed part (task name, field names, EOS) and label strings are tokenised exactly
with the T5 SentencePiece model (`/work/shared/fixtures/t5_vocab/`, or
`$HYPERPROMPT_VOCAB`); the free text of each field has a mean length in words from the
dataset's published statistics (`TASKS` below, source per row), converted to tokens
with a tokens-per-word ratio measured with the same model on local English prose
(`tokens_per_word`), and a log-normal spread around that mean (`FIELD_SIGMA`: the
papers give means, not distributions; the spread is our assumption).

When the TFDS data of a task is prepared (`tfds` data dir, e.g. `$TFDS_DATA_DIR`),
`task_lengths(..., prefer_tfds=True)` reads the real lengths from the registered seqio
task instead; `LengthSampler.source` says which was used, and the benchmarks print it.

Means marked "recalled" were taken from the cited papers without being able to
re-check them offline; they are the inputs to change if a figure is wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import numpy as np

SPM_PATH = os.environ.get(
    "HYPERPROMPT_VOCAB",
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "..",
        "..",
        "..",
        "shared",
        "fixtures",
        "t5_vocab",
        "sentencepiece.model",
    ),
)
_FALLBACK_SPM = "/work/shared/fixtures/t5_vocab/sentencepiece.model"
EOS_ID = 1

# Log-normal sigma of a free-text field's length around its published mean (an
# assumption; it gives a coefficient of variation of about 0.47).
FIELD_SIGMA = 0.45

# Local English prose on which the tokens-per-word ratio is measured (whitespace
# words -> T5 SentencePiece pieces). License texts are what every Debian / Ubuntu
# image has; they are formal English, as are most GLUE sources (news, Wikipedia).
PROSE_FILES = (
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/Apache-2.0",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/MPL-2.0",
)


@dataclasses.dataclass(frozen=True)
class TaskShape:
    """One task's text format and length statistics.

    Attributes:
      name: the t5 library's task word (`rte`), also the input's first word.
      benchmark: `glue` or `super_glue` (the TFDS dataset).
      fields: `(field name, mean words)` in the order the input lists them; a field
        with a fixed value (COPA's `question: cause`) has a negative mean: its
        value is the word itself, tokenised exactly.
      labels: target strings (TFDS class names); None: `target_words` of free text.
      target_words: mean words of a free-text target (STS-B's "3.4", ReCoRD's entity).
      source: where the means come from.
    """

    name: str
    benchmark: str
    fields: tuple[tuple[str, float], ...]
    labels: tuple[str, ...] | None
    source: str
    target_words: float = 0.0
    fixed_values: tuple[tuple[str, str], ...] = ()


# Means in words per field. Sources: the dataset papers (numbers recalled unless
# marked); field order and names follow tasks/preprocessors.glue (sorted keys, or
# MultiRC's / WiC's given order) and the t5 library's formats.
TASKS: dict[str, TaskShape] = {
    t.name: t
    for t in (
        # GLUE (Wang et al., 2019); labels are TFDS's class names.
        TaskShape("cola", "glue", (("sentence", 9.0),), ("unacceptable", "acceptable"),
                  "CoLA, Warstadt et al. 2019: short single sentences, ~9 words (recalled)"),
        TaskShape("sst2", "glue", (("sentence", 10.0),), ("negative", "positive"),
                  "SST-2 train phrases, Socher et al. 2013: ~10 words (recalled)"),
        TaskShape("mrpc", "glue", (("sentence1", 22.0), ("sentence2", 22.0)),
                  ("not_equivalent", "equivalent"),
                  "MRPC, Dolan & Brockett 2005: news sentences ~22 words (recalled)"),
        TaskShape("qqp", "glue", (("question1", 11.0), ("question2", 11.0)),
                  ("not_duplicate", "duplicate"), "Quora questions ~11 words (recalled)"),
        TaskShape("stsb", "glue", (("sentence1", 10.0), ("sentence2", 10.0)), None,
                  "STS-B, Cer et al. 2017: ~10 words per sentence (recalled); target "
                  "'3.4' style, tokenised exactly", target_words=1.0),
        TaskShape("mnli", "glue", (("hypothesis", 11.0), ("premise", 22.0)),
                  ("entailment", "neutral", "contradiction"),
                  "MultiNLI, Williams et al. 2018: premise ~22, hypothesis ~11 words "
                  "(recalled)"),
        TaskShape("qnli", "glue", (("question", 10.0), ("sentence", 30.0)),
                  ("entailment", "not_entailment"),
                  "QNLI from SQuAD, Rajpurkar et al. 2016: questions ~10 words, "
                  "Wikipedia sentences ~30 (recalled)"),
        TaskShape("rte", "glue", (("sentence1", 43.0), ("sentence2", 9.0)),
                  ("entailment", "not_entailment"),
                  "RTE1-3/5: premise ~43 words, hypothesis ~9 (recalled)"),
        # SuperGLUE (Wang et al., 2019).
        TaskShape("boolq", "super_glue", (("passage", 108.0), ("question", 8.9)),
                  ("False", "True"),
                  "BoolQ, Clark et al. 2019: passages 108 tokens, questions 8.9 (recalled)"),
        TaskShape("cb", "super_glue", (("hypothesis", 8.0), ("premise", 61.0)),
                  ("entailment", "contradiction", "neutral"),
                  "CommitmentBank, de Marneffe et al. 2019: multi-sentence premises "
                  "~61 words, hypothesis ~8 (recalled)"),
        TaskShape("copa", "super_glue",
                  (("choice1", 6.0), ("choice2", 6.0), ("premise", 6.0), ("question", -1)),
                  ("choice1", "choice2"),
                  "COPA, Roemmele et al. 2011: premise and choices ~6 words (recalled)",
                  fixed_values=(("question", "cause"),)),
        TaskShape("multirc", "super_glue",
                  (("question", 10.9), ("answer", 4.7), ("paragraph", 263.1)),
                  ("False", "True"),
                  "MultiRC, Khashabi et al. 2018: paragraph 263.1 words, question "
                  "10.9, answer 4.7 (recalled)"),
        TaskShape("record", "super_glue",
                  (("query", 21.3), ("entities", 25.0), ("passage", 169.5)), None,
                  "ReCoRD, Zhang et al. 2018: passage 169.5 tokens, query 21.3 "
                  "(recalled); entities list ~25 words and answers ~1.5 words are "
                  "our estimates", target_words=1.5),
        TaskShape("wic", "super_glue",
                  (("sentence1", 13.0), ("sentence2", 13.0), ("word", 1.0)),
                  ("False", "True"),
                  "WiC, Pilehvar & Camacho-Collados 2019: short contexts ~13 words "
                  "(recalled)"),
        TaskShape("wsc", "super_glue", (("", 20.0),), None,
                  "WSC (t5 'simple' format 'wsc: ... *he* ...'): ~20 words (recalled); "
                  "target the referent, ~2 words", target_words=2.0),
    )
}  # fmt: skip

GLUE_TASKS = tuple(n for n, t in TASKS.items() if t.benchmark == "glue")
SUPER_GLUE_TASKS = tuple(n for n, t in TASKS.items() if t.benchmark == "super_glue")


@functools.cache
def _processor():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=spm_path())


def spm_path() -> str:
    """The T5 SentencePiece model: `$HYPERPROMPT_VOCAB` or the shared fixture."""
    return SPM_PATH if os.path.exists(SPM_PATH) else _FALLBACK_SPM


def encode(text: str) -> list[int]:
    """T5 SentencePiece ids of `text` (no EOS)."""
    return list(_processor().encode(text))


@functools.cache
def tokens_per_word() -> tuple[float, dict[str, float]]:
    """(median ratio, `{file: ratio}`): T5 pieces per whitespace word on `PROSE_FILES`."""
    ratios = {}
    for path in PROSE_FILES:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        words = sum(len(line.split()) for line in lines)
        pieces = sum(len(encode(line)) for line in lines)
        ratios[os.path.basename(path)] = pieces / max(words, 1)
    if not ratios:
        return 1.3, {"(no prose file found; assumed)": 1.3}
    return float(np.median(list(ratios.values()))), ratios


def template(task: TaskShape) -> str:
    """The task's input with every free-text field empty, e.g. `rte sentence1: sentence2:`."""
    if task.name == "wsc":
        return "wsc:"
    fixed = dict(task.fixed_values)
    parts = [task.name]
    for name, _ in task.fields:
        parts.append(f"{name}:")
        if name in fixed:
            parts.append(fixed[name])
    return " ".join(parts)


@dataclasses.dataclass
class LengthSampler:
    """Draws `(inputs_length, targets_length)` in T5 tokens (EOS included) for a task."""

    task: TaskShape
    ratio: float
    source: str = "published statistics"
    empirical: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def fixed_tokens(self) -> int:
        return len(encode(template(self.task))) + 1  # + EOS

    def target_lengths(self) -> list[int]:
        """Token counts (with EOS) of each label string."""
        return [len(encode(label)) + 1 for label in self.task.labels or ()]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` input and target lengths ([n] int arrays, EOS included)."""
        if self.empirical is not None:
            idx = rng.integers(0, len(self.empirical[0]), n)
            return self.empirical[0][idx], self.empirical[1][idx]
        inputs = np.full(n, self.fixed_tokens, np.int64)
        for _, words in self.task.fields:
            if words <= 0:
                continue  # A fixed value, already in the template.
            mean_tokens = words * self.ratio
            # Log-normal with this mean: mu = log(mean) - sigma^2 / 2.
            mu = np.log(mean_tokens) - FIELD_SIGMA**2 / 2
            inputs += np.maximum(1, np.rint(rng.lognormal(mu, FIELD_SIGMA, n))).astype(np.int64)
        if self.task.labels:
            targets = np.asarray(self.target_lengths())[rng.integers(0, len(self.task.labels), n)]
        elif self.task.name == "stsb":
            # '0.0' .. '5.0' in steps of 0.2, each tokenised exactly.
            labels = [f"{x / 5:.1f}" for x in range(26)]
            lengths = np.asarray([len(encode(s)) + 1 for s in labels])
            targets = lengths[rng.integers(0, len(labels), n)]
        else:
            mean_tokens = self.task.target_words * self.ratio
            mu = np.log(mean_tokens) - FIELD_SIGMA**2 / 2
            targets = 1 + np.maximum(1, np.rint(rng.lognormal(mu, FIELD_SIGMA, n))).astype(int)
        return inputs, targets


def _tfds_lengths(task: TaskShape, limit: int = 20_000):
    """Real `(inputs, targets)` lengths from the registered seqio task, or None."""
    try:
        import seqio

        import tasks  # noqa: F401 (registers hp_* tasks)

        version = "v002" if task.benchmark == "glue" else "v102"
        name = f"hp_{task.benchmark}_{task.name}_{version}"
        if task.name == "wsc":
            name = "hp_super_glue_wsc_v102_simple_train"
        ds = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None, split="train", shuffle=False
        )
        ins, outs = [], []
        for ex in ds.take(limit).as_numpy_iterator():
            ins.append(len(ex["inputs"]))
            outs.append(len(ex["targets"]))
        return np.asarray(ins), np.asarray(outs)
    except Exception:  # noqa: BLE001 (data not prepared: fall back to statistics)
        return None


def sampler(name: str, prefer_tfds: bool = True) -> LengthSampler:
    """A `LengthSampler` for task `name`: from TFDS data if prepared, else statistics."""
    task = TASKS[name]
    ratio, _ = tokens_per_word()
    if prefer_tfds and os.environ.get("TFDS_DATA_DIR"):
        lengths = _tfds_lengths(task)
        if lengths is not None and len(lengths[0]):
            return LengthSampler(task, ratio, source="TFDS data", empirical=lengths)
    return LengthSampler(task, ratio)


def sample_examples(
    task_names: Sequence[str], n: int, seed: int = 0, prefer_tfds: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """`n` examples drawn uniformly over tasks: input lengths, target lengths, task ids.

    Returns:
      `(inputs [n], targets [n], task_ids [n], source)`: lengths in T5 tokens with EOS,
      task ids the indices into `task_names`, source "TFDS data" / "published
      statistics" (or both, when only some tasks have data).
    """
    rng = np.random.default_rng(seed)
    samplers = [sampler(t, prefer_tfds) for t in task_names]
    task_ids = rng.integers(0, len(task_names), n)
    inputs = np.zeros(n, np.int64)
    targets = np.zeros(n, np.int64)
    for i, s in enumerate(samplers):
        where = np.flatnonzero(task_ids == i)
        inputs[where], targets[where] = s.sample(rng, len(where))
    sources = sorted({s.source for s in samplers})
    return inputs, targets, task_ids.astype(np.int32), " + ".join(sources)


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

    ratio, ratios = tokens_per_word()
    print(
        "T5 SentencePiece tokens per word: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
        + f"; median {ratio:.3f} used"
    )
    rows = []
    for name in TASKS:
        s = sampler(name)
        ins, outs = s.sample(np.random.default_rng(0), 20_000)
        rows.append([
            f"{s.task.benchmark}/{name}", f"`{template(s.task)}`", s.fixed_tokens,
            f"{ins.mean():.0f}", f"{np.percentile(ins, 50):.0f}", f"{np.percentile(ins, 95):.0f}",
            f"{np.mean(ins > 512):.1%}", f"{outs.mean():.1f}", int(outs.max()), s.source,
        ])  # fmt: skip
    print(
        common.markdown_table(
            [
                "task",
                "input format",
                "fixed tokens",
                "inputs mean",
                "p50",
                "p95",
                "> 512",
                "targets mean",
                "targets max",
                "lengths from",
            ],
            rows,
        )  # fmt: skip
    )
    print("\nSources of the means:")
    for t in TASKS.values():
        print(f"- {t.name}: {t.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
