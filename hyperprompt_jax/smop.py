"""SMoP: a sparse mixture of short soft prompts chosen per example by a linear router.

Choi et al., 2023, "SMoP: Towards Efficient and Effective Prompt Tuning with Sparse
Mixture-of-Prompts" (EMNLP). `SMoP` is the network's input hook: it holds `k` prompts
of length `l` (`prompt/prompts [k, l, emb_dim]`) and a bias-free linear router
(`prompt/router/kernel [emb_dim, k]`, orthogonal init). For each example the router
reads the masked mean of the input embeddings, a softmax gives the prompt
probabilities, and the top-1 prompt, scaled by its probability, is prepended to the
inputs (mask extended by `l` always-valid positions). Trainable parameters:
`k*l*d + d*k` (T5-large, 4 x 5: 20,480 + 4,096 = 24,576).

Routing is a `Routing` callable chosen by gin; the variants of the paper's routing
ablation are here, following the authors' code (jyjohnchoi/SMoP,
`peft_models/tuners/prompt_routing.py` and `scripts/train.py`) where the paper leaves a
detail open:

* `TopK(k=1, noise=GaussianNoise(1.0))` (default, the paper's SMoP): router
  perturbation in training only, `logits + sigma * eps * stop_gradient(logits)`,
  `eps ~ N(0, 1)`: multiplicative Gaussian noise whose scale is not differentiated,
  as the authors' `GaussianNoise` (`is_relative_detach=True`; their code multiplies by
  sigma twice, identical for the paper's sigma = 1). No noise at evaluation.
* `TopK(noise=None)`: no perturbation. `TopK(noise=LogitDropout(0.2))`: dropout on the
  router logits (the authors' non-perturbed router uses `Dropout(p=0.2)`).
* `TopK(k>1)`: the top-k prompts, each scaled by its probability, summed (no
  renormalisation, as the authors' `topk` branch).
* `Dense()`: every prompt weighted by its probability.
* `RandomRouting()`: training picks a uniformly random prompt (weight 1); evaluation
  uses the mean of all prompts (the authors' "stochastic" routing). The authors train
  it with a consistency loss: two forward passes (two random draws), both
  cross-entropies plus 0.1 x the symmetric KL divergence between the passes' output
  distributions; `gin/methods/smop_random.gin` turns that on
  (`models.EncoderDecoderModel.consistency_weight = 0.1`, see `losses.symmetric_kl`).
* `ProbabilityGumbel()` (the authors' Gumbel routing): the router's *probabilities*
  (softmax after `Dropout(0.2)` on the logits in training, as their non-perturbed
  router) plus Gumbel noise, softmax at temperature 1, hard top-1 with a
  straight-through weight: forward 1 for the chosen prompt, gradient through that
  prompt's soft sample only (their `topk` of the straight-through output).
* `Gumbel(temperature)` (ours): hard Gumbel-softmax on the *logits* (the textbook
  estimator), straight-through over all prompts (forward one-hot, gradient through the
  soft probabilities).
  Both Gumbel variants evaluate noise-free (argmax of the probabilities); the authors'
  code also samples Gumbel noise at evaluation, which makes evaluation random.

Where we keep the paper's behaviour over the authors' code: their top-1 branch builds
the prompt indices `[B, l]` and multiplies the gathered prompts `[B, l, d]` by the
probabilities reshaped to `[B, 1, 1, 1]`; broadcasting gives `[B, B, l, d]`, and the sum
over dim 1 hands every example its own probability times the *sum of the prompts chosen
by all examples of the batch*. That mixes prompts across the batch (an example's input
depends on the other examples) and contradicts the paper's per-example top-1 routing
(Section 2.2); we prepend each example's own chosen prompt scaled by its own
probability. Their top-k (k > 1) branch has no such broadcast and matches ours.

The routing noise draws from the `'dropout'` RNG stream, which every training step
already provides. The authors' script also adds an auxiliary load-balancing loss,
`0.01 * k * sum_i(mean probability_i * fraction of selections_i)` (Switch-style, on by
default there, training only); the paper describes none (its balance comes from the
router perturbation), so it is off by default here and `load_balancing_weight = 0.01`
(as `gin/methods/smop_authors.gin` sets) turns it on: the module sows it into the
`aux_losses` collection, which `models.EncoderDecoderModel.loss_fn` adds to the loss.

Router statistics are sown into the `'intermediates'` collection on every call
(retrieve them with `mutable=['intermediates']`):

* `router_probs` `[B, k]`: softmax probabilities (rows sum to 1); packed rows
  (`packing`) sow their mean over the batch's examples, `[k]`.
* `prompt_fraction` `[k]`: fraction of the batch's prompt selections that went to each
  prompt (top-1: fraction of examples per prompt; dense: weighted by probability).
* `mean_max_prob` `[]`: batch mean of the largest router probability.

Logical axes: prompts `('prompt_experts', 'prompt', 'prompt_embed')` and router
`('prompt_embed', 'prompt_experts')`; all replicated (tens of thousands of floats; a
replicated router needs no collective for its matmul).

Shapes: B batch, L input length, K number of prompts, P prompt length, E emb_dim.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from hyperprompt_jax import layers, packing, prompts
from hyperprompt_jax.errors import UserError

Array = jax.Array
PRNGKey = jax.Array


# ----------------------------------------------------------------------------------------
# Noise on router logits
# ----------------------------------------------------------------------------------------


class LogitNoise(Protocol):
    """Training-time perturbation of router logits `[B, K]`."""

    def __call__(self, logits: Array, rng: PRNGKey) -> Array: ...


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """`logits + sigma * eps * stop_gradient(logits)`, `eps ~ N(0, 1)` (router perturbation)."""

    sigma: float = 1.0

    def __call__(self, logits, rng):
        eps = jax.random.normal(rng, logits.shape, logits.dtype)
        return logits + self.sigma * eps * jax.lax.stop_gradient(logits)


@dataclasses.dataclass(frozen=True)
class LogitDropout:
    """Inverted dropout on the router logits."""

    rate: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise UserError(f"LogitDropout rate must be in [0, 1), got {self.rate}.")

    def __call__(self, logits, rng):
        keep = jax.random.bernoulli(rng, 1.0 - self.rate, logits.shape)
        return jnp.where(keep, logits / (1.0 - self.rate), 0.0)


# ----------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------


class Routing(Protocol):
    """Router logits -> per-prompt weights and probabilities.

    `selects_prompts` says how the router statistics count selections: True when the
    weights pick prompts (the nonzero weights are the selections), False when every
    prompt is mixed in by its probability (selections weighted by probability).
    """

    selects_prompts: ClassVar[bool]

    def __call__(
        self, logits: Array, *, deterministic: bool, rng: PRNGKey | None
    ) -> Tuple[Array, Array]:
        """`[B, K]` -> (weights `[B, K]` applied to the prompts, probabilities `[B, K]`).

        `rng` is None when `deterministic` (evaluation): routing must then be noise-free.
        """


def _top_k_weights(probs: Array, k: int) -> Array:
    """Keeps the `k` largest probabilities of each row (the rest 0)."""
    values, index = jax.lax.top_k(probs, k)
    return jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=probs.dtype) * values[..., None], 1)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Softmax over (optionally perturbed) logits; the top-k prompts, scaled by probability."""

    k: int = 1
    noise: LogitNoise | None = GaussianNoise(1.0)
    selects_prompts: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"TopK.k must be a positive int, got {self.k!r}.")

    def __call__(self, logits, *, deterministic, rng):
        if self.k > logits.shape[-1]:
            raise UserError(f"TopK.k={self.k} exceeds the number of prompts {logits.shape[-1]}.")
        if not deterministic and self.noise is not None:
            logits = self.noise(logits, rng)
        probs = jax.nn.softmax(logits, axis=-1)
        return _top_k_weights(probs, self.k), probs


@dataclasses.dataclass(frozen=True)
class Dense:
    """All prompts, each weighted by its probability."""

    noise: LogitNoise | None = None
    selects_prompts: ClassVar[bool] = False

    def __call__(self, logits, *, deterministic, rng):
        if not deterministic and self.noise is not None:
            logits = self.noise(logits, rng)
        probs = jax.nn.softmax(logits, axis=-1)
        return probs, probs


@dataclasses.dataclass(frozen=True)
class RandomRouting:
    """Training: a uniformly random prompt (weight 1); evaluation: the mean of all prompts.

    The router is not used for the choice (its probabilities are still reported).
    Train it as the authors did with `gin/methods/smop_random.gin` (consistency loss).
    """

    selects_prompts: ClassVar[bool] = True

    def __call__(self, logits, *, deterministic, rng):
        probs = jax.nn.softmax(logits, axis=-1)
        num = logits.shape[-1]
        if deterministic:
            return jnp.full_like(probs, 1.0 / num), probs
        choice = jax.random.randint(rng, logits.shape[:-1], 0, num)
        return jax.nn.one_hot(choice, num, dtype=probs.dtype), probs


@dataclasses.dataclass(frozen=True)
class Gumbel:
    """Hard Gumbel-softmax on the logits (straight-through) in training; argmax at evaluation.

    Ours (the textbook estimator); the authors' variant is `ProbabilityGumbel`.
    """

    temperature: float = 1.0
    selects_prompts: ClassVar[bool] = True

    def __call__(self, logits, *, deterministic, rng):
        probs = jax.nn.softmax(logits, axis=-1)
        num = logits.shape[-1]
        if deterministic:
            return jax.nn.one_hot(jnp.argmax(logits, -1), num, dtype=probs.dtype), probs
        gumbel = jax.random.gumbel(rng, logits.shape, logits.dtype)
        soft = jax.nn.softmax((logits + gumbel) / self.temperature, axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(soft, -1), num, dtype=soft.dtype)
        # Forward value: one-hot; gradient: that of the soft sample.
        return hard + soft - jax.lax.stop_gradient(soft), probs


@dataclasses.dataclass(frozen=True)
class ProbabilityGumbel:
    """The authors' Gumbel routing: Gumbel noise on the router *probabilities*.

    Training: `probs = softmax(noise(logits))` (`noise`: the authors' `Dropout(0.2)`),
    `soft = softmax((probs + g) / temperature)` with `g ~ Gumbel(0, 1)`, the top-1 of
    `soft` chosen with weight `1 + soft - stop_gradient(soft)` at the chosen prompt (1
    forward; the gradient reaches only the chosen prompt's soft value, as their `topk`
    of the straight-through output). Evaluation: argmax of the noise-free
    probabilities, weight 1 (the authors also sample Gumbel noise at evaluation).
    """

    temperature: float = 1.0
    noise: LogitNoise | None = LogitDropout(0.2)
    selects_prompts: ClassVar[bool] = True

    def __call__(self, logits, *, deterministic, rng):
        num = logits.shape[-1]
        if deterministic:
            probs = jax.nn.softmax(logits, axis=-1)
            return jax.nn.one_hot(jnp.argmax(probs, -1), num, dtype=probs.dtype), probs
        noise_rng, gumbel_rng = jax.random.split(rng)
        if self.noise is not None:
            logits = self.noise(logits, noise_rng)
        probs = jax.nn.softmax(logits, axis=-1)
        gumbel = jax.random.gumbel(gumbel_rng, probs.shape, probs.dtype)
        soft = jax.nn.softmax((probs + gumbel) / self.temperature, axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(soft, -1), num, dtype=soft.dtype)
        return hard * (1.0 + soft - jax.lax.stop_gradient(soft)), probs


# ----------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------


def masked_mean(embedded_BLE: Array, mask_BL: Array) -> Array:
    """Mean of the real (mask = 1) positions, `[B, L, E]` -> `[B, E]` (0 if none)."""
    mask = mask_BL.astype(jnp.float32)[..., None]
    total = jnp.sum(embedded_BLE.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class SMoP(prompts.InputHook, nn.Module):
    """Sparse mixture of prompts (input hook).

    Attributes:
      num_prompts: k (gin macro NUM_PROMPTS; 4 in the paper).
      length: l, the length of each prompt (gin macro PROMPT_LENGTH; 5 in the paper).
      routing: a `Routing` (default `TopK(1, GaussianNoise(1.0))`).
      prompt_init: a `prompts.PromptInit` applied to the `[k, l, E]` prompts.
      router_init: initialiser of the `[E, k]` router kernel (orthogonal).
      combination: how the routed prompt meets the inputs (`prompts.Prefix`).
      max_length: optional encoder length budget including the prompt.
      load_balancing_weight: weight of the authors' auxiliary load-balancing loss
        (training only; 0 = off, the paper).
    """

    num_prompts: int = 4
    length: int = 5
    routing: Routing = TopK()
    prompt_init: prompts.PromptInit = prompts.Uniform(0.5)
    router_init: layers.Initializer = nn.initializers.orthogonal()
    combination: prompts.Combination = prompts.Prefix()
    max_length: int | None = None
    load_balancing_weight: float = 0.0

    def __post_init__(self):
        self._check_length()
        if not self.load_balancing_weight >= 0.0:
            raise UserError(
                f"load_balancing_weight must be >= 0, got {self.load_balancing_weight!r}."
            )
        if not isinstance(self.num_prompts, int) or self.num_prompts < 1:
            raise UserError(f"num_prompts must be a positive int, got {self.num_prompts!r}.")
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
        """`[B, L, E]`, `[B, L]` -> `[B, l + L, E]`, `[B, l + L]`. `task_ids` are unused.

        Packed rows (`segments`): every example is routed on the mean of its own tokens
        and its prompt written into its slots; `[B, L, E]`, `[B, L]`. Routing then runs
        on `N = B * L` example rows, of which the `present` ones hold an example.
        """
        del task_ids
        _, _, emb_dim = self._input_shape(embedded_inputs, input_mask, segments)
        prompts_KPE = self._prompt_param(
            "prompts",
            (self.num_prompts, self.length, emb_dim),
            ("prompt_experts", "prompt", "prompt_embed"),
            embedding_table,
        )
        present_N = None
        if segments is None:
            sentence_NE = masked_mean(embedded_inputs, input_mask)
        else:
            tokens_BL = input_mask & ~segments.prompt_slots(self.length)
            sentence_NE, positions_N = segments.example_mean(embedded_inputs, tokens_BL)
            present_N = positions_N > 0
        # The router runs in float32 whatever the activation dtype: its softmax decides
        # discrete choices.
        logits_NK = layers.DenseGeneral(
            self.num_prompts,
            dtype=jnp.float32,
            kernel_init=self.router_init,
            kernel_axes=("prompt_embed", "prompt_experts"),
            name="router",
        )(sentence_NE)
        rng = None if deterministic else self.make_rng("dropout")
        weights_NK, probs_NK = self.routing(logits_NK, deterministic=deterministic, rng=rng)
        self._sow_statistics(weights_NK, probs_NK, present_N, deterministic)

        if segments is None:
            prompt_BPE = jnp.einsum("bk,kpe->bpe", weights_NK, prompts_KPE)
            return self._prepend(prompt_BPE, embedded_inputs, input_mask)
        weights_BLK = segments.per_position(weights_NK)
        slot_BLP = jax.nn.one_hot(segments.positions, self.length, dtype=weights_BLK.dtype)
        prompt_BLE = jnp.einsum("blk,blp,kpe->ble", weights_BLK, slot_BLP, prompts_KPE)
        return self._fill_slots(prompt_BLE, embedded_inputs, input_mask, segments)

    def _sow_statistics(
        self, weights_NK: Array, probs_NK: Array, present_N: Array | None, deterministic: bool
    ) -> None:
        """Router statistics (and the load-balancing loss) over the examples: the N rows,
        or the `present` ones of packed rows. `router_probs` is `[B, k]` unpacked and
        the mean over the examples `[k]` when packed."""
        packed = present_N is not None
        if not packed:
            present_N = jnp.ones(probs_NK.shape[:1], bool)
        present = present_N.astype(jnp.float32)[:, None]
        num_examples = jnp.maximum(jnp.sum(present), 1.0)
        mean_probs_K = jnp.sum(probs_NK * present, 0) / num_examples
        self.sow("intermediates", "router_probs", mean_probs_K if packed else probs_NK)
        if self.routing.selects_prompts:
            selections = (weights_NK != 0).astype(jnp.float32) * present
        else:
            selections = probs_NK * present
        fraction_K = jnp.sum(selections, 0) / jnp.maximum(jnp.sum(selections), 1.0)
        self.sow("intermediates", "prompt_fraction", fraction_K)
        if self.load_balancing_weight > 0.0 and not deterministic:
            # k * sum_i mean_prob_i * load_i: 1 when balanced; the load is not differentiated.
            balance = self.num_prompts * jnp.sum(mean_probs_K * jax.lax.stop_gradient(fraction_K))
            self.sow("aux_losses", "load_balancing", self.load_balancing_weight * balance)
        max_prob = jnp.sum(jnp.max(probs_NK, -1) * present[:, 0]) / num_examples
        self.sow("intermediates", "mean_max_prob", max_prob)
