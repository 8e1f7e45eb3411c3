"""All weight I/O: t5x checkpoints (legacy and Orbax formats), Hugging Face T5
directories, train-state checkpoints, and one rule for finding checkpoints.

Modules:
  trees        parameter trees: flatten / unflatten, T5 shapes, `check_params_match`
  paths        local and gs:// paths (TensorStore key-value stores)
  discovery    the one rule: `checkpoint_<step>/`, kinds, intact or damaged, newest intact
  sources      lazy `WeightSource`s: shapes first, slices read straight into shardings
  t5x_legacy   t5x's tensorstore format (msgpack + zarr): read lazily, write
  t5x_orbax    t5x's Orbax format (what `t5x.train` writes by default): read lazily
  orbax_source parameters inside an orbax PyTree item, restored with shardings
  hf           Hugging Face T5 directories: read lazily (safetensors), write
  backbone     `load_backbone` from any accepted path; backbone references
  train_state  `Checkpointer`: full or trainable-only train checkpoints, resume

Parameter trees are nested dicts with t5x's names (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, ...), i.e. the `params` collection of
`network.Transformer`.
"""

from hyperprompt_jax.checkpoints.backbone import (
    BackboneRef,
    load_backbone,
    open_train_checkpoint,
    open_weights,
)
from hyperprompt_jax.checkpoints.discovery import (
    COMMIT_MARKER,
    STEP_PREFIX,
    newest_intact,
    parse_step,
    resolve,
    step_dir_name,
    step_dirs,
)
from hyperprompt_jax.checkpoints.hf import hf_config_to_t5, load_hf_t5, open_hf_t5, save_hf_t5
from hyperprompt_jax.checkpoints.sources import Tensor, WeightSource, array_source, gathered
from hyperprompt_jax.checkpoints.t5x_legacy import (
    T5X_CHECKPOINT_VERSION,
    find_t5x_checkpoint_dir,
    load_t5x_checkpoint,
    open_t5x,
    save_t5x_checkpoint,
)
from hyperprompt_jax.checkpoints.t5x_orbax import open_t5x_orbax
from hyperprompt_jax.checkpoints.train_state import (
    BEST_CHECKPOINTS_FILE,
    CHECKPOINT_PREFIX,
    Checkpointer,
    is_train_checkpoint,
    restore_params,
)
from hyperprompt_jax.checkpoints.trees import (
    Params,
    check_params_match,
    flatten_params,
    t5_param_shapes,
    unflatten_params,
)

__all__ = [
    "BEST_CHECKPOINTS_FILE", "BackboneRef", "CHECKPOINT_PREFIX", "COMMIT_MARKER",
    "Checkpointer", "Params", "STEP_PREFIX", "T5X_CHECKPOINT_VERSION", "Tensor",
    "WeightSource", "array_source", "check_params_match", "find_t5x_checkpoint_dir",
    "flatten_params", "gathered", "hf_config_to_t5", "is_train_checkpoint", "load_backbone",
    "load_hf_t5", "load_t5x_checkpoint", "newest_intact", "open_hf_t5", "open_t5x",
    "open_t5x_orbax", "open_train_checkpoint", "open_weights", "parse_step", "resolve",
    "restore_params", "save_hf_t5", "save_t5x_checkpoint", "step_dir_name", "step_dirs",
    "t5_param_shapes", "unflatten_params",
]  # fmt: skip
