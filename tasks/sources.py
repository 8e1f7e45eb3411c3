"""TFDS data sources that never download and say how to prepare missing data.

`seqio.TfdsDataSource` calls `tfds.load(..., download=True, try_gcs=True)`, which on a
machine without the data starts a download (or fails deep inside TFDS). Every task of
this package reads through `PreparedTfdsSource` instead: it only reads prepared data,
and when the data is missing it raises `DatasetNotPreparedError`, one `ValueError`
whose message names the dataset, the data directory and the command that prepares it.

The TFDS versions are pinned (seqio requires a version); they are the versions the
installed `tensorflow-datasets` (4.9) builds. The t5 library's task names are kept
(`v002`, `v102` name the t5 preprocessing, not the TFDS version): GLUE 2.0.0 and
SuperGLUE 1.0.2 hold the same examples as the t5 library's GLUE 1.0.0 / SuperGLUE 1.0.2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import seqio
import tensorflow_datasets as tfds

from hyperprompt_jax.errors import UserError

# Datasets whose TFDS builder needs files the user downloads by hand or a Beam
# pipeline; the error message points to the builder's own instructions.
_SPECIAL_PREPARATION = {
    "c4": (
        "C4 is generated from Common Crawl with Apache Beam (hundreds of GB); see "
        "https://www.tensorflow.org/datasets/catalog/c4 for the Beam command."
    ),
}


class DatasetNotPreparedError(UserError):
    """A task needs TFDS data that has not been downloaded and prepared."""


def prepare_command(tfds_name: str, data_dir: str | None = None) -> str:
    """Returns the shell command that prepares `tfds_name` (see `task_registry`)."""
    command = f"python -m hyperprompt_jax.task_registry prepare {tfds_name}"
    if data_dir:
        command += f" --data_dir={data_dir}"
    return command


def not_prepared_message(
    missing: Sequence[tuple[str, tfds.core.DatasetBuilder]], prepare_target: str | None = None
) -> str:
    """One readable message for missing datasets: which, where, and how to prepare them.

    Args:
      missing: `(tfds_name, builder)` of each unprepared dataset.
      prepare_target: what the printed command prepares (a task / mixture name);
        default: the single missing TFDS name.
    """
    names = [name for name, _ in missing]
    data_dirs = sorted({str(builder.data_dir_root) for _, builder in missing})
    where = data_dirs[0] if len(data_dirs) == 1 else ", ".join(data_dirs)
    if len(names) == 1:
        lines = [f"TFDS dataset '{names[0]}' is not prepared in data_dir '{where}'"]
    else:
        lines = [
            f"{len(names)} TFDS datasets are not prepared in data_dir '{where}': "
            + ", ".join(names)
        ]
    lines[0] += " (nothing is downloaded at run time)."
    target = prepare_target or names[0]
    data_dir = data_dirs[0] if len(data_dirs) == 1 else None
    lines.append(
        f"Prepare {'it' if len(names) == 1 else 'them'} once with:\n  {prepare_command(target, data_dir)}"
    )
    for name, builder in missing:
        base_name = name.split("/")[0].split(":")[0]
        if base_name in _SPECIAL_PREPARATION:
            lines.append(f"{name}: {_SPECIAL_PREPARATION[base_name]}")
        elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            instructions = " ".join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
            lines.append(f"{name} needs a manual download first: {instructions}")
    lines.append(
        "If the data is elsewhere, point TFDS at it with the TFDS_DATA_DIR environment "
        "variable or seqio.set_tfds_data_dir_override(...)."
    )
    return "\n".join(lines)


class PreparedTfdsSource(seqio.TfdsDataSource):
    """`seqio.TfdsDataSource` that reads prepared data only (`read_only=True`).

    Every entry point that needs the data (`splits` when not given explicitly,
    `get_dataset`, `num_input_examples`, `list_shards`) first checks
    `builder.is_prepared()` and raises `DatasetNotPreparedError` otherwise.
    """

    def __init__(
        self,
        tfds_name: str,
        splits: Iterable[str] | Mapping[str, str] | None = None,
    ):
        super().__init__(tfds_name=tfds_name, splits=splits, read_only=True)

    @property
    def tfds_name(self) -> str:
        return self.tfds_dataset.name

    def is_prepared(self) -> bool:
        """Whether the dataset exists in the (possibly overridden) TFDS data_dir."""
        return self.tfds_dataset.builder.is_prepared()

    def require_prepared(self) -> None:
        """Raises `DatasetNotPreparedError` with the prepare command if data is missing."""
        builder = self.tfds_dataset.builder
        if not builder.is_prepared():
            raise DatasetNotPreparedError(not_prepared_message([(self.tfds_name, builder)]))

    @property
    def splits(self):
        if self._splits:
            return self._splits
        self.require_prepared()
        return super().splits

    def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
        self.require_prepared()
        return super().get_dataset(
            split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs
        )

    def num_input_examples(self, split: str) -> int | None:
        self.require_prepared()
        return super().num_input_examples(split)

    def list_shards(self, split: str):
        self.require_prepared()
        return super().list_shards(split)
