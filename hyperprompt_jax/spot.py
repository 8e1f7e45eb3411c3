"""SPoT (Vu et al., ACL 2022): learned soft prompts as task embeddings, and transfer.

A trained prompt `[length, emb_dim]` is the embedding of the task it was trained on
(the paper's Section 4). This module turns a directory of prompts into a *prompt
library*, measures task similarity with the paper's two metrics, ranks the library's
prompts for a target task, and builds what the transfer step starts from: a weighted
average of the top-k prompts (an initial prompt for `gin/methods/spot.gin`), a seqio
mixture of the top-k source tasks plus the target, or k separate transfers of which
the best on validation is kept (`best_of_topk`).

Library format: a directory of `<name>.npy` files, each a float `[length, emb_dim]`
array (the layout of google-research/prompt-tuning's released prompts), each with an
optional `<name>.json` of metadata (`task`, `model`, `step`, `score`, any extras).
Without a JSON file the entry's name is the file stem and its task is unknown.

Metrics (Section 4 of the paper), for prompts `P [l1, d]` and `Q [l2, d]`:

* cosine of average tokens: `cos(mean_i P_i, mean_j Q_j)`.
* per-token average cosine: `1/(l1*l2) sum_ij cos(P_i, Q_j)`. Because the average of
  dot products is the dot product of averages, this equals `mean_i u(P_i) . mean_j
  u(Q_j)` with `u(x) = x / |x|`: O((l1 + l2) d) per pair, not O(l1 l2 d). Unlike the
  first metric, a prompt's similarity with itself is below 1 (it averages the
  cosines of its distinct tokens too); the two metrics accept prompts of different
  lengths.

Top-k weighted average (the paper's "TOP-K WEIGHTED AVERAGE"): `sum_i w_i P_i` over the
k most similar sources with `w_i = s_i / sum_j s_j`. Averaging token by token needs
prompts of one shape, so the k prompts must all be `[length, emb_dim]` (a ValueError
names the odd ones out), and similarities must be positive for the weights to be a
convex combination (a ValueError suggests a smaller k otherwise).

Everything except checkpoint export, mixtures and `best_of_topk` is pure NumPy and
imports nothing heavy, so `rank`, `init` and `similarity` are fast on a laptop.
The command line is `python -m hyperprompt_jax.spot <subcommand>` (`spot_cli.py`).

Shapes: L prompt length, E emb_dim, N library size, K top-k.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------
# Prompts and prompt libraries
# ----------------------------------------------------------------------------------------

METADATA_SUFFIX = ".json"
PROMPT_SUFFIX = ".npy"


def check_prompt(
    array: Any,
    name: str,
    *,
    length: int | None = None,
    emb_dim: int | None = None,
) -> np.ndarray:
    """Validates one prompt and returns it as float32 `[L, E]`.

    Args:
      array: the prompt.
      name: how error messages refer to it (a file name, a library entry).
      length: required prompt length L (None = any).
      emb_dim: required model width E (None = any).

    Raises:
      ValueError: not a 2-D float array, an empty dimension, NaN / inf values, or a
        length / width different from the required one.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        hint = ""
        if array.ndim == 3 and array.shape[0] == 1:
            hint = " (a leading axis of size 1: squeeze it)"
        elif array.ndim == 3:
            hint = (
                " (several prompts, e.g. a multi-task prompt or an SMoP checkpoint: export "
                "one with --prompt_index)"
            )
        raise ValueError(
            f"Prompt {name} has shape {array.shape}; expected a 2-D [length, emb_dim] array{hint}."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"Prompt {name} holds {array.dtype}; expected a float array.")
    if 0 in array.shape:
        raise ValueError(f"Prompt {name} is empty: shape {array.shape}.")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        kinds = sorted({"NaN" if np.isnan(array[tuple(i)]) else "inf" for i in bad[:1000]})
        raise ValueError(
            f"Prompt {name} contains {len(bad)} non-finite value(s) ({', '.join(kinds)}), "
            f"first at token {bad[0][0]}, dimension {bad[0][1]}: a diverged training run?"
        )
    if emb_dim is not None and array.shape[1] != emb_dim:
        raise ValueError(
            f"Prompt {name} has width {array.shape[1]} but the model's emb_dim is {emb_dim}: "
            "it was trained on a different model size."
        )
    if length is not None and array.shape[0] != length:
        raise ValueError(
            f"Prompt {name} has length {array.shape[0]} but the prompt length is {length} "
            "(PROMPT_LENGTH): set it to match, or use prompts of that length."
        )
    return array.astype(np.float32, copy=False)


def load_prompt_file(
    path: str, *, length: int | None = None, emb_dim: int | None = None
) -> np.ndarray:
    """Reads and validates a `.npy` prompt: float32 `[L, E]` (see `check_prompt`).

    Raises:
      ValueError: a missing or unreadable file, or an invalid prompt.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Prompt file {path!r} does not exist.")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"Prompt file {path!r} is not a readable .npy array: {e}") from e
    return check_prompt(array, repr(path), length=length, emb_dim=emb_dim)


def read_metadata(prompt_path: str) -> dict[str, Any]:
    """The `<name>.json` beside `<name>.npy` as a dict ({} if there is none).

    Raises:
      ValueError: a metadata file that is not a JSON object.
    """
    path = os.path.splitext(prompt_path)[0] + METADATA_SUFFIX
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            metadata = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Metadata file {path!r} is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"Metadata file {path!r} must hold a JSON object, got {metadata!r}.")
    return metadata


def save_prompt(path: str, prompt: np.ndarray, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes `prompt` `[L, E]` to `path` (`.npy` appended if missing) and, if given,
    `metadata` to the `.json` beside it. Returns the `.npy` path.

    Raises:
      ValueError: an invalid prompt (see `check_prompt`).
    """
    prompt = check_prompt(prompt, "to save")
    if not path.endswith(PROMPT_SUFFIX):
        path += PROMPT_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, prompt)
    if metadata is not None:
        meta = {"length": int(prompt.shape[0]), "emb_dim": int(prompt.shape[1]), **metadata}
        with open(os.path.splitext(path)[0] + METADATA_SUFFIX, "w") as f:
            json.dump(_jsonable(meta), f, indent=2, sort_keys=True)
            f.write("\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One prompt of a library: its name (file stem), prompt `[L, E]`, metadata, file."""

    name: str
    prompt: np.ndarray
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str | None = None

    @property
    def task(self) -> str | None:
        """The seqio task the prompt was trained on (metadata `task`), if known."""
        task = self.metadata.get("task")
        return str(task) if task else None


@dataclasses.dataclass(frozen=True)
class PromptLibrary:
    """An ordered collection of prompts of one width E (lengths may differ)."""

    entries: tuple[PromptEntry, ...]

    def __post_init__(self):
        entries = tuple(self.entries)
        object.__setattr__(self, "entries", entries)
        if not entries:
            raise ValueError("The prompt library is empty: it needs at least one prompt.")
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Prompt names must be unique; repeated: {duplicates}.")
        widths = {e.name: e.prompt.shape[1] for e in entries}
        if len(set(widths.values())) > 1:
            raise ValueError(
                "Prompts in one library must share emb_dim (they must come from one model "
                f"size); widths: {widths}."
            )

    @classmethod
    def from_prompts(
        cls, prompts: Mapping[str, Any], metadata: Mapping[str, Mapping] | None = None
    ) -> PromptLibrary:
        """A library from `{name: [L, E] array}` (validated), with optional metadata."""
        metadata = metadata or {}
        return cls(
            tuple(
                PromptEntry(name, check_prompt(p, repr(name)), dict(metadata.get(name, {})))
                for name, p in prompts.items()
            )
        )

    @classmethod
    def load(
        cls,
        directory: str,
        *,
        emb_dim: int | None = None,
        length: int | None = None,
    ) -> PromptLibrary:
        """Reads every `<name>.npy` (and `<name>.json`) in `directory`, sorted by name.

        Args:
          directory: the library directory (not searched recursively).
          emb_dim: if set, every prompt must have this width (the target model's).
          length: if set, every prompt must have this length.

        Raises:
          ValueError: a missing directory, no `.npy` files, an invalid prompt or
            metadata file (named), or prompts of different widths.
        """
        if not os.path.isdir(directory):
            raise ValueError(f"Prompt library {directory!r} is not a directory.")
        files = sorted(f for f in os.listdir(directory) if f.endswith(PROMPT_SUFFIX))
        if not files:
            others = sorted(os.listdir(directory))[:5]
            raise ValueError(
                f"Prompt library {directory!r} holds no {PROMPT_SUFFIX} prompts"
                + (f" (found e.g. {others})." if others else " (the directory is empty).")
            )
        entries = []
        for f in files:
            path = os.path.join(directory, f)
            prompt = load_prompt_file(path, length=length, emb_dim=emb_dim)
            entries.append(PromptEntry(f[: -len(PROMPT_SUFFIX)], prompt, read_metadata(path), path))
        return cls(tuple(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    @property
    def names(self) -> list[str]:
        """Entry names in library order."""
        return [e.name for e in self.entries]

    @property
    def prompts(self) -> list[np.ndarray]:
        """Entry prompts `[L_n, E]` in library order."""
        return [e.prompt for e in self.entries]

    @property
    def emb_dim(self) -> int:
        """The width E shared by every prompt."""
        return int(self.entries[0].prompt.shape[1])

    def __getitem__(self, name: str) -> PromptEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(_unknown(name, self.names, "library entry"))

    def without(self, names: Iterable[str]) -> PromptLibrary:
        """The library minus the named entries (each must exist).

        Raises:
          ValueError: an unknown name, or nothing left.
        """
        names = set(names)
        for n in names:
            if n not in self.names:
                raise ValueError(_unknown(n, self.names, "library entry"))
        kept = tuple(e for e in self.entries if e.name not in names)
        if not kept:
            raise ValueError(f"Excluding {sorted(names)} leaves the prompt library empty.")
        return PromptLibrary(kept)


def _unknown(name: str, known: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown {what} {name!r}.{hint} Known: {list(known)}."


# ----------------------------------------------------------------------------------------
# Similarity metrics
# ----------------------------------------------------------------------------------------


class SimilarityMetric(Protocol):
    """Task similarity between two sets of prompts.

    `(a: N prompts [L_n, E], b: M prompts [L_m, E]) -> [N, M]` float64 similarities;
    lengths may differ, widths may not.
    """

    def __call__(self, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray: ...


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    """Rows of `x` `[R, E]` scaled to unit L2 norm (float64)."""
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        row = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"Cosine similarity is undefined for {what}: row {row} has zero norm.")
    return x / norms


def _check_widths(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> None:
    widths = {p.shape[-1] for p in (*a, *b)}
    if len(widths) > 1:
        raise ValueError(
            f"Prompts of different widths cannot be compared: emb_dims {sorted(widths)} "
            "(task embeddings must come from one model size)."
        )


def _embedding_metric(embed: Callable[[np.ndarray, str], np.ndarray]) -> SimilarityMetric:
    """A metric that embeds each prompt as one unit vector `[E]` and takes dot products."""

    def metric(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
        if len(a) == 0 or len(b) == 0:
            raise ValueError("Similarity needs at least one prompt on each side.")
        _check_widths(a, b)
        ea = np.stack([embed(p, f"prompt {i} of the first set") for i, p in enumerate(a)])
        eb = np.stack([embed(p, f"prompt {i} of the second set") for i, p in enumerate(b)])
        return ea @ eb.T

    return metric


def _mean_token_unit(prompt: np.ndarray, what: str) -> np.ndarray:
    # cos(mean P, mean Q) = u(mean P) . u(mean Q).
    return _unit_rows(np.asarray(prompt, np.float64).mean(0, keepdims=True), f"{what}'s mean")[0]


def _mean_of_unit_tokens(prompt: np.ndarray, what: str) -> np.ndarray:
    # mean_ij u(P_i) . u(Q_j) = (mean_i u(P_i)) . (mean_j u(Q_j)); NOT re-normalised.
    return _unit_rows(prompt, f"a token of {what}").mean(0)


cosine_of_average_tokens: SimilarityMetric = _embedding_metric(_mean_token_unit)
cosine_of_average_tokens.__doc__ = "SPoT's COSINE SIMILARITY OF AVERAGE TOKENS: `[N, M]`."
per_token_average_cosine: SimilarityMetric = _embedding_metric(_mean_of_unit_tokens)
per_token_average_cosine.__doc__ = (
    "SPoT's PER-TOKEN AVERAGE COSINE SIMILARITY (mean over all token pairs): `[N, M]`."
)

METRICS: dict[str, SimilarityMetric] = {
    "cosine_of_average_tokens": cosine_of_average_tokens,
    "per_token_average_cosine": per_token_average_cosine,
}
DEFAULT_METRIC = "cosine_of_average_tokens"


def get_metric(name: str) -> SimilarityMetric:
    """The metric registered as `name` in `METRICS`.

    Raises:
      ValueError: an unknown name (with the known ones).
    """
    if name not in METRICS:
        raise ValueError(_unknown(name, list(METRICS), "similarity metric"))
    return METRICS[name]


def similarity_matrix(prompts: Sequence[np.ndarray], metric: SimilarityMetric) -> np.ndarray:
    """Pairwise similarities `[N, N]` of N prompts, exactly symmetric."""
    s = np.asarray(metric(prompts, prompts), np.float64)
    # The matmul is symmetric only up to rounding; plots and clustering want exact.
    return (s + s.T) / 2


# ----------------------------------------------------------------------------------------
# Retrieval and the transfer initialisation
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankedSource:
    """A library prompt with its similarity to the target (higher = more similar)."""

    name: str
    similarity: float
    task: str | None
    path: str | None


def rank_sources(
    library: PromptLibrary,
    target: np.ndarray,
    metric: SimilarityMetric | str = DEFAULT_METRIC,
) -> list[RankedSource]:
    """The library's prompts, most similar to `target` `[L, E]` first (ties: by name).

    The target embedding is the prompt of a short prompt-tuning run on the target
    task (the paper uses an early checkpoint): it needs no full training.

    Raises:
      ValueError: an invalid target, or a target width different from the library's.
    """
    metric = get_metric(metric) if isinstance(metric, str) else metric
    target = check_prompt(target, "target")
    if target.shape[1] != library.emb_dim:
        raise ValueError(
            f"The target prompt has width {target.shape[1]} but the library's prompts have "
            f"emb_dim {library.emb_dim}: they come from different model sizes."
        )
    scores = np.asarray(metric([target], library.prompts), np.float64)[0]
    ranked = [
        RankedSource(e.name, float(s), e.task, e.path)
        for e, s in zip(library.entries, scores, strict=True)
    ]
    return sorted(ranked, key=lambda r: (-r.similarity, r.name))


WEIGHTINGS = ("similarity", "uniform")


def top_k_weights(
    ranked: Sequence[RankedSource], k: int, weighting: str = "similarity"
) -> np.ndarray:
    """Normalised weights `[K]` of the first k ranked sources.

    `similarity` (the paper): `w_i = s_i / sum_j s_j`; `uniform`: `1/k`.

    Raises:
      ValueError: k outside [1, len(ranked)], an unknown weighting, or (similarity
        weighting) a non-positive similarity among the top k.
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(ranked):
        raise ValueError(f"k must be an int in [1, {len(ranked)}] (the library size), got {k!r}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; expected one of {WEIGHTINGS}.")
    if weighting == "uniform":
        return np.full(k, 1.0 / k)
    s = np.array([r.similarity for r in ranked[:k]], np.float64)
    if np.any(s <= 0):
        bad = {r.name: round(r.similarity, 4) for r in ranked[:k] if r.similarity <= 0}
        raise ValueError(
            f"Similarity-weighted averaging needs positive similarities, but the top {k} "
            f"include {bad} (dissimilar to the target): use a smaller k or "
            "--weighting=uniform."
        )
    return s / s.sum()


def top_k_weighted_average(
    library: PromptLibrary,
    ranked: Sequence[RankedSource],
    k: int,
    *,
    weighting: str = "similarity",
    length: int | None = None,
    emb_dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's top-k weighted average: `sum_i w_i P_i` `[L, E]` and the weights `[K]`.

    Args:
      library: the library `ranked` was computed on.
      ranked: `rank_sources` output.
      k: how many of the most similar prompts to combine.
      weighting: 'similarity' (the paper) or 'uniform'.
      length: the target's prompt length (PROMPT_LENGTH); None = the sources' length.
      emb_dim: the target model's width; None = the library's.

    Raises:
      ValueError: see `top_k_weights`; top-k prompts of different shapes, or of a
        shape other than `[length, emb_dim]`.
    """
    weights = top_k_weights(ranked, k, weighting)
    chosen = [library[r.name] for r in ranked[:k]]
    shapes = {e.name: tuple(e.prompt.shape) for e in chosen}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            "The top-k weighted average combines prompts token by token, so they must share "
            f"one shape [length, emb_dim]; got {shapes}. Use prompts of one length or a "
            "smaller k."
        )
    for e in chosen:
        check_prompt(e.prompt, repr(e.name), length=length, emb_dim=emb_dim)
    total = sum(w * e.prompt.astype(np.float64) for w, e in zip(weights, chosen, strict=True))
    return np.asarray(total, np.float32), weights


# ----------------------------------------------------------------------------------------
# Outputs: CSV, heatmap, dendrogram
# ----------------------------------------------------------------------------------------


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
      ValueError: fewer than two prompts (nothing to cluster).
    """
    if len(names) < 2:
        raise ValueError("A dendrogram needs at least two prompts in the library.")
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
    metrics: Sequence[str] = tuple(METRICS),
) -> dict[str, Any]:
    """Writes `similarity_<metric>.csv` per metric, `heatmap.png` and `dendrogram.png`.

    Returns:
      {'matrices': {metric: [N, N]}, 'names': [...], 'files': [paths]}.

    Raises:
      ValueError: an unknown metric; a library of one prompt gets the CSVs and the
        heatmap, then an error for the dendrogram.
    """
    if not metrics:
        raise ValueError("Name at least one similarity metric.")
    os.makedirs(output_dir, exist_ok=True)
    matrices = {m: similarity_matrix(library.prompts, get_metric(m)) for m in metrics}
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


# ----------------------------------------------------------------------------------------
# Reading prompts and scores from training runs (orbax checkpoints)
# ----------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint_"
EVAL_METRICS_FILE = "eval_metrics.jsonl"
BEST_CHECKPOINTS_FILE = "best_checkpoints.json"
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_sharding")
# Components under which parameters live in a train state (flax `params`, t5x `target`,
# this package's `TrainState.trainable` / `.frozen`); a `prompt/prompt` elsewhere
# (optimizer moments mirror the parameter tree: `opt_state/.../v_row/prompt/prompt`) is
# not the prompt.
_PARAM_ROOTS = ("params", "target", "trainable", "frozen")
_OPTIMIZER_KEYS = ("opt_state", "optimizer", "param_states", "state_dict")


def checkpoint_steps(model_dir: str) -> list[int]:
    """Steps of the `checkpoint_<step>/` directories in `model_dir`, ascending."""
    if not os.path.isdir(model_dir):
        return []
    steps = []
    for d in os.listdir(model_dir):
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", d)
        if m and os.path.isdir(os.path.join(model_dir, d)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _is_pytree_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS
    )


def _pytree_dirs(step_dir: str) -> list[str]:
    """The orbax PyTree directories of one checkpoint: itself, or its item subdirectories
    (`default/` from `StandardSave` through a CheckpointManager, `state/`, ...)."""
    if _is_pytree_dir(step_dir):
        return [step_dir]
    return sorted(
        os.path.join(step_dir, d)
        for d in os.listdir(step_dir)
        if _is_pytree_dir(os.path.join(step_dir, d))
    )


def resolve_checkpoint(
    path: str,
    step: int | str | None = None,
    *,
    task: str | None = None,
    metric: str | None = None,
) -> tuple[str, int | None]:
    """`(checkpoint_<step> directory, step)` for a model directory or a step directory.

    Args:
      path: a model directory (holding `checkpoint_<step>/`) or one checkpoint directory.
      step: for a model directory: an int, 'latest' / None (default), or 'best' (the
        step with the best validation score in `eval_metrics.jsonl` that has a
        checkpoint).
      task, metric: which validation score 'best' maximises (see `best_eval_score`).

    Raises:
      ValueError: a missing path, no checkpoints, or an unknown step (with the
        available ones).
    """
    if not os.path.isdir(path):
        raise ValueError(f"Checkpoint path {path!r} is not a directory.")
    steps = checkpoint_steps(path)
    if not steps:
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
        if step not in (None, "latest") and not (m and str(step) == m.group(1)):
            raise ValueError(
                f"{path!r} is a single checkpoint (no {CHECKPOINT_PREFIX}<step>/ inside); "
                f"--step={step} needs the model directory."
            )
        return path, int(m.group(1)) if m else None
    if step in (None, "latest"):
        chosen = steps[-1]
    elif step == "best":
        best = best_eval_score(path, task=task, metric=metric)
        if best is None:
            raise ValueError(
                f"--step=best needs validation scores in {os.path.join(path, EVAL_METRICS_FILE)}."
            )
        evaluated = [s for s in best.ranking if s in steps]
        if not evaluated:
            raise ValueError(
                f"No evaluated step of {path!r} has a checkpoint (checkpoints: {steps})."
            )
        chosen = evaluated[0]
    else:
        try:
            chosen = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"--step must be an int, 'latest' or 'best', got {step!r}.") from None
        if chosen not in steps:
            raise ValueError(f"No checkpoint at step {chosen} in {path!r}; available: {steps}.")
    return os.path.join(path, f"{CHECKPOINT_PREFIX}{chosen}"), chosen


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, str(k)))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        for i, v in enumerate(tree):
            yield from _leaf_paths(v, (*prefix, str(i)))
    else:
        yield prefix, tree


def find_prompt_paths(tree: Any) -> dict[str, list[tuple[str, ...]]]:
    """Paths of prompt parameters in a (metadata) tree: 'soft' (`.../prompt/prompt`,
    a soft prompt `[L, E]` or a multi-task one `[T, L, E]`) and 'smop'
    (`.../prompt/prompts`, SMoP's `[K, L, E]`), those under a parameter root first."""
    found: dict[str, list[tuple[str, ...]]] = {"soft": [], "smop": []}
    for path, _ in _leaf_paths(tree):
        if path[-2:] == ("prompt", "prompt"):
            found["soft"].append(path)
        elif path[-2:] == ("prompt", "prompts"):
            found["smop"].append(path)
    for kind, paths in found.items():
        # Optimizer states mirror the parameter tree: when there is a choice, the
        # parameter is the path right under a parameter root, or else outside any
        # optimizer state.
        under_params = [p for p in paths if len(p) >= 3 and p[-3] in _PARAM_ROOTS]
        outside_optimizer = [p for p in paths if not set(p) & set(_OPTIMIZER_KEYS)]
        found[kind] = under_params or outside_optimizer or paths
    return found


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k]
    return tree


def _select_prompt(
    array: np.ndarray, where: str, kind: str, prompt_index: int | None
) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        if prompt_index not in (None, 0):
            raise ValueError(f"{where} is a single prompt {array.shape}; drop --prompt_index.")
        return array
    if array.ndim != 3:
        raise ValueError(f"{where} has shape {array.shape}; expected [length, emb_dim].")
    what = "an SMoP checkpoint" if kind == "smop" else "a multi-task prompt"
    if prompt_index is None:
        raise ValueError(
            f"{where} is {what} with {array.shape[0]} prompts {array.shape}; choose one "
            f"with --prompt_index in [0, {array.shape[0]})."
        )
    if not 0 <= prompt_index < array.shape[0]:
        raise ValueError(
            f"--prompt_index={prompt_index} is out of range for {array.shape[0]} prompts in {where}."
        )
    return array[prompt_index]


@dataclasses.dataclass(frozen=True)
class CheckpointPrompt:
    """A prompt read from a checkpoint: `prompt [L, E]`, where it came from."""

    prompt: np.ndarray
    checkpoint: str
    step: int | None
    param_path: str


def read_checkpoint_prompt(
    path: str,
    *,
    step: int | str | None = None,
    prompt_index: int | None = None,
    param_path: str | None = None,
    task: str | None = None,
    metric: str | None = None,
) -> CheckpointPrompt:
    """Reads the soft prompt of an orbax checkpoint without knowing the state layout.

    The PyTree is searched through its metadata for a leaf at a path ending in
    `prompt/prompt`; only that array is restored (a T5-XXL checkpoint is not loaded).

    Args:
      path: a model directory or a `checkpoint_<step>` directory.
      step: see `resolve_checkpoint`.
      prompt_index: which prompt of a multi-task prompt `[T, L, E]` or SMoP's `[K, L, E]`.
      param_path: an explicit '/'-joined path to the prompt (when the search is ambiguous).
      task, metric: the validation score that `step='best'` maximises.

    Raises:
      ValueError: no checkpoint, no prompt (the method parameters found are named),
        an ambiguous prompt, an SMoP / multi-task prompt without `prompt_index`.
    """
    import orbax.checkpoint as ocp  # Heavy; only export needs it.

    step_dir, step_number = resolve_checkpoint(path, step, task=task, metric=metric)
    item_dirs = _pytree_dirs(step_dir)
    if not item_dirs:
        raise ValueError(
            f"{step_dir!r} holds no orbax PyTree checkpoint (no _METADATA file in it or its "
            "subdirectories). A native t5x checkpoint? Load it with "
            "hyperprompt_jax.checkpoints.load_t5x_checkpoint and save its prompt with np.save."
        )
    checkpointer = ocp.PyTreeCheckpointer()
    seen_method_params: list[str] = []
    for item_dir in item_dirs:
        item_dir = os.path.abspath(item_dir)
        try:
            tree = checkpointer.metadata(item_dir).item_metadata.tree
        except Exception:  # noqa: BLE001 - old layouts without metadata: restore fully.
            tree = checkpointer.restore(item_dir)
        if param_path:
            wanted = tuple(param_path.strip("/").split("/"))
            leaves = dict(_leaf_paths(tree))
            if wanted not in leaves:
                close = difflib.get_close_matches(
                    "/".join(wanted), ["/".join(p) for p in leaves], n=3
                )
                raise ValueError(
                    f"No parameter {param_path!r} in {item_dir!r}."
                    + (f" Did you mean {close}?" if close else "")
                )
            kind = "smop" if wanted[-1] == "prompts" else "soft"
            candidates = [wanted]
        else:
            found = find_prompt_paths(tree)
            kind = "soft" if found["soft"] else "smop"
            candidates = found[kind]
            seen_method_params += [
                "/".join(p) for p, _ in _leaf_paths(tree)
                if any(c in ("prompt", "router", "hyperprompt") for c in p)
            ]  # fmt: skip
        if not candidates:
            continue
        if len(candidates) > 1:
            listing = ", ".join("/".join(c) for c in candidates)
            raise ValueError(
                f"Several prompt parameters in {item_dir!r}: {listing}; choose one with "
                "--param_path."
            )
        prompt_path = candidates[0]
        array = _restore_leaf(checkpointer, item_dir, tree, prompt_path)
        where = f"{'/'.join(prompt_path)} in {step_dir!r}"
        prompt = check_prompt(_select_prompt(array, where, kind, prompt_index), where)
        return CheckpointPrompt(prompt, step_dir, step_number, "/".join(prompt_path))
    hint = (
        f" Method parameters found: {seen_method_params[:6]}"
        + (
            " (HyperPrompt has no input prompt to export)."
            if any("hyperprompt" in p for p in seen_method_params)
            else "."
        )
        if seen_method_params
        else " It holds no method parameters: a model-tuning or backbone checkpoint?"
    )
    raise ValueError(
        f"No soft prompt (a parameter path ending in prompt/prompt) in {step_dir!r}.{hint}"
    )


def _restore_leaf(checkpointer: Any, item_dir: str, tree: Any, path: Sequence[str]) -> np.ndarray:
    """Restores only the leaf at `path` as a NumPy array (partial restore)."""
    import orbax.checkpoint as ocp

    leaf = _get(tree, path)
    if isinstance(leaf, np.ndarray):  # `tree` is already restored data.
        return leaf
    if any(k.isdigit() for k in path):
        # Partial restore templates are dicts; a path through a list restores fully.
        return np.asarray(_get(checkpointer.restore(item_dir), path))
    item: dict = {}
    restore_args: dict = {}
    node, args = item, restore_args
    for k in path[:-1]:
        node = node.setdefault(k, {})
        args = args.setdefault(k, {})
    node[path[-1]] = leaf
    args[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    return np.asarray(_get(restored, path))


# -- Validation scores ---------------------------------------------------------------------

_LOSS_LIKE = re.compile(r"loss|perplexity|error", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class EvalScore:
    """A run's validation scores: the best, and the evaluated steps best-first.

    `by_step` maps a step to its score; `metric` says how the score is made (one
    metric, or the mean of several, as GLUE averages MRPC's F1 and accuracy).
    """

    score: float
    step: int
    metric: str
    by_step: Mapping[int, float]

    @property
    def ranking(self) -> list[int]:
        """Evaluated steps, best first (ties: earlier step first)."""
        return sorted(self.by_step, key=lambda s: (-self.by_step[s], s))


def read_eval_metrics(model_dir: str) -> list[dict[str, Any]]:
    """The rows of `model_dir/eval_metrics.jsonl` ([] if absent).

    Raises:
      ValueError: a line that is not a JSON object with a `step` (file and line named).
    """
    path = os.path.join(model_dir, EVAL_METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON: {e}") from e
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{i} must be a JSON object with a 'step'; got {line!r}.")
            rows.append(row)
    return rows


def best_eval_score(
    model_dir: str, *, task: str | None = None, metric: str | None = None
) -> EvalScore | None:
    """The best validation score of a run from its `eval_metrics.jsonl`.

    Args:
      model_dir: the run's directory.
      task: score this task's rows. If it is not in the file (e.g. the run trained on
        a mixture, whose sub-tasks are evaluated) or None, a step's score is the mean
        over every task evaluated at that step, as GLUE averages its tasks.
      metric: the metric to maximise; None = the mean of every numeric metric whose
        name is not loss-like (one metric: that metric).

    Returns:
      None when there is no file or no usable row; else an `EvalScore`.

    Raises:
      ValueError: an unknown `metric` (with the logged ones).
    """
    rows = read_eval_metrics(model_dir)
    if not rows:
        return None
    tasks = sorted({str(r.get("task")) for r in rows if r.get("task") is not None})
    if task is not None and task in tasks:
        rows = [r for r in rows if r.get("task") == task]
        tasks = [task]
    per_step: dict[int, dict[str, float]] = {}  # step -> {task: score}
    used: set[str] = set()
    for r in rows:
        numeric = {
            k: float(v) for k, v in r.items()
            if k not in ("step", "task") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        if metric is not None:
            values = {metric: numeric[metric]} if metric in numeric else {}
        else:
            values = {k: v for k, v in numeric.items() if not _LOSS_LIKE.search(k)}
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if values:
            used.update(values)
            per_step.setdefault(int(r["step"]), {})[str(r.get("task"))] = float(
                np.mean(list(values.values()))
            )
    if not per_step:
        if metric is not None:
            known = sorted({k for r in rows for k in r if k not in ("step", "task")})
            raise ValueError(_unknown(metric, known, "eval metric"))
        return None
    # Steps where only some tasks were evaluated are not comparable with full ones.
    most = max(len(v) for v in per_step.values())
    by_step = {s: float(np.mean(list(v.values()))) for s, v in per_step.items() if len(v) == most}
    name = next(iter(used)) if len(used) == 1 else f"mean({','.join(sorted(used))})"
    if len(tasks) > 1:
        name = f"mean over {len(tasks)} tasks of {name}"
    best_step = min(by_step, key=lambda s: (-by_step[s], s))
    return EvalScore(by_step[best_step], best_step, name, by_step)


_TASK_MACRO = re.compile(r"^\s*MIXTURE_OR_TASK_NAME\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


def task_from_config(model_dir: str) -> str | None:
    """`MIXTURE_OR_TASK_NAME` from the run's operative `config.gin`, if recorded."""
    path = os.path.join(model_dir, "config.gin")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = _TASK_MACRO.search(f.read())
    return m.group(1) if m else None


def export_prompt(
    checkpoint: str,
    output: str,
    *,
    step: int | str | None = None,
    task: str | None = None,
    model: str | None = None,
    score: float | None = None,
    metric: str | None = None,
    prompt_index: int | None = None,
    param_path: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Exports a checkpoint's prompt to `output` `.npy` `[L, E]` plus a `.json` beside it.

    Metadata: `task` (given, else the run's `MIXTURE_OR_TASK_NAME`), `model`, `step`,
    `score` (given, else the run's validation score at the exported step, else its best
    score; `score_step` and `score_metric` say which), `length`, `emb_dim`, `checkpoint`,
    `param_path`, and `extra`.

    Returns:
      (the `.npy` path, the metadata).

    Raises:
      ValueError: see `read_checkpoint_prompt`, `best_eval_score`.
    """
    model_dir = (
        checkpoint
        if checkpoint_steps(checkpoint)
        else os.path.dirname(os.path.normpath(checkpoint))
    )
    task = task or task_from_config(model_dir)
    found = read_checkpoint_prompt(
        checkpoint, step=step, prompt_index=prompt_index, param_path=param_path,
        task=task, metric=metric,
    )  # fmt: skip
    meta: dict[str, Any] = {
        "task": task,
        "model": model,
        "step": found.step,
        "checkpoint": os.path.abspath(found.checkpoint),
        "param_path": found.param_path,
    }
    if prompt_index is not None:
        meta["prompt_index"] = prompt_index
    if score is not None:
        meta.update(score=float(score), score_metric=metric or "given")
    else:
        evals = best_eval_score(model_dir, task=task, metric=metric)
        if evals is not None:
            at = found.step if found.step in evals.by_step else evals.step
            meta.update(score=evals.by_step[at], score_step=at, score_metric=evals.metric)
        else:
            meta["score"] = None
    meta.update(extra or {})
    path = save_prompt(output, found.prompt, meta)
    return path, read_metadata(path)


def load_target_prompt(
    target: str,
    *,
    step: int | str | None = None,
    prompt_index: int | None = None,
    emb_dim: int | None = None,
) -> np.ndarray:
    """The target's task embedding `[L, E]`: a `.npy` file, or a (short) training run's
    model / checkpoint directory (its prompt at `step`, default latest).

    Raises:
      ValueError: see `load_prompt_file` / `read_checkpoint_prompt`.
    """
    if os.path.isdir(target):
        prompt = read_checkpoint_prompt(target, step=step, prompt_index=prompt_index).prompt
        return check_prompt(prompt, f"of {target!r}", emb_dim=emb_dim)
    return load_prompt_file(target, emb_dim=emb_dim)


# ----------------------------------------------------------------------------------------
# Top-k multi-task mixture
# ----------------------------------------------------------------------------------------


def source_tasks(
    ranked: Sequence[RankedSource], k: int, task_map: Mapping[str, str] | None = None
) -> list[str]:
    """The seqio task names of the first k ranked sources (metadata `task`, or
    `task_map[name]`), duplicates dropped in rank order.

    Raises:
      ValueError: k out of range, or sources whose task is unknown (named).
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(ranked):
        raise ValueError(f"k must be an int in [1, {len(ranked)}] (the library size), got {k!r}.")
    task_map = dict(task_map or {})
    tasks, missing = [], []
    for r in ranked[:k]:
        task = task_map.get(r.name, r.task)
        if not task:
            missing.append(r.name)
        elif task not in tasks:
            tasks.append(task)
    if missing:
        raise ValueError(
            f'The task of library prompt(s) {missing} is unknown: add {{"task": ...}} to '
            "their .json metadata or pass --task_map NAME=TASK."
        )
    return tasks


MIXTURE_RATES = ("examples", "equal")


def mixture_name(target_task: str, k: int) -> str:
    """`spot_<target>_top<k>_mixture`."""
    return f"spot_{target_task}_top{k}_mixture"


def register_topk_mixture(
    target_task: str,
    sources: Sequence[str],
    *,
    name: str | None = None,
    rate: str = "examples",
    maximum: int | None = None,
    temperature: float = 1.0,
) -> Any:
    """Registers (replacing any namesake) a seqio Mixture of the target plus `sources`.

    Args:
      target_task: the target's registered task.
      sources: registered source tasks / mixtures (the top k).
      name: mixture name; default `spot_<target>_top<k>_mixture`.
      rate: 'examples' (examples-proportional, T5's multi-task default, capped by
        `maximum`, with `temperature`) or 'equal'.
      maximum: the examples-proportional cap K (None = uncapped).
      temperature: examples-proportional temperature (1 = proportional).

    Returns:
      The registered `seqio.Mixture`.

    Raises:
      ValueError: a task not registered (with close names), an unknown rate.
    """
    import seqio

    if rate not in MIXTURE_RATES:
        raise ValueError(f"Unknown mixing rate {rate!r}; expected one of {MIXTURE_RATES}.")
    members = [target_task] + [s for s in sources if s != target_task]
    registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    unknown = [m for m in members if m not in registered]
    if unknown:
        lines = []
        for m in unknown:
            close = difflib.get_close_matches(m, sorted(registered), n=3, cutoff=0.5)
            lines.append(f"{m!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"Not registered in seqio: {'; '.join(lines)}. Import the module that registers "
            "them with --module, or fix the prompts' metadata `task`."
        )
    name = name or mixture_name(target_task, len(sources))
    if rate == "examples":
        import functools

        default_rate = functools.partial(
            seqio.mixing_rate_num_examples, maximum=maximum, temperature=temperature
        )
    else:
        default_rate = 1.0
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, members, default_rate=default_rate)


# ----------------------------------------------------------------------------------------
# Best of top-k: one transfer per retrieved prompt, the best kept on validation
# ----------------------------------------------------------------------------------------


class Launcher(Protocol):
    """Runs the training entry point on t5x-style flags; returns its exit code."""

    def __call__(self, argv: Sequence[str]) -> int: ...


@dataclasses.dataclass(frozen=True)
class SubprocessLauncher:
    """`python -m hyperprompt_jax.train ARGV` in a fresh process per run (default).

    A process per candidate frees the device memory of the previous run and keeps a
    failing run from taking the others down. `cwd` is where the process starts (gin
    files are also looked up there).
    """

    module: str = "hyperprompt_jax.train"
    cwd: str | None = None

    def __call__(self, argv: Sequence[str]) -> int:
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", self.module, *argv], cwd=self.cwd).returncode


def in_process_launcher(argv: Sequence[str]) -> int:
    """`hyperprompt_jax.train.main(argv)` in this process (no start-up cost per run)."""
    from hyperprompt_jax import train

    return train.main(list(argv))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One transfer of best-of-top-k: its source, run directory and validation score."""

    rank: int
    name: str
    task: str | None
    similarity: float
    source_prompt: str
    model_dir: str
    exit_code: int
    score: float | None = None
    score_step: int | None = None
    metric: str | None = None


@dataclasses.dataclass(frozen=True)
class BestOfTopK:
    """The k transfers, the best one, and where the summary (and best prompt) went."""

    candidates: tuple[Candidate, ...]
    best: Candidate
    summary_path: str
    best_prompt_path: str | None


SUMMARY_FILE = "best_of_topk.json"
BEST_PROMPT_FILE = "best_prompt.npy"


def _candidate_dir_name(rank: int, name: str) -> str:
    return f"top{rank}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def best_of_topk(
    library: PromptLibrary,
    ranked: Sequence[RankedSource],
    k: int,
    *,
    model_dir: str,
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    task: str | None = None,
    metric: str | None = None,
    length: int | None = None,
    emb_dim: int | None = None,
    launcher: Launcher | None = None,
    prompt_macro: str = "SOURCE_PROMPT",
) -> BestOfTopK:
    """Trains one transfer from each of the k most similar prompts; keeps the best.

    Candidate i (1-based rank) runs the launcher with `gin_files` (e.g. a run file, the
    model and `methods/spot.gin`), `gin_bindings`, `MODEL_DIR=model_dir/top<i>_<name>`
    and `SOURCE_PROMPT=<the source prompt file>`. Its score is its best validation score
    in `eval_metrics.jsonl` (see `best_eval_score`); the best candidate's best
    checkpoint's prompt is exported to `model_dir/best_prompt.npy` and everything is
    summarised in `model_dir/best_of_topk.json`. Re-running resumes each candidate
    (the launcher resumes from its checkpoints) and re-reads the scores.

    Args:
      library: the library `ranked` was computed on.
      ranked: `rank_sources` output.
      k: how many of the most similar sources to try.
      model_dir: parent directory of the candidates' runs.
      gin_files: the training gin files.
      gin_bindings: extra `NAME=VALUE` bindings for every candidate.
      task: the target task in `eval_metrics.jsonl` (needed if it logs several).
      metric: the validation metric to maximise (default: mean of non-loss metrics).
      length, emb_dim: the target prompt shape, checked before anything trains.
      launcher: how to run training (default `SubprocessLauncher()`).
      prompt_macro: the gin macro holding the initial prompt file.

    Raises:
      ValueError: bad k, no gin files, bindings that would override the per-candidate
        ones, prompts that do not fit (all before training), or no candidate with a
        validation score.
    """
    if not gin_files:
        raise ValueError("best_of_topk needs the training gin files (--train_gin_file).")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(ranked):
        raise ValueError(f"k must be an int in [1, {len(ranked)}] (the library size), got {k!r}.")
    for b in gin_bindings:
        if b.split("=", 1)[0].strip() in ("MODEL_DIR", prompt_macro):
            raise ValueError(
                f"Binding {b!r} would override what best_of_topk sets per candidate "
                f"(MODEL_DIR, {prompt_macro}); pass --model_dir instead."
            )
    launcher = launcher or SubprocessLauncher()
    os.makedirs(model_dir, exist_ok=True)
    plan = []
    for i, r in enumerate(ranked[:k], 1):
        entry = library[r.name]
        check_prompt(entry.prompt, repr(r.name), length=length, emb_dim=emb_dim)
        run_dir = os.path.abspath(os.path.join(model_dir, _candidate_dir_name(i, r.name)))
        source = entry.path
        if source is None:  # An in-memory library: give the launcher a file.
            source = save_prompt(os.path.join(run_dir + "_source", f"{r.name}.npy"), entry.prompt)
        plan.append((i, r, os.path.abspath(source), run_dir))

    candidates = []
    for i, r, source, run_dir in plan:
        argv = [f"--gin_file={f}" for f in gin_files]
        argv += [f"--gin.{b}" for b in gin_bindings]
        argv += [f"--gin.MODEL_DIR={run_dir!r}", f"--gin.{prompt_macro}={source!r}"]
        code = int(launcher(argv))
        evals = best_eval_score(run_dir, task=task, metric=metric) if code == 0 else None
        candidates.append(
            Candidate(
                rank=i, name=r.name, task=r.task, similarity=r.similarity,
                source_prompt=source, model_dir=run_dir, exit_code=code,
                score=evals.score if evals else None,
                score_step=evals.step if evals else None,
                metric=evals.metric if evals else None,
            )
        )  # fmt: skip
    scored = [c for c in candidates if c.score is not None]
    if not scored:
        codes = {c.name: c.exit_code for c in candidates}
        raise ValueError(
            f"No best-of-top-k candidate produced a validation score (exit codes {codes}); "
            "does the run gin evaluate (EVAL_PERIOD, a validation split)?"
        )
    # Ties go to the more similar source (lower rank).
    best = min(scored, key=lambda c: (-c.score, c.rank))
    best_prompt = None
    try:
        best_prompt, _ = export_prompt(
            best.model_dir,
            os.path.join(model_dir, BEST_PROMPT_FILE),
            step=best.score_step if best.score_step in checkpoint_steps(best.model_dir) else None,
            task=task,
            metric=metric,
            extra={"best_of_topk_source": best.name},
        )
    except ValueError as e:  # The scores stand even if the prompt cannot be exported.
        print(f"Could not export the best candidate's prompt: {e}")
    summary_path = os.path.join(model_dir, SUMMARY_FILE)
    with open(summary_path, "w") as f:
        json.dump(
            {
                "k": k,
                "best": dataclasses.asdict(best),
                "best_prompt": best_prompt,
                "candidates": [dataclasses.asdict(c) for c in candidates],
            },
            f,
            indent=2,
        )
        f.write("\n")
    return BestOfTopK(tuple(candidates), best, summary_path, best_prompt)


def format_best_of_topk(result: BestOfTopK) -> str:
    """A plain-text table of the candidates, the best marked."""
    lines = [f"{'rank':>4}  {'source':<24} {'similarity':>10} {'score':>9} {'@step':>6}  run"]
    for c in result.candidates:
        score = f"{c.score:9.3f}" if c.score is not None else f"{'exit ' + str(c.exit_code):>9}"
        mark = "  <- best" if c is result.best else ""
        step = c.score_step if c.score_step is not None else "-"
        lines.append(
            f"{c.rank:>4}  {c.name:<24} {c.similarity:>10.4f} {score} {step:>6}  {c.model_dir}{mark}"
        )
    lines.append(f"Summary: {result.summary_path}")
    if result.best_prompt_path:
        lines.append(f"Best prompt: {result.best_prompt_path}")
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m hyperprompt_jax.spot <subcommand>`: the command line lives in spot_cli.
    import sys

    from hyperprompt_jax import spot_cli

    sys.exit(spot_cli.main())
