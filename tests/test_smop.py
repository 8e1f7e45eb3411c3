"""SMoP: routing math, router statistics, noise only in training, the routing variants.

Invariants: SMoP with one prompt (no noise) equals prompt tuning; the prepended prompt
is the top-1 prompt scaled by its probability, chosen from the masked mean of the
input embeddings; router probabilities sum to 1; training noise changes the routing
logits and evaluation never does; each routing variant of the paper's ablation
produces the weights it promises. Numerics against Hugging Face: `test_methods_hf.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import network, prompts, smop
from tests.helpers import tiny_t5_config

CONFIG = tiny_t5_config()
K, L, E = 4, 3, 16
KEY = jax.random.PRNGKey(0)
ENC = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [15, 16, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4], [0, 5, 6], [0, 7, 8]], np.int32)
TGT = np.array([[3, 4, 2], [5, 6, 2], [7, 8, 2]], np.int32)


def _inputs(batch=8, length=6, seed=1):
    rng = np.random.RandomState(seed)
    embedded = rng.normal(size=(batch, length, E)).astype(np.float32)
    mask = np.ones((batch, length), bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    return jnp.asarray(embedded), jnp.asarray(mask)


@pytest.fixture(scope="module")
def smop_module():
    module = smop.SMoP(num_prompts=K, length=L, prompt_init=prompts.Normal())
    embedded, mask = _inputs()
    variables = module.init({"params": KEY, "dropout": KEY}, embedded, mask)
    return module, variables


def _apply(module, variables, embedded, mask, *, train=False, seed=0):
    rngs = {"dropout": jax.random.PRNGKey(seed)} if train else {}
    (out, out_mask), state = module.apply(
        variables, embedded, mask, deterministic=not train, rngs=rngs, mutable=["intermediates"]
    )
    return np.asarray(out), np.asarray(out_mask), jax.tree.map(np.asarray, state["intermediates"])


def test_parameters_and_axes(smop_module):
    _, variables = smop_module
    params = variables["params"]
    assert params["prompts"].shape == (K, L, E)
    assert params["router"]["kernel"].shape == (E, K)
    kernel = np.asarray(params["router"]["kernel"])
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(K), atol=1e-5)  # orthogonal init
    assert variables["params_axes"]["prompts_axes"].names == (
        "prompt_experts",
        "prompt",
        "prompt_embed",
    )
    assert variables["params_axes"]["router"]["kernel_axes"].names == (
        "prompt_embed",
        "prompt_experts",
    )


def test_top1_prompt_scaled_by_probability_from_masked_mean(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs()
    out, out_mask, stats = _apply(module, variables, embedded, mask)
    m = np.asarray(mask, np.float32)[..., None]
    sentence = (np.asarray(embedded) * m).sum(1) / m.sum(1)
    logits = sentence @ np.asarray(variables["params"]["router"]["kernel"])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    choice = probs.argmax(-1)
    expected = np.asarray(variables["params"]["prompts"])[choice] * probs.max(-1)[:, None, None]
    np.testing.assert_allclose(out[:, :L], expected, atol=1e-5)
    np.testing.assert_array_equal(out[:, L:], embedded)
    np.testing.assert_array_equal(out_mask[:, :L], True)
    np.testing.assert_array_equal(out_mask[:, L:], mask)

    (router_probs,) = stats["router_probs"]
    np.testing.assert_allclose(router_probs, probs, atol=1e-5)
    np.testing.assert_allclose(router_probs.sum(-1), 1.0, atol=1e-6)
    (fraction,) = stats["prompt_fraction"]
    np.testing.assert_allclose(fraction, np.bincount(choice, minlength=K) / len(choice))
    (mean_max,) = stats["mean_max_prob"]
    np.testing.assert_allclose(mean_max, probs.max(-1).mean(), atol=1e-6)


def test_padding_does_not_affect_routing(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs()
    noisy_padding = jnp.where(mask[..., None], embedded, 100.0)
    a, _, _ = _apply(module, variables, embedded, mask)
    b, _, _ = _apply(module, variables, noisy_padding, mask)
    np.testing.assert_allclose(a[:, :L], b[:, :L], atol=1e-6)


def test_noise_only_in_training(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs(batch=64, seed=2)
    eval_a, _, stats_a = _apply(module, variables, embedded, mask)
    eval_b, _, _ = _apply(module, variables, embedded, mask, seed=5)
    np.testing.assert_array_equal(eval_a, eval_b)  # deterministic: no rng, no noise
    train_1, _, stats_1 = _apply(module, variables, embedded, mask, train=True, seed=1)
    train_2, _, stats_2 = _apply(module, variables, embedded, mask, train=True, seed=2)
    assert np.abs(stats_1["router_probs"][0] - stats_a["router_probs"][0]).max() > 1e-2
    assert np.abs(stats_1["router_probs"][0] - stats_2["router_probs"][0]).max() > 1e-2
    assert np.abs(train_1[:, :L] - train_2[:, :L]).max() > 1e-3
    for stats in (stats_1, stats_2):
        np.testing.assert_allclose(stats["router_probs"][0].sum(-1), 1.0, atol=1e-6)


def test_gaussian_noise_is_multiplicative_with_detached_scale():
    logits = jnp.array([[1.0, -2.0, 0.0, 4.0]])
    noise = smop.GaussianNoise(1.0)
    out = noise(logits, KEY)
    eps = jax.random.normal(KEY, logits.shape)
    np.testing.assert_allclose(out, logits * (1 + eps), atol=1e-6)
    assert out[0, 2] == 0.0  # zero logits stay zero: the noise scales with the logit
    grad = jax.grad(lambda x: noise(x, KEY).sum())(logits)
    np.testing.assert_allclose(grad, np.ones_like(logits))  # the noise scale is not trained


def test_single_prompt_smop_equals_prompt_tuning():
    sp = network.Transformer(CONFIG, prompt=prompts.SoftPrompt(length=L))
    mp = network.Transformer(
        CONFIG, prompt=smop.SMoP(num_prompts=1, length=L, routing=smop.TopK(1, noise=None))
    )
    sp_params = sp.init({"params": KEY, "dropout": KEY}, ENC, DEC, TGT, enable_dropout=False)[
        "params"
    ]
    mp_params = mp.init({"params": KEY, "dropout": KEY}, ENC, DEC, TGT, enable_dropout=False)[
        "params"
    ]
    mp_params = dict(mp_params)
    mp_params.update({k: v for k, v in sp_params.items() if k != "prompt"})
    mp_params["prompt"] = {
        "prompts": sp_params["prompt"]["prompt"][None],
        "router": mp_params["prompt"]["router"],
    }
    for train in (False, True):  # with one prompt and no noise, training routes the same
        rngs = {"dropout": KEY}
        a = sp.apply({"params": sp_params}, ENC, DEC, TGT, enable_dropout=train, rngs=rngs)
        b = mp.apply({"params": mp_params}, ENC, DEC, TGT, enable_dropout=train, rngs=rngs)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# Routing variants
# ----------------------------------------------------------------------------------------

LOGITS = jnp.array([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 0.2, 0.1]])
PROBS = np.asarray(jax.nn.softmax(LOGITS))


def test_top_k_and_dense_weights():
    w, p = smop.TopK(2, noise=None)(LOGITS, deterministic=True, rng=None)
    expected = np.zeros_like(PROBS)
    for i, row in enumerate(PROBS):
        top = np.argsort(row)[-2:]
        expected[i, top] = row[top]
    np.testing.assert_allclose(w, expected, atol=1e-6)
    np.testing.assert_allclose(p, PROBS, atol=1e-6)
    w, _ = smop.Dense()(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(w, PROBS, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        smop.TopK(5)(LOGITS, deterministic=True, rng=None)


def test_logit_dropout_only_in_training():
    routing = smop.TopK(1, noise=smop.LogitDropout(0.5))
    w_eval, p_eval = routing(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(p_eval, PROBS, atol=1e-6)
    big = jnp.tile(LOGITS, (50, 1))
    _, p_train = routing(big, deterministic=False, rng=KEY)
    assert np.abs(np.asarray(p_train) - np.tile(PROBS, (50, 1))).max() > 1e-2


def test_random_routing():
    w_eval, _ = smop.RandomRouting()(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(w_eval, 0.25)  # evaluation: mean of all prompts
    logits = jnp.zeros((400, 4)).at[:, 0].set(10.0)  # the router strongly prefers prompt 0
    w, _ = smop.RandomRouting()(logits, deterministic=False, rng=KEY)
    w = np.asarray(w)
    assert ((w == 0) | (w == 1)).all() and (w.sum(-1) == 1).all()
    counts = w.sum(0)
    assert (counts > 60).all()  # uniformly random, ignoring the router


def test_gumbel_routing_straight_through():
    routing = smop.Gumbel()
    w_eval, _ = routing(LOGITS, deterministic=True, rng=None)
    np.testing.assert_array_equal(w_eval, np.eye(4)[np.asarray(LOGITS).argmax(-1)])
    w, _ = routing(LOGITS, deterministic=False, rng=KEY)
    np.testing.assert_array_equal(np.sort(np.asarray(w), -1)[:, -1], 1.0)  # forward one-hot
    assert (np.asarray(w).sum(-1) == 1).all()
    grad = jax.grad(
        lambda x: (routing(x, deterministic=False, rng=KEY)[0] * jnp.arange(4.0)).sum()
    )(LOGITS)
    assert np.abs(np.asarray(grad)).max() > 1e-4  # gradients flow through the soft sample


@pytest.mark.parametrize(
    "routing",
    [
        smop.TopK(2),
        smop.Dense(),
        smop.RandomRouting(),
        smop.Gumbel(),
        smop.ProbabilityGumbel(),
        smop.TopK(1, smop.LogitDropout()),
    ],
    ids=["top2", "dense", "random", "gumbel", "probability_gumbel", "dropout"],
)
def test_variants_run_in_the_module(routing):
    module = smop.SMoP(num_prompts=K, length=L, routing=routing)
    embedded, mask = _inputs()
    variables = module.init({"params": KEY, "dropout": KEY}, embedded, mask)
    for train in (False, True):
        out, out_mask, stats = _apply(module, variables, embedded, mask, train=train)
        assert out.shape == (8, L + 6, E) and np.isfinite(out).all()
        np.testing.assert_allclose(stats["router_probs"][0].sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(stats["prompt_fraction"][0].sum(), 1.0, atol=1e-6)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="num_prompts"):
        smop.SMoP(num_prompts=0)
    with pytest.raises(ValueError, match="leaves no room"):
        smop.SMoP(length=5, max_length=5)
    with pytest.raises(ValueError, match="TopK.k"):
        smop.TopK(0)


# ---------------------------------------------------------------------------------------
# The authors' ablation variants (jyjohnchoi/SMoP), against torch transcriptions
# ---------------------------------------------------------------------------------------


def test_probability_gumbel_matches_the_authors_torch_formula():
    """Forward weights and gradients equal the authors' `gumbel_softmax(probs, hard=True)`
    followed by `topk(k=1)` (torch, same Gumbel sample), router dropout off."""
    torch = pytest.importorskip("torch")
    routing = smop.ProbabilityGumbel(temperature=0.7, noise=None)
    logits = jnp.asarray(np.random.RandomState(3).normal(size=(16, 4)), jnp.float32)
    coef = np.random.RandomState(4).normal(size=(16, 4)).astype(np.float32)
    rng = jax.random.PRNGKey(7)

    def ours(x):
        weights, _ = routing(x, deterministic=False, rng=rng)
        return jnp.sum(weights * coef), weights

    (_, weights), grad = jax.value_and_grad(ours, has_aux=True)(logits)
    # The Gumbel sample the module drew (its second key; the first feeds the dropout).
    gumbel = np.asarray(jax.random.gumbel(jax.random.split(rng)[1], logits.shape))

    x = torch.tensor(np.asarray(logits), requires_grad=True)
    probs = torch.softmax(x, -1)  # the authors' router ends in Softmax
    soft = torch.softmax((probs + torch.tensor(gumbel)) / 0.7, -1)
    _, top = soft.topk(1, dim=-1)
    one_hot = torch.zeros_like(soft).scatter_(-1, top, 1.0)
    output = one_hot - soft.detach() + soft
    values, index = torch.topk(output, k=1, dim=-1)
    ref_weights = torch.zeros_like(soft).scatter(-1, index, values)
    (ref_weights * torch.tensor(coef)).sum().backward()

    np.testing.assert_allclose(np.asarray(weights), ref_weights.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grad)).max() > 1e-4
    # Noise-free evaluation: the router's argmax with weight 1.
    w_eval, _ = routing(logits, deterministic=True, rng=None)
    np.testing.assert_array_equal(w_eval, np.eye(4)[np.asarray(logits).argmax(-1)])


def test_symmetric_kl_matches_the_authors_torch_loss():
    """`losses.symmetric_kl` (unweighted) = the authors' `symmetric_KL_loss` x batch size
    (theirs is a `batchmean`), with the same gradients (each side's target detached)."""
    torch = pytest.importorskip("torch")
    from hyperprompt_jax import losses

    rng = np.random.RandomState(5)
    a = rng.normal(size=(3, 4, 11)).astype(np.float32)
    b = rng.normal(size=(3, 4, 11)).astype(np.float32)
    value, (grad_a, grad_b) = jax.value_and_grad(
        lambda x, y: losses.symmetric_kl(x, y), argnums=(0, 1)
    )(jnp.asarray(a), jnp.asarray(b))

    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    F = torch.nn.functional
    ref = F.kl_div(
        F.log_softmax(ta, -1), F.softmax(tb.detach(), -1), reduction="batchmean"
    ) + F.kl_div(F.log_softmax(tb, -1), F.softmax(ta.detach(), -1), reduction="batchmean")
    ref = 0.5 * ref.sum() * a.shape[0]
    ref.backward()
    np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_a), ta.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad_b), tb.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert float(losses.symmetric_kl(jnp.asarray(a), jnp.asarray(a))) == pytest.approx(
        0.0, abs=1e-6
    )
    # Weights drop padded positions.
    weights = np.ones((3, 4), np.float32)
    weights[:, 2:] = 0.0
    masked = losses.symmetric_kl(jnp.asarray(a), jnp.asarray(b), jnp.asarray(weights))
    unmasked = losses.symmetric_kl(jnp.asarray(a[:, :2]), jnp.asarray(b[:, :2]))
    np.testing.assert_allclose(float(masked), float(unmasked), rtol=1e-5)


def _smop_model(routing, consistency_weight):
    from hyperprompt_jax import models

    module = network.Transformer(CONFIG, prompt=smop.SMoP(num_prompts=K, length=L, routing=routing))
    return models.EncoderDecoderModel(
        module, None, None, z_loss=1e-4, consistency_weight=consistency_weight
    )


BATCH = {
    "encoder_input_tokens": jnp.asarray(ENC),
    "decoder_input_tokens": jnp.asarray(DEC),
    "decoder_target_tokens": jnp.asarray(TGT),
}


def test_consistency_loss_two_passes():
    """With deterministic routing both passes agree: the loss is twice one pass and the
    consistency term 0. With random routing the term is positive, the loss is both
    passes' plus 0.1 x the term, and the term's gradient reaches the prompts."""
    shapes = {k: v.shape for k, v in BATCH.items()}
    fixed = _smop_model(smop.TopK(1, noise=None), 0.1)
    params = fixed.get_initial_variables(KEY, shapes)["params"]
    single, _ = jax.jit(_smop_model(smop.TopK(1, noise=None), 0.0).loss_fn)(params, BATCH, KEY)
    double, metrics = jax.jit(fixed.loss_fn)(params, BATCH, KEY)
    np.testing.assert_allclose(float(double), 2 * float(single), rtol=1e-6)
    assert float(metrics["consistency_loss"]) == pytest.approx(0.0, abs=1e-6)

    random = _smop_model(smop.RandomRouting(), 0.1)
    plain = jax.jit(_smop_model(smop.RandomRouting(), 0.0).loss_fn)
    second_key = jax.random.fold_in(KEY, 1)

    def consistency_part(p):
        loss, metrics = random.loss_fn(p, BATCH, KEY)
        first, _ = plain(p, BATCH, KEY)  # the same first pass
        second, _ = plain(p, BATCH, second_key)
        return loss - first - second, metrics

    (rest, metrics), grads = jax.jit(jax.value_and_grad(consistency_part, has_aux=True))(params)
    kl = float(metrics["consistency_loss"])
    assert kl > 1e-4
    np.testing.assert_allclose(float(rest), 0.1 * kl, rtol=1e-3, atol=1e-6)
    assert np.abs(np.asarray(grads["prompt"]["prompts"])).max() > 1e-6
    # Evaluation (no dropout rng): one pass, no consistency term.
    _, eval_metrics = jax.jit(random.loss_fn)(params, BATCH, None)
    assert "consistency_loss" not in eval_metrics


def test_load_balancing_loss_is_the_authors_formula_and_reaches_the_loss():
    """`load_balancing_weight` sows `w * k * sum(mean prob * load)` (the authors'
    `balancing_loss`, transcribed in NumPy from their prompt_routing.py) in training only;
    the model adds it to the loss scaled by the number of target tokens."""
    module = smop.SMoP(num_prompts=K, length=L, load_balancing_weight=0.5)
    embedded, mask = _inputs()
    variables = module.init({"params": KEY, "dropout": KEY}, embedded, mask)
    _, state = module.apply(
        variables, embedded, mask, deterministic=False, rngs={"dropout": KEY},
        mutable=["intermediates", "aux_losses"],
    )  # fmt: skip
    probs = np.asarray(state["intermediates"]["router_probs"][0])
    # Their load: bincount of the chosen prompts / (batch * k); their probs_mean.
    load = np.bincount(probs.argmax(-1), minlength=K) / probs.shape[0]  # top-1 choices
    expected = 0.5 * K * np.sum(probs.mean(0) * load)
    np.testing.assert_allclose(state["aux_losses"]["load_balancing"][0], expected, rtol=1e-5)
    _, eval_state = module.apply(variables, embedded, mask, mutable=["aux_losses"])
    assert not eval_state.get("aux_losses")

    from hyperprompt_jax import models

    def loss_of(weight):
        hook = smop.SMoP(num_prompts=K, length=L, load_balancing_weight=weight)
        model = models.EncoderDecoderModel(network.Transformer(CONFIG, prompt=hook), None, None)
        return model, jax.jit(model.loss_fn)

    model, with_aux = loss_of(0.5)
    _, without = loss_of(0.0)
    params = model.get_initial_variables(KEY, {k: v.shape for k, v in BATCH.items()})["params"]
    loss, metrics = with_aux(params, BATCH, KEY)
    plain, _ = without(params, BATCH, KEY)
    tokens = float((TGT > 0).sum())
    assert float(metrics["aux_loss"]) > 0.0
    np.testing.assert_allclose(
        float(loss), float(plain) + tokens * float(metrics["aux_loss"]), rtol=1e-5
    )


# ---------------------------------------------------------------------------------------
# Recipes: gin files held to the authors' numbers
# ---------------------------------------------------------------------------------------


def _parse(files, bindings=()):
    from hyperprompt_jax import gin_utils

    gin_utils.parse_gin(["models/t5_1_1_tiny.gin", *files], list(bindings), finalize=False)


def test_authors_recipe_follows_their_script():
    """smop_authors.gin: HF Adafactor with their arguments, lr 0.5 with HF's linear
    schedule (warmup 6% of TRAIN_STEPS), batch 32, 512-token budget with the prompt,
    early stopping patience 10."""
    import gin
    from hyperprompt_jax import gin_utils, optim

    torch = pytest.importorskip("torch")
    from transformers import optimization as hf

    run = ["MODEL_DIR='/tmp/x'", "MIXTURE_OR_TASK_NAME='t'", "EVAL_PERIOD=78"]
    try:
        _parse(["methods/smop_authors.gin"], [*run, "TRAIN_STEPS=3900"])
        assert gin_utils.query_macro("BATCH_SIZE") == 32
        assert gin_utils.query_macro("EARLY_STOPPING_PATIENCE") == 10
        # ... and it reaches the launcher's train function (runs/finetune.gin binds it).
        patience = gin.query_parameter("train_script.train.early_stopping_patience")
        assert gin_utils.instantiate(patience) == 10
        lengths = gin_utils.query_macro("TASK_FEATURE_LENGTHS")
        budget = gin_utils.query_macro("ENCODER_MAX_LENGTH")
        assert budget == 512 and lengths["inputs"] + gin_utils.query_macro("PROMPT_LENGTH") == 512
        adafactor = gin.get_configurable(optim.adafactor)
        schedule = gin.get_configurable(optim.create_learning_rate_scheduler)()
        kwargs = {
            k: gin_utils.instantiate(gin.query_parameter(f"optim.adafactor.{k}"))
            for k in ("hf_semantics", "multiply_by_parameter_scale", "weight_decay_rate")
        }
        assert kwargs == dict(
            hf_semantics=True, multiply_by_parameter_scale=False, weight_decay_rate=1e-5
        )
        assert callable(adafactor)
        assert gin.get_configurable(smop.SMoP)().load_balancing_weight == 0.01
        # HF's schedule is a LambdaLR of the step: read its lambda directly.
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = hf.get_linear_schedule_with_warmup(opt, int(3900 * 0.06), 3900)
        steps = np.arange(0, 3910, 7)
        expected = [0.5 * sched.lr_lambdas[0](int(t)) for t in steps]
        got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))
        np.testing.assert_allclose(got, expected, atol=1e-6)
        # The schedule follows TRAIN_STEPS: a shorter run warms up and decays sooner.
        _parse(["methods/smop_authors.gin"], [*run, "TRAIN_STEPS=1000"])
        short = gin.get_configurable(optim.create_learning_rate_scheduler)()
        assert float(short(30)) == pytest.approx(0.25) and float(short(1000)) == 0.0
    finally:
        gin.clear_config()


def test_t5x_recipe_and_random_variant():
    import gin
    from hyperprompt_jax import gin_utils, models

    try:
        _parse(["runs/finetune.gin", "methods/smop_random.gin"], ["TRAIN_STEPS=500"])
        assert gin_utils.instantiate(gin.query_parameter("optim.adafactor.hf_semantics")) is False
        model = gin.get_configurable(models.EncoderDecoderModel)(
            module=None, input_vocabulary=None, output_vocabulary=None
        )
        assert model.consistency_weight == 0.1 and model.z_loss == 1e-4
        hook = gin.get_configurable(smop.SMoP)()
        assert isinstance(hook.routing, smop.RandomRouting)
        assert (hook.num_prompts, hook.length) == (4, 5)
    finally:
        gin.clear_config()
    # The authors' prompts: torch.nn.Embedding's default N(0, 1).
    assert hook.prompt_init == prompts.Normal(1.0)
    embedded, mask = jnp.zeros((2, 3, 256)), jnp.ones((2, 3), bool)
    params = hook.init({"params": KEY}, embedded, mask)["params"]
    assert params["prompts"].shape == (4, 5, 256)
    assert float(jnp.std(params["prompts"])) == pytest.approx(1.0, rel=0.05)
    assert abs(float(jnp.mean(params["prompts"]))) < 0.05
