"""Soft prompts for prompt tuning and SPoT: the prompt, its initialisers, its combination.

`SoftPrompt` is the network's input hook (`network.InputConditioner`): it holds a
prompt `[length, emb_dim]` (parameter `prompt/prompt`) and prepends it to the embedded
encoder inputs, extending the mask so the prompt positions are always valid. The
encoder then builds its attention mask from the extended mask, so every real token
attends to the prompt, the prompt attends to the real tokens, and padding stays
masked in both directions.

Choices and their sources (Lester et al., 2021, "The Power of Scale for
Parameter-Efficient Prompt Tuning"; Vu et al., 2022, "SPoT"):

* Placement: the prompt is prepended to the embedded input (the paper's Figure 2 and
  `prefix_prompt`, the default combination in google-research/prompt-tuning). Other
  placements plug in through the `Combination` protocol.
* `Uniform(0.5)`: "random uniform initialisation from [-0.5, 0.5]" (paper, Section 3),
  our default. The released code differs: `prompts.Prompt`'s default is flax's
  `nn.initializers.uniform()`, i.e. [0, 0.01), and its model configs
  (`configs/models/t5_1_1_prompt.gin`) set `uniform.scale = 0.5`, i.e. [0, 0.5);
  `Uniform(0.5, symmetric=False)` reproduces that. `SampledVocab(5000)`: rows drawn
  without replacement from the first 5,000 rows of the embedding table (SentencePiece
  ids are roughly frequency ordered, the paper's "5,000 most common tokens"); with
  replacement only if the prompt is longer than the population. `ClassLabels`: a label's embedding (the mean of its pieces when
  it is split into several tokens) fills one prompt position each, the remaining
  positions come from `SampledVocab` (paper, Section 3).
* SPoT transfers a source prompt by initialising the target prompt from it: `FromFile`
  reads a prompt file of exactly the prompt's shape (a `.npy` file or a PEFT
  prompt-tuning adapter directory; `prompt_files` reads and checks both).
  `WeightedFiles` initialises from a weighted average of several source prompts
  (weights normalised to sum to 1): SPoT's top-k weighted average, given the files.
* Logical axes `('prompt', 'prompt_embed')`, not `'embed'`: like prompt-tuning's
  `Prompt`, the prompt stays replicated even when `'embed'` is sharded (it is tiny,
  and a replicated prompt can be written as one `.npy` file). Multi-task prompts
  (`num_tasks` set) add a leading `'tasks'` axis, also replicated.
* `max_length`: prompt tuning counts the prompt in the encoder length budget (SMoP's
  code feeds `max_length - prompt_length` input tokens); when set, a prompt that
  leaves no room for the inputs, or inputs that overflow the budget, raise a
  ValueError.

Shapes: B batch, L input length, P prompt length, E emb_dim, T tasks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from hyperprompt_jax import packing, prompt_files
from hyperprompt_jax import task_ids as task_ids_lib
from hyperprompt_jax.errors import UserError

Array = jax.Array
PRNGKey = jax.Array
Shape = Tuple[int, ...]

param_with_axes = nn_partitioning.param_with_axes


# ----------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------


class PromptInit(Protocol):
    """Initialises a prompt `[..., length, emb_dim]` (float32)."""

    def __call__(
        self, rng: PRNGKey, shape: Shape, *, embedding_table: Array | None = None
    ) -> Array:
        """`embedding_table` is the token embedding `[vocab, emb_dim]` (the pretrained
        one when the prompt is initialised over a loaded backbone)."""


def _check_emb_dim(shape: Shape, embedding_table: Array | None, who: str) -> Array:
    if embedding_table is None:
        raise UserError(f"{who} needs the token embedding table; none was given.")
    if embedding_table.ndim != 2 or embedding_table.shape[-1] != shape[-1]:
        raise UserError(
            f"{who}: embedding table {tuple(embedding_table.shape)} does not match the "
            f"prompt's emb_dim {shape[-1]} (prompt shape {tuple(shape)})."
        )
    return jnp.asarray(embedding_table, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform in `[-scale, scale]` (Lester et al.: scale 0.5), or in `[0, scale)` with
    `symmetric=False` (the released prompt-tuning configs: flax's `uniform(0.5)`)."""

    scale: float = 0.5
    symmetric: bool = True

    def __call__(self, rng, shape, *, embedding_table=None):
        del embedding_table
        low = -self.scale if self.symmetric else 0.0
        return jax.random.uniform(rng, shape, jnp.float32, low, self.scale)


@dataclasses.dataclass(frozen=True)
class Normal:
    """Normal with standard deviation `stddev` (SMoP's code: torch's Embedding default, 1.0)."""

    stddev: float = 1.0

    def __call__(self, rng, shape, *, embedding_table=None):
        del embedding_table
        return self.stddev * jax.random.normal(rng, shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class SampledVocab:
    """Rows of the embedding table sampled from its first `population_size` rows."""

    population_size: int = 5000

    def __post_init__(self):
        if self.population_size <= 0:
            raise UserError(f"population_size must be positive, got {self.population_size}.")

    def __call__(self, rng, shape, *, embedding_table=None):
        table = _check_emb_dim(shape, embedding_table, "SampledVocab")
        population = min(self.population_size, table.shape[0])
        num = math.prod(shape[:-1])
        index = jax.random.choice(rng, population, (num,), replace=num > population)
        return table[index].reshape(shape)


def _encode_label(vocabulary: Any, label: str) -> list[int]:
    ids = vocabulary.encode(label)
    return [int(i) for i in np.asarray(ids).reshape(-1)]


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """Class-label embeddings in the first prompt positions, `fallback` elsewhere.

    Attributes:
      labels: label strings (e.g. `('positive', 'negative')`), encoded with `vocabulary`.
      vocabulary: a seqio vocabulary (anything with `encode(str) -> ids`).
      token_ids: alternatively the labels' token ids directly, one sequence per label.
      fallback: initialiser for the other positions.
    """

    labels: Sequence[str] = ()
    vocabulary: Any = None
    token_ids: Sequence[Sequence[int]] | None = None
    fallback: PromptInit = SampledVocab()

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", tuple(tuple(t) for t in self.token_ids))
        if self.token_ids is None and not self.labels:
            raise UserError("ClassLabels needs `labels` (with a vocabulary) or `token_ids`.")
        if self.token_ids is None and self.vocabulary is None:
            raise UserError("ClassLabels got label strings but no `vocabulary` to encode them.")

    def _ids(self) -> list[list[int]]:
        if self.token_ids is not None:
            ids = [list(t) for t in self.token_ids]
        else:
            ids = [_encode_label(self.vocabulary, label) for label in self.labels]
        for i, t in enumerate(ids):
            if not t:
                raise UserError(f"Class label {i} encodes to no tokens.")
        return ids

    def __call__(self, rng, shape, *, embedding_table=None):
        table = _check_emb_dim(shape, embedding_table, "ClassLabels")
        ids = self._ids()
        length = shape[-2]
        if len(ids) > length:
            raise UserError(f"{len(ids)} class labels do not fit in a prompt of length {length}.")
        for t in ids:
            if max(t) >= table.shape[0] or min(t) < 0:
                raise UserError(f"Label token ids {t} out of range for vocab {table.shape[0]}.")
        prompt = self.fallback(rng, shape, embedding_table=embedding_table)
        # A label split into several pieces is represented by the mean of their embeddings.
        label_rows = jnp.stack([table[jnp.asarray(t)].mean(axis=0) for t in ids])
        return prompt.at[..., : len(ids), :].set(label_rows)


def _load_file(path: str, shape: Shape) -> np.ndarray:
    """A prompt file (`.npy` or PEFT adapter) checked against the prompt's shape `[L, E]`."""
    if len(shape) != 2:
        raise UserError(
            f"Prompt file {path!r} holds one prompt [length, emb_dim], but the prompt is "
            f"{tuple(shape)} (a multi-task prompt cannot be initialised from one file)."
        )
    array = prompt_files.load_prompt_file(path)
    if tuple(array.shape) != tuple(shape):
        raise UserError(
            f"Prompt file {path!r} has shape {tuple(array.shape)} but the prompt is "
            f"{tuple(shape)} ([length, emb_dim]); set the prompt length to "
            f"{array.shape[0]} or use a matching file."
        )
    return array


@dataclasses.dataclass(frozen=True)
class FromFile:
    """The prompt stored in a prompt file of exactly the prompt's shape (SPoT transfer):
    a `.npy` file (local or gs://) or a PEFT prompt-tuning adapter directory."""

    path: str

    def __call__(self, rng, shape, *, embedding_table=None):
        del rng, embedding_table
        return jnp.asarray(_load_file(self.path, shape))


@dataclasses.dataclass(frozen=True)
class WeightedFiles:
    """Weighted average `sum_i w_i p_i / sum_i w_i` of several `.npy` prompts.

    Attributes:
      paths: prompt files (`.npy` or PEFT adapter directories), all of the prompt's shape.
      weights: non-negative weights (e.g. SPoT similarity scores); None = uniform.
    """

    paths: Sequence[str]
    weights: Sequence[float] | None = None

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(self.paths))
        if not self.paths:
            raise UserError("WeightedFiles needs at least one prompt file.")
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(self.paths):
                raise UserError(
                    f"WeightedFiles got {len(weights)} weights for {len(self.paths)} files."
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise UserError(f"Weights must be non-negative with a positive sum: {weights}.")
            object.__setattr__(self, "weights", weights)

    def __call__(self, rng, shape, *, embedding_table=None):
        del rng, embedding_table
        weights = self.weights or (1.0,) * len(self.paths)
        total = np.zeros(shape, np.float64)
        for path, w in zip(self.paths, weights, strict=True):
            total += w * _load_file(path, shape)
        return jnp.asarray(total / sum(weights), jnp.float32)


# ----------------------------------------------------------------------------------------
# Combination with the inputs
# ----------------------------------------------------------------------------------------


class Combination(Protocol):
    """How a prompt is combined with the embedded inputs and their mask."""

    def __call__(self, prompt: Array, embedded: Array, mask: Array) -> Tuple[Array, Array]:
        """`[B, P, E]`, `[B, L, E]`, `[B, L]` -> `[B, L', E]`, `[B, L']`."""

    def extend_mask(self, mask: Array, prompt_length: int) -> Array:
        """`[B, L]` -> `[B, L']`, the mask `__call__` returns, without embeddings."""


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prompt first, then the inputs; prompt positions are always valid."""

    def __call__(self, prompt, embedded, mask):
        return (
            jnp.concatenate([prompt.astype(embedded.dtype), embedded], axis=1),
            self.extend_mask(mask, prompt.shape[1]),
        )

    def extend_mask(self, mask, prompt_length):
        ones = jnp.ones((mask.shape[0], prompt_length), mask.dtype)
        return jnp.concatenate([ones, mask], axis=1)


def check_prompt_length(length: Any, max_length: int | None, what: str = "prompt") -> None:
    """Validates a prompt length (and that it leaves room in `max_length`)."""
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        raise UserError(f"The {what} length must be a positive int, got {length!r}.")
    if max_length is not None:
        if not isinstance(max_length, int) or max_length <= 0:
            raise UserError(f"max_length must be a positive int or None, got {max_length!r}.")
        if length >= max_length:
            raise UserError(
                f"A {what} of length {length} leaves no room for the inputs in an encoder "
                f"length budget of max_length={max_length}; shorten the prompt or raise "
                "max_length."
            )


def check_inputs_fit(input_length: int, prompt_length: int, max_length: int | None) -> None:
    """Raises if `input_length + prompt_length` exceeds `max_length` (when set)."""
    if max_length is not None and input_length + prompt_length > max_length:
        raise UserError(
            f"Inputs of length {input_length} plus a prompt of length {prompt_length} exceed "
            f"max_length={max_length}; set the inputs feature length to at most "
            f"{max_length - prompt_length}."
        )


def check_embedded(embedded: Array, mask: Array) -> None:
    if embedded.ndim != 3:
        raise UserError(f"Embedded inputs must be [batch, length, emb_dim], got {embedded.shape}.")
    if mask.shape != embedded.shape[:2]:
        raise UserError(f"Mask {mask.shape} does not match embeddings {embedded.shape[:2]}.")


# ----------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------


class InputHook:
    """What every prompt input hook does around its own prompt (mixed into `SoftPrompt`
    and `smop.SMoP`): validate the inputs, create the prompt parameter, prepend it to an
    unpacked row or write it into each example's slots of a packed row (`packing`).

    The module provides `length` (prompt positions prepended), `max_length` (optional
    encoder budget including the prompt), `combination` and `prompt_init`.
    """

    length: int
    max_length: int | None
    combination: Combination
    prompt_init: PromptInit

    def _check_length(self) -> None:
        """For `__post_init__`: a positive length that leaves room in `max_length`."""
        check_prompt_length(self.length, self.max_length)

    def _input_shape(
        self,
        embedded_inputs: Array,
        input_mask: Array,
        segments: packing.Segments | None = None,
    ) -> Tuple[int, int, int]:
        """Validates `[B, L, E]` / `[B, L]` inputs and the budget; returns `(B, L, E)`.

        Packed rows already hold the prompt slots, so their length is the budget."""
        check_embedded(embedded_inputs, input_mask)
        batch, length, emb_dim = embedded_inputs.shape
        if segments is None:
            check_inputs_fit(length, self.length, self.max_length)
            return batch, length, emb_dim
        if not isinstance(self.combination, Prefix):
            raise UserError(
                f"Packed rows put each example's prompt in front of its inputs (Prefix); "
                f"{type(self.combination).__name__} cannot be packed: set pack=False."
            )
        if segments.ids.shape != (batch, length) or segments.positions.shape != (batch, length):
            raise UserError(
                f"Packed segment ids {tuple(segments.ids.shape)} and positions "
                f"{tuple(segments.positions.shape)} must be [batch, length] = {(batch, length)}."
            )
        if self.max_length is not None and length > self.max_length:
            raise UserError(
                f"Packed rows of length {length} (prompts included) exceed max_length="
                f"{self.max_length}; set the inputs feature length to at most {self.max_length}."
            )
        return batch, length, emb_dim

    def _prompt_param(
        self, name: str, shape: Shape, axes: Tuple[str, ...], embedding_table: Array | None
    ) -> Array:
        """The prompt parameter, initialised by `prompt_init` (which may read the table)."""
        return param_with_axes(
            name,
            lambda rng, s: self.prompt_init(rng, s, embedding_table=embedding_table),
            shape,
            axes=axes,
        )

    def _prepend(self, prompt_BPE: Array, embedded_inputs: Array, input_mask: Array):
        """`[B, P, E]` prompt + inputs -> `[B, P + L, E]`, `[B, P + L]` (`combination`)."""
        embedded, mask = self.combination(prompt_BPE, embedded_inputs, input_mask)
        return nn.with_logical_constraint(embedded, ("batch", "length", "embed")), mask

    def _fill_slots(
        self,
        prompt_BLE: Array,
        embedded_inputs: Array,
        input_mask: Array,
        segments: packing.Segments,
    ) -> Tuple[Array, Array]:
        """Packed rows: `prompt_BLE` (each position's prompt vector) replaces the
        embeddings of the prompt slots; `[B, L, E]`, `[B, L]` (the mask is unchanged)."""
        slots = segments.prompt_slots(self.length)[..., None]
        embedded = jnp.where(slots, prompt_BLE.astype(embedded_inputs.dtype), embedded_inputs)
        return nn.with_logical_constraint(embedded, ("batch", "length", "embed")), input_mask

    def extend_mask(self, input_mask: Array) -> Array:
        """`[B, L]` -> `[B, P + L]`, the mask the hook returns, without embeddings
        (unpacked rows; a packed row's mask is unchanged)."""
        return self.combination.extend_mask(input_mask, self.length)


class SoftPrompt(InputHook, nn.Module):
    """A trainable prompt prepended to the encoder input embeddings (input hook).

    Attributes:
      length: prompt length P (gin macro PROMPT_LENGTH; 100 in Lester et al.).
      prompt_init: a `PromptInit` (Uniform(0.5), SampledVocab(5000), ClassLabels,
        FromFile, WeightedFiles).
      combination: how the prompt meets the inputs (`Prefix`).
      num_tasks: if set, one prompt per task (`[T, P, E]`) and each example uses its
        own task's prompt (multi-task prompt tuning); None = one shared prompt, and
        `task_ids` are ignored.
      max_length: optional encoder length budget including the prompt.
    """

    length: int = 100
    prompt_init: PromptInit = Uniform(0.5)
    combination: Combination = Prefix()
    num_tasks: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        self._check_length()
        if self.num_tasks is not None and (
            not isinstance(self.num_tasks, int) or self.num_tasks <= 0
        ):
            raise UserError(f"num_tasks must be a positive int or None, got {self.num_tasks!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        embedded_inputs: Array,
        input_mask: Array,
        *,
        task_ids: Array | None = None,
        deterministic: bool = True,
        embedding_table: Array | None = None,
        segments: packing.Segments | None = None,
    ) -> Tuple[Array, Array]:
        """`[B, L, E]`, `[B, L]` -> `[B, P + L, E]`, `[B, P + L]`; for packed rows
        (`segments`, `task_ids [B, L]`) `[B, L, E]`, `[B, L]` with every example's
        prompt in its slots."""
        del deterministic
        batch, length, emb_dim = self._input_shape(embedded_inputs, input_mask, segments)
        if self.num_tasks is None:
            shape, axes = (self.length, emb_dim), ("prompt", "prompt_embed")
        else:
            shape, axes = (
                (self.num_tasks, self.length, emb_dim),
                ("tasks", "prompt", "prompt_embed"),
            )
        prompt = self._prompt_param("prompt", shape, axes, embedding_table)
        if segments is not None:
            if self.num_tasks is None:
                rows = jnp.clip(segments.positions, 0, self.length - 1)
                prompt_BLE = jnp.take(prompt, rows, axis=0)
            else:
                ids = task_ids_lib.validate_task_ids(
                    task_ids, self.num_tasks, batch_size=batch, module="SoftPrompt", length=length
                )
                prompt_BLE = task_ids_lib.gather_task_positions(
                    prompt, ids, segments.positions, self.num_tasks
                )
            return self._fill_slots(prompt_BLE, embedded_inputs, input_mask, segments)
        if self.num_tasks is None:
            prompt_BPE = jnp.broadcast_to(prompt[None], (batch, self.length, emb_dim))
        else:
            ids = task_ids_lib.validate_task_ids(
                task_ids, self.num_tasks, batch_size=batch, module="SoftPrompt"
            )
            prompt_BPE = task_ids_lib.gather_tasks(prompt, ids, self.num_tasks)
        return self._prepend(prompt_BPE, embedded_inputs, input_mask)
