"""Shared pytest fixtures: where the real test fixtures (checkpoints, vocab, prompts) are.

The fixtures folder is `$HYPERPROMPT_FIXTURES`, or `shared/fixtures` next to the
repository root (`<repo>/../shared/fixtures`). Tests that need it skip, with a message
naming the folder, only where it is truly absent.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def fixtures_dir() -> pathlib.Path:
    """The fixtures folder (it may not exist; see `fixtures` below)."""
    env = os.environ.get("HYPERPROMPT_FIXTURES")
    if env:
        return pathlib.Path(env)
    return REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
    """Path of the real fixtures folder; skips the test if the folder is absent."""
    path = fixtures_dir()
    if not path.is_dir():
        pytest.skip(
            f"Fixtures folder {path} not found (set HYPERPROMPT_FIXTURES to the folder "
            "holding t5x_checkpoints/, t5_vocab/, pretrained_prompts/)."
        )
    return path


@pytest.fixture(scope="session")
def tiny_t5x_checkpoint(fixtures: pathlib.Path) -> pathlib.Path:
    """The real tiny T5.1.1 t5x checkpoint directory (`.../checkpoint_3`)."""
    path = fixtures / "t5x_checkpoints" / "test_t5_1_1_tiny" / "checkpoint_3"
    if not path.is_dir():
        pytest.fail(f"The fixtures folder {fixtures} exists but lacks {path}.")
    return path
