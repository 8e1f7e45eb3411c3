"""`optim.adafactor(hf_semantics=True)` against `transformers.optimization.Adafactor`.

The reference is Hugging Face's torch class itself (the optimiser of the SMoP authors'
code), stepped with the same gradients: parameters of rank 1, 2 (small and large) and
3 after five steps agree to float32 tolerance, for the SMoP authors' settings (fixed
lr under `get_linear_schedule_with_warmup`, weight decay 1e-5, no parameter scaling),
HF's defaults (relative step, parameter scaling), `warmup_init`, and momentum with a
large weight decay. The schedule with `warmup_fraction` equals HF's linear schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperprompt_jax import optim

torch = pytest.importorskip("torch")
transformers_optimization = pytest.importorskip("transformers.optimization")

SHAPES = {
    "vector": (7,),
    "matrix": (6, 5),  # factored by HF (t5x: too small to factor)
    "tall": (130, 3),
    "stack": (3, 4, 6),  # factored over the last two dims (4, 6), batched over 3
}
STEPS, TOTAL, WARMUP_FRACTION = 5, 8, 0.25


def _data(seed=0):
    rng = np.random.RandomState(seed)
    params = {k: rng.randn(*s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {
            k: (rng.randn(*s) * 10.0 ** rng.uniform(-2, 1)).astype(np.float32)
            for k, s in SHAPES.items()
        }
        for _ in range(STEPS)
    ]
    return params, grads


def _torch_run(params, grads, hf_kwargs, linear_schedule: bool):
    tensors = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    opt = transformers_optimization.Adafactor(list(tensors.values()), **hf_kwargs)
    sched = None
    if linear_schedule:
        sched = transformers_optimization.get_linear_schedule_with_warmup(
            opt, num_warmup_steps=int(TOTAL * WARMUP_FRACTION), num_training_steps=TOTAL
        )
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        opt.step()
        if sched is not None:
            sched.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def _jax_run(params, grads, tx):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return jax.tree.map(np.asarray, p), state


CASES = {
    # The SMoP authors: Adafactor(lr, relative_step=False, weight_decay=1e-5,
    # scale_parameter=False) under get_linear_schedule_with_warmup(warmup_ratio).
    "smop_authors": (
        dict(lr=0.5, relative_step=False, scale_parameter=False, weight_decay=1e-5),
        True,
        dict(multiply_by_parameter_scale=False, weight_decay_rate=1e-5),
    ),
    "hf_defaults": (
        dict(lr=None),
        False,
        dict(multiply_by_parameter_scale=True),
    ),
    "warmup_init": (
        dict(lr=None, warmup_init=True, weight_decay=0.1),
        False,
        dict(multiply_by_parameter_scale=True, weight_decay_rate=0.1),
    ),
    "momentum_decay": (
        dict(lr=0.05, relative_step=False, beta1=0.9, weight_decay=0.2, clip_threshold=0.5),
        False,
        dict(
            multiply_by_parameter_scale=True,
            beta1=0.9,
            weight_decay_rate=0.2,
            clipping_threshold=0.5,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_adafactor_matches_transformers_step_for_step(case):
    hf_kwargs, linear, ours = CASES[case]
    params, grads = _data()
    expected = _torch_run(params, grads, hf_kwargs, linear)
    if linear:
        lr = optim.create_learning_rate_scheduler(
            factors="constant * linear_warmup * linear_decay_to_zero",
            base_learning_rate=hf_kwargs["lr"],
            total_steps=TOTAL,
            warmup_fraction=WARMUP_FRACTION,
            min_learning_rate=0.0,
        )
    elif hf_kwargs.get("lr") is None:
        lr = optim.hf_relative_step(warmup_init=hf_kwargs.get("warmup_init", False))
    else:
        lr = hf_kwargs["lr"]
    got, state = _jax_run(params, grads, optim.adafactor(lr, hf_semantics=True, **ours))
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
        # The parameters moved (by ~1e-5 under warmup_init's tiny steps), so the
        # comparison is not vacuous; the moves agree too.
        moved = expected[k] - params[k]
        assert np.abs(moved).max() > 1e-5, k
        np.testing.assert_allclose(got[k] - params[k], moved, rtol=1e-3, atol=1e-6, err_msg=k)
    # Every rank >= 2 parameter keeps only row / column statistics.
    factored = state[0]
    assert factored.v_row["stack"].shape == (3, 4) and factored.v_col["stack"].shape == (3, 6)
    assert factored.v["matrix"].shape == (1,) and factored.v["vector"].shape == (7,)


def test_t5x_semantics_differ_from_hf_on_small_matrices():
    """The option changes the update (t5x leaves a 6 x 5 matrix unfactored, no lr on wd)."""
    params, grads = _data(1)
    kwargs = dict(multiply_by_parameter_scale=False, weight_decay_rate=1e-1)
    hf, _ = _jax_run(params, grads, optim.adafactor(0.3, hf_semantics=True, **kwargs))
    t5x, _ = _jax_run(params, grads, optim.adafactor(0.3, **kwargs))
    assert np.abs(hf["matrix"] - t5x["matrix"]).max() > 1e-3


def test_warmup_fraction_schedule_equals_hf_linear_schedule():
    total = 1000
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = transformers_optimization.get_linear_schedule_with_warmup(
        opt, num_warmup_steps=int(total * 0.06), num_training_steps=total
    )
    expected = []
    for _ in range(total + 5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = optim.create_learning_rate_scheduler(
        factors="constant * linear_warmup * linear_decay_to_zero",
        base_learning_rate=0.5,
        total_steps=total,
        warmup_fraction=0.06,
        min_learning_rate=0.0,
    )
    got = np.asarray(jax.vmap(ours)(jnp.arange(total + 5)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # The warmup follows total_steps: doubling the run doubles the warmup.
    longer = optim.create_learning_rate_scheduler(
        factors="constant * linear_warmup", base_learning_rate=1.0,
        total_steps=2 * total, warmup_fraction=0.06,
    )  # fmt: skip
    assert float(longer(60)) == pytest.approx(0.5) and float(longer(120)) == 1.0


def test_fraction_schedule_rejects_missing_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        optim.create_learning_rate_scheduler(factors="constant * linear_decay_to_zero")
    with pytest.raises(ValueError, match="warmup_fraction"):
        optim.create_learning_rate_scheduler(total_steps=10, warmup_fraction=1.5)
