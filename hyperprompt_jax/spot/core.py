"""SPoT's method: prompt libraries, the two task-similarity metrics, retrieval, top-k.

Vu et al. (ACL 2022), "SPoT: Better Frozen Model Adaptation through Soft Prompt
Transfer". A prompt `[L, E]` trained on a task is that task's embedding (Section 4).
A *library* holds one entry per source task; an entry carries two prompts, as in the
paper's protocol:

* the *task embedding*: the prompt taken early in training (the paper: after 10K
  steps), compared with the target's embedding by `rank_sources`;
* the *transfer prompt*: the source's best checkpoint, which `top_k_weighted_average`
  combines and best-of-top-k / the mixture transfer start from.

On disk an entry is `<name>.npy` (the transfer prompt), an optional
`<name>.embedding.npy` (the task embedding; without it the one prompt serves both, as
in libraries of released prompts) and an optional `<name>.json` of metadata (`task`,
`model`, `step`, `score`, and `prompts`, which says which file is which and from which
step). A PEFT prompt-tuning adapter directory is also an entry (its name is the
directory's; see `prompt_files`).

Metrics (Section 4 of the paper), for prompts `P [l1, E]` and `Q [l2, E]`:

* cosine of average tokens: `cos(mean_i P_i, mean_j Q_j)`.
* per-token average cosine: `1/(l1*l2) sum_ij cos(P_i, Q_j)`. The average of dot
  products is the dot product of averages, so it equals `mean_i u(P_i) . mean_j u(Q_j)`
  with `u(x) = x / |x|`: O((l1 + l2) E) per pair, not O(l1 l2 E). Unlike the first
  metric, a prompt's similarity with itself is below 1.

The default is per-token average cosine (`DEFAULT_METRIC`): by the paper's retrieval
results (as issue 15 reads them), best-of-top-k transfer does best with it.

Top-k weighted average (the paper's "TOP-K WEIGHTED AVERAGE"): `sum_i w_i P_i` over the
k most similar sources with `w_i = s_i / sum_j s_j`; token by token, so the k transfer
prompts must share one shape, and the similarities must be positive.

Pure NumPy: `rank`, `init` and `similarity` run on a laptop in a second.
Shapes: L prompt length, E emb_dim, N library size, K top-k.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from hyperprompt_jax import prompt_files
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.prompt_files import check_prompt

EMBEDDING_SUFFIX = ".embedding" + prompt_files.PROMPT_SUFFIX


def unknown_name(name: str, known: Sequence[str], what: str) -> str:
    """An 'Unknown <what> <name>' message with close matches and the known names."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown {what} {name!r}.{hint} Known: {list(known)}."


def check_k(k: Any, n: int) -> None:
    """Raises unless k is an int in [1, n] (n = the number of ranked sources)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise UserError(f"k must be an int in [1, {n}] (the library size), got {k!r}.")


# ----------------------------------------------------------------------------------------
# Prompt libraries
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One source of a library.

    Attributes:
      name: the entry's name (file stem or adapter directory name).
      prompt: the transfer prompt `[L, E]`.
      metadata: the entry's metadata.
      path: the transfer prompt's file (None for an in-memory entry).
      embedding: the task embedding `[L', E]`; None = `prompt` serves as both.
    """

    name: str
    prompt: np.ndarray
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str | None = None
    embedding: np.ndarray | None = None

    @property
    def task(self) -> str | None:
        """The seqio task the prompt was trained on (metadata `task`), if known."""
        task = self.metadata.get("task")
        return str(task) if task else None

    @property
    def task_embedding(self) -> np.ndarray:
        """The prompt compared with the target: `embedding`, else the transfer prompt."""
        return self.prompt if self.embedding is None else self.embedding


@dataclasses.dataclass(frozen=True)
class PromptLibrary:
    """An ordered collection of prompts of one width E (lengths may differ)."""

    entries: tuple[PromptEntry, ...]

    def __post_init__(self):
        entries = tuple(self.entries)
        object.__setattr__(self, "entries", entries)
        if not entries:
            raise UserError("The prompt library is empty: it needs at least one prompt.")
        names = [e.name for e in entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"Prompt names must be unique; repeated: {duplicates}.")
        widths = {e.name: e.prompt.shape[1] for e in entries}
        widths |= {f"{e.name} (embedding)": e.task_embedding.shape[1] for e in entries}
        if len(set(widths.values())) > 1:
            raise UserError(
                "Prompts in one library must share emb_dim (they must come from one model "
                f"size); widths: {widths}."
            )

    @classmethod
    def from_prompts(
        cls,
        prompts: Mapping[str, Any],
        metadata: Mapping[str, Mapping] | None = None,
        embeddings: Mapping[str, Any] | None = None,
    ) -> PromptLibrary:
        """A library from `{name: [L, E] transfer prompt}` (validated), with optional
        metadata and task embeddings `{name: [L', E]}`."""
        metadata, embeddings = metadata or {}, embeddings or {}
        return cls(
            tuple(
                PromptEntry(
                    name,
                    check_prompt(p, repr(name)),
                    dict(metadata.get(name, {})),
                    embedding=(
                        check_prompt(embeddings[name], f"{name!r} (embedding)")
                        if name in embeddings
                        else None
                    ),
                )
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
        """Reads every entry of `directory`, sorted by name (see the module docstring).

        Args:
          directory: the library directory (not searched recursively).
          emb_dim: if set, every prompt must have this width (the target model's).
          length: if set, every transfer prompt must have this length.

        Raises:
          UserError: a missing directory, no entries, an invalid prompt or metadata
            file (named), an embedding file without its transfer prompt, or prompts of
            different widths.
        """
        if not os.path.isdir(directory):
            raise UserError(f"Prompt library {directory!r} is not a directory.")
        listing = sorted(os.listdir(directory))
        files = [f for f in listing if f.endswith(prompt_files.PROMPT_SUFFIX)]
        embeddings = {f for f in files if f.endswith(EMBEDDING_SUFFIX)}
        transfers = {f[: -len(prompt_files.PROMPT_SUFFIX)]: f for f in files if f not in embeddings}
        adapters = {
            d: d for d in listing if prompt_files.is_peft_adapter(os.path.join(directory, d))
        }
        for f in sorted(embeddings):
            if f[: -len(EMBEDDING_SUFFIX)] not in transfers:
                raise UserError(
                    f"Task embedding {os.path.join(directory, f)!r} has no transfer prompt "
                    f"{f[: -len(EMBEDDING_SUFFIX)]}{prompt_files.PROMPT_SUFFIX} beside it."
                )
        if not transfers and not adapters:
            raise UserError(
                f"Prompt library {directory!r} holds no {prompt_files.PROMPT_SUFFIX} prompts "
                "or PEFT prompt-tuning adapters"
                + (f" (found e.g. {listing[:5]})." if listing else " (the directory is empty).")
            )
        entries = []
        for name, f in sorted({**transfers, **adapters}.items()):
            path = os.path.join(directory, f)
            prompt = prompt_files.load_prompt_file(path, length=length, emb_dim=emb_dim)
            embedding_path = os.path.join(directory, name + EMBEDDING_SUFFIX)
            embedding = (
                prompt_files.load_prompt_file(embedding_path, emb_dim=emb_dim)
                if os.path.exists(embedding_path)
                else None
            )
            metadata = prompt_files.read_metadata(path)
            entries.append(PromptEntry(name, prompt, metadata, path, embedding))
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
        """Transfer prompts `[L_n, E]` in library order."""
        return [e.prompt for e in self.entries]

    @property
    def embeddings(self) -> list[np.ndarray]:
        """Task embeddings `[L_n, E]` in library order (what similarity compares)."""
        return [e.task_embedding for e in self.entries]

    @property
    def emb_dim(self) -> int:
        """The width E shared by every prompt."""
        return int(self.entries[0].prompt.shape[1])

    def __getitem__(self, name: str) -> PromptEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(unknown_name(name, self.names, "library entry"))

    def without(self, names: Iterable[str]) -> PromptLibrary:
        """The library minus the named entries (each must exist).

        Raises:
          UserError: an unknown name, or nothing left.
        """
        names = set(names)
        for n in names:
            if n not in self.names:
                raise UserError(unknown_name(n, self.names, "library entry"))
        kept = tuple(e for e in self.entries if e.name not in names)
        if not kept:
            raise UserError(f"Excluding {sorted(names)} leaves the prompt library empty.")
        return PromptLibrary(kept)


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
        raise UserError(f"Cosine similarity is undefined for {what}: row {row} has zero norm.")
    return x / norms


def _embedding_metric(embed: Callable[[np.ndarray, str], np.ndarray]) -> SimilarityMetric:
    """A metric that embeds each prompt as one vector `[E]` and takes dot products."""

    def metric(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
        if len(a) == 0 or len(b) == 0:
            raise UserError("Similarity needs at least one prompt on each side.")
        widths = {p.shape[-1] for p in (*a, *b)}
        if len(widths) > 1:
            raise UserError(
                f"Prompts of different widths cannot be compared: emb_dims {sorted(widths)} "
                "(task embeddings must come from one model size)."
            )
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
# The paper's best retrieval metric for best-of-top-k transfer (module docstring);
# `cosine_of_average_tokens` was this package's default before.
DEFAULT_METRIC = "per_token_average_cosine"


def get_metric(name: str) -> SimilarityMetric:
    """The metric registered as `name` in `METRICS`.

    Raises:
      UserError: an unknown name (with the known ones).
    """
    if name not in METRICS:
        raise UserError(unknown_name(name, list(METRICS), "similarity metric"))
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
    """A library entry with its similarity to the target (higher = more similar)."""

    name: str
    similarity: float
    task: str | None
    path: str | None


def rank_sources(
    library: PromptLibrary,
    target: np.ndarray,
    metric: SimilarityMetric | str = DEFAULT_METRIC,
) -> list[RankedSource]:
    """The library's entries, most similar to `target` `[L, E]` first (ties: by name).

    Compares the target's embedding (a short prompt-tuning run's prompt on the target
    task: the paper uses an early checkpoint) with each entry's task embedding.

    Raises:
      UserError: an invalid target, or a target width different from the library's.
    """
    metric = get_metric(metric) if isinstance(metric, str) else metric
    target = check_prompt(target, "target")
    if target.shape[1] != library.emb_dim:
        raise UserError(
            f"The target prompt has width {target.shape[1]} but the library's prompts have "
            f"emb_dim {library.emb_dim}: they come from different model sizes."
        )
    scores = np.asarray(metric([target], library.embeddings), np.float64)[0]
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
      UserError: k outside [1, len(ranked)], an unknown weighting, or (similarity
        weighting) a non-positive similarity among the top k.
    """
    check_k(k, len(ranked))
    if weighting not in WEIGHTINGS:
        raise UserError(f"Unknown weighting {weighting!r}; expected one of {WEIGHTINGS}.")
    if weighting == "uniform":
        return np.full(k, 1.0 / k)
    s = np.array([r.similarity for r in ranked[:k]], np.float64)
    if np.any(s <= 0):
        bad = {r.name: round(r.similarity, 4) for r in ranked[:k] if r.similarity <= 0}
        raise UserError(
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
    """The paper's top-k weighted average of the transfer prompts: `sum_i w_i P_i`
    `[L, E]` and the weights `[K]`.

    Args:
      library: the library `ranked` was computed on.
      ranked: `rank_sources` output.
      k: how many of the most similar entries to combine.
      weighting: 'similarity' (the paper) or 'uniform'.
      length: the target's prompt length (PROMPT_LENGTH); None = the sources' length.
      emb_dim: the target model's width; None = the library's.

    Raises:
      UserError: see `top_k_weights`; top-k prompts of different shapes, or of a
        shape other than `[length, emb_dim]`.
    """
    weights = top_k_weights(ranked, k, weighting)
    chosen = [library[r.name] for r in ranked[:k]]
    shapes = {e.name: tuple(e.prompt.shape) for e in chosen}
    if len(set(shapes.values())) > 1:
        raise UserError(
            "The top-k weighted average combines prompts token by token, so they must share "
            f"one shape [length, emb_dim]; got {shapes}. Use prompts of one length or a "
            "smaller k."
        )
    for e in chosen:
        check_prompt(e.prompt, repr(e.name), length=length, emb_dim=emb_dim)
    total = sum(w * e.prompt.astype(np.float64) for w, e in zip(weights, chosen, strict=True))
    return np.asarray(total, np.float32), weights
