"""SPoT's outputs for people: similarity CSVs, heatmaps, dendrograms, text tables.

`similarity_report` writes, for a library, one `similarity_<metric>.csv` per metric
(a labelled `[N, N]` matrix of the entries' task embeddings), `heatmap.png` (one panel
per metric) and `dendrogram.png` (average-linkage clustering on `1 - similarity`).
matplotlib and scipy are imported only when a plot is drawn.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Mapping, Sequence

import numpy as np

from hyperprompt_jax.errors import UserError
from hyperprompt_jax.spot import core
from hyperprompt_jax.spot.core import PromptLibrary


def make_output_dir(path: str) -> None:
    """Creates the directory `path` (and parents).

    Raises:
      UserError: `path` (or a parent) is a file, or cannot be created.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output_dir {path!r} is a file; expected a directory (new or existing).")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the output directory {path!r}: {e.strerror or e}.") from e


def write_matrix_csv(path: str, names: Sequence[str], matrix: np.ndarray) -> None:
    """Writes a labelled `[N, N]` matrix: a header row and a name column."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *names])
        for name, row in zip(names, matrix, strict=True):
            w.writerow([name, *(f"{v:.6f}" for v in row)])


def read_matrix_csv(path: str) -> tuple[list[str], np.ndarray]:
    """Reads a `write_matrix_csv` file: (names, `[N, N]` matrix)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return names, np.array([[float(v) for v in r[1:]] for r in rows[1:]])


_METRIC_TITLES = {
    "cosine_of_average_tokens": "Cosine of average tokens",
    "per_token_average_cosine": "Per-token average cosine",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # Files only; never needs a display.
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(path: str, names: Sequence[str], matrices: Mapping[str, np.ndarray]) -> None:
    """One annotated heatmap panel per metric (values printed when N <= 20), to a PNG."""
    plt = _pyplot()
    n = len(names)
    side = max(4.0, 0.45 * n + 2.5)
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(side * len(matrices) + 1, side), squeeze=False
    )
    for ax, (metric, m) in zip(axes[0], matrices.items(), strict=True):
        # Colours span the off-diagonal values, per panel, and the diagonal is grey: a
        # prompt's similarity with itself (1 for the first metric) says nothing about
        # task pairs and would squeeze them into one colour; the per-token metric's
        # values are far smaller than the first metric's, hence separate ranges.
        diagonal = np.eye(n, dtype=bool) if n > 1 else np.zeros((1, 1), bool)
        off = m[~diagonal]
        lo, hi = float(off.min()), float(off.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        im = ax.imshow(np.ma.masked_array(m, diagonal), cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=names)
        ax.set_title(_METRIC_TITLES.get(metric, metric))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity (diagonal in grey)")
        # Small values (the per-token metric) need a 4th decimal to tell pairs apart.
        fmt = ".3f" if np.abs(m).max() >= 0.1 else ".4f"
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    dark = not diagonal[i, j] and (m[i, j] - lo) / (hi - lo) < 0.5
                    ax.text(
                        j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black",
                    )  # fmt: skip
    fig.suptitle("SPoT task similarity (prompts as task embeddings)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def similarity_linkage(matrix: np.ndarray, method: str = "average") -> np.ndarray:
    """scipy hierarchical clustering of `[N, N]` similarities (distance `1 - s`, N >= 2).

    Only off-diagonal entries are used, so the per-token metric's sub-1 diagonal does
    not matter; `1 - s` is >= 0 for every cosine-based metric.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - matrix, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    return hierarchy.linkage(squareform(distance, checks=False), method=method)


def plot_dendrograms(path: str, names: Sequence[str], matrices: Mapping[str, np.ndarray]) -> None:
    """One average-linkage dendrogram panel per metric (distance `1 - similarity`), to a PNG.

    Raises:
      UserError: fewer than two prompts (nothing to cluster).
    """
    if len(names) < 2:
        raise UserError("A dendrogram needs at least two prompts in the library.")
    from scipy.cluster import hierarchy

    plt = _pyplot()
    width = max(5.0, 0.5 * len(names) + 3)
    fig, axes = plt.subplots(1, len(matrices), figsize=(width * len(matrices), 4.5), squeeze=False)
    for ax, (metric, m) in zip(axes[0], matrices.items(), strict=True):
        links = similarity_linkage(m)
        tree = hierarchy.dendrogram(
            links, labels=list(names), ax=ax, leaf_rotation=45,
            color_threshold=0, above_threshold_color="tab:blue",
        )  # fmt: skip
        # Merge heights can sit in a narrow band far from 0 (per-token cosines of
        # unrelated prompts are all near 0, so distances are all near 1): zoom the axis
        # onto the merges and print each merge's distance.
        heights = links[:, 2]
        span = max(float(heights.max() - heights.min()), 1e-3)
        bottom = max(0.0, float(heights.min()) - 1.5 * span)
        ax.set_ylim(bottom, float(heights.max()) + 0.3 * span)
        for xs, ys in zip(tree["icoord"], tree["dcoord"], strict=True):
            ax.annotate(
                f"{ys[1]:.3f}", ((xs[1] + xs[2]) / 2, ys[1]), xytext=(0, 3),
                textcoords="offset points", ha="center", va="bottom", fontsize=8,
            )  # fmt: skip
        ax.set_title(_METRIC_TITLES.get(metric, metric))
        ylabel = "1 - similarity (average linkage)"
        ax.set_ylabel(ylabel + (", axis zoomed" if bottom > 0 else ""))
    fig.suptitle("SPoT task clustering")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def similarity_report(
    library: PromptLibrary,
    output_dir: str,
    metrics: Sequence[str] = tuple(core.METRICS),
) -> dict[str, Any]:
    """Writes `similarity_<metric>.csv` per metric, `heatmap.png` and `dendrogram.png`.

    Returns:
      {'matrices': {metric: [N, N]}, 'names': [...], 'files': [paths]}.

    Raises:
      UserError: an unknown metric, or an output path that is a file. A library of
        one prompt gets the CSVs and the heatmap, and no dendrogram.
    """
    if not metrics:
        raise UserError("Name at least one similarity metric.")
    metric_fns = {m: core.get_metric(m) for m in metrics}
    make_output_dir(output_dir)
    matrices = {m: core.similarity_matrix(library.embeddings, f) for m, f in metric_fns.items()}
    files = []
    for metric, m in matrices.items():
        path = os.path.join(output_dir, f"similarity_{metric}.csv")
        write_matrix_csv(path, library.names, m)
        files.append(path)
    heatmap = os.path.join(output_dir, "heatmap.png")
    plot_heatmaps(heatmap, library.names, matrices)
    files.append(heatmap)
    if len(library) >= 2:
        dendrogram = os.path.join(output_dir, "dendrogram.png")
        plot_dendrograms(dendrogram, library.names, matrices)
        files.append(dendrogram)
    return {"matrices": matrices, "names": library.names, "files": files}


def format_matrix(names: Sequence[str], matrix: np.ndarray, digits: int = 4) -> str:
    """A plain-text table of a labelled `[N, N]` matrix."""
    width = max(8, *(len(n) for n in names), digits + 3)
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for n, row in zip(names, matrix, strict=True):
        lines.append(f"{n:<{width}}" + "".join(f"{v:>{width}.{digits}f}" for v in row))
    return "\n".join(lines)
