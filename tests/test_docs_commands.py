"""The documentation's shell commands run, in order, exactly as written.

A fenced `sh` / `bash` block in README.md or docs/*.md preceded by the line
`<!-- docs-test -->` is run by this test. The blocks of one file run in document
order, each with `bash -e -o pipefail`, all in one fresh temporary directory (so a
later block sees what an earlier one wrote, as a reader's shell would), and each must
exit 0. Two documented mechanisms keep this small; nothing else is changed:

* `pip install ...` lines are not run: the package under test is already installed in
  this environment (the test checks that it is importable instead);
* `HYPERPROMPT_EXTRA_FLAGS` (documented in docs/cli.md, honoured by every gin entry
  point) shortens every run: 20 train steps, evaluation on 32 examples per task.

So the README's quickstart chain (train into `quickstart/`, the baseline, then eval
and infer reading `quickstart/`) runs as written, shortened from 2,000 steps to 20.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- docs-test -->"
SHORT_RUNS = (
    "--gin.TRAIN_STEPS=20 --gin.EVAL_PERIOD=None --gin.SAVE_PERIOD=20 --gin.LOG_PERIOD=10 "
    "--gin.EVAL_NUM_EXAMPLES=32"
)


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int  # 1-based line of the opening fence
    text: str


def marked_blocks(path: pathlib.Path) -> list[Block]:
    """The `sh` / `bash` blocks of a Markdown file that follow a `<!-- docs-test -->` line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MARKER:
            j = i + 1
            if j >= len(lines) or not re.fullmatch(r"```(sh|bash)\s*", lines[j].strip()):
                raise AssertionError(f"{path}:{i + 1}: {MARKER} must precede a ```sh block")
            k = j + 1
            while lines[k].strip() != "```":
                k += 1
            blocks.append(Block(path, j + 1, "\n".join(lines[j + 1 : k])))
            i = k
        i += 1
    return blocks


def _without_pip_install(script: str) -> str:
    """Drops `pip install ...` commands (also `pip install ... && rest` keeps `rest`)."""
    out = []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("pip install"):
            _, sep, rest = stripped.partition("&&")
            if not sep:
                continue
            line = rest.strip()
        out.append(line)
    return "\n".join(out)


def documents() -> list[pathlib.Path]:
    docs = sorted((ROOT / "docs").glob("*.md")) if (ROOT / "docs").is_dir() else []
    return [p for p in [ROOT / "README.md", *docs] if marked_blocks(p)]


def test_markers_find_the_readme_quickstart_chain():
    blocks = marked_blocks(ROOT / "README.md")
    text = "\n".join(b.text for b in blocks)
    assert "--gin.MODEL_DIR=\"'quickstart'\"" in text  # the quickstart trains here ...
    assert "--gin.CHECKPOINT_PATH=\"'quickstart'\"" in text  # ... and eval / infer read it
    assert "hyperprompt_jax.eval" in text and "hyperprompt_jax.infer" in text
    assert _without_pip_install("pip install -e . && python -m x\npip install y\nls") == (
        "python -m x\nls"
    )


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documented_commands_run_in_order(path, tmp_path):
    import hyperprompt_jax  # noqa: F401  (what the skipped `pip install` lines provide)

    env = {
        **os.environ,
        "HYPERPROMPT_EXTRA_FLAGS": SHORT_RUNS,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
    }
    for block in marked_blocks(path):
        script = _without_pip_install(block.text)
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        where = f"{block.path.name}:{block.line}"
        assert result.returncode == 0, f"{where} failed:\n{script}\n{result.stderr[-3000:]}"
    if path.name == "README.md":
        # The chain: one model directory trained, evaluated and decoded.
        assert (tmp_path / "quickstart" / "checkpoint_20").is_dir()
        assert (tmp_path / "quickstart" / "eval" / "eval_metrics.jsonl").is_file()
        predictions = (tmp_path / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 2
