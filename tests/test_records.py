"""What a run records about itself: config.gin names the trained parameters."""

from __future__ import annotations

import pytest

import gin
from hyperprompt_jax import summaries, train


@gin.configurable("record_demo")
def record_demo(trainable_patterns=train._FROM_GIN_MACRO):
    return trainable_patterns


@pytest.mark.parametrize("patterns", [None, ["prompt/.*", "router/.*"]])
def test_config_record_spells_out_trainable_patterns(patterns):
    try:
        gin.parse_config("")
        record_demo()  # gin records the unbound default it used
        assert "'TRAINABLE_PATTERNS from gin'" in gin.operative_config_str()
        text = summaries.config_record(
            gin.operative_config_str(), train._FROM_GIN_MACRO, patterns, 24_576, 783_150_080
        )
    finally:
        gin.clear_config()
    assert "TRAINABLE_PATTERNS from gin" not in text
    assert f"record_demo.trainable_patterns = {patterns!r}" in text
    assert "# Trained parameters: 24,576 of 783,150,080 (0.0031%)" in text
    shown = "every parameter" if patterns is None else "'prompt/.*', 'router/.*'"
    assert text.endswith(f"# selected by TRAINABLE_PATTERNS: {shown}\n")
