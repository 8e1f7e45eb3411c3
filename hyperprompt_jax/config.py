"""T5 configuration with t5x's field names, and the public T5.1.1 / T5 v1.0 sizes.

`T5Config` carries exactly the fields of t5x's `t5x/examples/t5/network.py` config
(so gin files and code written for t5x read the same), plus the two relative-position
settings a real checkpoint needs and two execution options (how token ids are embedded,
which layer activations are rematerialised) that change speed and memory, never
numerics.

The sizes follow the T5.1.1 release (head_dim 64, vocab 32128, GeGLU MLP, untied
logits) and the original T5 v1.0 release (ReLU MLP, logits through the shared
embedding scaled by 1/sqrt(d)). They are written once, in `gin/models/*.gin`;
`t5_1_1(size)` / `t5_1_0(size)` read those files (`from_gin_file`) with gin's parser,
without touching gin's global configuration.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp

from gin import config_parser as gin_parser
from hyperprompt_jax.errors import UserError

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
            raise UserError(
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
                raise UserError(f"T5Config.{name} must be a positive int, got {value!r}.")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise UserError(f"T5Config.{name} must be a non-negative int, got {value!r}.")
        if not 0.0 <= float(self.dropout_rate) < 1.0:
            raise UserError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(
                f"Unknown T5Config.remat_policy {self.remat_policy!r}; expected one of "
                f"{list(REMAT_POLICIES)}."
            )
        if not self.mlp_activations:
            raise UserError("T5Config.mlp_activations must name at least one activation.")
        if self.relative_attention_num_buckets < 2:
            raise UserError(
                "T5Config.relative_attention_num_buckets must be >= 2, got "
                f"{self.relative_attention_num_buckets}."
            )

    def replace(self, **changes: Any) -> T5Config:
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------
# Published sizes: read from gin/models/*.gin (the one source of truth)
# ----------------------------------------------------------------------------------------

# The architecture fields a model file binds; execution settings (dtype, dropout, remat)
# keep T5Config's defaults here (float32, no dropout) and are the caller's overrides.
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "emb_dim",
    "num_heads",
    "num_encoder_layers",
    "num_decoder_layers",
    "head_dim",
    "mlp_dim",
    "mlp_activations",
    "logits_via_embedding",
    "float32_attention_logits",
)

T5_1_1_SIZES = ("small", "base", "large", "xl", "xxl")
T5_1_0_SIZES = ("small", "base", "large", "3b", "11b")


class _Macro(NamedTuple):
    name: str


class _Reference(NamedTuple):
    name: str


class _Delegate(gin_parser.ParserDelegate):
    def configurable_reference(self, scoped_configurable_name, evaluate):
        return _Reference(scoped_configurable_name)

    def macro(self, macro_name):
        return _Macro(macro_name)


def _gin_statements(path: str, seen: tuple[str, ...] = ()) -> list[Any]:
    """A gin file's binding statements, its includes first (in file order)."""
    from hyperprompt_jax import gin_utils  # gin_utils imports nothing of the library

    for root in gin_utils.search_paths():
        full = os.path.join(root, path)  # an absolute `path` stays itself
        if os.path.isfile(full):
            break
    else:
        raise FileNotFoundError(f"No gin file {path!r} in {gin_utils.search_paths()}.")
    if full in seen:
        raise UserError(f"Include cycle through {full}.")
    out = []
    with open(full) as f:
        for statement in gin_parser.ConfigParser(f, _Delegate()):
            if isinstance(statement, gin_parser.IncludeStatement):
                out.extend(_gin_statements(statement.filename, (*seen, full)))
            elif isinstance(statement, gin_parser.BindingStatement):
                out.append(statement)
    return out


def from_gin_file(path: str, **overrides: Any) -> T5Config:
    """The architecture a model gin file binds to `config.T5Config`, without gin's state.

    Reads the file (by relative name, e.g. 'models/t5_1_1_base.gin', found like the
    launchers find it) and its includes with gin's own parser, resolving macros the files
    define; nothing is registered or bound in gin. Only architecture fields are taken
    (dtype, dropout and remat keep `T5Config`'s defaults: float32, dropout 0).

    Args:
      path: a model gin file.
      **overrides: T5Config fields to change (e.g. dtype='bfloat16').

    Raises:
      FileNotFoundError: no such gin file.
      ValueError: a field bound to a value that is neither a literal nor a macro the
        files define.
    """
    macros: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for st in _gin_statements(path):
        if not st.arg_name and not st.scope and "." not in st.selector:
            macros[st.selector] = st.value  # `NAME = value`
        elif st.selector in ("config.T5Config", "T5Config") and st.arg_name in _ARCHITECTURE_FIELDS:
            fields[st.arg_name] = st.value

    def resolve(value: Any, name: str) -> Any:
        for _ in range(10):  # macros may point at macros
            if not isinstance(value, _Macro):
                break
            if value.name not in macros:
                raise UserError(f"{path}: T5Config.{name} = %{value.name}, an undefined macro.")
            value = macros[value.name]
        if isinstance(value, (_Macro, _Reference)):
            raise UserError(f"{path}: T5Config.{name} is not a literal ({value}).")
        return value

    fields = {name: resolve(value, name) for name, value in fields.items()}
    fields.setdefault("dropout_rate", 0.0)
    fields.update(overrides)
    return T5Config(**fields)


def _from_size(family: str, sizes: Sequence[str], size: str, overrides: dict) -> T5Config:
    if size not in sizes:
        raise UserError(f"Unknown {family} size {size!r}; expected one of {sorted(sizes)}.")
    return from_gin_file(f"models/{family}_{size}.gin", **overrides)


def t5_1_1(size: str, **overrides: Any) -> T5Config:
    """T5.1.1 / LM-adapted config (GeGLU, untied logits, 32128 vocab) from its gin file.

    Args:
      size: one of 'small', 'base', 'large', 'xl', 'xxl' (`gin/models/t5_1_1_<size>.gin`).
      **overrides: T5Config fields to change (e.g. dtype='bfloat16').
    """
    return _from_size("t5_1_1", T5_1_1_SIZES, size, overrides)


def t5_1_0(size: str, **overrides: Any) -> T5Config:
    """Original T5 (v1.0) config (ReLU MLP, logits through the tied embedding).

    Args:
      size: one of 'small', 'base', 'large', '3b', '11b' (`gin/models/t5_1_0_<size>.gin`).
      **overrides: T5Config fields to change.
    """
    return _from_size("t5_1_0", T5_1_0_SIZES, size, overrides)
