"""t5x's Orbax checkpoint format: what current `t5x.train` writes by default.

Layout (orbax `CheckpointManager` with `step_prefix='checkpoint'`):

    checkpoint_<step>/
      commit_success.txt          orbax's commit marker (the save finished)
      _CHECKPOINT_METADATA        orbax step metadata (JSON)
      state/                      orbax PyTree item (OCDBT): t5x's train-state dict
        _METADATA                   `{'target': params, 'state': {'step',
        manifest.ocdbt, d/...       'param_states': ...}, ['flax_mutables']}`
      dataset/                    (optional) the input pipeline's position

Parameters are the `target` subtree, with t5x's names (`encoder/layers_0/...`), in the
dtype t5x saved them (`save_dtype`). They are read lazily through `OrbaxSource`:
straight into the caller's shardings, each process reading only its devices' slices.
The public pretrained T5 checkpoints use the legacy format instead (`t5x_legacy`).
"""

from __future__ import annotations

from hyperprompt_jax.checkpoints import discovery, paths
from hyperprompt_jax.checkpoints.orbax_source import OrbaxSource


def open_t5x_orbax(step_dir: str) -> OrbaxSource:
    """The `target` parameters of a t5x Orbax-format `checkpoint_<step>/`, read lazily.

    Raises:
      UserError: unreadable orbax metadata (damaged or incomplete checkpoint).
    """
    item = paths.join(step_dir, discovery.T5X_ORBAX_ITEM)
    return OrbaxSource(item, roots=("target",), description=f"t5x Orbax checkpoint {step_dir}")
