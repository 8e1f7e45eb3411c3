"""The default vocabulary of every registered task: T5's SentencePiece model.

All public T5 / T5.1.1 checkpoints use the `cc_all.32000` SentencePiece model with 100
extra ids (32,100 ids, embeddings padded to 32,128). Tasks are registered at import
time, long before gin files are parsed, so the model path cannot be fixed when the
vocabulary object is built. `T5Vocabulary` therefore resolves its path lazily, the first
time a token is encoded or decoded, in this order:

1. gin: `hyperprompt_jax.tasks.sentencepiece_model_path.path = "/path/spm.model"`;
2. the environment variable `HYPERPROMPT_VOCAB`;
3. `gs://t5-data/vocabs/cc_all.32000/sentencepiece.model` (read by TensorFlow's GCS
   file system; nothing is read before the first tokenization).

The path is re-resolved on every use, so tests may point `HYPERPROMPT_VOCAB` at the
copy in `shared/fixtures/t5_vocab/` at any time.
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf
import tensorflow_text as tf_text

import gin

DEFAULT_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
VOCAB_ENV_VAR = "HYPERPROMPT_VOCAB"


@gin.configurable(module="hyperprompt_jax.tasks")
def sentencepiece_model_path(path: str | None = None) -> str:
    """Returns the SentencePiece model file of the default vocabulary.

    Args:
      path: explicit path (set by gin); wins over the environment variable.

    Returns:
      `path`, else `$HYPERPROMPT_VOCAB`, else the public T5 model on GCS.
    """
    return path or os.environ.get(VOCAB_ENV_VAR) or DEFAULT_SPM_PATH


class T5Vocabulary(seqio.SentencePieceVocabulary):
    """`seqio.SentencePieceVocabulary` whose model path is resolved at first use.

    Equality (which seqio uses to check that the tasks of a mixture share one
    vocabulary) compares the resolved path and the number of extra ids, so two
    instances are interchangeable exactly when they would load the same model.
    """

    def __init__(self, extra_ids: int = DEFAULT_EXTRA_IDS):
        super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)
        self._tf_tokenizer = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_tf_tokenizer", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._tf_tokenizer = None

    def _resolve(self) -> str:
        path = sentencepiece_model_path()
        if path != self._sentencepiece_model_file:
            # A new path (gin or env var changed): drop the loaded model so the next
            # call to `_model_context` loads the new one.
            self._sentencepiece_model_file = path
            self._model = None
            self._tf_tokenizer = None
        return path

    @property
    def tf_tokenizer(self) -> tf_text.SentencepieceTokenizer:
        """One TF tokenizer, created eagerly and shared by every tf.data pipeline.

        seqio builds a new tokenizer per call, which embeds the 800 KB model as a
        constant in every `map` function (about 0.3 s per pipeline); capturing one
        eagerly created tokenizer resource instead makes building a task's pipeline
        about ten times faster.
        """
        self._resolve()
        if self._tf_tokenizer is None:
            with tf.init_scope():
                self._tf_tokenizer = tf_text.SentencepieceTokenizer(model=self.sp_model)
        return self._tf_tokenizer

    def _model_context(self):
        path = self._resolve()
        if self._model is None and not path.startswith("gs://") and not tf.io.gfile.exists(path):
            raise ValueError(
                f"SentencePiece model {path!r} does not exist. Set "
                f"`{VOCAB_ENV_VAR}` or gin `hyperprompt_jax.tasks.sentencepiece_model_path.path` "
                "to T5's `sentencepiece.model` (cc_all.32000)."
            )
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        return self._resolve()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, seqio.SentencePieceVocabulary):
            return False
        return (
            self.sentencepiece_model_file == other.sentencepiece_model_file
            and self.extra_ids == other.extra_ids
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.extra_ids))

    def __str__(self) -> str:
        # seqio's __str__ hashes the loaded model; keep printing free of I/O.
        return f"T5Vocabulary(file={self.sentencepiece_model_file}, extra_ids={self.extra_ids})"


_DEFAULT_VOCABULARY = T5Vocabulary()


def get_default_vocabulary() -> seqio.Vocabulary:
    """Returns the vocabulary shared by every task registered in this package."""
    return _DEFAULT_VOCABULARY


# The task-id feature is an int32 scalar; it is never tokenized, so a size-0
# pass-through vocabulary only satisfies `seqio.Feature`'s interface.
_TASK_ID_VOCABULARY = seqio.PassThroughVocabulary(size=0)


def get_output_features(with_task_id: bool = False) -> dict[str, seqio.Feature]:
    """Returns the output features of the registered tasks.

    Args:
      with_task_id: add `task_id` (int32 scalar, shape `[]` per example), which the
        multi-task mixtures carry and `EncDecTaskIdFeatureConverter` turns into the
        model feature `task_ids` `[batch]`.

    Returns:
      `inputs` (optional, as in the t5 library) and `targets`, both with EOS.
    """
    vocab = get_default_vocabulary()
    features = {
        "inputs": seqio.Feature(vocabulary=vocab, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocab, add_eos=True),
    }
    if with_task_id:
        features["task_id"] = seqio.Feature(
            vocabulary=_TASK_ID_VOCABULARY, add_eos=False, dtype=tf.int32, rank=0
        )
    return features
