"""Bad input: data that is not prepared, unknown names, a missing vocabulary file."""

from __future__ import annotations

import pytest
import seqio
from hyperprompt_jax.tasks import DatasetNotPreparedError, mixtures, testing, vocab

from hyperprompt_jax import task_registry


@pytest.fixture
def empty_data_dir(tmp_path):
    """TFDS reads from an empty directory (nothing prepared) for the test's duration."""
    seqio.utils.set_tfds_data_dir_override(str(tmp_path))
    testing.clear_builder_cache()
    yield str(tmp_path)
    seqio.utils.set_tfds_data_dir_override(None)
    testing.clear_builder_cache()


def test_unprepared_task_gives_one_message_with_the_prepare_command(empty_data_dir):
    task = task_registry.get_mixture_or_task("hp_glue_rte_v002")
    with pytest.raises(DatasetNotPreparedError) as info:
        task.get_dataset({"inputs": 16, "targets": 4}, split="train")
    message = str(info.value)
    assert "TFDS dataset 'glue/rte:2.0.0' is not prepared" in message
    assert empty_data_dir in message
    assert (
        f"python -m hyperprompt_jax.task_registry prepare glue/rte:2.0.0 --data_dir={empty_data_dir}"
        in message
    )
    assert isinstance(info.value, ValueError)  # launchers catch ValueError
    # Every other entry point that needs the data fails the same way.
    with pytest.raises(DatasetNotPreparedError, match="glue/rte:2.0.0"):
        task.num_input_examples("train")
    with pytest.raises(DatasetNotPreparedError, match="glue/rte:2.0.0"):
        task.splits  # noqa: B018  (the property reads the metadata)


def test_check_prepared_lists_all_missing_datasets_of_a_mixture(empty_data_dir):
    with pytest.raises(DatasetNotPreparedError) as info:
        task_registry.check_prepared("hp_super_glue_v102_multitask", split="train")
    message = str(info.value)
    # 7 SuperGLUE training configs + WSC + DPR; the test-only diagnostics are skipped.
    assert "9 TFDS datasets are not prepared" in message
    assert "super_glue/record:1.0.2" in message and "definite_pronoun_resolution:1.1.0" in message
    assert "super_glue/axb" not in message
    assert "prepare hp_super_glue_v102_multitask" in message


def test_c4_and_manual_datasets_explain_the_extra_step(empty_data_dir):
    with pytest.raises(DatasetNotPreparedError) as info:
        task_registry.check_prepared("hp_spot_summarization")
    message = str(info.value)
    assert "newsroom:1.0.0 needs a manual download first" in message
    with pytest.raises(DatasetNotPreparedError, match="Apache Beam"):
        task_registry.check_prepared("hp_c4_v220_prefix_lm")


def test_cli_prints_the_message_without_a_traceback(empty_data_dir, capsys):
    assert task_registry.main(["check", "hp_glue_rte_v002"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'hp_glue_rte_v002' cannot be read")
    assert "Traceback" not in err
    assert task_registry.main(["list", "hp_glue_rte"]) == 0
    assert capsys.readouterr().out.split() == ["hp_glue_rte_v002", "hp_glue_rte_v002_task_id"]


@pytest.mark.parametrize(
    "typo,suggestion",
    [
        ("hp_glue_rtee_v002", "hp_glue_rte_v002"),
        ("glue_rte_v002", "hp_glue_rte_v002"),  # the t5 library's name, without hp_
        ("hp_super_glue_v102_multitsk", "hp_super_glue_v102_multitask"),
        ("hp_glue_v002_proportinal", "hp_glue_v002_proportional"),
    ],
)
def test_unknown_name_suggests_close_ones(typo, suggestion):
    with pytest.raises(ValueError, match=f"Unknown task or mixture '{typo}'") as info:
        task_registry.get_mixture_or_task(typo)
    assert f"Did you mean: {suggestion}" in str(info.value)


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match="List the registered names") as info:
        task_registry.get_mixture_or_task("zzzzzzzz")
    assert "Did you mean" not in str(info.value)


def test_task_id_helpers_reject_bad_names():
    assert mixtures.task_id("hp_super_glue_axg_v102_task_id") == 5  # cast as RTE
    with pytest.raises(ValueError, match="did you mean hp_glue_rte_v002_task_id"):
        mixtures.task_id("hp_glue_rte_v002")
    with pytest.raises(ValueError, match="not a multi-task mixture"):
        mixtures.task_order("hp_glue_v002_proportional")


def test_missing_vocabulary_file_names_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(vocab.VOCAB_ENV_VAR, str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="HYPERPROMPT_VOCAB"):
        vocab.get_default_vocabulary().encode("hello")


def test_vocabulary_path_is_resolved_lazily(fixtures, monkeypatch):
    # Registration never reads the model; the path is looked up at first use, so
    # the default (GCS) never has to be reachable when a local model is configured.
    monkeypatch.delenv(vocab.VOCAB_ENV_VAR, raising=False)
    assert vocab.sentencepiece_model_path() == vocab.DEFAULT_SPM_PATH
    monkeypatch.setenv(vocab.VOCAB_ENV_VAR, str(fixtures / "t5_vocab" / "sentencepiece.model"))
    t5_vocab = vocab.get_default_vocabulary()
    assert t5_vocab.encode("Hello world") == [8774, 296]
    assert t5_vocab.vocab_size == 32100
    assert t5_vocab.decode([8774, 296]) == "Hello world"
    assert t5_vocab.decode([32099]).strip() == "<extra_id_0>"  # first of the 100 sentinels
