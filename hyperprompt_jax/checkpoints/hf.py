"""Hugging Face T5 directories (`save_pretrained` of a `T5ForConditionalGeneration`).

`config.json` plus `model.safetensors`, sharded safetensors, or `pytorch_model.bin`.
HF's `nn.Linear` weights are `[out, in]` (t5x kernels are `[in, out]`), the relative
attention bias table is `[buckets, heads]` and lives in block 0 of each stack (t5x:
`relpos_bias/rel_embedding`, `[heads, buckets]`). Neither library scales the query by
1/sqrt(d), so q kernels map as they are. HF decides the output layer with two flags:
whether `lm_head` is tied to `shared`, and whether the decoder output is multiplied by
d_model**-0.5 (`scale_decoder_outputs` in transformers>=5, `tie_word_embeddings`
before); tied + scaled is t5x's `logits_via_embedding`, every other combination
becomes an explicit `logits_dense` kernel.

Reading is lazy (`open_hf_t5`): safetensors files are memory-mapped and each device's
slice is read tensor by tensor (transposed on the fly), so no whole array is
materialised; PyTorch `.bin` files force a whole-file read (pickle) on every host.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Tuple

import ml_dtypes
import numpy as np

from hyperprompt_jax.checkpoints.sources import Tensor, WeightSource, gathered
from hyperprompt_jax.checkpoints.trees import (
    Params,
    check_params_match,
    flatten_params,
    t5_param_shapes,
    unflatten_params,
)
from hyperprompt_jax.config import T5Config
from hyperprompt_jax.errors import UserError

# HF `feed_forward_proj` -> t5x `mlp_activations`. HF's "gated-gelu" uses `gelu_new`, the
# tanh approximation, which is flax's `nn.gelu` default (exact erf "gelu" is not).
_HF_TO_T5X_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-relu": ("relu", "linear"),
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gelu_new": ("gelu",),
    "silu": ("silu",),
    "gated-silu": ("silu", "linear"),
}
_T5X_TO_HF_ACTIVATIONS = {
    ("relu",): "relu",
    ("relu", "linear"): "gated-relu",
    ("gelu", "linear"): "gated-gelu",
    ("gelu",): "gelu_new",
    ("silu",): "silu",
    ("silu", "linear"): "gated-silu",
}
_HF_MODEL_TYPES = ("t5", "mt5")
_HF_EMBEDDING_NAMES = (
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
)
# Present in some HF files but carrying nothing t5x needs: the per-stack copies of the
# shared embedding and a cross-attention bias table HF never uses.
_HF_IGNORED = frozenset(
    {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
)
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _hf_int(hf: Mapping[str, Any], key: str, where: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: '{key}' must be an integer, got {value!r}.")
    return value


def hf_config_to_t5(hf: Mapping[str, Any], where: str = "config.json") -> Tuple[T5Config, bool]:
    """Converts a Hugging Face T5 `config.json` dict.

    Returns:
      `(config, scale_decoder_outputs)`: the T5Config (float32 activations; the output
      layer is `logits_via_embedding` only if HF ties and scales it, decided by the
      caller with the weights) and whether HF multiplies the decoder output by
      d_model**-0.5 before `lm_head`.

    Raises:
      ValueError: for a non-T5 model type or an architecture this network cannot
        express (activation, layer-norm epsilon, decoder-only).
    """
    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        extra = (
            " umT5 has a relative attention bias in every layer, which t5x's T5 does not."
            if model_type == "umt5"
            else ""
        )
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported; expected one of "
            f"{list(_HF_MODEL_TYPES)} (a T5 encoder-decoder).{extra}"
        )
    if hf.get("is_encoder_decoder", True) is False or hf.get("is_decoder", False) is True:
        raise UserError(f"{where}: expected a T5 encoder-decoder (is_encoder_decoder=true).")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _HF_TO_T5X_ACTIVATIONS:
        raise UserError(
            f"{where}: feed_forward_proj {proj!r} is not supported; expected one of "
            f"{sorted(_HF_TO_T5X_ACTIVATIONS)} (t5x's gelu is the tanh approximation, HF's "
            "'gelu_new'; exact-erf 'gelu' has no t5x equivalent)."
        )
    if "is_gated_act" in hf and bool(hf["is_gated_act"]) != proj.startswith("gated-"):
        raise UserError(
            f"{where}: is_gated_act={hf['is_gated_act']} contradicts feed_forward_proj {proj!r}."
        )
    epsilon = hf.get("layer_norm_epsilon", 1e-6)
    if not isinstance(epsilon, (int, float)) or abs(float(epsilon) - 1e-6) > 1e-12:
        raise UserError(
            f"{where}: layer_norm_epsilon {epsilon!r} is not supported; t5x's T5 layer norm "
            "uses 1e-6."
        )
    num_layers = _hf_int(hf, "num_layers", where)
    num_decoder_layers = num_layers
    if hf.get("num_decoder_layers") is not None:
        num_decoder_layers = _hf_int(hf, "num_decoder_layers", where)
    dropout = hf.get("dropout_rate", 0.1)
    if "scale_decoder_outputs" in hf:  # transformers >= 5
        scale = bool(hf["scale_decoder_outputs"])
    else:  # transformers < 5 scaled exactly when the embeddings were tied.
        scale = hf.get("tie_word_embeddings", True) is not False
    try:
        config = T5Config(
            vocab_size=_hf_int(hf, "vocab_size", where),
            dtype="float32",
            emb_dim=_hf_int(hf, "d_model", where),
            num_heads=_hf_int(hf, "num_heads", where),
            num_encoder_layers=num_layers,
            num_decoder_layers=num_decoder_layers,
            head_dim=_hf_int(hf, "d_kv", where),
            mlp_dim=_hf_int(hf, "d_ff", where),
            mlp_activations=_HF_TO_T5X_ACTIVATIONS[proj],
            dropout_rate=float(dropout),
            logits_via_embedding=scale,
            relative_attention_num_buckets=_hf_int(hf, "relative_attention_num_buckets", where, 32),
            relative_attention_max_distance=_hf_int(
                hf, "relative_attention_max_distance", where, 128
            ),
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return config, scale


def _hf_name_map(config: T5Config) -> List[Tuple[str, str, bool]]:
    """`(t5x name, HF name, transpose)` for every weight except the output layer."""
    entries: List[Tuple[str, str, bool]] = [("token_embedder/embedding", "shared.weight", False)]
    if len(config.mlp_activations) == 1:
        mlp = ["wi"]
    else:
        mlp = [f"wi_{k}" for k in range(len(config.mlp_activations))]
    mlp.append("wo")
    qkvo = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))

    def attention(ours: str, theirs: str) -> None:
        for t5x_name, hf_name in qkvo:
            entries.append((f"{ours}/{t5x_name}/kernel", f"{theirs}.{hf_name}.weight", True))

    def mlp_block(ours: str, theirs: str) -> None:
        for name in mlp:
            entries.append(
                (f"{ours}/mlp/{name}/kernel", f"{theirs}.DenseReluDense.{name}.weight", True)
            )

    for i in range(config.num_encoder_layers):
        ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
        attention(f"{ours}/attention", f"{theirs}.0.SelfAttention")
        entries.append(
            (f"{ours}/pre_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", False)
        )
        mlp_block(ours, f"{theirs}.1")
        entries.append((f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.1.layer_norm.weight", False))
    for i in range(config.num_decoder_layers):
        ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
        attention(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
        entries.append(
            (f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", False)
        )
        attention(f"{ours}/encoder_decoder_attention", f"{theirs}.1.EncDecAttention")
        entries.append(
            (f"{ours}/pre_cross_attention_layer_norm/scale", f"{theirs}.1.layer_norm.weight", False)
        )
        mlp_block(ours, f"{theirs}.2")
        entries.append((f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.2.layer_norm.weight", False))
    for stack, layers, norm in (
        ("encoder", config.num_encoder_layers, "encoder_norm"),
        ("decoder", config.num_decoder_layers, "decoder_norm"),
    ):
        if layers:
            # HF keeps the one shared bias table of a stack in its first block, [buckets, heads].
            entries.append(
                (
                    f"{stack}/relpos_bias/rel_embedding",
                    f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    True,
                )
            )
        entries.append((f"{stack}/{norm}/scale", f"{stack}.final_layer_norm.weight", False))
    return entries


def _read_safetensors(path: str) -> Dict[str, Tensor]:
    """The tensors of a safetensors file, memory-mapped (bfloat16 included, which the
    safetensors NumPy backend cannot represent): 8-byte header size, JSON header, raw
    row-major data. Reading a slice touches only the pages it covers."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is truncated (no safetensors header).")
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            raise UserError(f"{path} is truncated or not a safetensors file.")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:
            raise UserError(f"{path}: unreadable safetensors header: {e}") from None
    data_start = 8 + header_size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if data_start + end > size:
            raise UserError(
                f"{path} is truncated: tensor {name!r} needs bytes up to "
                f"{data_start + end}, the file has {size}."
            )
        if (end - begin) != math.prod(shape) * dtype.itemsize:
            raise UserError(f"{path}: tensor {name!r} byte range does not match its shape {shape}.")

        def read(index, offset=data_start + begin, dtype=dtype, shape=shape):
            if not math.prod(shape):
                return np.zeros(shape, dtype)[index]
            mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
            return np.array(mapped[index])  # copies only the slice

        tensors[name] = Tensor(shape, dtype, read)
    return tensors


def _read_torch_bin(path: str) -> Dict[str, Tensor]:
    """A PyTorch pickle: the format forces reading the whole file on every host."""
    try:
        import torch
    except ImportError:
        raise UserError(
            f"Reading {path} needs PyTorch (pip install torch), or save the model with "
            "safetensors (save_pretrained(..., safe_serialization=True))."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"Cannot read PyTorch weights {path} (truncated or corrupt?): {e}"
        ) from None
    tensors = {}
    for name, tensor in state.items():
        array = tensor.detach().float().numpy()
        tensors[name] = Tensor(
            array.shape, array.dtype, lambda index, a=array: a[index], whole_read=True
        )
    return tensors


def _read_hf_weights(directory: str) -> Dict[str, Tensor]:
    single = {"model.safetensors": _read_safetensors, "pytorch_model.bin": _read_torch_bin}
    for filename, reader in single.items():
        index_path = os.path.join(directory, filename + ".index.json")
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            return reader(path)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise UserError(f"{index_path} has no 'weight_map'.")
            tensors: Dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.isfile(shard_path):
                    raise UserError(f"Shard {shard_path} listed in {index_path} is missing.")
                tensors.update(reader(shard_path))
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise UserError(
                    f"{index_path} lists tensors absent from its shards: {absent[:10]}."
                )
            return tensors
    raise UserError(
        f"No weights in {directory}: expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json."
    )


def _transposed(tensor: Tensor, factor: float = 1.0) -> Tensor:
    """`tensor.T * factor` as a lazy tensor (a slice of the transpose reads the
    transposed slice of the source)."""

    def read(index):
        part = tensor.read(tuple(reversed(index))).T
        if factor != 1.0:
            part = np.asarray(part, np.float32) * np.float32(factor)
        return part

    dtype = tensor.dtype if factor == 1.0 else np.dtype(np.float32)
    return Tensor(tuple(reversed(tensor.shape)), dtype, read, tensor.whole_read)


def _equal_by_rows(a: Tensor, b: Tensor, rows: int = 4096) -> bool:
    """`a == b` elementwise, read in blocks of rows (bounded host memory)."""
    if a.shape != b.shape:
        return False
    for start in range(0, a.shape[0], rows):
        index = (slice(start, min(start + rows, a.shape[0])),) + tuple(
            slice(0, d) for d in a.shape[1:]
        )
        if not np.array_equal(a.read(index), b.read(index)):
            return False
    return True


def _read_config(path: str) -> Tuple[T5Config, bool]:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(f"Hugging Face model directory {path!r} does not exist.")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path!r} has no config.json; expected a save_pretrained directory.")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except ValueError as e:
        raise UserError(f"{config_path} is not valid JSON: {e}") from None
    return hf_config_to_t5(hf_config, where=config_path)


def open_hf_t5(path: str) -> Tuple[T5Config, WeightSource]:
    """A Hugging Face T5 directory as a T5Config and a lazy source of t5x parameters.

    Names, shapes and the output-layer decision are settled here (the tied check reads
    `lm_head` and `shared` in row blocks); the weights are read later, slice by slice.

    Raises:
      UserError: as `load_hf_t5`.
    """
    config, scale = _read_config(path)
    tensors = _read_hf_weights(path)

    shared = next((n for n in _HF_EMBEDDING_NAMES if n in tensors), None)
    if shared is None:
        raise UserError(
            f"{path}: no token embedding (expected one of {list(_HF_EMBEDDING_NAMES)})."
        )
    tensors = dict(tensors)
    tensors["shared.weight"] = tensors[shared]

    expected = t5_param_shapes(config.replace(logits_via_embedding=False))
    arch = (
        f"d_model={config.emb_dim}, num_heads={config.num_heads}, d_kv={config.head_dim}, "
        f"d_ff={config.mlp_dim}, vocab_size={config.vocab_size}, "
        f"relative_attention_num_buckets={config.relative_attention_num_buckets}"
    )
    params: Dict[str, Tensor] = {}
    missing, wrong = [], []
    used = {"shared.weight", shared}
    for ours, theirs, transpose in _hf_name_map(config):
        if theirs not in tensors:
            missing.append(theirs)
            continue
        used.add(theirs)
        tensor = tensors[theirs]
        want = expected[ours][::-1] if transpose else expected[ours]
        if tuple(tensor.shape) != tuple(want):
            wrong.append(
                f"  {theirs}: found {tuple(tensor.shape)}, expected {tuple(want)} (-> {ours})"
            )
            continue
        params[ours] = _transposed(tensor) if transpose else tensor

    # The output layer: tied means lm_head is absent or equal to the embedding.
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None:
        used.add("lm_head.weight")
        if tuple(lm_head.shape) != (config.vocab_size, config.emb_dim):
            wrong.append(
                f"  lm_head.weight: found {tuple(lm_head.shape)}, expected "
                f"{(config.vocab_size, config.emb_dim)}"
            )
    if missing or wrong:
        lines = [f"{path}: the weights do not fit config.json ({arch})."]
        if wrong:
            lines.append("Wrong shapes:\n" + "\n".join(wrong[:20]))
        if missing:
            lines.append(f"Missing weights ({len(missing)}): {missing[:20]}")
        raise UserError("\n".join(lines))
    unexpected = sorted(set(tensors) - used - _HF_IGNORED)
    if unexpected:
        raise UserError(
            f"{path}: unexpected weights for a T5ForConditionalGeneration with this "
            f"config ({arch}): {unexpected[:20]}"
        )
    tied = lm_head is None or _equal_by_rows(lm_head, tensors["shared.weight"])
    if tied and scale:
        config = config.replace(logits_via_embedding=True)
    else:
        # Untied, or tied without scaling (transformers>=5 ties by default): an explicit
        # kernel reproduces HF exactly, with any output scaling folded in.
        head = tensors["shared.weight"] if lm_head is None else lm_head
        factor = config.emb_dim**-0.5 if scale else 1.0
        params["decoder/logits_dense/kernel"] = _transposed(head, factor)
        config = config.replace(logits_via_embedding=False)
    return config, WeightSource(f"Hugging Face T5 {path}", params)


def load_hf_t5(path: str) -> Tuple[T5Config, Params]:
    """Loads a Hugging Face T5 (`save_pretrained` directory) as a T5Config and t5x params.

    Supports T5 v1.0 (`relu`, tied and scaled output layer), T5.1.1 / LM-adapted / mT5
    (`gated-gelu`, untied `lm_head`), and the other `feed_forward_proj` values t5x's
    MLP can express. Whole float32 NumPy arrays; for sharded loading into a model use
    `load_backbone`.

    Args:
      path: directory with `config.json` and the weights (safetensors or PyTorch,
        optionally sharded with an index file).

    Returns:
      `(config, params)`: float32 activations and the network's parameter tree.

    Raises:
      UserError: missing directory or files, an unsupported config, missing or
        unexpected weights, or weights whose shapes do not fit `config.json`.
    """
    config, source = open_hf_t5(path)
    params = {
        name: np.ascontiguousarray(np.asarray(a, np.float32))
        for name, a in gathered(source).items()
    }
    return config, unflatten_params(params)


def save_hf_t5(config: T5Config, params: Mapping[str, Any], path: str) -> str:
    """Writes `params` as a Hugging Face `T5ForConditionalGeneration` directory.

    `config.json` (both the transformers<5 `tie_word_embeddings` and the >=5
    `scale_decoder_outputs` conventions), `generation_config.json` (start token 0,
    eos 1, pad 0) and `model.safetensors` (float32).

    Args:
      config: the network's T5Config.
      params: its parameter tree (backbone only: method parameters have no HF place).
      path: output directory (created).

    Returns:
      `path`.

    Raises:
      ValueError: if `params` do not fit `config`, or the activations have no HF name.
    """
    import safetensors.numpy

    activations = tuple(config.mlp_activations)
    if activations not in _T5X_TO_HF_ACTIVATIONS:
        raise UserError(
            f"mlp_activations {activations} have no Hugging Face feed_forward_proj; "
            f"supported: {sorted(_T5X_TO_HF_ACTIVATIONS)}."
        )
    check_params_match(params, t5_param_shapes(config), source="parameters to export")
    flat = {name: np.asarray(value, np.float32) for name, value in flatten_params(params).items()}
    tensors = {}
    for ours, theirs, transpose in _hf_name_map(config):
        tensors[theirs] = np.ascontiguousarray(flat[ours].T if transpose else flat[ours])
    if not config.logits_via_embedding:
        tensors["lm_head.weight"] = np.ascontiguousarray(flat["decoder/logits_dense/kernel"].T)
    hf_config = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": _T5X_TO_HF_ACTIVATIONS[activations],
        "dropout_rate": float(config.dropout_rate),
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "scale_decoder_outputs": bool(config.logits_via_embedding),
        "torch_dtype": "float32",
    }
    generation_config = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(generation_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(
        tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"}
    )
    return path
