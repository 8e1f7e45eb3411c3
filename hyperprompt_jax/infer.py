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
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from hyperprompt_jax import eval as eval_lib
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import utils

logger = logging.getLogger("hyperprompt_jax")


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def read_input_file(path: str, default_task_id: int) -> list[tuple[str, int]]:
    """`[(text, task_id)]` from a text or JSON-lines file (see the module docstring).

    Raises:
      ValueError: a missing file, or a JSON line without a string `inputs`.
    """
    if not tf.io.gfile.exists(path):
        raise ValueError(f"INPUT_FILE {path!r} does not exist.")
    out = []
    with tf.io.gfile.GFile(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON: {e}") from e
                if not isinstance(record.get("inputs"), str):
                    raise ValueError(f"{path}:{number}: expected a string 'inputs' field.")
                out.append((record["inputs"], int(record.get("task_id", default_task_id))))
            else:
                out.append((line, default_task_id))
    return out


def _file_features(
    texts: Sequence[tuple[str, int]], vocabulary: Any, lengths: Mapping[str, int]
) -> Iterator[dict[str, np.ndarray]]:
    """Model features of each input line (EOS appended after trimming, as seqio)."""
    in_len, out_len = lengths["inputs"], lengths["targets"]
    for text, task_id in texts:
        ids = list(vocabulary.encode(text))[: in_len - 1] + [vocabulary.eos_id]
        tokens = np.zeros(in_len, np.int32)
        tokens[: len(ids)] = ids
        yield {
            "encoder_input_tokens": tokens,
            "decoder_input_tokens": np.zeros(out_len, np.int32),
            "decoder_target_tokens": np.zeros(out_len, np.int32),
            "decoder_loss_weights": np.zeros(out_len, np.int32),
            "task_ids": np.asarray(task_id, np.int32),
        }


def _batched(items: Iterable[dict], batch_size: int) -> Iterator[tuple[int, dict]]:
    """Groups feature dicts into `batch_size` rows, padding the last batch."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield batch_size, {k: np.stack([c[k] for c in chunk]) for k in chunk[0]}
            chunk = []
    if chunk:
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        yield n, {k: np.stack([c[k] for c in chunk]) for k in chunk[0]}


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
      ValueError: no input given, an unknown task, a missing file.
    """
    if input_file:
        mixture_or_task_name = None  # The file takes precedence (see runs/infer.gin).
    elif not mixture_or_task_name:
        raise ValueError(
            "Nothing to decode: set INPUT_FILE (one input per line) or MIXTURE_OR_TASK_NAME "
            "(with INFER_SPLIT)."
        )
    directory = output_file.rsplit("/", 1)[0] if "/" in output_file else "."
    utils.ensure_writable_dir(directory, "INFER_OUTPUT_FILE's directory")
    converter = feature_converter or utils.default_feature_converter()
    if mixture_or_task_name:
        utils.check_data(mixture_or_task_name, split)
    else:
        texts = read_input_file(input_file, task_id)
    lengths = dict(task_feature_lengths)
    shapes = eval_lib.model_input_shapes(
        converter,
        utils.DatasetConfig(mixture_or_task_name or "<file>", lengths, split, batch_size),
    )
    trainer, step, params = eval_lib.load_for_inference(model, shapes, checkpoint_path, partitioner)
    vocabulary = model.output_vocabulary

    def predict(features: Iterable[dict]) -> Iterator[np.ndarray]:
        for n, batch in _batched(features, batch_size):
            arrays = {
                k: jax.make_array_from_callback(
                    v.shape, trainer.partitioner.batch_sharding(v.ndim), lambda idx, v=v: v[idx]
                )
                for k, v in batch.items()
            }
            tokens = np.asarray(trainer.predict_step(params, arrays, decoder_params))
            yield from tokens[:n]

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
        provider = utils.get_mixture_or_task(mixture_or_task_name)
        tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
        for task in tasks:
            if split not in task.splits:
                continue
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
        utils.write_text(output_file, "".join(json.dumps(r) + "\n" for r in records))
        logger.info("Wrote %d predictions of step %d to %s.", len(records), step, output_file)
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.infer --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="infer", module_name="hyperprompt_jax.infer")


if __name__ == "__main__":
    sys.exit(main())
