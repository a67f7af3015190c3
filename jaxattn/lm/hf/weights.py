"""The weight tables and the loader: chapters 3 to 5 of reading a checkpoint.

3. The weight tables, one per architecture: each row maps a checkpoint tensor (``{i}`` is
   the layer) to one or more jaxattn parameters and says how to convert it. This is the
   only place that knows the checkpoints' names (the docs print the tables).
4. ``SafetensorsFolder``: the tensors, read with ``safetensors``' NumPy API (sharded
   checkpoints through ``model.safetensors.index.json``). PyTorch is never imported.
5. ``load_hf_model``: every tensor converted, checked against the shape the config
   implies, cast to the dtype asked for, and only then put into a model, so that an
   error never leaves a half-loaded model behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read bf16 tensors)
import numpy as np
from flax import nnx, traverse_util

from jaxattn.lm.hf.config import LoadError, model_folder, read_hf_config, transformer_config
from jaxattn.lm.hf.tokenizer import load_tokenizer
from jaxattn.nn import TransformerConfig, TransformerLM

# --------------------------------------------------------------- 3. the weight tables


def _same(x, shapes):
    return (x,)


def _transpose(x, shapes):  # torch Linear [out, in] -> nnx.Linear kernel [in, out]
    return (x.T,)


def _heads(x, shapes):  # [H*D] -> [H, D]; GPT-2's Conv1D [H*E, C] -> [H, E, C]
    return (x.reshape(shapes[0]),)


def _transpose_heads(x, shapes):  # torch Linear [H*D, C] -> [C, H, D]; [C, H*E] -> [H, E, C]
    return (x.T.reshape(shapes[0]),)


def _split_three_heads(x, shapes):  # GPT-2's fused c_attn, Conv1D [C, 3C] (or bias [3C]) -> q, k, v in heads
    return tuple(part.reshape(shape) for part, shape in zip(np.split(x, 3, axis=-1), shapes))


@dataclass(frozen=True)
class Row:
    """One checkpoint tensor (``{i}``: the layer) -> jaxattn parameter path(s), via
    ``convert(tensor, target_shapes)``."""

    checkpoint: str
    params: tuple[str, ...]
    convert: Callable = _same


def _rows(*rows):
    return tuple(Row(name, (targets,) if isinstance(targets, str) else targets, *rest) for name, targets, *rest in rows)


GPT2_TABLE = _rows(
    ("wte.weight", "embed.embedding"),
    ("wpe.weight", "position_embed.embedding"),
    ("h.{i}.ln_1.weight", "blocks.{i}.attn_norm.scale"),
    ("h.{i}.ln_1.bias", "blocks.{i}.attn_norm.bias"),
    ("h.{i}.attn.c_attn.weight", ("blocks.{i}.attn.w_q", "blocks.{i}.attn.w_k", "blocks.{i}.attn.w_v"), _split_three_heads),
    ("h.{i}.attn.c_attn.bias", ("blocks.{i}.attn.b_q", "blocks.{i}.attn.b_k", "blocks.{i}.attn.b_v"), _split_three_heads),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.w_o", _heads),  # Conv1D stores [in, out] already
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.b_o"),
    ("h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.scale"),
    ("h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias"),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up.kernel"),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias"),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down.kernel"),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias"),
    ("ln_f.weight", "final_norm.scale"),
    ("ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

def _plus_one(x, shapes):  # Gemma's RMSNorm scales by (1 + w): the same norm with w + 1
    return ((x + 1.0).reshape(shapes[0]),)


def _split_qkv(x, shapes):  # Phi-3's fused qkv_proj [H*D + 2*K*D, C] -> q, k, v in heads
    sizes = [int(np.prod(shape)) // shape[0] for shape in shapes]  # the out-features of each: H*D, K*D, K*D
    q, k, v = np.split(x, np.cumsum(sizes)[:2], axis=0)
    return tuple(part.T.reshape(shape) for part, shape in zip((q, k, v), shapes))


def _split_gate_up(x, shapes):  # Phi-3's fused gate_up_proj [2F, C] -> gate, up kernels [C, F]
    return tuple(part.T for part in np.split(x, 2, axis=0))


def _split_neox_qkv(x, shapes):  # GPT-NeoX's query_key_value [H*3*D, C] (or bias [H*3*D]): per head q, k, v
    H, D = shapes[0][-2:] if len(shapes[0]) == 3 else shapes[0]
    grouped = x.reshape(H, 3, D, *x.shape[1:])  # [H, 3, D, C] or [H, 3, D]
    parts = (grouped[:, i] for i in range(3))
    if x.ndim == 2:
        return tuple(part.transpose(2, 0, 1) for part in parts)  # [C, H, D]
    return tuple(parts)  # [H, D]


def _attention_rows(prefix: str, *, bias: str = "qkv", norms=None, norm_convert=_heads):
    """The attention rows of a Llama-style layer: q/k/v/o projections (+ biases), QK-norm scales."""
    rows = [(f"{prefix}.{p}_proj.weight", f"blocks.{{i}}.attn.w_{p}", _transpose_heads) for p in "qkvo"]
    rows += [(f"{prefix}.{p}_proj.bias", f"blocks.{{i}}.attn.b_{p}", _heads) for p in "qkv"]
    rows += [(f"{prefix}.o_proj.bias", "blocks.{i}.attn.b_o")]
    if norms:
        rows += [(f"{prefix}.{p}_norm.weight", f"blocks.{{i}}.attn.{p}_norm", norm_convert) for p in "qk"]
    return rows


def _mlp_rows(prefix: str):
    return [*((f"{prefix}.{p}_proj.weight", f"blocks.{{i}}.mlp.{p}.kernel", _transpose) for p in ("gate", "up", "down")),
            *((f"{prefix}.{p}_proj.bias", f"blocks.{{i}}.mlp.{p}.bias") for p in ("gate", "up", "down"))]


LLAMA_TABLE = _rows(
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.scale"),
    *_attention_rows("model.layers.{i}.self_attn", norms=True),  # QK-norm: Qwen3 (per head)
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.scale"),
    *_mlp_rows("model.layers.{i}.mlp"),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

OLMO2_TABLE = _rows(  # norms after each sublayer; QK-norm over the whole projection
    ("model.embed_tokens.weight", "embed.embedding"),
    *_attention_rows("model.layers.{i}.self_attn", norms=True),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.attn_out_norm.scale"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.mlp_out_norm.scale"),
    *_mlp_rows("model.layers.{i}.mlp"),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

GEMMA_TABLE = _rows(  # four norms a layer, each stored as w for a scale of (1 + w)
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.scale", _plus_one),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.attn_out_norm.scale", _plus_one),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.mlp_norm.scale", _plus_one),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.mlp_out_norm.scale", _plus_one),
    *_attention_rows("model.layers.{i}.self_attn", norms=True, norm_convert=_plus_one),  # QK-norm: Gemma 3
    *_mlp_rows("model.layers.{i}.mlp"),
    ("model.norm.weight", "final_norm.scale", _plus_one),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

PHI3_TABLE = _rows(  # fused projections
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.scale"),
    ("model.layers.{i}.self_attn.qkv_proj.weight", ("blocks.{i}.attn.w_q", "blocks.{i}.attn.w_k", "blocks.{i}.attn.w_v"),
     _split_qkv),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.w_o", _transpose_heads),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.scale"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", ("blocks.{i}.mlp.gate.kernel", "blocks.{i}.mlp.up.kernel"),
     _split_gate_up),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.kernel", _transpose),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

GPT_NEOX_TABLE = _rows(  # q, k, v fused per head; LayerNorms; a parallel residual
    ("gpt_neox.embed_in.weight", "embed.embedding"),
    ("gpt_neox.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.scale"),
    ("gpt_neox.layers.{i}.input_layernorm.bias", "blocks.{i}.attn_norm.bias"),
    ("gpt_neox.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.scale"),
    ("gpt_neox.layers.{i}.post_attention_layernorm.bias", "blocks.{i}.mlp_norm.bias"),
    ("gpt_neox.layers.{i}.attention.query_key_value.weight",
     ("blocks.{i}.attn.w_q", "blocks.{i}.attn.w_k", "blocks.{i}.attn.w_v"), _split_neox_qkv),
    ("gpt_neox.layers.{i}.attention.query_key_value.bias",
     ("blocks.{i}.attn.b_q", "blocks.{i}.attn.b_k", "blocks.{i}.attn.b_v"), _split_neox_qkv),
    ("gpt_neox.layers.{i}.attention.dense.weight", "blocks.{i}.attn.w_o", _transpose_heads),
    ("gpt_neox.layers.{i}.attention.dense.bias", "blocks.{i}.attn.b_o"),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", "blocks.{i}.mlp.up.kernel", _transpose),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", "blocks.{i}.mlp.up.bias"),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", "blocks.{i}.mlp.down.kernel", _transpose),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", "blocks.{i}.mlp.down.bias"),
    ("gpt_neox.final_layer_norm.weight", "final_norm.scale"),
    ("gpt_neox.final_layer_norm.bias", "final_norm.bias"),
    ("embed_out.weight", "unembed.kernel", _transpose),
)

WEIGHT_TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE, "mistral": LLAMA_TABLE, "qwen2": LLAMA_TABLE,
                 "qwen3": LLAMA_TABLE, "smollm3": LLAMA_TABLE, "olmo2": OLMO2_TABLE, "gemma2": GEMMA_TABLE,
                 "gemma3_text": GEMMA_TABLE, "gemma3": GEMMA_TABLE, "phi3": PHI3_TABLE, "gpt_neox": GPT_NEOX_TABLE}
# Names a checkpoint may hold that are buffers, not parameters (causal-mask caches, RoPE tables).
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|attention\.(masked_)?bias$")
# Prefixes the checkpoint's names carry where the table has another (checkpoint prefix -> table
# prefix): GPT2LMHeadModel's "transformer.", and Gemma 3's multimodal model, which keeps its text
# model under "language_model." (as published, and as transformers saves it) or, as transformers
# names it in memory, "model.language_model.".
PREFIXES = {"gpt2": (("transformer.", ""),),
            "gemma3": (("language_model.", ""), ("model.language_model.", "model."))}
# What a multimodal checkpoint holds beside the text model: not loaded, not an error.
OTHER_MODALITIES = {"gemma3": re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")}


# ------------------------------------------------------------- 4. reading the tensors


class SafetensorsFolder:
    """The tensors of a checkpoint folder: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json``, or every ``*.safetensors`` file. NumPy arrays only."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as error:
                raise LoadError(f"{str(index)!r} is unreadable: {error}") from error
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                binaries = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
                hint = f" (found {', '.join(binaries)}: PyTorch pickles are not read; save with safe_serialization)" if binaries else ""
                raise LoadError(f"{str(self.folder)!r} holds no *.safetensors weights{hint}")
        self.file_of: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise LoadError(f"{str(index)!r} lists {name!r}, which does not exist")
            for key in self._open(path).keys():
                self.file_of[key] = name

    def _open(self, path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(str(path), framework="np")
        except (SafetensorError, OSError, ValueError) as error:
            raise LoadError(f"{str(path)!r} is not a readable safetensors file: {error}") from error

    def names(self) -> list[str]:
        return list(self.file_of)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise KeyError(name)
        path = self.folder / self.file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except Exception as error:  # a damaged data section
            raise LoadError(f"tensor {name!r} in {str(path)!r} cannot be read: {error}") from error


# ------------------------------------------------------------- 5. into a TransformerLM


def _expand(row: Row, layers: int):
    if "{i}" not in row.checkpoint:
        return [(row.checkpoint, row.params)]
    return [(row.checkpoint.format(i=i), tuple(p.format(i=i) for p in row.params)) for i in range(layers)]


def _key(path: str) -> tuple:
    """``"blocks.3.attn.w_q"`` -> the parameter's key in a flattened state dict."""
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


def read_weights(tensors: SafetensorsFolder, model_type: str, config: TransformerConfig, expected: dict) -> dict:
    """Every parameter of ``expected`` (``flax.traverse_util.flatten_dict`` of the model's
    state: key tuple -> ShapeDtypeStruct) from the checkpoint, as key tuple -> array in the
    config's dtype. Errors name the tensor and its file."""
    def unprefixed(name):
        for prefix, replacement in PREFIXES.get(model_type, ()):
            if name.startswith(prefix):
                return replacement + name.removeprefix(prefix)
        return name

    other = OTHER_MODALITIES.get(model_type)
    available = {unprefixed(name): name for name in tensors.names() if other is None or not other.search(name)}
    weights, used = {}, set()
    for row in WEIGHT_TABLES[model_type]:
        for name, targets in _expand(row, config.layers):
            if not all(_key(target) in expected for target in targets):
                continue  # the model has no such parameter (no bias, tied head, no learned positions)
            if name not in available:
                where = ", ".join(sorted(set(tensors.file_of.values())))
                raise LoadError(f"tensor {name!r} (for {', '.join(targets)}) is missing from {where} in {str(tensors.folder)!r}")
            raw = tensors[available[name]]
            used.add(name)
            wants = tuple(tuple(expected[_key(target)].shape) for target in targets)

            def mismatch(got, target, want):
                return LoadError(
                    f"tensor {name!r} in {tensors.file_of[available[name]]!r} has shape {raw.shape}, which gives "
                    f"{got} for {target}; the config.json ({_describe(config)}) needs {want}"
                )

            try:
                converted = row.convert(raw, wants)
            except ValueError as error:  # a reshape into heads that cannot fit
                raise mismatch("no fit", ", ".join(targets), ", ".join(map(str, wants))) from error
            for target, array, want in zip(targets, converted, wants):
                if array.shape != want:
                    raise mismatch(array.shape, target, want)
                weights[_key(target)] = np.asarray(array).astype(jnp.dtype(config.dtype))
    tied_head = config.tied_embeddings and "lm_head.weight" in available
    unexpected = [n for n in available if n not in used and not IGNORED.search(n) and not (tied_head and n == "lm_head.weight")]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:6]) + (" ..." if len(unexpected) > 6 else "")
        raise LoadError(
            f"{str(tensors.folder)!r} holds {len(unexpected)} tensor(s) that this {model_type!r} configuration has no "
            f"place for: {shown} (a feature jaxattn does not implement, or a config.json that does not match)"
        )
    missing = sorted(".".join(map(str, key)) for key in set(expected) - set(weights))
    if missing:
        raise LoadError(f"no tensor of the checkpoint fills {', '.join(missing[:6])}")
    return weights


def _describe(config: TransformerConfig) -> str:
    return (f"width={config.width}, layers={config.layers}, heads={config.heads}, kv_heads={config.kv_heads}, "
            f"head_dim={config.head_dim}, mlp_hidden={config.mlp_hidden}, vocab_size={config.vocab_size}")


def load_hf_model(name, *, dtype: str = "float32"):
    """A Hugging Face causal LM as ``(TransformerLM, tokenizer)``.

    ``name``: a local folder (``config.json``, ``*.safetensors``, optionally
    ``tokenizer.json``) or a hub id. ``dtype``: of the parameters and the computation.
    The tokenizer is an ``HFTokenizer``, or ``None`` when the folder has no
    ``tokenizer.json``. Raises ``LoadError``; never returns a half-loaded model.
    """
    folder = model_folder(name)
    hf = read_hf_config(folder)
    config = transformer_config(hf, dtype=dtype)
    abstract_model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_state))
    weights = read_weights(SafetensorsFolder(folder), hf["model_type"], config, expected)
    params = traverse_util.unflatten_dict({key: jnp.asarray(value) for key, value in weights.items()})
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state), load_tokenizer(folder, hf)
