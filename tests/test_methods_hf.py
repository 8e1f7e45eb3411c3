"""The methods against references nobody here wrote: Hugging Face T5 and NumPy.

* Prompt tuning equals HF `T5ForConditionalGeneration` run with
  `inputs_embeds = [prompt; embedded inputs]` and the mask extended by ones.
* SMoP (evaluation) equals HF run with the prompt a NumPy router picks: masked mean of
  the input embeddings, linear router, softmax, top-1 prompt scaled by its probability.
* Decoder-side key/value prefixes equal HF given the same prefixes as
  `past_key_values` (an `EncoderDecoderCache` whose self-attention `DynamicCache`
  holds `[batch, heads, prefix, head_dim]` per layer, as `peft` prefix tuning feeds
  them). HF treats a cache as earlier positions: it shifts the query positions by the
  prefix length and gives the prefix columns a relative-position bias, while our
  prefixes get none (HyperPrompt's design). The comparison is made valid by zeroing
  the decoder's relative-position table in both models: real-to-real biases are then
  zero in both, and HF's prefix-column biases are exactly zero like ours. The encoder
  keeps its (non-zero) table.
* Encoder-side prefixes equal a naive NumPy T5 encoder that attends over
  `[prefix; keys]` (prefix columns unmasked and unbiased); its relative-position bias
  comes from HF's own `compute_bias`.
* Full HyperPrompt (Share / Sep / Global) equals NumPy encoder + HF decoder
  (`encoder_outputs=` and `past_key_values=`), with the hyper-prompts regenerated in
  NumPy from the module's parameters.
* Incremental (cached) decoding equals the full forward pass for every method.

The HF model is a tiny random T5.1.1 (GeGLU, untied output layer, heads x head_dim !=
d_model); its weights are converted to our parameter tree here (HF Linear weights are
`[out, in]`; the relative-position table `[buckets, heads]` lives in block 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hyperprompt_jax import hyperprompt, network, prompts, smop  # noqa: E402
from hyperprompt_jax.config import T5Config  # noqa: E402
from tests.helpers import decode_incrementally  # noqa: E402

VOCAB, EMB, HEADS, HEAD_DIM, MLP, ENC_LAYERS, DEC_LAYERS = 64, 32, 4, 6, 48, 2, 3
BUCKETS, MAX_DISTANCE = 8, 20
ENC_LEN, DEC_LEN, BATCH = 7, 5, 3
NUM_TASKS = 3

CONFIG = T5Config(
    vocab_size=VOCAB,
    emb_dim=EMB,
    num_heads=HEADS,
    head_dim=HEAD_DIM,
    mlp_dim=MLP,
    num_encoder_layers=ENC_LAYERS,
    num_decoder_layers=DEC_LAYERS,
    mlp_activations=("gelu", "linear"),
    dropout_rate=0.0,
    logits_via_embedding=False,
    relative_attention_num_buckets=BUCKETS,
    relative_attention_max_distance=MAX_DISTANCE,
)
ATOL, RTOL = 1e-4, 1e-4


# ----------------------------------------------------------------------------------------
# Hugging Face model and weight conversion
# ----------------------------------------------------------------------------------------


def _build_hf(seed: int, zero_decoder_relpos: bool):
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=EMB,
        d_kv=HEAD_DIM,
        num_heads=HEADS,
        d_ff=MLP,
        num_layers=ENC_LAYERS,
        num_decoder_layers=DEC_LAYERS,
        relative_attention_num_buckets=BUCKETS,
        relative_attention_max_distance=MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            if "relative_attention_bias" in name:
                param.copy_(torch.randn_like(param))
        # transformers 5 may tie the output layer whatever the config says: untie it.
        model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, EMB))
        if zero_decoder_relpos:
            model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    assert model.lm_head.weight is not model.shared.weight
    return model


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def hf_to_params(model) -> dict:
    """Our (t5x) parameter tree from a HF T5.1.1 model."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}

    def attention(prefix):
        return {
            ours: {"kernel": sd[f"{prefix}.{theirs}.weight"].T}
            for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
        }

    def mlp(prefix):
        return {
            name: {"kernel": sd[f"{prefix}.DenseReluDense.{name}.weight"].T}
            for name in ("wi_0", "wi_1", "wo")
        }

    encoder = {
        "relpos_bias": {
            "rel_embedding": sd[
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            ].T
        }
    }
    for i in range(ENC_LAYERS):
        p = f"encoder.block.{i}.layer"
        encoder[f"layers_{i}"] = {
            "pre_attention_layer_norm": {"scale": sd[f"{p}.0.layer_norm.weight"]},
            "attention": attention(f"{p}.0.SelfAttention"),
            "pre_mlp_layer_norm": {"scale": sd[f"{p}.1.layer_norm.weight"]},
            "mlp": mlp(f"{p}.1"),
        }
    encoder["encoder_norm"] = {"scale": sd["encoder.final_layer_norm.weight"]}
    decoder = {
        "relpos_bias": {
            "rel_embedding": sd[
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            ].T
        }
    }
    for i in range(DEC_LAYERS):
        p = f"decoder.block.{i}.layer"
        decoder[f"layers_{i}"] = {
            "pre_self_attention_layer_norm": {"scale": sd[f"{p}.0.layer_norm.weight"]},
            "self_attention": attention(f"{p}.0.SelfAttention"),
            "pre_cross_attention_layer_norm": {"scale": sd[f"{p}.1.layer_norm.weight"]},
            "encoder_decoder_attention": attention(f"{p}.1.EncDecAttention"),
            "pre_mlp_layer_norm": {"scale": sd[f"{p}.2.layer_norm.weight"]},
            "mlp": mlp(f"{p}.2"),
        }
    decoder["decoder_norm"] = {"scale": sd["decoder.final_layer_norm.weight"]}
    decoder["logits_dense"] = {"kernel": sd["lm_head.weight"].T}
    return {
        "token_embedder": {"embedding": sd["shared.weight"]},
        "encoder": encoder,
        "decoder": decoder,
    }


def _batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, VOCAB, size=(BATCH, ENC_LEN))
    enc[0, 5:] = 0  # padded encoder inputs
    enc[2, 3:] = 0
    tgt = rng.randint(2, VOCAB, size=(BATCH, DEC_LEN))
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int64), tgt[:, :-1]], axis=1)
    task_ids = np.array([2, 0, 1], np.int32)
    return enc, dec_in, tgt, task_ids


def _hf_logits(
    model, *, dec_in, enc=None, inputs_embeds=None, mask=None, encoder_outputs=None, past=None
):
    kwargs = dict(decoder_input_ids=torch.tensor(dec_in), attention_mask=torch.tensor(mask))
    if enc is not None:
        kwargs["input_ids"] = torch.tensor(enc)
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = torch.tensor(np.asarray(inputs_embeds, np.float32))
    if encoder_outputs is not None:
        kwargs["encoder_outputs"] = (torch.tensor(np.asarray(encoder_outputs, np.float32)),)
    if past is not None:
        self_cache = transformers.DynamicCache(
            [
                (torch.tensor(k).permute(0, 2, 1, 3), torch.tensor(v).permute(0, 2, 1, 3))
                for k, v in past
            ]
        )
        kwargs["past_key_values"] = transformers.EncoderDecoderCache(
            self_cache, transformers.DynamicCache()
        )
    with torch.no_grad():
        return _np(model(**kwargs).logits)


@functools.cache
def _forward(module: network.Transformer):
    @jax.jit
    def run(params, enc, dec_in, tgt, task_ids):
        return module.apply(
            {"params": params}, enc, dec_in, tgt, task_ids=task_ids, enable_dropout=False
        )

    return run


@pytest.fixture(scope="module")
def hf_model():
    return _build_hf(seed=0, zero_decoder_relpos=False)


@pytest.fixture(scope="module")
def hf_model_zero_decoder_bias():
    return _build_hf(seed=1, zero_decoder_relpos=True)


HYPERNETWORKS = {
    "share": hyperprompt.PerLayer(),
    "sep": hyperprompt.PerLayer(per_task=True),
    "global": hyperprompt.Global(task_embed_dim=5, projector_hidden_dim=6, layer_task_embed_dim=7),
}

# One network per method, shared by the HF comparisons and the decoding test so each
# is initialised and compiled once.
METHODS = {
    name: network.Transformer(CONFIG, **hooks)
    for name, hooks in {
        "model_tuning": dict(),
        "prompt_tuning": dict(prompt=prompts.SoftPrompt(length=3)),
        "multi_task_prompt": dict(prompt=prompts.SoftPrompt(length=3, num_tasks=NUM_TASKS)),
        "smop": dict(prompt=smop.SMoP(num_prompts=3, length=2, prompt_init=prompts.Normal())),
        **{
            f"hyperprompt_{v}": dict(
                hyperprompt=hyperprompt.HyperPrompt(
                    num_tasks=NUM_TASKS,
                    prompt_length=2,
                    bottleneck_dim=4,
                    hypernetworks=HYPERNETWORKS[v],
                )
            )
            for v in hyperprompt.VARIANTS
        },
    }.items()
}


@functools.cache
def _init(module: network.Transformer) -> dict:
    enc, dec_in, tgt, task_ids = _batch()
    params = module.init(
        {"params": jax.random.PRNGKey(7), "dropout": jax.random.PRNGKey(7)},
        enc,
        dec_in,
        tgt,
        task_ids=task_ids,
        enable_dropout=False,
    )["params"]
    return dict(nn.unbox(params))


def _with_method_params(module, backbone):
    """The module's initial parameters with the converted HF backbone swapped in."""
    params = dict(_init(module))
    for key in backbone:
        assert jax.tree.map(np.shape, params[key]) == jax.tree.map(np.shape, backbone[key])
    params.update(backbone)
    return params


def test_converted_base_model_matches_hf(hf_model):
    """Sanity check of the conversion itself (no method attached)."""
    module = METHODS["model_tuning"]
    params = hf_to_params(hf_model)
    enc, dec_in, tgt, task_ids = _batch()
    ours = np.asarray(_forward(module)(params, enc, dec_in, tgt, task_ids))
    theirs = _hf_logits(hf_model, enc=enc, dec_in=dec_in, mask=(enc > 0).astype(np.int64))
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------
# Prompt tuning and SMoP vs HF inputs_embeds
# ----------------------------------------------------------------------------------------


def test_prompt_tuning_matches_hf_inputs_embeds(hf_model):
    length = 3
    module = METHODS["prompt_tuning"]
    backbone = hf_to_params(hf_model)
    params = _with_method_params(module, backbone)
    prompt = np.asarray(params["prompt"]["prompt"])
    assert prompt.shape == (length, EMB)
    enc, dec_in, tgt, task_ids = _batch()
    ours = np.asarray(_forward(module)(params, enc, dec_in, tgt, task_ids))

    embeds = backbone["token_embedder"]["embedding"][enc]
    inputs_embeds = np.concatenate([np.broadcast_to(prompt, (BATCH, length, EMB)), embeds], 1)
    mask = np.concatenate([np.ones((BATCH, length)), enc > 0], 1).astype(np.int64)
    theirs = _hf_logits(hf_model, inputs_embeds=inputs_embeds, mask=mask, dec_in=dec_in)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    # The prompt matters (the comparison is not vacuous).
    plain = _hf_logits(hf_model, enc=enc, dec_in=dec_in, mask=(enc > 0).astype(np.int64))
    assert np.abs(plain - theirs).max() > 1e-2


def test_smop_eval_matches_hf_with_numpy_router(hf_model):
    length = 2
    module = METHODS["smop"]
    backbone = hf_to_params(hf_model)
    params = _with_method_params(module, backbone)
    enc, dec_in, tgt, task_ids = _batch()
    ours = np.asarray(_forward(module)(params, enc, dec_in, tgt, task_ids))

    prompts_KPE = np.asarray(params["prompt"]["prompts"])
    router = np.asarray(params["prompt"]["router"]["kernel"])
    embeds = backbone["token_embedder"]["embedding"][enc]
    real = (enc > 0)[..., None]
    sentence = (embeds * real).sum(1) / real.sum(1)
    logits = sentence @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = probs.argmax(-1)
    routed = prompts_KPE[choice] * probs[np.arange(BATCH), choice][:, None, None]
    inputs_embeds = np.concatenate([routed, embeds], 1)
    mask = np.concatenate([np.ones((BATCH, length)), enc > 0], 1).astype(np.int64)
    theirs = _hf_logits(hf_model, inputs_embeds=inputs_embeds, mask=mask, dec_in=dec_in)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------
# Key/value prefixes: decoder vs HF past_key_values, encoder vs NumPy
# ----------------------------------------------------------------------------------------


class FixedPrefixes(nn.Module):
    """A test `PrefixGenerator` returning given per-layer prefixes (None = no prefix)."""

    encoder: tuple = None
    decoder: tuple = None

    def __call__(self, task_ids, *, config, stack, batch_size, deterministic):
        prefixes = self.encoder if stack == "encoder" else self.decoder
        if prefixes is None:
            return None
        return [(jnp.asarray(k), jnp.asarray(v)) for k, v in prefixes]


def _random_prefixes(seed: int, num_layers: int, length: int):
    rng = np.random.RandomState(seed)
    shape = (BATCH, length, HEADS, HEAD_DIM)
    return tuple(
        (rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))
        for _ in range(num_layers)
    )


def test_decoder_prefixes_match_hf_past_key_values(hf_model_zero_decoder_bias):
    hf = hf_model_zero_decoder_bias
    past = _random_prefixes(seed=5, num_layers=DEC_LAYERS, length=3)
    # Hashable container for the module attribute.
    module = network.Transformer(CONFIG, hyperprompt=FixedPrefixes(decoder=_Frozen(past)))
    params = hf_to_params(hf)
    enc, dec_in, tgt, task_ids = _batch()
    ours = np.asarray(
        module.apply({"params": params}, enc, dec_in, tgt, task_ids=task_ids, enable_dropout=False)
    )
    theirs = _hf_logits(hf, enc=enc, dec_in=dec_in, mask=(enc > 0).astype(np.int64), past=past)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    plain = _hf_logits(hf, enc=enc, dec_in=dec_in, mask=(enc > 0).astype(np.int64))
    assert np.abs(plain - theirs).max() > 1e-2  # the prefixes matter


class _Frozen(tuple):
    """A tuple of (key, value) NumPy arrays, hashable by identity (module attribute)."""

    def __new__(cls, items):
        return super().__new__(cls, items)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _rms(x, scale):
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale


def numpy_encoder(params, hf, enc, prefixes, prompt=None):
    """A naive NumPy T5.1.1 encoder; layer m attends over `[prefix_m; keys]`.

    Prefix columns get neither mask nor relative-position bias; real key columns get
    the padding mask and HF's `compute_bias`. Rows of padded positions are not
    meaningful (compare real positions only).
    """
    x = params["token_embedder"]["embedding"][enc].astype(np.float64)
    valid = enc > 0
    if prompt is not None:
        x = np.concatenate([prompt, x], 1)
        valid = np.concatenate([np.ones(prompt.shape[:2], bool), valid], 1)
    length = x.shape[1]
    with torch.no_grad():
        relbias = _np(hf.encoder.block[0].layer[0].SelfAttention.compute_bias(length, length))
    key_bias = np.where(valid[:, None, None, :], 0.0, -1e10) + relbias  # [B, H, Q, K]
    for i in range(ENC_LAYERS):
        p = params["encoder"][f"layers_{i}"]
        att = p["attention"]
        h = _rms(x, p["pre_attention_layer_norm"]["scale"])
        q = (h @ att["query"]["kernel"]).reshape(BATCH, length, HEADS, HEAD_DIM)
        k = (h @ att["key"]["kernel"]).reshape(BATCH, length, HEADS, HEAD_DIM)
        v = (h @ att["value"]["kernel"]).reshape(BATCH, length, HEADS, HEAD_DIM)
        bias = key_bias
        if prefixes is not None:
            pk, pv = prefixes[i]
            k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
            bias = np.concatenate([np.zeros(bias.shape[:3] + (pk.shape[1],)), bias], -1)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(BATCH, length, HEADS * HEAD_DIM)
        x = x + out @ att["out"]["kernel"]
        h = _rms(x, p["pre_mlp_layer_norm"]["scale"])
        m = p["mlp"]
        x = (
            x
            + (_gelu_tanh(h @ m["wi_0"]["kernel"]) * (h @ m["wi_1"]["kernel"])) @ m["wo"]["kernel"]
        )
    return _rms(x, params["encoder"]["encoder_norm"]["scale"]).astype(np.float32)


def test_encoder_prefixes_match_numpy_attention(hf_model):
    prefixes = _random_prefixes(seed=7, num_layers=ENC_LAYERS, length=2)
    module = network.Transformer(CONFIG, hyperprompt=FixedPrefixes(encoder=_Frozen(prefixes)))
    params = hf_to_params(hf_model)
    enc, _, _, _ = _batch()
    ours = np.asarray(
        module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
    )
    reference = numpy_encoder(params, hf_model, enc, prefixes)
    valid = enc > 0
    np.testing.assert_allclose(ours[valid], reference[valid], atol=ATOL, rtol=RTOL)
    plain = numpy_encoder(params, hf_model, enc, None)
    assert np.abs(plain[valid] - reference[valid]).max() > 1e-2


# ----------------------------------------------------------------------------------------
# Full HyperPrompt: NumPy hyper-prompts + NumPy encoder + HF decoder
# ----------------------------------------------------------------------------------------


def numpy_hyper_prompts(hp: dict, variant: str, stack: str, task_ids: np.ndarray):
    """Per-layer (key, value) `[B, l, H, D]` from HyperPrompt's parameters, in NumPy.

    Global builds each layer's HyperNetwork weights explicitly,
    `D = sum_s I_s W_D[s]`, `U = sum_s I_s W_U[s]` (the paper's formulation), where the
    module contracts in another order.
    """
    prompts_TPE = np.asarray(hp["task_prompts"], np.float64)
    num_layers = ENC_LAYERS if stack == "encoder" else DEC_LAYERS
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    if variant == "global":
        g = hp["global"]
        task = np.asarray(g["task_embeddings"])
        layer = np.asarray(hp[f"{stack}_layer_embeddings"])
    out = []
    for m in range(num_layers):
        kv = []
        for kind in ("key", "value"):
            per_task = []
            for t in range(NUM_TASKS):
                if variant == "share":
                    down, up = hp[stack][f"{kind}_down"][m], hp[stack][f"{kind}_up"][m]
                elif variant == "sep":
                    down, up = hp[stack][f"{kind}_down"][t, m], hp[stack][f"{kind}_up"][t, m]
                else:
                    pair = np.concatenate([task[t], layer[m]])
                    hidden = relu(pair @ g["projector_hidden_kernel"] + g["projector_hidden_bias"])
                    emb = hidden @ g["projector_out_kernel"] + g["projector_out_bias"]
                    down = np.einsum("s,sen->en", emb, g[f"{kind}_down"])
                    up = np.einsum("s,snk->nk", emb, g[f"{kind}_up"])
                per_task.append(relu(prompts_TPE[t] @ down) @ up)
            table = np.stack(per_task)[task_ids]  # [B, l, H*D]
            kv.append(table.reshape(table.shape[:2] + (HEADS, HEAD_DIM)).astype(np.float32))
        out.append(tuple(kv))
    return out


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_hyperprompt_matches_numpy_encoder_and_hf_decoder(variant, hf_model_zero_decoder_bias):
    hf = hf_model_zero_decoder_bias
    module = METHODS[f"hyperprompt_{variant}"]
    backbone = hf_to_params(hf)
    params = _with_method_params(module, backbone)
    hp = jax.tree.map(np.asarray, params["hyperprompt"])
    enc, dec_in, tgt, task_ids = _batch()
    ours = np.asarray(_forward(module)(params, enc, dec_in, tgt, task_ids))

    encoded = numpy_encoder(
        backbone, hf, enc, numpy_hyper_prompts(hp, variant, "encoder", task_ids)
    )
    theirs = _hf_logits(
        hf,
        encoder_outputs=encoded,
        mask=(enc > 0).astype(np.int64),
        dec_in=dec_in,
        past=numpy_hyper_prompts(hp, variant, "decoder", task_ids),
    )
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------
# Incremental decoding equals the full forward pass, for every method
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_incremental_decoding_equals_full_forward(method, hf_model):
    module = METHODS[method]
    params = _with_method_params(module, hf_to_params(hf_model))
    enc, dec_in, tgt, task_ids = _batch()
    full = np.asarray(_forward(module)(params, enc, dec_in, tgt, task_ids))

    steps, cache = decode_incrementally(module, params, enc, dec_in, task_ids)
    # The cache holds only real decoder positions: prefixes never enter it.
    key_cache = cache["decoder"]["layers_0"]["self_attention"]["cached_key"]
    assert key_cache.shape == (BATCH, HEADS, HEAD_DIM, DEC_LEN)
    np.testing.assert_allclose(steps, full, atol=2e-5, rtol=1e-5)
