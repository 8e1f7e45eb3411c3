"""Train-state checkpoints: `MODEL_DIR/checkpoint_<step>/` written and restored with orbax.

orbax `CheckpointManager` (`step_prefix='checkpoint'`) writes a `default/` PyTree item
into a temporary directory, renames it into place and writes its commit marker last.

* Full checkpoints (every parameter trained, or `SELF_CONTAINED_CHECKPOINTS`): the whole
  `TrainState` (`step`, `trainable`, `frozen`, `opt_state`).
* Trainable-only checkpoints (part of the model frozen: prompt tuning, SPoT, SMoP,
  HyperPrompt with `['hyperprompt/.*']`): `step`, `trainable`, `opt_state`; the
  step metadata (`_CHECKPOINT_METADATA` `custom_metadata`) records the data position
  and a `BackboneRef` (the backbone's path, or the init seed, and its fingerprint).
  Resume reloads the backbone from that reference, sharded, and stops with one line
  if it is gone or its fingerprint differs, before anything is compiled.

Besides the latest `keep`, the checkpoints holding a task's best evaluation score are
preserved (`best_checkpoints.json`); they follow the same format rule.

Resume picks the newest intact checkpoint (`discovery.newest_intact`): a damaged or
incomplete newer one is moved aside to `MODEL_DIR/damaged_checkpoint_<step>` (kept,
never deleted, so the run can save that step again) with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from hyperprompt_jax.checkpoints import backbone as backbone_lib
from hyperprompt_jax.checkpoints import discovery, paths
from hyperprompt_jax.checkpoints.backbone import BackboneRef, read_step_metadata
from hyperprompt_jax.checkpoints.trees import flatten_params, unflatten_params
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

PyTree = Any
CHECKPOINT_PREFIX = discovery.STEP_PREFIX
BEST_CHECKPOINTS_FILE = "best_checkpoints.json"
DAMAGED_PREFIX = "damaged_"
TRAINABLE_ONLY = "trainable-only"


@dataclasses.dataclass
class _PreserveSteps:
    """orbax preservation policy: keep every checkpoint whose step is in `steps`."""

    steps: set

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_latest` found.

    Attributes:
      step: the checkpoint's step.
      state: the restored item: a full `TrainState`, or for trainable-only checkpoints
        a dict `{'step', 'trainable', 'opt_state'}`.
      backbone: the `BackboneRef` of a trainable-only checkpoint, else None.
      data_position: batches consumed when it was written.
    """

    step: int
    state: Any
    backbone: Optional[BackboneRef]
    data_position: int


def _write_text(path: str, text: str) -> None:
    import tensorflow as tf

    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


class Checkpointer:
    """Saves and restores train states as `MODEL_DIR/checkpoint_<step>/` with orbax.

    Args:
      model_dir: the run's directory.
      keep: recent checkpoints kept (None: all); each task's best is kept as well.
      backbone: set for runs with frozen parameters that write trainable-only
        checkpoints (see `set_backbone`); None: full checkpoints.
    """

    def __init__(self, model_dir: str, keep: int | None = None):
        import orbax.checkpoint as ocp

        if keep is not None and keep < 1:
            raise UserError(f"KEEP must be >= 1 or None, got {keep!r}.")
        self.model_dir = model_dir
        self.backbone: Optional[BackboneRef] = None
        self.best = self._read_best()
        self._preserved = _PreserveSteps({v["step"] for v in self.best.values()})
        options = ocp.CheckpointManagerOptions(
            step_prefix=CHECKPOINT_PREFIX,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(keep), self._preserved]
            ),
        )
        directory = model_dir if "://" in model_dir else os.path.abspath(model_dir)
        self.manager = ocp.CheckpointManager(directory, options=options)
        self._saved = set(self.manager.all_steps())

    def set_backbone(self, backbone: Optional[BackboneRef]) -> None:
        """From now on, save trainable-only checkpoints referencing `backbone` (None: full)."""
        self.backbone = backbone

    def _best_path(self) -> str:
        return os.path.join(self.model_dir, BEST_CHECKPOINTS_FILE)

    def _read_best(self) -> dict:
        path = self._best_path()
        if not paths.is_file(path):
            return {}
        try:
            return json.loads(paths.read_bytes(path))
        except ValueError:
            logger.warning("%s is not valid JSON; best checkpoints start afresh.", path)
            return {}

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint orbax considers complete, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        """Steps of every checkpoint orbax considers complete."""
        return self.manager.all_steps()

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Starts writing `state` at `step` (asynchronously); True if a save started.

        With a backbone set, only `step`, `trainable` and `opt_state` are written.
        """
        import orbax.checkpoint as ocp

        if step in self._saved:
            return False
        self._saved.add(step)
        metadata = {"data_position": int(step)}
        item = state
        if self.backbone is not None:
            item = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}
            metadata.update(format=TRAINABLE_ONLY, backbone=self.backbone.to_json())
        return self.manager.save(
            step, args=ocp.args.StandardSave(item), force=force, custom_metadata=metadata
        )

    def restore(self, step: int, abstract_state: PyTree) -> PyTree:
        """Restores `step` with the shapes, dtypes and shardings of `abstract_state`."""
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(
        self,
        abstract_state: PyTree,
        check_fits: Callable[[str, bool], None],
    ) -> Optional[Restored]:
        """Restores the newest intact checkpoint; moves damaged newer ones aside.

        Args:
          abstract_state: the full `TrainState` of `ShapeDtypeStruct`s with shardings.
          check_fits: `(step_dir, trainable_only) -> None`, raises UserError if the
            checkpoint was written by another model / method (then no older checkpoint
            is tried: they belong to the same run).

        Returns:
          A `Restored`, or None if the directory has no checkpoint at all.
        """
        result: list = []

        def verify(step_dir: str) -> Optional[str]:
            meta = read_step_metadata(step_dir)
            trainable_only = meta.get("format") == TRAINABLE_ONLY
            check_fits(step_dir, trainable_only)
            step = discovery.parse_step(step_dir)
            abstract = abstract_state
            if trainable_only:
                abstract = {
                    "step": abstract_state.step,
                    "trainable": abstract_state.trainable,
                    "opt_state": abstract_state.opt_state,
                }
            try:
                state = self.restore(step, abstract)
            except Exception as e:  # noqa: BLE001 - damaged data: tensorstore/orbax errors
                return f"its arrays cannot be read ({type(e).__name__}: {str(e)[:200]})"
            backbone = BackboneRef.from_json(meta["backbone"]) if trainable_only else None
            position = int(meta.get("data_position", step))
            result.append(Restored(step, state, backbone, position))
            return None

        step, chosen, skipped = discovery.newest_intact(
            self.model_dir, kinds=(discovery.TRAIN,), verify=verify
        )
        if skipped:
            self._move_aside(skipped)
        discovery.warn_skipped([(p, f"{r}; moved to {self._aside(p)}") for p, r in skipped], chosen)
        return result[-1] if result else None

    def _aside(self, step_dir: str) -> str:
        name = step_dir.rstrip("/").rsplit("/", 1)[-1]
        return paths.join(self.model_dir, DAMAGED_PREFIX + name)

    def _move_aside(self, skipped) -> None:
        """Renames damaged checkpoints out of orbax's view (kept; the step can be saved
        again). Process 0 renames; every process waits for it."""
        import tensorflow as tf

        if jax.process_index() == 0:
            for step_dir, _ in skipped:
                target = self._aside(step_dir)
                suffix = 1
                while tf.io.gfile.exists(target):
                    target = f"{self._aside(step_dir)}.{suffix}"
                    suffix += 1
                tf.io.gfile.rename(step_dir, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("hyperprompt_jax_damaged_checkpoints_moved")
        self.manager.reload()
        self._saved = set(self.manager.all_steps())

    def record_best(self, task: str, step: int, metric: str, value: float) -> None:
        """Marks `step` as `task`'s best checkpoint (kept until a better one comes)."""
        self.best[task] = {"step": int(step), "metric": metric, "value": float(value)}
        self._preserved.steps.clear()
        self._preserved.steps.update(v["step"] for v in self.best.values())
        if jax.process_index() == 0:
            _write_text(self._best_path(), json.dumps(self.best, indent=2, sort_keys=True))

    def wait(self) -> None:
        """Blocks until pending saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def is_train_checkpoint(path: str) -> bool:
    """True for a `checkpoint_<step>/` directory written by `Checkpointer`."""
    return discovery.kind(path) == discovery.TRAIN


def restore_params(checkpoint_dir: str, param_shardings: PyTree) -> PyTree:
    """Reads only the parameters of a train checkpoint (no optimizer state).

    Works whatever the trainable / frozen split of the run that wrote it; a
    trainable-only checkpoint brings its frozen parameters from its backbone.

    Args:
      checkpoint_dir: a `checkpoint_<step>/` directory.
      param_shardings: `NamedSharding`s of the model's full parameter tree.

    Returns:
      The full `params` tree, placed with `param_shardings` (stored dtypes).

    Raises:
      UserError: if the checkpoint lacks a model parameter or has one the model lacks.
    """
    from hyperprompt_jax.checkpoints.backbone import open_train_checkpoint

    source = open_train_checkpoint(checkpoint_dir)
    shardings = flatten_params(param_shardings)
    missing = sorted(set(shardings) - set(source.tensors))
    unexpected = sorted(set(source.tensors) - set(shardings))
    if missing or unexpected:
        raise UserError(
            f"Checkpoint {checkpoint_dir} does not fit the model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}. Was it written with another model or method gin?"
        )
    targets = {n: (shardings[n], source.tensors[n].dtype) for n in shardings}
    return unflatten_params(source.load(targets))


# ---------------------------------------------------------------------------------------
# A trainer's initial state: resume, initial checkpoint, or fresh
# ---------------------------------------------------------------------------------------


def _train_state_cls():
    from hyperprompt_jax.trainer import TrainState

    return TrainState


def initial_state(trainer, checkpointer, initial_checkpoint_path, self_contained=False):
    """Resumes from the newest intact checkpoint, or starts from the initial checkpoint
    (read straight into the shardings) or a fresh initialisation.

    Runs with frozen parameters write trainable-only checkpoints unless
    `self_contained`; resuming one reloads and verifies its backbone first.
    """
    restored = checkpointer.restore_latest(
        trainer.layout.abstract, check_fits=lambda d, t: check_fits(trainer, d, t)
    )
    if restored is not None:
        logger.info("Resuming from %s/checkpoint_%d.", checkpointer.model_dir, restored.step)
        if restored.backbone is None:
            state = restored.state
        else:
            frozen = frozen_from_ref(trainer, restored.backbone, checkpointer.model_dir)
            state = _train_state_cls()(
                step=restored.state["step"],
                trainable=restored.state["trainable"],
                frozen=frozen,
                opt_state=restored.state["opt_state"],
            )
        checkpointer.set_backbone(restored.backbone if not self_contained else None)
        return state
    frozen_names = sorted(flatten_params(trainer.layout.abstract.frozen))
    if initial_checkpoint_path:
        logger.info("Initialising the backbone from %s.", initial_checkpoint_path)
        _, directory, source = backbone_lib.open_weights(
            initial_checkpoint_path, what="INITIAL_CHECKPOINT_PATH"
        )
        state = trainer.init_state_from_params(source, source=initial_checkpoint_path)
        if frozen_names and not self_contained:
            abstract = trainer.abstract_params()
            digest, content = backbone_lib.fingerprint_source(
                source, frozen_names, {n: abstract[n].dtype for n in frozen_names}
            )
            path = initial_checkpoint_path
            path = path if "://" in path else os.path.abspath(path)
            checkpointer.set_backbone(BackboneRef(path, trainer.seed, digest, content))
        return state
    state = trainer.init_state()
    if frozen_names and not self_contained:
        digest, content = _seeded_fingerprint(trainer, flatten_params(state.frozen), frozen_names)
        checkpointer.set_backbone(BackboneRef(None, trainer.seed, digest, content))
    return state


def _host_small(flat: Mapping[str, Any], names: Sequence[str]) -> dict:
    """Host copies of the small arrays among `names` (those the fingerprint reads)."""
    from jax.experimental import multihost_utils

    shapes = {n: (tuple(flat[n].shape), flat[n].dtype) for n in names}
    small = backbone_lib.content_names(shapes)
    out = {}
    for name in small:
        value = flat[name]
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        out[name] = np.asarray(value)
    return out


def _seeded_fingerprint(trainer, flat: Mapping[str, Any], names: Sequence[str]):
    """`(names_hash, content)` of a seed-initialised backbone's arrays `flat`."""
    abstract = trainer.abstract_params()
    shapes = {n: (tuple(abstract[n].shape), abstract[n].dtype) for n in names}
    return backbone_lib.names_hash(shapes), backbone_lib.content_of(_host_small(flat, names))


def frozen_from_ref(trainer, ref, model_dir, names=None):
    """The frozen parameters a trainable-only checkpoint references, verified against
    the reference's fingerprint and read straight into their shardings.

    Args:
      trainer: provides the abstract parameters (shapes, dtypes, shardings).
      ref: the checkpoint's `BackboneRef`.
      model_dir: for messages.
      names: the frozen parameters' names (default: the trainer's frozen tree).

    Returns:
      Nested dict of the frozen parameters.

    Raises:
      UserError: (one line) the backbone is gone, or differs from the fingerprint.
    """
    frozen_names = sorted(
        names if names is not None else flatten_params(trainer.layout.abstract.frozen)
    )
    abstract = trainer.abstract_params()
    where = f"MODEL_DIR {model_dir}"
    if ref.path is None:
        flat = trainer.fresh_params(frozen_names)
        digest, content = _seeded_fingerprint(trainer, flat, frozen_names)
        if digest != ref.names_hash or {k: tuple(v) for k, v in content.items()} != {
            k: tuple(v) for k, v in ref.content.items()
        }:
            raise UserError(
                f"{where} was trained on a backbone initialised with seed {ref.seed}, and "
                "this model's initialisation differs from it (another model gin, seed or "
                "library version); use the original settings, or start a new MODEL_DIR."
            )
        return unflatten_params(flat)
    try:
        _, _, source = backbone_lib.open_weights(ref.path, what="backbone")
    except UserError as e:
        raise UserError(
            f"{where} holds trainable-only checkpoints whose backbone {ref.path} cannot be "
            f"loaded ({e}); restore it there, or start a new MODEL_DIR."
        ) from None
    bad = [
        n for n in frozen_names
        if n not in source.tensors or tuple(source.tensors[n].shape) != tuple(abstract[n].shape)
    ]  # fmt: skip
    if bad:
        raise UserError(
            f"{where} was trained on the backbone {ref.path}, which has changed since (it "
            f"lacks {bad[:3]} or their shapes differ); restore the original backbone files, "
            "or start a new MODEL_DIR."
        )
    backbone_lib.check_backbone(
        ref, source, frozen_names, {n: abstract[n].dtype for n in frozen_names}, where
    )
    flat = source.load({n: (abstract[n].sharding, abstract[n].dtype) for n in frozen_names})
    return unflatten_params(flat)


def check_fits(trainer, step_dir: str, trainable_only: bool) -> None:
    """UserError if `step_dir` was written by another model, method or TRAINABLE_PATTERNS
    (compared by metadata only: names and shapes of the parameters, shapes of all leaves)."""
    from hyperprompt_jax.checkpoints import orbax_source

    item = os.path.join(step_dir, discovery.TRAIN_ITEM)
    try:
        stored = orbax_source.item_tree_shapes(item)
    except UserError:
        return  # unreadable metadata: damaged, found by the restore attempt
    abstract = trainer.layout.abstract
    parts = (
        ("trainable", "opt_state", "step")
        if trainable_only
        else ("trainable", "frozen", "opt_state", "step")
    )
    expected_params = {
        ("trainable",) + tuple(k.split("/")): v.shape
        for k, v in flatten_params(abstract.trainable).items()
    }
    if not trainable_only:
        expected_params.update(
            {
                ("frozen",) + tuple(k.split("/")): v.shape
                for k, v in flatten_params(abstract.frozen).items()
            }
        )
    stored_params = {p: s for p, (s, _) in stored.items() if p[0] in ("trainable", "frozen")}
    leaves = [abstract.step, abstract.trainable, abstract.opt_state] + (
        [] if trainable_only else [abstract.frozen]
    )
    expected_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(leaves))
    stored_shapes = sorted(s for p, (s, _) in stored.items() if p[0] in parts)
    if stored_params != expected_params or stored_shapes != expected_shapes:
        differ = sorted("/".join(p) for p in set(stored_params) ^ set(expected_params)) or sorted(
            "/".join(p) for p in stored_params if stored_params[p] != expected_params.get(p)
        )
        raise UserError(
            f"MODEL_DIR {os.path.dirname(step_dir)} holds {os.path.basename(step_dir)} of "
            "another model, method, optimizer or TRAINABLE_PATTERNS (parameters that differ: "
            f"{differ[:3] or 'optimizer state'}); use a new MODEL_DIR (or the gin files of "
            "that run)."
        )
