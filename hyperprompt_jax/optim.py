"""Adafactor and learning-rate schedules with t5x's names and semantics, built on optax.

Method gin files bind `optim.adafactor.*` and `optim.create_learning_rate_scheduler.*`
with the parameter names of t5x's `adafactor.Adafactor` and
`t5x.utils.create_learning_rate_scheduler`, and those names mean what they mean in t5x:

* `decay_rate=0.8`: the second-moment decay at step t (0-based) is
  `beta2_t = 1 - (t + 1)^-0.8`, so the first update uses the squared gradient alone.
* `multiply_by_parameter_scale=True`: the step is scaled by the parameter's RMS,
  floored at `epsilon2=1e-3` (relative step sizes).
* `clipping_threshold=1.0`: the normalised update of each parameter is divided by
  `max(1, RMS(update) / clipping_threshold)`.
* `weight_decay_rate`: decoupled and *not* multiplied by the learning rate:
  `param <- (1 - weight_decay_rate) * param - lr * update`.
* Factoring: a parameter's second moment is factored over its two largest dimensions
  when the second largest has at least `min_dim_size_to_factor=128` entries. t5x's
  logical factor rules fall back to exactly this heuristic for parameters of rank <= 2,
  which covers every T5 parameter; method parameters of higher rank are factored by
  the same heuristic (t5x would ask for an explicit rule).

optax's building blocks implement each of these pieces with identical arithmetic
(`tests/test_train.py` checks three steps against a NumPy transcription of t5x's
update), so `adafactor` only chains them with t5x's argument names and order.

`adafactor(..., hf_semantics=True)` is Hugging Face's `transformers.optimization.
Adafactor` instead (the optimiser of the SMoP authors' code; `tests/test_optim_hf.py`
checks it step for step against the torch class). Two rules change:

* Factoring: every parameter of rank >= 2 is factored over its *last two* dimensions,
  whatever their sizes (`min_dim_size_to_factor` is ignored); t5x factors over the two
  largest dimensions, and only when both are >= 128.
* Weight decay is multiplied by the learning rate (and by the parameter scale when
  `multiply_by_parameter_scale`): `param <- param - wd * lr_t * param - lr_t * update`.
HF's other settings map onto existing ones: `decay_rate=-0.8` is `decay_rate=0.8`,
`eps=(1e-30, 1e-3)` is `(epsilon1, epsilon2)`, `clip_threshold` is
`clipping_threshold`, `scale_parameter` is `multiply_by_parameter_scale`, and
`relative_step=True` (with or without `warmup_init`) is the learning-rate schedule
`hf_relative_step(warmup_init)` with `lr=None`. With `relative_step=False` HF uses the
given `lr`, scheduled here by `create_learning_rate_scheduler` (the SMoP authors:
`get_linear_schedule_with_warmup` = factors `'constant * linear_warmup *
linear_decay_to_zero'` with `warmup_fraction`).

The learning rate is an optax schedule of the optimizer's own update count, which
starts at 0 and is saved in checkpoints, like t5x's `train_state.step`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from hyperprompt_jax.errors import UserError

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

_FACTORS = (
    "constant",
    "linear_warmup",
    "linear_decay",
    "rsqrt_decay",
    "rsqrt_normalized_decay",
    "decay_every",
    "cosine_decay",
    "linear_decay_to_zero",
)


def create_learning_rate_scheduler(
    factors: str = "constant * linear_warmup * rsqrt_decay",
    base_learning_rate: float = 0.5,
    warmup_steps: int = 1000,
    decay_factor: float = 0.5,
    steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000,
    step_offset: int = 0,
    min_learning_rate: float = 1e-8,
    total_steps: int | None = None,
    warmup_fraction: float | None = None,
) -> Schedule:
    """t5x's product-of-factors learning-rate schedule (same names, same values).

    `factors` is a '*'-separated product of:
      * `constant`: `base_learning_rate`;
      * `linear_warmup`: `min(1, step / warmup_steps)`;
      * `linear_decay`: `base_learning_rate * min(step / warmup_steps,
        1 + decay_factor * (warmup_steps - step))` (implies constant and warmup);
      * `rsqrt_decay`: `1 / sqrt(max(step, warmup_steps))`;
      * `rsqrt_normalized_decay`: `sqrt(warmup_steps) / sqrt(max(step, warmup_steps))`;
      * `decay_every`: `decay_factor ** (step // steps_per_decay)`;
      * `cosine_decay`: cyclic cosine over `steps_per_cycle` steps after warmup.
      * `linear_decay_to_zero`: `min(1, max(0, (total_steps - step) / (total_steps -
        warmup_steps)))`: 1 through the warmup, then linearly to 0 at `total_steps`
        (with `constant * linear_warmup` it is Hugging Face's
        `get_linear_schedule_with_warmup`). Needs `total_steps`.
    The result is floored at `min_learning_rate`; `step` is counted from `step_offset`.
    With `warmup_fraction` set, `warmup_steps = int(warmup_fraction * total_steps)`
    (HF's `warmup_ratio`), so the schedule follows `TRAIN_STEPS` when gin binds
    `total_steps = %TRAIN_STEPS`.

    Args:
      factors: e.g. 'constant' (prompt tuning: 0.3) or 'constant * rsqrt_decay'.
      base_learning_rate: the constant factor.
      warmup_steps: warmup length (also the knee of the rsqrt decays).
      decay_factor: multiplier of `decay_every` / slope of `linear_decay`.
      steps_per_decay: period of `decay_every`.
      steps_per_cycle: period of `cosine_decay`.
      step_offset: the step at which the schedule starts.
      min_learning_rate: lower bound of the result.
      total_steps: the run's length (gin: `%TRAIN_STEPS`), for `linear_decay_to_zero`
        and `warmup_fraction`.
      warmup_fraction: warmup as a fraction of `total_steps` (replaces `warmup_steps`).

    Returns:
      `schedule(step) -> float32 learning rate`, usable as an optax schedule.

    Raises:
      UserError: for an unknown factor name (listing the known ones), a non-positive
        `warmup_steps` with a factor that divides by it, or a missing / bad
        `total_steps` or `warmup_fraction`.
    """
    names = [n.strip() for n in factors.split("*") if n.strip()]
    unknown = [n for n in names if n not in _FACTORS]
    if unknown:
        raise UserError(
            f"Unknown learning-rate factor(s) {unknown} in {factors!r}; expected a "
            f"'*'-separated product of {list(_FACTORS)}."
        )
    needs_total = warmup_fraction is not None or "linear_decay_to_zero" in names
    if needs_total and (
        not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0
    ):
        raise UserError(
            f"total_steps must be a positive int (bind it to %TRAIN_STEPS) for {factors!r} "
            f"with warmup_fraction={warmup_fraction!r}; got {total_steps!r}."
        )
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise UserError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}.")
        # HF's `int(total_steps * warmup_ratio)`; 0 means no warmup at all.
        warmup_steps = int(total_steps * warmup_fraction)
    elif warmup_steps <= 0 and {"linear_warmup", "linear_decay"} & set(names):
        raise UserError(f"warmup_steps must be positive for {factors!r}, got {warmup_steps}.")

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.maximum(0, jnp.asarray(step, jnp.float32) - step_offset)
        lr = jnp.asarray(1.0, jnp.float32)
        for name in names:
            if name == "constant":
                lr = lr * base_learning_rate
            elif name == "linear_warmup":
                lr = lr * (jnp.minimum(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0)
            elif name == "linear_decay":
                lr = (
                    lr
                    * base_learning_rate
                    * jnp.minimum(step / warmup_steps, 1.0 + decay_factor * (warmup_steps - step))
                )
            elif name == "rsqrt_decay":
                lr = lr / jnp.sqrt(jnp.maximum(step, warmup_steps))
            elif name == "rsqrt_normalized_decay":
                lr = lr * math.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(step, warmup_steps))
            elif name == "decay_every":
                lr = lr * decay_factor ** jnp.floor(step / steps_per_decay)
            elif name == "cosine_decay":
                progress = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
                lr = lr * jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
            elif name == "linear_decay_to_zero":
                remaining = (total_steps - step) / max(1, total_steps - warmup_steps)
                lr = lr * jnp.clip(remaining, 0.0, 1.0)
        return jnp.maximum(lr, min_learning_rate).astype(jnp.float32)

    return schedule


def adafactor(
    learning_rate: Union[float, Schedule],
    decay_rate: float = 0.8,
    step_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    beta1: float | None = None,
    weight_decay_rate: float | None = None,
    min_dim_size_to_factor: int = 128,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    factored: bool = True,
    hf_semantics: bool = False,
) -> optax.GradientTransformation:
    """Adafactor with t5x's argument names and update rule (see the module docstring).

    Args:
      learning_rate: a float or a schedule of the update count
        (`create_learning_rate_scheduler()`).
      decay_rate: exponent of the second-moment decay `1 - (t + 1)^-decay_rate`.
      step_offset: subtract from t in the decay (resets the accumulators' warmup).
      multiply_by_parameter_scale: scale steps by max(RMS(param), epsilon2).
      clipping_threshold: per-parameter RMS threshold of the update, or None.
      beta1: momentum (None = no momentum, no momentum state; T5's setting).
      weight_decay_rate: decoupled weight decay not scaled by the learning rate.
      min_dim_size_to_factor: factor the second moment only if both of the two
        largest dimensions are at least this large.
      epsilon1: added to squared gradients.
      epsilon2: lower bound of the parameter scale.
      factored: use the factored second-moment estimator at all.
      hf_semantics: Hugging Face's rules instead of t5x's: every parameter of rank
        >= 2 factored over its last two dimensions, weight decay multiplied by the
        learning rate (and the parameter scale). See the module docstring.

    Returns:
      An optax GradientTransformation whose `update` needs the parameters.

    Raises:
      ValueError: for a decay rate, clipping threshold, momentum or weight decay
        outside its valid range (named in the message).
    """
    if decay_rate <= 0:
        raise UserError(f"adafactor decay_rate must be positive, got {decay_rate}.")
    if clipping_threshold is not None and clipping_threshold <= 0:
        raise UserError(
            f"adafactor clipping_threshold must be positive or None, got {clipping_threshold}."
        )
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise UserError(f"adafactor beta1 must be in [0, 1) or None, got {beta1}.")
    if weight_decay_rate is not None and not 0.0 <= weight_decay_rate < 1.0:
        raise UserError(
            f"adafactor weight_decay_rate must be in [0, 1) or None, got {weight_decay_rate}."
        )
    if hf_semantics:
        return _hf_adafactor(
            learning_rate,
            decay_rate=decay_rate,
            step_offset=step_offset,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            clipping_threshold=clipping_threshold,
            beta1=beta1,
            weight_decay_rate=weight_decay_rate,
            epsilon1=epsilon1,
            epsilon2=epsilon2,
            factored=factored,
        )
    chain = [
        optax.scale_by_factored_rms(
            factored=factored,
            decay_rate=decay_rate,
            step_offset=step_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            epsilon=epsilon1,
        )
    ]
    chain += _scaled_step(
        clipping_threshold, learning_rate, multiply_by_parameter_scale, epsilon2, beta1
    )
    if weight_decay_rate is not None:
        # Added to the step before the sign flip: param - lr * u - wd * param.
        chain.append(optax.add_decayed_weights(weight_decay_rate))
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)


def _scaled_step(
    clipping_threshold: float | None,
    learning_rate: Union[float, Schedule],
    multiply_by_parameter_scale: bool,
    epsilon2: float,
    beta1: float | None,
) -> list[optax.GradientTransformation]:
    """The part t5x's and HF's Adafactor share after the normalised update `u`:
    clip RMS(u) at the threshold, times the learning rate, times max(RMS(param),
    epsilon2), then momentum on that already-scaled step (no bias correction in either).
    """
    chain = []
    if clipping_threshold is not None:
        chain.append(optax.clip_by_block_rms(clipping_threshold))
    chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        chain.append(optax.scale_by_param_block_rms(min_scale=epsilon2))
    if beta1 is not None:
        chain.append(optax.ema(beta1, debias=False))
    return chain


# ----------------------------------------------------------------------------------------
# Hugging Face's Adafactor (`transformers.optimization.Adafactor`)
# ----------------------------------------------------------------------------------------


def hf_relative_step(warmup_init: bool = False) -> Schedule:
    """HF Adafactor's `relative_step=True` learning rate, as a schedule of the update count.

    At update t (1-based; the count is t - 1): `min(1e-2, 1 / sqrt(t))`, or with
    `warmup_init` `min(1e-6 * t, 1 / sqrt(t))`. Combine with
    `multiply_by_parameter_scale=True` for HF's default `scale_parameter=True`.
    """

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        t = jnp.asarray(count, jnp.float32) + 1.0
        ceiling = 1e-6 * t if warmup_init else 1e-2
        return jnp.minimum(ceiling, jax.lax.rsqrt(t)).astype(jnp.float32)

    return schedule


class _HFFactoredState(NamedTuple):
    count: jnp.ndarray  # [] int32: updates applied so far
    v_row: optax.Params  # [..., rows] per factored leaf (else [1])
    v_col: optax.Params  # [..., cols] per factored leaf (else [1])
    v: optax.Params  # full second moment of unfactored leaves (else [1])


def _hf_scale_by_factored_rms(
    decay_rate: float, step_offset: int, epsilon1: float, factored: bool
) -> optax.GradientTransformation:
    """HF's second-moment normalisation: rank >= 2 leaves factored over the last two dims."""

    def is_factored(shape) -> bool:
        return factored and len(shape) >= 2

    def init_fn(params):
        def rows(p):
            return jnp.zeros(p.shape[:-1], jnp.float32) if is_factored(p.shape) else jnp.zeros(1)

        def cols(p):
            if not is_factored(p.shape):
                return jnp.zeros(1)
            return jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32)

        def full(p):
            return jnp.zeros(1) if is_factored(p.shape) else jnp.zeros(p.shape, jnp.float32)

        return _HFFactoredState(
            count=jnp.zeros([], jnp.int32),
            v_row=jax.tree.map(rows, params),
            v_col=jax.tree.map(cols, params),
            v=jax.tree.map(full, params),
        )

    def update_fn(updates, state, params=None):
        del params
        t = jnp.asarray(state.count - step_offset + 1, jnp.float32)
        beta2 = 1.0 - t ** (-decay_rate)

        def one(g, v_row, v_col, v):
            g = g.astype(jnp.float32)
            g2 = g * g + epsilon1
            if is_factored(g.shape):
                v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(g2, axis=-1)
                v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(g2, axis=-2)
                # V ~ row col^T / mean(row): rsqrt of each factor, row-normalised.
                r = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=-1, keepdims=True))
                c = jax.lax.rsqrt(v_col)
                return r[..., None] * c[..., None, :] * g, v_row, v_col, v
            v = beta2 * v + (1.0 - beta2) * g2
            return jax.lax.rsqrt(v) * g, v_row, v_col, v

        out = jax.tree.map(one, updates, state.v_row, state.v_col, state.v)
        treedef = jax.tree.structure(updates)
        leaves = treedef.flatten_up_to(out)
        new = [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(4)]
        return new[0], _HFFactoredState(
            count=optax.safe_int32_increment(state.count), v_row=new[1], v_col=new[2], v=new[3]
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _hf_decayed_weights(
    weight_decay_rate: float,
    learning_rate: Union[float, Schedule],
    multiply_by_parameter_scale: bool,
    epsilon2: float,
) -> optax.GradientTransformation:
    """Adds `wd * lr_t * scale(param) * param` to the (already scaled) update (HF's rule)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params):
        if params is None:
            raise UserError("HF Adafactor's weight decay needs the parameters.")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def one(u, p):
            scale = 1.0
            if multiply_by_parameter_scale:
                scale = jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p))), epsilon2)
            return u + weight_decay_rate * lr * scale * p

        return jax.tree.map(one, updates, params), optax.ScaleByScheduleState(
            count=optax.safe_int32_increment(state.count)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _hf_adafactor(
    learning_rate: Union[float, Schedule],
    *,
    decay_rate: float,
    step_offset: int,
    multiply_by_parameter_scale: bool,
    clipping_threshold: float | None,
    beta1: float | None,
    weight_decay_rate: float | None,
    epsilon1: float,
    epsilon2: float,
    factored: bool,
) -> optax.GradientTransformation:
    """`transformers.optimization.Adafactor.step` as an optax chain (same order).

    HF: `u = clip(normalised g) * lr_t * scale(p)`; with momentum `m = beta1 m + (1 -
    beta1) u`, the step is m; then `p -= wd * lr_t * scale(p) * p` and `p -= step`.
    """
    chain = [_hf_scale_by_factored_rms(decay_rate, step_offset, epsilon1, factored)]
    chain += _scaled_step(
        clipping_threshold, learning_rate, multiply_by_parameter_scale, epsilon2, beta1
    )
    if weight_decay_rate:
        chain.append(
            _hf_decayed_weights(
                weight_decay_rate, learning_rate, multiply_by_parameter_scale, epsilon2
            )
        )
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)
