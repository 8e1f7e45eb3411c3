"""Text of every GLUE / SuperGLUE / SQuAD / C4 task on hand-written examples.

The examples go through the real TFDS builders (`tasks.testing.mock_tfds`, no
download) and the registered seqio tasks; the expected strings are written out by hand
from the t5 library's formats (including the hard cases: ReCoRD's one example per
answer, MultiRC's markup and ids, the simple WSC / DPR marking, STS-B's half-to-even
rounding to 0.2, WNLI's label order, SQuAD's punctuation padding).
"""

from __future__ import annotations

import hyperprompt_jax.tasks  # noqa: F401  (registers the tasks)
import numpy as np
import pytest
import seqio
import tensorflow as tf
from hyperprompt_jax.tasks import specs, spot, testing

WSC_SPECIAL = (
    "The boy continued to whip the pony , and eventually the pony threw him over. "
    'John laughed out quite loud. "Good for him," he said. '
)

EXAMPLES = {
    "glue/cola": [{"sentence": "The book was read by John.", "label": 1, "idx": 3}],
    "glue/sst2": [
        {"sentence": "a gorgeous , witty film", "label": 1, "idx": 0},
        {"sentence": "dull", "label": -1, "idx": 1},  # test split: no label
    ],
    "glue/mrpc": [{"sentence1": "He said hi.", "sentence2": "He greeted us.", "label": 0}],
    "glue/qqp": [{"question1": "Why is it red?", "question2": "What makes it red?", "label": 1}],
    "glue/stsb": [
        {"sentence1": "A", "sentence2": "B", "label": v}
        for v in (2.5, 0.3, 3.1, 2.33, 3.8, 4.5, 5.0, 0.1)
    ],
    "glue/mnli": [{"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": 2}],
    "glue/mnli_matched": [{"premise": "P.", "hypothesis": "H.", "label": 0}],
    "glue/mnli_mismatched": [{"premise": "P.", "hypothesis": "H.", "label": 1}],
    "glue/qnli": [{"question": "Where is it?", "sentence": "It is here.", "label": 1}],
    "glue/rte": [
        {"sentence1": "S1.", "sentence2": "S2.", "label": 0},
        {"sentence1": "S1.", "sentence2": "S3.", "label": 1},
    ],
    "glue/wnli": [
        {"sentence1": "The fish ate the worm. It was tasty.", "sentence2": "The worm was tasty.", "label": 1},
        {"sentence1": "The fish ate the worm. It was hungry.", "sentence2": "The worm was hungry.", "label": 0},
    ],
    "glue/ax": [{"premise": "P", "hypothesis": "H", "label": -1}],
    "super_glue/boolq": [{"question": "is the sky blue", "passage": "The sky is blue.", "label": 1, "idx": 4}],
    "super_glue/cb": [{"premise": "P.", "hypothesis": "H.", "label": 2}],
    "super_glue/copa": [
        {
            "premise": "The man broke his toe.", "question": "cause",
            "choice1": "He dropped a hammer.", "choice2": "He wore boots.", "label": 0,
        }
    ],
    "super_glue/multirc": [
        {
            "question": "What did Sam eat?", "answer": "An apple",
            "paragraph": "Sam was hungry.<br>He ate <b>an apple</b>.", "label": 1,
            "idx": {"paragraph": 3, "question": 5, "answer": 7},
        }
    ],
    "super_glue/record": [
        {
            "passage": "Alice won the race.\n@highlight\nAlice is fast\n@highlight\nBob came second",
            "query": "@placeholder won the race.", "entities": ["Alice", "Bob"],
            "answers": ["Alice", "Alice Smith"], "idx": {"passage": 1, "query": 2},
        },
        {
            "passage": "X.", "query": "@placeholder?", "entities": ["X"], "answers": [],
            "idx": {"passage": 9, "query": 9},
        },
    ],
    "super_glue/rte": [{"premise": "P.", "hypothesis": "H.", "label": 1}],
    "super_glue/wic": [
        {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "label": 0}
    ],
    "super_glue/axb": [{"sentence1": "S1.", "sentence2": "S2.", "label": 0}],
    "super_glue/axg": [{"premise": "P.", "hypothesis": "H.", "label": 1}],
    "super_glue/wsc.fixed": [
        {
            "text": "Mitchell asked Tom if he could lend some money .", "span1_text": "Tom",
            "span1_index": 2, "span2_text": "he", "span2_index": 4, "label": 1, "idx": 0,
        },
        {
            "text": "The trophy does not fit into the suitcase because it is too large .",
            "span1_text": "the suitcase", "span1_index": 6, "span2_text": "it",
            "span2_index": 9, "label": 0, "idx": 1,
        },
        # One of the two texts the t5 library fixes by hand (its index is wrong).
        {
            "text": WSC_SPECIAL, "span1_text": "The boy", "span1_index": 0,
            "span2_text": "him", "span2_index": 11, "label": 1, "idx": 2,
        },
    ],
    "definite_pronoun_resolution": [
        {"sentence": "Bob asked Tom if he can lend some money.", "pronoun": "he",
         "candidates": ["Bob", "Tom"], "label": 1},
        {"sentence": "Mary gave the book to Anna because she liked her.", "pronoun": "her",
         "candidates": ["Mary", "Anna"], "label": 1},
        {"sentence": "The hen said he was tired.", "pronoun": "he",
         "candidates": ["The hen", "the farmer"], "label": 0},
    ],
    "squad/v1.1": [
        {
            "id": "q1", "title": "T", "context": "Paris is the capital of France.",
            "question": "What is the capital of France?",
            "answers": {"text": ["Paris", "Paris, France"], "answer_start": [0, 0]},
        }
    ],
    "c4/en": [
        {"text": " ".join(f"word{i} is number {i}." for i in range(40))},
    ],
}  # fmt: skip

# (task, split, [(inputs, targets), ...]) written by hand from the t5 formats.
EXPECTED = [
    ("hp_glue_cola_v002", "train", [("cola sentence: The book was read by John.", "acceptable")]),
    (
        "hp_glue_sst2_v002",
        "test",
        [("sst2 sentence: a gorgeous , witty film", "positive"), ("sst2 sentence: dull", "<unk>")],
    ),
    (
        "hp_glue_mrpc_v002",
        "train",
        [("mrpc sentence1: He said hi. sentence2: He greeted us.", "not_equivalent")],
    ),
    (
        "hp_glue_qqp_v002",
        "train",
        [("qqp question1: Why is it red? question2: What makes it red?", "duplicate")],
    ),
    (
        "hp_glue_stsb_v002",
        "validation",
        # x5, round half to even, /5: 12.5->12, 1.5->2, 15.5->16, 11.65->12, 22.5->22, 0.5->0.
        [
            ("stsb sentence1: A sentence2: B", t)
            for t in ("2.4", "0.4", "3.2", "2.4", "3.8", "4.4", "5.0", "0.0")
        ],
    ),
    (
        "hp_glue_mnli_v002",
        "train",
        [("mnli hypothesis: A man is awake. premise: A man sleeps.", "contradiction")],
    ),
    (
        "hp_glue_mnli_matched_v002",
        "validation",
        [("mnli hypothesis: H. premise: P.", "entailment")],
    ),
    (
        "hp_glue_mnli_mismatched_v002",
        "validation",
        [("mnli hypothesis: H. premise: P.", "neutral")],
    ),
    (
        "hp_glue_qnli_v002",
        "train",
        [("qnli question: Where is it? sentence: It is here.", "not_entailment")],
    ),
    (
        "hp_glue_rte_v002",
        "validation",
        [
            ("rte sentence1: S1. sentence2: S2.", "entailment"),
            ("rte sentence1: S1. sentence2: S3.", "not_entailment"),
        ],
    ),
    (
        # WNLI's classes are (not_entailment, entailment): label 1 is "entailment",
        # the reverse of RTE.
        "hp_glue_wnli_v002",
        "validation",
        [
            (
                "wnli sentence1: The fish ate the worm. It was tasty. "
                "sentence2: The worm was tasty.",
                "entailment",
            ),
            (
                "wnli sentence1: The fish ate the worm. It was hungry. "
                "sentence2: The worm was hungry.",
                "not_entailment",
            ),
        ],
    ),
    ("hp_glue_ax_v002", "test", [("mnli hypothesis: H premise: P", "<unk>")]),
    (
        "hp_super_glue_boolq_v102",
        "train",
        [("boolq passage: The sky is blue. question: is the sky blue", "True")],
    ),
    ("hp_super_glue_cb_v102", "train", [("cb hypothesis: H. premise: P.", "neutral")]),
    (
        "hp_super_glue_copa_v102",
        "train",
        [
            (
                "copa choice1: He dropped a hammer. choice2: He wore boots. "
                "premise: The man broke his toe. question: cause",
                "choice1",
            )
        ],
    ),
    (
        "hp_super_glue_multirc_v102",
        "validation",
        [
            (
                "multirc question: What did Sam eat? answer: An apple "
                "paragraph: Sam was hungry. He ate an apple.",
                "True",
            )
        ],
    ),
    (
        "hp_super_glue_record_v102",
        "validation",
        [
            (
                "record query: @placeholder won the race. entities: Alice, Bob "
                "passage: Alice won the race. Alice is fast. Bob came second",
                answer,
            )
            for answer in ("Alice", "Alice Smith")
        ]
        + [("record query: @placeholder? entities: X passage: X.", "<unk>")],
    ),
    ("hp_super_glue_rte_v102", "train", [("rte hypothesis: H. premise: P.", "not_entailment")]),
    (
        "hp_super_glue_wic_v102",
        "train",
        [("wic sentence1: The river bank. sentence2: The bank loan. word: bank", "False")],
    ),
    ("hp_super_glue_axb_v102", "test", [("rte hypothesis: S2. premise: S1.", "entailment")]),
    ("hp_super_glue_axg_v102", "test", [("rte hypothesis: H. premise: P.", "not_entailment")]),
    (
        # Training keeps only examples whose candidate is the referent (label 1).
        "hp_super_glue_wsc_v102_simple_train",
        "train",
        [
            ("wsc: Mitchell asked Tom if *he* could lend some money .", "Tom"),
            (
                "wsc: The boy continued to whip the pony , and eventually the pony threw him "
                'over. John laughed out quite loud. "Good for *him* ," he said.',
                "The boy",
            ),
        ],
    ),
    (
        "hp_super_glue_wsc_v102_simple_eval",
        "validation",
        [
            ("wsc: Mitchell asked Tom if *he* could lend some money .", "Tom"),
            (
                "wsc: The trophy does not fit into the suitcase because *it* is too large .",
                "the suitcase",
            ),
            (
                "wsc: The boy continued to whip the pony , and eventually the pony threw him "
                'over. John laughed out quite loud. "Good for *him* ," he said.',
                "The boy",
            ),
        ],
    ),
    (
        "hp_dpr_v001_simple",
        "train",
        [
            ("wsc: Bob asked Tom if *he* can lend some money.", "Tom"),
            ("wsc: Mary gave the book to Anna because she liked *her*.", "Anna"),
            # " he" inside "hen" is not the pronoun: a space must follow it.
            ("wsc: The hen said *he* was tired.", "The hen"),
        ],
    ),
    (
        "hp_squad_v010_allanswers",
        "validation",
        # Every non-word character is padded with spaces, whitespace collapsed (so
        # a trailing space remains after the final ".").
        [
            (
                "question: What is the capital of France ? "
                "context: Paris is the capital of France . ",
                "Paris",
            )
        ],
    ),
]


@pytest.fixture(scope="module")
def mocked(fixtures, tmp_path_factory):
    """Real TFDS builders serving the hand-written examples; the fixture T5 vocab."""
    vocab_file = fixtures / "t5_vocab" / "sentencepiece.model"
    names = [task for task, _, _ in EXPECTED] + [
        "hp_c4_v220_prefix_lm",
        "hp_glue_rte_v002_task_id",
        "hp_super_glue_wsc_v102_simple_eval_task_id",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPERPROMPT_VOCAB", str(vocab_file))
        with testing.mock_tfds(names, str(tmp_path_factory.mktemp("tfds")), examples=EXAMPLES):
            yield


def _read(task_name: str, split: str, sequence_length=None) -> list[dict]:
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(sequence_length, split=split, shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


@pytest.mark.parametrize("task_name,split,expected", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_text_matches_t5_format(mocked, task_name, split, expected):
    examples = _read(task_name, split)
    got = [
        (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()) for ex in examples
    ]
    assert got == expected


def test_tokens_are_the_t5_vocabulary_ids_with_eos(mocked):
    vocab = seqio.get_mixture_or_task("hp_glue_rte_v002").output_features["targets"].vocabulary
    (example, _) = _read("hp_glue_rte_v002", "train")
    assert vocab.vocab_size == 32100  # 32,000 pieces + 100 sentinels
    np.testing.assert_array_equal(
        example["inputs"], vocab.encode("rte sentence1: S1. sentence2: S2.") + [1]
    )
    np.testing.assert_array_equal(example["targets"], vocab.encode("entailment") + [1])
    assert vocab.decode(list(example["targets"][:-1])) == "entailment"


def test_ids_kept_for_evaluation(mocked):
    (multirc,) = _read("hp_super_glue_multirc_v102", "validation")
    assert (multirc["idx/paragraph"], multirc["idx/question"], multirc["idx/answer"]) == (3, 5, 7)
    record = _read("hp_super_glue_record_v102", "validation")
    assert [(r["idx/passage"], r["idx/query"]) for r in record] == [(1, 2), (1, 2), (9, 9)]
    assert [list(r["answers"]) for r in record] == [[b"Alice", b"Alice Smith"]] * 2 + [[]]
    (squad,) = _read("hp_squad_v010_allanswers", "validation")
    assert list(squad["answers"]) == [b"Paris", b"Paris , France"]
    (boolq,) = _read("hp_super_glue_boolq_v102", "train")
    assert boolq["idx"] == 4
    wsc = _read("hp_super_glue_wsc_v102_simple_eval", "validation")
    assert [w["label"] for w in wsc] == [1, 0, 1]  # gold labels for the wsc_simple metric


def test_task_id_variant_has_same_text_plus_documented_id(mocked):
    plain = _read("hp_glue_rte_v002", "train")
    with_id = _read("hp_glue_rte_v002_task_id", "train")
    assert [e["inputs_pretokenized"] for e in with_id] == [e["inputs_pretokenized"] for e in plain]
    assert [int(e["task_id"]) for e in with_id] == [7, 7]  # rte is GLUE task 7
    wsc = _read("hp_super_glue_wsc_v102_simple_eval_task_id", "validation")
    assert {int(e["task_id"]) for e in wsc} == {7}  # wsc is SuperGLUE task 7


def test_c4_prefix_lm_splits_each_piece_into_prefix_and_rest(mocked):
    text = EXAMPLES["c4/en"][0]["text"]
    vocab = seqio.get_mixture_or_task("hp_c4_v220_prefix_lm").output_features["targets"].vocabulary
    tokens = vocab.encode(text)
    length = 16  # pieces of 15 tokens + EOS
    examples = _read("hp_c4_v220_prefix_lm", "train", {"inputs": length, "targets": length})
    assert len(examples) == -(-len(tokens) // (length - 1))
    pieces = []
    for ex in examples:
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS on both
        prefix, rest = list(ex["inputs"][:-1]), list(ex["targets"][:-1])
        assert len(prefix) >= 1 and len(rest) >= 1
        assert len(prefix) + len(rest) <= length - 1
        pieces += prefix + rest
    # Concatenating every (prefix, rest) gives back the document, in order.
    assert pieces == tokens


def _apply(preprocessor, example: dict) -> dict:
    ds = tf.data.Dataset.from_tensors(example)
    out = next(preprocessor(ds).as_numpy_iterator())
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


def test_spot_source_formats():
    """SPoT-style formats of the source datasets the t5 library does not cover."""
    sentiment140 = spot_spec("hp_spot_sentiment140")
    out = _apply(sentiment140, {"text": "great  day", "polarity": 4})
    assert (out["inputs"], out["targets"]) == ("sentiment140 text: great day", "positive")
    snli = spot_spec("hp_spot_snli")
    out = _apply(snli, {"premise": "P.", "hypothesis": "H.", "label": 2})
    assert (out["inputs"], out["targets"]) == ("snli hypothesis: H. premise: P.", "contradiction")
    goemotions = spot_spec("hp_spot_goemotions")
    flags = {name: name in ("joy", "love") for name in spot._GOEMOTIONS}
    out = _apply(goemotions, {"comment_text": "yay", **flags})
    assert (out["inputs"], out["targets"]) == ("goemotions comment_text: yay", "joy, love")
    hellaswag = spot_spec("hp_spot_hellaswag")
    out = _apply(hellaswag, {"context": "He opens", "endings": ["a door", "a book"], "label": 1})
    assert out["inputs"] == "hellaswag question: He opens choice0: a door choice1: a book"
    assert out["targets"] == "a book"
    out = _apply(hellaswag, {"context": "X", "endings": ["a", "b"], "label": -1})  # test split
    assert out["targets"] == "<unk>"
    mrqa = spot_spec("hp_spot_mrqa_news_qa")
    out = _apply(mrqa, {"question": "Who?", "context": "Ann.", "answers": ["Ann", "ann"]})
    assert (out["inputs"], out["targets"]) == ("news_qa question: Who? context: Ann.", "Ann")
    wmt = spot_spec("hp_spot_wmt16_enro")
    out = _apply(wmt, {"en": "Hello.", "ro": "Salut."})
    assert (out["inputs"], out["targets"]) == ("translate English to Romanian: Hello.", "Salut.")
    dart = spot_spec("hp_spot_gem_dart")
    out = _apply(dart, {"tripleset": ["a | b | c", "d | e | f"], "target": "T."})
    assert (out["inputs"], out["targets"]) == ("dart: a | b | c ; d | e | f", "T.")


def spot_spec(name: str):
    (preprocessor,) = specs.get_spec(name).text_preprocessors
    return preprocessor
