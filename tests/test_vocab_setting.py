"""One vocabulary setting reaches every vocabulary a run builds (offline runs).

A SentencePiece model is trained on the fly (no downloads). With `HYPERPROMPT_VOCAB`
(or the gin binding `hyperprompt_jax.tasks.sentencepiece_model_path.path`) pointing at
it, the model gin files' `VOCABULARY` (used by decoding and evaluation: `eos_id`) and
the registered tasks' output features read that file and never `gs://`.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm

from hyperprompt_jax import data, gin_utils


@pytest.fixture(scope="module")
def local_spm(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("spm")
    text = work / "text.txt"
    text.write_text(
        "\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200))
    )
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(work / "local"), vocab_size=40,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
    )  # fmt: skip
    return str(work / "local.model")


def _model_and_task_vocabularies():
    from hyperprompt_jax import task_registry

    data.import_task_modules()
    gin_utils.parse_gin(["models/t5_1_1_small.gin", "methods/prompt_tuning.gin"], finalize=False)
    model = gin_utils.configured("MODEL")
    task = task_registry.get_mixture_or_task("hp_super_glue_rte_v102")
    return model, task.output_features


@pytest.mark.parametrize("how", ["env", "gin"])
def test_one_setting_moves_model_and_task_vocabularies(local_spm, monkeypatch, how):
    import gin

    monkeypatch.delenv("HYPERPROMPT_VOCAB", raising=False)
    if how == "env":
        monkeypatch.setenv("HYPERPROMPT_VOCAB", local_spm)
    try:
        model, features = _model_and_task_vocabularies()
        if how == "gin":
            gin.bind_parameter("hyperprompt_jax.tasks.sentencepiece_model_path.path", local_spm)
        for vocab in (model.input_vocabulary, model.output_vocabulary,
                      features["inputs"].vocabulary, features["targets"].vocabulary):  # fmt: skip
            assert vocab.sentencepiece_model_file == local_spm
            assert vocab.eos_id == 1  # what decoding reads at the first evaluation
            assert vocab.vocab_size == 40 + 100  # the local pieces plus T5's 100 extra ids
        assert model.output_vocabulary == features["targets"].vocabulary
        assert (
            model.output_vocabulary.decode(model.output_vocabulary.encode("the fox")) == "the fox"
        )
    finally:
        gin.clear_config()
