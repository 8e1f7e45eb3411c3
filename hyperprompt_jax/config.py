"""T5 configuration with t5x's field names, and the public T5.1.1 / T5 v1.0 sizes.

`T5Config` carries exactly the fields of t5x's `t5x/examples/t5/network.py` config
(so gin files and code written for t5x read the same), plus the two relative-position
settings a real checkpoint needs and two execution options (how token ids are embedded,
which layer activations are rematerialised) that change speed and memory, never
numerics.

The sizes follow the T5.1.1 release (head_dim 64, vocab 32128, GeGLU MLP, untied
logits) and the original T5 v1.0 release (ReLU MLP, logits through the shared
embedding scaled by 1/sqrt(d)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def canonical_dtype(dtype: Any) -> Any:
    """Returns a jnp dtype for a dtype or its name ('float32', 'bfloat16', ...).

    Raises:
      ValueError: for a name that is not a supported activation dtype.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(
                f"Unsupported activation dtype {dtype!r}; expected one of {sorted(_DTYPES)}."
            )
        return _DTYPES[dtype]
    return dtype


# Layer rematerialisation policies (see `T5Config.remat_policy`).
REMAT_POLICIES = ("none", "minimal", "full")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 encoder-decoder (t5x field names).

    Attributes:
      vocab_size: rows of the token embedding (32128 for public T5 checkpoints).
      dtype: activation dtype (parameters are always float32).
      emb_dim: model width d.
      num_heads: attention heads.
      num_encoder_layers: encoder depth.
      num_decoder_layers: decoder depth.
      head_dim: width of one head (heads x head_dim need not equal emb_dim).
      mlp_dim: hidden width of the feed-forward block.
      mlp_activations: one entry per input projection; ('gelu', 'linear') is
        T5.1.1's GeGLU (`wi_0`, `wi_1`), ('relu',) is T5 v1.0 (`wi`).
      dropout_rate: dropout everywhere t5x applies it.
      logits_via_embedding: tie the output layer to the token embedding (v1.0).
      float32_attention_logits: compute q.k and softmax in float32.
      relative_attention_num_buckets: relative-position buckets (32 in T5).
      relative_attention_max_distance: distance folded into the last bucket (128).
      one_hot_embedding: embed tokens with a one-hot matmul like t5x (a TPU habit,
        ~40% of a T5-small step's FLOPs on CPU/GPU) instead of an exact gather.
      remat_policy: rematerialisation of each encoder / decoder layer in training
        (flaxformer's names): 'none' keeps every activation the backward pass needs;
        'minimal' keeps only the outputs of weight matmuls (`dots_with_no_batch_dims`)
        and recomputes the rest (attention scores, softmax, GeGLU, layer norms);
        'full' keeps only each layer's input and recomputes the layer. Speed and
        memory only: values and gradients are unchanged.
    """

    vocab_size: int
    dtype: Any = jnp.float32
    emb_dim: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    head_dim: int = 64
    mlp_dim: int = 2048
    mlp_activations: Sequence[str] = ("relu",)
    dropout_rate: float = 0.1
    logits_via_embedding: bool = False
    float32_attention_logits: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    one_hot_embedding: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for name in (
            "vocab_size",
            "emb_dim",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}.")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"T5Config.{name} must be a non-negative int, got {value!r}.")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown T5Config.remat_policy {self.remat_policy!r}; expected one of "
                f"{list(REMAT_POLICIES)}."
            )
        if not self.mlp_activations:
            raise ValueError("T5Config.mlp_activations must name at least one activation.")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be >= 2, got "
                f"{self.relative_attention_num_buckets}."
            )

    def replace(self, **changes: Any) -> T5Config:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# T5.1.1 sizes (DESIGN.md, "Facts to match"): (emb_dim, num_heads, mlp_dim, layers).
_T5_1_1_SIZES = {
    "small": dict(emb_dim=512, num_heads=6, mlp_dim=1024, num_layers=8),
    "base": dict(emb_dim=768, num_heads=12, mlp_dim=2048, num_layers=12),
    "large": dict(emb_dim=1024, num_heads=16, mlp_dim=2816, num_layers=24),
    "xl": dict(emb_dim=2048, num_heads=32, mlp_dim=5120, num_layers=24),
    "xxl": dict(emb_dim=4096, num_heads=64, mlp_dim=10240, num_layers=24),
}

# T5 v1.0 sizes: (emb_dim, num_heads, mlp_dim, layers).
_T5_1_0_SIZES = {
    "small": dict(emb_dim=512, num_heads=8, mlp_dim=2048, num_layers=6),
    "base": dict(emb_dim=768, num_heads=12, mlp_dim=3072, num_layers=12),
    "large": dict(emb_dim=1024, num_heads=16, mlp_dim=4096, num_layers=24),
    "3b": dict(emb_dim=1024, num_heads=32, mlp_dim=16384, num_layers=24, head_dim=128),
    "11b": dict(emb_dim=1024, num_heads=128, mlp_dim=65536, num_layers=24, head_dim=128),
}

T5_1_1_SIZES = tuple(_T5_1_1_SIZES)
T5_1_0_SIZES = tuple(_T5_1_0_SIZES)


def _from_table(table: dict, family: str, size: str, overrides: dict) -> T5Config:
    if size not in table:
        raise ValueError(f"Unknown {family} size {size!r}; expected one of {sorted(table)}.")
    spec = dict(table[size])
    layers = spec.pop("num_layers")
    fields = dict(
        vocab_size=32128,
        head_dim=64,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dropout_rate=0.0,
    )
    # A size may override the defaults above (T5 v1.0 3B / 11B use head_dim 128).
    fields.update(spec)
    fields.update(overrides)
    return T5Config(**fields)


def t5_1_1(size: str, **overrides: Any) -> T5Config:
    """T5.1.1 / LM-adapted config: GeGLU, untied logits, no bias, 32128 vocab.

    Args:
      size: one of 'small', 'base', 'large', 'xl', 'xxl'.
      **overrides: T5Config fields to change (e.g. dtype='bfloat16').
    """
    return _from_table(
        _T5_1_1_SIZES,
        "T5.1.1",
        size,
        dict(mlp_activations=("gelu", "linear"), logits_via_embedding=False, **overrides),
    )


def t5_1_0(size: str, **overrides: Any) -> T5Config:
    """Original T5 (v1.0) config: ReLU MLP, logits through the tied embedding.

    Args:
      size: one of 'small', 'base', 'large', '3b', '11b'.
      **overrides: T5Config fields to change.
    """
    return _from_table(
        _T5_1_0_SIZES,
        "T5 v1.0",
        size,
        dict(mlp_activations=("relu",), logits_via_embedding=True, **overrides),
    )
