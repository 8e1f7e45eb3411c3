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

The learning rate is an optax schedule of the optimizer's own update count, which
starts at 0 and is saved in checkpoints, like t5x's `train_state.step`.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

_FACTORS = (
    "constant",
    "linear_warmup",
    "linear_decay",
    "rsqrt_decay",
    "rsqrt_normalized_decay",
    "decay_every",
    "cosine_decay",
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
    The result is floored at `min_learning_rate`; `step` is counted from `step_offset`.

    Args:
      factors: e.g. 'constant' (prompt tuning: 0.3) or 'constant * rsqrt_decay'.
      base_learning_rate: the constant factor.
      warmup_steps: warmup length (also the knee of the rsqrt decays).
      decay_factor: multiplier of `decay_every` / slope of `linear_decay`.
      steps_per_decay: period of `decay_every`.
      steps_per_cycle: period of `cosine_decay`.
      step_offset: the step at which the schedule starts.
      min_learning_rate: lower bound of the result.

    Returns:
      `schedule(step) -> float32 learning rate`, usable as an optax schedule.

    Raises:
      ValueError: for an unknown factor name (listing the known ones), or a
        non-positive `warmup_steps` with a factor that divides by it.
    """
    names = [n.strip() for n in factors.split("*") if n.strip()]
    unknown = [n for n in names if n not in _FACTORS]
    if unknown:
        raise ValueError(
            f"Unknown learning-rate factor(s) {unknown} in {factors!r}; expected a "
            f"'*'-separated product of {list(_FACTORS)}."
        )
    if warmup_steps <= 0 and {"linear_warmup", "linear_decay"} & set(names):
        raise ValueError(f"warmup_steps must be positive for {factors!r}, got {warmup_steps}.")

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.maximum(0, jnp.asarray(step, jnp.float32) - step_offset)
        lr = jnp.asarray(1.0, jnp.float32)
        for name in names:
            if name == "constant":
                lr = lr * base_learning_rate
            elif name == "linear_warmup":
                lr = lr * jnp.minimum(1.0, step / warmup_steps)
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

    Returns:
      An optax GradientTransformation whose `update` needs the parameters.

    Raises:
      ValueError: for a decay rate, clipping threshold, momentum or weight decay
        outside its valid range (named in the message).
    """
    if decay_rate <= 0:
        raise ValueError(f"adafactor decay_rate must be positive, got {decay_rate}.")
    if clipping_threshold is not None and clipping_threshold <= 0:
        raise ValueError(
            f"adafactor clipping_threshold must be positive or None, got {clipping_threshold}."
        )
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ValueError(f"adafactor beta1 must be in [0, 1) or None, got {beta1}.")
    if weight_decay_rate is not None and not 0.0 <= weight_decay_rate < 1.0:
        raise ValueError(
            f"adafactor weight_decay_rate must be in [0, 1) or None, got {weight_decay_rate}."
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
    if clipping_threshold is not None:
        chain.append(optax.clip_by_block_rms(clipping_threshold))
    chain.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        chain.append(optax.scale_by_param_block_rms(min_scale=epsilon2))
    if beta1 is not None:
        # t5x averages the already learning-rate-scaled step (no bias correction).
        chain.append(optax.ema(beta1, debias=False))
    if weight_decay_rate is not None:
        # Added to the step before the sign flip: param - lr * u - wd * param.
        chain.append(optax.add_decayed_weights(weight_decay_rate))
    chain.append(optax.scale(-1.0))
    return optax.chain(*chain)
