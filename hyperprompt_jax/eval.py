"""`python -m hyperprompt_jax.eval`: evaluate one checkpoint with seqio metrics.

The evaluation itself is the library module `evaluation.py` (also used by training);
this entry point only wires gin to it:

  python -m hyperprompt_jax.eval --gin_file=models/... --gin_file=methods/... \\
    --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="'/model_dir'" \\
    --gin.MIXTURE_OR_TASK_NAME="'...'" --gin.EVAL_OUTPUT_DIR="'/out'"
`CHECKPOINT_PATH` is a model directory (its latest checkpoint), a `checkpoint_<step>`
directory of this library, a t5x checkpoint or a Hugging Face T5 directory.
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("eval")

import sys
from typing import Any, Mapping, Sequence

import jax
import seqio

from hyperprompt_jax import data, gin_utils, summaries
from hyperprompt_jax import evaluation as evaluation_lib
from hyperprompt_jax import model_dir as model_dir_lib
from hyperprompt_jax import partitioning as partitioning_lib

# Old names, for callers that imported the library from here.
from hyperprompt_jax.evaluation import (  # noqa: F401
    SeqioEvaluation,
    load_for_inference,
    load_params,
    model_input_shapes,
)


def evaluate(
    *,
    model: Any,
    dataset_cfg: data.DatasetConfig,
    checkpoint_path: str,
    output_dir: str,
    partitioner: partitioning_lib.Partitioner | None = None,
    num_examples: int | None = None,
    decoder_params: Mapping[str, Any] | None = None,
    feature_converter: seqio.FeatureConverter | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates one checkpoint (gin entry point `evaluate`).

    Args:
      model: the model (gin `%MODEL`, with the method's hooks).
      dataset_cfg: mixture / task, split, lengths, batch size.
      checkpoint_path: model dir, `checkpoint_<step>` dir, t5x checkpoint or HF dir.
      output_dir: where `eval_metrics.jsonl` is appended.
      partitioner: mesh and rules (default: data parallel on all devices).
      num_examples: evaluate only the first N examples per task.
      decoder_params: extra decode arguments (e.g. `{'alpha': 0.6}`).
      feature_converter: default `EncDecTaskIdFeatureConverter`.

    Returns:
      `{task: {metric: value}}`.

    Raises:
      UserError: bad settings, an unknown task, task ids out of range, an unwritable
        output directory, a checkpoint that cannot be read or does not fit.
    """
    dataset_cfg.check_batch_size("BATCH_SIZE")
    model_dir_lib.ensure_writable_dir(output_dir, "EVAL_OUTPUT_DIR")
    num_tasks = gin_utils.query_macro("NUM_TASKS", None)
    name, split = dataset_cfg.mixture_or_task_name, dataset_cfg.split
    data.check_data(name, split)
    data.check_num_tasks(name, split, num_tasks)
    converter = feature_converter or data.default_feature_converter(num_tasks=num_tasks)
    trainer, step, params = evaluation_lib.load_for_inference(
        model,
        evaluation_lib.model_input_shapes(converter, dataset_cfg),
        checkpoint_path,
        partitioner,
    )
    evaluation = evaluation_lib.SeqioEvaluation(
        dataset_cfg, converter, trainer, num_examples, decoder_params, num_tasks=num_tasks
    )
    results = evaluation.evaluate(params, step)
    writer = summaries.MetricsWriter(
        output_dir, total_steps=step, batch_size=dataset_cfg.batch_size
    )
    writer.write_eval(step, results)
    writer.close()
    if jax.process_index() == 0:
        print(
            summaries.score_table(results, {}, title=f"Scores of {checkpoint_path} (step {step})")
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.eval --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="evaluate", module_name="hyperprompt_jax.eval")


if __name__ == "__main__":
    sys.exit(main())
