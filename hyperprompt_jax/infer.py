"""`python -m hyperprompt_jax.infer`: decode a dataset split or a text file to JSON lines.

Two inputs, chosen by gin (`gin/runs/infer.gin`):

* `MIXTURE_OR_TASK_NAME` + `INFER_SPLIT`: every example of the split of each task
  (preprocessed exactly as in training and evaluation). One line per example:
  `{"task", "index", "task_id", "inputs", "targets", "prediction"}`.
* `INPUT_FILE`: one input per line, either plain text or a JSON object
  `{"inputs": "...", "task_id": 3}` (a task id per line for task-conditioned models;
  plain lines get `TASK_ID`). The text is tokenized with the model's input vocabulary
  and an EOS is appended, as seqio does. One line per input:
  `{"index", "task_id", "inputs", "prediction"}`.

Predictions are written to `INFER_OUTPUT_FILE` (process 0 only). Batches are padded to
`BATCH_SIZE` so one compiled decoder serves the whole run.
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("infer")

import json
import logging
import sys
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from hyperprompt_jax import data, gin_utils
from hyperprompt_jax import evaluation as evaluation_lib
from hyperprompt_jax import model_dir as model_dir_lib
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _check_task_id(value: Any, num_tasks: int | None, where: str) -> int:
    """A task id from user input: an int (not a bool, float, string or null) in range."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: task_id must be an integer, got {value!r}.")
    if value < 0 or (num_tasks is not None and value >= num_tasks):
        limit = f"NUM_TASKS={num_tasks}" if num_tasks is not None else "the number of tasks"
        raise UserError(
            f"{where}: task_id {value} is out of range: expected 0 <= task_id < {limit}."
        )
    return value


def read_input_file(
    path: str, default_task_id: int, num_tasks: int | None = None
) -> list[tuple[str, int]]:
    """`[(text, task_id)]` from a text or JSON-lines file (see the module docstring).

    Args:
      path: the file.
      default_task_id: task id of plain-text lines (gin `TASK_ID`).
      num_tasks: NUM_TASKS of a task-conditioned model (None: ids only need be >= 0).

    Raises:
      UserError: a missing file or a directory, a line that is not UTF-8, invalid JSON,
        a JSON line without a string `inputs`, or a bad task id (naming file and line).
    """
    if not tf.io.gfile.exists(path):
        raise UserError(f"INPUT_FILE {path!r} does not exist.")
    if tf.io.gfile.isdir(path):
        raise UserError(f"INPUT_FILE {path!r} is a directory; expected a text file.")
    _check_task_id(default_task_id, num_tasks, "TASK_ID")
    out = []
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{where}: not UTF-8 text ({e.reason} at byte {e.start})."
                ) from None
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: invalid JSON: {e}") from None
                if not isinstance(record.get("inputs"), str):
                    raise UserError(f"{where}: expected a string 'inputs' field.")
                tid = _check_task_id(record.get("task_id", default_task_id), num_tasks, where)
                out.append((record["inputs"], tid))
            else:
                out.append((line, default_task_id))
    return out


def _file_features(
    texts: Sequence[tuple[str, int]], vocabulary: Any, lengths: Mapping[str, int]
) -> list[dict[str, np.ndarray]]:
    """Model features of each input line (EOS appended after trimming, as seqio).

    Logs once how many inputs were longer than `lengths['inputs']` and were cut.
    """
    in_len, out_len = lengths["inputs"], lengths["targets"]
    out, cut = [], 0
    for text, task_id in texts:
        ids = list(vocabulary.encode(text))
        cut += len(ids) > in_len - 1
        ids = ids[: in_len - 1] + [vocabulary.eos_id]
        tokens = np.zeros(in_len, np.int32)
        tokens[: len(ids)] = ids
        out.append(
            {
                "encoder_input_tokens": tokens,
                "decoder_input_tokens": np.zeros(out_len, np.int32),
                "decoder_target_tokens": np.zeros(out_len, np.int32),
                "decoder_loss_weights": np.zeros(out_len, np.int32),
                "task_ids": np.asarray(task_id, np.int32),
            }
        )
    if cut:
        logger.warning(
            "%d of %d inputs are longer than TASK_FEATURE_LENGTHS['inputs']=%d tokens (with "
            "EOS) and were truncated.",
            cut,
            len(texts),
            in_len,
        )
    return out


def infer(
    *,
    model: Any,
    checkpoint_path: str,
    output_file: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    mixture_or_task_name: str | None = None,
    split: str = "validation",
    input_file: str | None = None,
    task_id: int = 0,
    partitioner: partitioning_lib.Partitioner | None = None,
    decoder_params: Mapping[str, Any] | None = None,
    num_examples: int | None = None,
    feature_converter: seqio.FeatureConverter | None = None,
) -> int:
    """Decodes a split or a file of inputs into JSON lines (gin entry point).

    Args:
      model: the model (gin `%MODEL` with the method's hooks).
      checkpoint_path: model dir, `checkpoint_<step>` dir, t5x checkpoint or HF dir.
      output_file: JSON-lines output path.
      task_feature_lengths: `{'inputs': ..., 'targets': ...}` (targets = decode length).
      batch_size: rows per decoding batch.
      mixture_or_task_name: decode this task / mixture's `split` (unless `input_file`).
      split: the split.
      input_file: decode these inputs instead (takes precedence).
      task_id: task id of plain-text input lines.
      partitioner: mesh and rules (default: data parallel).
      decoder_params: extra decode arguments (e.g. `{'alpha': 0.6}`).
      num_examples: at most this many examples per task (split mode).
      feature_converter: default `EncDecTaskIdFeatureConverter`.

    Returns:
      The number of predictions written.

    Raises:
      UserError: no input given, an unknown task, a missing or malformed input file, a
        task id out of range, an output path that is a directory (all before decoding).
    """
    if input_file:
        mixture_or_task_name = None  # The file takes precedence (see runs/infer.gin).
    elif not mixture_or_task_name:
        raise UserError(
            "Nothing to decode: set INPUT_FILE (one input per line) or MIXTURE_OR_TASK_NAME "
            "(with INFER_SPLIT)."
        )
    if not output_file or not isinstance(output_file, str):
        raise UserError(f"INFER_OUTPUT_FILE must be a file path, got {output_file!r}.")
    if tf.io.gfile.isdir(output_file):
        raise UserError(
            f"INFER_OUTPUT_FILE {output_file!r} is a directory; give a file path, e.g. "
            f"{output_file.rstrip('/')}/predictions.jsonl."
        )
    directory = output_file.rsplit("/", 1)[0] if "/" in output_file else "."
    model_dir_lib.ensure_writable_dir(directory, "INFER_OUTPUT_FILE's directory")
    lengths = dict(task_feature_lengths)
    dataset_cfg = data.DatasetConfig(mixture_or_task_name or "<file>", lengths, split, batch_size)
    dataset_cfg.check_batch_size("BATCH_SIZE")
    num_tasks = gin_utils.query_macro("NUM_TASKS", None)
    converter = feature_converter or data.default_feature_converter(num_tasks=num_tasks)
    if mixture_or_task_name:
        data.check_data(mixture_or_task_name, split)
        data.check_num_tasks(mixture_or_task_name, split, num_tasks)
    else:
        texts = read_input_file(input_file, task_id, num_tasks)
    shapes = evaluation_lib.model_input_shapes(converter, dataset_cfg)
    trainer, step, params = evaluation_lib.load_for_inference(
        model, shapes, checkpoint_path, partitioner
    )
    vocabulary = model.output_vocabulary

    def predict(features: Sequence[dict]) -> Iterator[np.ndarray]:
        """Decoded tokens of every feature dict, in their order."""
        out: list[np.ndarray | None] = [None] * len(features)
        for positions, batch in data.decoding_batches(features, batch_size):
            arrays = data.put_on_mesh(batch, trainer.partitioner, whole=True, num_tasks=num_tasks)
            tokens = np.asarray(trainer.predict_step(params, arrays, decoder_params))
            for position, row in zip(positions, tokens, strict=False):
                out[position] = row
        yield from out

    records = []
    if input_file:
        for i, ((text, tid), tokens) in enumerate(
            zip(
                texts,
                predict(_file_features(texts, model.input_vocabulary, lengths)),
                strict=True,
            )
        ):
            records.append(
                {
                    "index": i,
                    "task_id": tid,
                    "inputs": text,
                    "prediction": vocabulary.decode(tokens.tolist()),
                }
            )
    else:
        for task in data.tasks_of(mixture_or_task_name):
            if split not in task.splits:
                continue
            over, total = data.count_over_long(task, split, lengths, num_examples)
            data.warn_over_long(task.name, over, total, lengths)
            ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
            if num_examples:
                ds = ds.take(num_examples)
            examples = list(ds.as_numpy_iterator())
            # The converter maps examples one to one (no packing), in order.
            model_ds = converter(ds, lengths)
            features = [
                {k: v for k, v in f.items() if k in shapes} for f in model_ds.as_numpy_iterator()
            ]
            for i, (example, tokens) in enumerate(zip(examples, predict(features), strict=True)):
                inputs = example.get("inputs_pretokenized")
                targets = example.get("targets_pretokenized")
                records.append(
                    {
                        "task": task.name,
                        "index": i,
                        "task_id": int(example.get("task_id", 0)),
                        "inputs": _text(inputs)
                        if inputs is not None
                        else vocabulary.decode(example["inputs"].tolist()),
                        "targets": _text(targets)
                        if targets is not None
                        else vocabulary.decode(example["targets"].tolist()),
                        "prediction": vocabulary.decode(tokens.tolist()),
                    }
                )
    if jax.process_index() == 0:
        model_dir_lib.write_text(output_file, "".join(json.dumps(r) + "\n" for r in records))
        logger.info("Wrote %d predictions of step %d to %s.", len(records), step, output_file)
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.infer --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="infer", module_name="hyperprompt_jax.infer")


if __name__ == "__main__":
    sys.exit(main())
