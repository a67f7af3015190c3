"""Real checkpoints: Hugging Face folders of GPT-2, Llama (1-3.x, with every RoPE scaling),
Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), OLMo 2, Phi-3/4-mini, GPT-NeoX/Pythia
and SmolLM3 as a ``TransformerLM``, with their tokenizer as transformers reads it (special
tokens, chat template, end-of-sequence ids); and one DeepSeek-V2/V3 attention layer as MLA.

The chapter, in the order a checkpoint is read:

1. ``model_folder``: a local folder, or a hub id fetched with ``huggingface_hub``
   (safetensors, config and tokenizer files only).
2. ``transformer_config``: ``config.json`` -> ``TransformerConfig``, one function per
   ``model_type``; a setting that would change the maths without jaxattn following it
   (rope scaling, another activation, ...) is an error that says what is supported.
3. The weight tables, one per architecture: each row maps a checkpoint tensor (``{i}`` is
   the layer) to one or more jaxattn parameters and says how to convert it. This is the
   only place that knows the checkpoints' names (the README prints the tables).
4. ``SafetensorsFolder``: the tensors, read with ``safetensors``' NumPy API (sharded
   checkpoints through ``model.safetensors.index.json``). PyTorch is never imported.
5. ``load_hf_model``: every tensor converted, checked against the shape the config
   implies, cast to the dtype asked for, and only then put into a model, so that an
   error never leaves a half-loaded model behind.
6. ``HFTokenizer``: ``tokenizer.json`` through the ``tokenizers`` library, with the
   settings of ``tokenizer_config.json`` that transformers honours; the chat template
   rendered as transformers renders it; ``stop_ids``: the ids that end generation.
7. ``mla_from_hf``: DeepSeek's MLA weights (``q_a_proj`` ... ``o_proj``) as ``MLAParams``.
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

from jaxattn.functional import MLAParams, MLASettings, Rope, RopeScaling
from jaxattn.nn import MultiHeadLatentAttention, TransformerConfig, TransformerLM

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "olmo2", "phi3",
                         "gpt_neox", "smollm3")
DTYPES = ("float32", "bfloat16", "float16")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class LoadError(ValueError):
    """A checkpoint that cannot be read as asked: missing or damaged files, unsupported
    settings, tensors that do not fit the configuration. The message names the file or
    tensor."""


# ------------------------------------------------------------------ 1. the files


def model_folder(name) -> Path:
    """A local Hugging Face model folder, or a hub id downloaded into the local cache.

    Only safetensors weights, JSON configs and tokenizer files are fetched.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path.is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:
        raise LoadError(f"model folder {str(name)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(name), allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown repository, gated model, ...
        raise LoadError(
            f"could not fetch {str(name)!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Without network access, download the model elsewhere (config.json, *.safetensors, tokenizer.json) "
            "and pass its local folder instead, e.g. `jaxattn inspect ./gpt2 \"some text\"`"
        ) from error


def read_hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LoadError(f"{str(folder)!r} has no config.json: not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoadError(f"{str(path)!r} is unreadable: {error}") from error


# ----------------------------------------------------------- 2. config.json -> config


def _require(hf: dict, condition: bool, setting: str, supported: str) -> None:
    if not condition:
        raise LoadError(
            f"{hf.get('model_type')!r} checkpoint sets {setting}, which jaxattn does not implement "
            f"(it would change the maths); supported: {supported}"
        )


# Hugging Face's RoPE types -> jaxattn's RopeScaling kinds; "su" and Phi-3's "yarn" were LongRoPE's old names.
ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic", "llama3": "llama3", "yarn": "yarn", "longrope": "longrope"}
LAYER_KINDS = {"full_attention": "global", "sliding_attention": "local"}


def _rope_parameters(hf: dict, layer_type: str | None = None, default_theta: float = 10000.0) -> dict:
    """One layer type's RoPE parameters as transformers standardises them: ``rope_parameters``
    (flat, or nested by layer type, transformers >= 5), else ``rope_scaling`` with ``rope_theta``
    (older configs); ``rope_type`` "default" when nothing scales."""
    nested = hf.get("rope_parameters") or {}
    if layer_type is not None and isinstance(nested.get(layer_type), dict):
        parameters = dict(nested[layer_type])
    elif nested and not any(isinstance(value, dict) for value in nested.values()):
        parameters = dict(nested)
    else:
        parameters = dict(hf.get("rope_scaling") or {})
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    parameters.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if "partial_rotary_factor" in hf:
        parameters.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if parameters["rope_type"] in ("llama3", "yarn", "longrope"):
        parameters.setdefault("original_max_position_embeddings",
                              hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    return parameters


def _rope(hf: dict, layer_type: str | None = None, default_theta: float = 10000.0, *, allow=("default",) + tuple(ROPE_TYPES)):
    """``(theta, RopeScaling | None, rotary fraction)`` of one layer type; a RoPE type jaxattn
    does not implement (or the family does not use) is refused by name."""
    parameters = _rope_parameters(hf, layer_type, default_theta)
    kind = parameters["rope_type"]
    if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"
    _require(hf, kind in allow, f"rope_type={kind!r}", ", ".join(repr(k) for k in allow))
    fraction = float(parameters.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return float(parameters["rope_theta"]), None, fraction
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "short_factor", "long_factor"}
    unknown = sorted(set(parameters) - known)
    _require(hf, not unknown, f"rope parameters {unknown}", f"{sorted(known)}")
    scaling = RopeScaling(
        kind=ROPE_TYPES[kind], factor=parameters.get("factor"), original_max_length=parameters.get(
            "original_max_position_embeddings"), max_length=hf.get("max_position_embeddings"),
        low_freq_factor=parameters.get("low_freq_factor", 1.0), high_freq_factor=parameters.get("high_freq_factor", 4.0),
        beta_fast=parameters.get("beta_fast") or 32.0, beta_slow=parameters.get("beta_slow") or 1.0,
        mscale=parameters.get("mscale"), mscale_all_dim=parameters.get("mscale_all_dim"),
        attention_factor=parameters.get("attention_factor"), truncate=parameters.get("truncate", True),
        short_factor=parameters.get("short_factor"), long_factor=parameters.get("long_factor"),
    )
    return float(parameters["rope_theta"]), scaling, fraction


def _layer_types(hf: dict, layers: int):
    """Each layer ``"global"`` or ``"local"`` from ``layer_types`` (what transformers saves), else
    from the family's own rule (a window on every layer, Qwen's ``max_window_layers``, Gemma's
    alternation); ``None`` when every layer is global."""
    model_type = hf.get("model_type")
    types = hf.get("layer_types")
    if types is None:
        window = hf.get("sliding_window")
        if model_type in ("mistral", "phi3"):
            types = ["sliding_attention" if window else "full_attention"] * layers
        elif model_type in ("qwen2", "qwen3"):
            use = hf.get("use_sliding_window", False) and window is not None
            types = ["sliding_attention" if use and i >= hf.get("max_window_layers", 28) else "full_attention"
                     for i in range(layers)]
        elif model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        elif model_type == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        elif model_type == "smollm3":
            use = hf.get("use_sliding_window", False) and window is not None
            types = ["sliding_attention" if use and not uses_rope else "full_attention"
                     for uses_rope in _smollm3_rope_layers(hf, layers)]
        else:
            types = ["full_attention"] * layers
    unknown = sorted(set(types) - set(LAYER_KINDS))
    _require(hf, not unknown and len(types) == layers, f"layer_types={types}",
             f"one of {sorted(LAYER_KINDS)} for each of the {layers} layers")
    kinds = tuple(LAYER_KINDS[t] for t in types)
    if "local" in kinds:
        _require(hf, hf.get("sliding_window") is not None, "sliding layers without sliding_window", "a sliding_window")
    return None if "local" not in kinds else kinds


def _smollm3_rope_layers(hf: dict, layers: int) -> list[int]:
    """SmolLM3's ``no_rope_layers``: 1 where a layer uses RoPE, 0 where it has none."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    return list(flags)


def _gpt2_config(hf: dict, dtype: str) -> TransformerConfig:
    activation = hf.get("activation_function", "gelu_new")
    _require(hf, activation in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function={activation!r}",
             "'gelu_new' / 'gelu_pytorch_tanh' (GELU, tanh form)")
    _require(hf, not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true",
             "false (logits scaled by 1/sqrt(D) only)")
    _require(hf, hf.get("scale_attn_weights", True), "scale_attn_weights=false", "true")
    C, heads = hf["n_embd"], hf["n_head"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"], width=C, layers=hf["n_layer"], heads=heads, kv_heads=heads, head_dim=C // heads,
        mlp="gelu", mlp_hidden=hf.get("n_inner") or 4 * C, positions="learned", norm="layer",
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), tied_embeddings=hf.get("tie_word_embeddings", True),
        max_length=hf["n_positions"], dtype=dtype, qkv_bias=True, out_bias=True, mlp_bias=True,
    )


def _decoder(hf: dict, dtype: str, **overrides) -> dict:
    """The fields most decoders share (Llama's names), as ``TransformerConfig`` keywords."""
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    fields = dict(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], layers=layers, heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp="swiglu", mlp_hidden=hf["intermediate_size"], positions="rope", rope_style="half", norm="rms",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), tied_embeddings=hf.get("tie_word_embeddings", False),
        max_length=hf.get("max_position_embeddings", 2048), dtype=dtype,
    )
    return {**fields, **overrides}


def _with_rope(hf: dict, fields: dict, *, global_type: str | None = None, local_type: str | None = None,
               default_theta: float = 10000.0, default_local_theta: float | None = None) -> dict:
    """The RoPE fields: the global layers' base, scaling and rotary fraction; local layers' own
    base when their RoPE differs (Gemma 3), which must then be plain."""
    theta, scaling, fraction = _rope(hf, global_type, default_theta)
    fields.update(rope_theta=theta, rope_scaling=scaling, rotary_fraction=fraction)
    if scaling is not None and scaling.kind in ("linear", "dynamic"):  # max_position_embeddings is the trained length
        fields["max_length"] = int(fields["max_length"] * scaling.factor)
    kinds = fields.get("layer_types") or ()
    if local_type is not None and "local" in kinds:
        local_theta, local_scaling, local_fraction = _rope(hf, local_type, default_local_theta or default_theta,
                                                           allow=("default",))
        _require(hf, local_fraction == fraction, f"partial_rotary_factor {local_fraction} on sliding layers",
                 f"the global layers' {fraction}")
        if local_theta != theta or scaling is not None:
            fields["local_rope_theta"] = local_theta
    return fields


def _llama_config(hf: dict, dtype: str) -> TransformerConfig:
    model_type = hf["model_type"]
    activation = hf.get("hidden_act", "silu")
    _require(hf, activation == "silu", f"hidden_act={activation!r}", "'silu' (SwiGLU)")
    attention_bias = hf.get("attention_bias", False)
    fields = _decoder(hf, dtype, qkv_bias=model_type == "qwen2" or attention_bias, out_bias=attention_bias
                      if model_type != "qwen2" else False, mlp_bias=hf.get("mlp_bias", False))
    kinds = _layer_types(hf, fields["layers"])
    fields.update(layer_types=kinds, window=hf.get("sliding_window") if kinds else None)
    if model_type == "qwen3":
        fields["qk_norm"] = "head"
    if model_type == "olmo2":
        fields.update(qk_norm="projection", norm_placement="post")
    if model_type == "smollm3":
        fields["nope_layers"] = tuple(i for i, uses in enumerate(_smollm3_rope_layers(hf, fields["layers"])) if not uses)
    if kinds is not None and all(kind == "local" for kind in kinds):
        fields["layer_types"] = None  # one window on every layer: the plain windowed model
    return TransformerConfig(**_with_rope(hf, fields))


def _gemma_config(hf: dict, dtype: str) -> TransformerConfig:
    model_type = hf["model_type"]
    activation = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    _require(hf, activation in ("gelu_pytorch_tanh", "gelu_new"), f"hidden_activation={activation!r}",
             "'gelu_pytorch_tanh' (GeGLU, tanh form)")
    _require(hf, not hf.get("use_bidirectional_attention", False), "use_bidirectional_attention=true", "false")
    attention_bias = hf.get("attention_bias", False)
    fields = _decoder(hf, dtype, mlp="geglu", norm_placement="sandwich", embed_scale=True,
                      tied_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=attention_bias,
                      out_bias=attention_bias, attention_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                      attention_softcap=hf.get("attn_logit_softcapping"),
                      final_softcap=hf.get("final_logit_softcapping"))
    kinds = _layer_types(hf, fields["layers"])
    fields.update(layer_types=kinds, window=hf.get("sliding_window") if kinds else None)
    if model_type == "gemma3_text":
        fields["qk_norm"] = "head"
        if hf.get("rope_local_base_freq") is not None:  # older configs: the local base beside rope_theta
            hf = {**hf, "rope_parameters": {"full_attention": _rope_parameters(hf, None, 1_000_000.0),
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": hf["rope_local_base_freq"]}}}
        return TransformerConfig(**_with_rope(hf, fields, global_type="full_attention", local_type="sliding_attention",
                                              default_theta=1_000_000.0, default_local_theta=10_000.0))
    return TransformerConfig(**_with_rope(hf, fields))


def _phi3_config(hf: dict, dtype: str) -> TransformerConfig:
    activation = hf.get("hidden_act", "silu")
    _require(hf, activation == "silu", f"hidden_act={activation!r}", "'silu' (SwiGLU)")
    fields = _decoder(hf, dtype)
    kinds = _layer_types(hf, fields["layers"])
    fields.update(window=hf.get("sliding_window") if kinds else None)
    return TransformerConfig(**_with_rope(hf, fields))


def _gpt_neox_config(hf: dict, dtype: str) -> TransformerConfig:
    activation = hf.get("hidden_act", "gelu")
    _require(hf, activation in ("gelu", "gelu_new", "gelu_pytorch_tanh"), f"hidden_act={activation!r}",
             "'gelu' (exact) or 'gelu_new' (tanh)")
    heads, C = hf["num_attention_heads"], hf["hidden_size"]
    attention_bias = hf.get("attention_bias", True)
    parameters = dict(hf)
    if "rotary_pct" in hf:  # older configs
        parameters["partial_rotary_factor"] = hf["rotary_pct"]
    parameters.setdefault("partial_rotary_factor", 0.25)
    if "rotary_emb_base" in hf:
        parameters["rope_theta"] = hf["rotary_emb_base"]
    fields = dict(
        vocab_size=hf["vocab_size"], width=C, layers=hf["num_hidden_layers"], heads=heads, kv_heads=heads,
        head_dim=C // heads, mlp="gelu_exact" if activation == "gelu" else "gelu", mlp_hidden=hf["intermediate_size"],
        positions="rope", rope_style="half", norm="layer", norm_epsilon=hf.get("layer_norm_eps", 1e-5),
        tied_embeddings=hf.get("tie_word_embeddings", False), max_length=hf.get("max_position_embeddings", 2048),
        dtype=dtype, qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
    )
    return TransformerConfig(**_with_rope(parameters, fields))


def _gemma3_config(hf: dict, dtype: str) -> TransformerConfig:
    """Gemma 3's multimodal checkpoint: its text model (the vision tower is not loaded)."""
    text = dict(hf.get("text_config") or {})
    _require(hf, text != {}, "no text_config", "a text_config")
    return _gemma_config({**text, "model_type": "gemma3_text"}, dtype)


CONFIGS = {"gpt2": _gpt2_config, "llama": _llama_config, "mistral": _llama_config, "qwen2": _llama_config,
           "qwen3": _llama_config, "olmo2": _llama_config, "smollm3": _llama_config, "gemma2": _gemma_config,
           "gemma3_text": _gemma_config, "gemma3": _gemma3_config, "phi3": _phi3_config, "gpt_neox": _gpt_neox_config}


def transformer_config(hf: dict, *, dtype: str = "float32") -> TransformerConfig:
    """``config.json`` (as a dict) -> the ``TransformerConfig`` of the same network."""
    model_type = hf.get("model_type")
    if model_type not in CONFIGS:
        raise LoadError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    try:
        return CONFIGS[model_type](hf, dtype)
    except KeyError as error:
        raise LoadError(f"config.json of this {model_type!r} checkpoint lacks {error}") from error
    except ValueError as error:
        if isinstance(error, LoadError):
            raise
        raise LoadError(f"config.json of this {model_type!r} checkpoint does not make a model: {error}") from error


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


# ------------------------------------------------------------------ 6. the tokenizer

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A checkpoint's tokenizer as ``transformers`` applies it, with the interface of jaxattn's
    byte tokenizer: ``encode(text) -> int32 [N]``, ``decode(ids) -> str``, ``label(id)``,
    ``vocab_size``, ``stop_ids``.

    The rule is "the same ids as ``AutoTokenizer.from_pretrained(folder)(text)``": the
    ``tokenizer.json`` pipeline with its post-processor (the BOS/EOS template), which
    ``tokenizer_config.json``'s ``add_bos_token``/``add_eos_token`` replace when they are set
    (as transformers does); ``decode`` skips special tokens by default and cleans up spaces
    only where transformers would (``clean_up_tokenization_spaces``, not for BPE models).
    ``apply_chat_template`` renders the checkpoint's chat template as transformers renders it.
    ``stop_ids``: the tokens that end a sequence (``generation_config.json``'s ``eos_token_id``,
    else ``config.json``'s; an int or a list).
    """

    def __init__(self, tokenizer, config: dict | None = None, *, chat_template: str | None = None,
                 stop_ids: tuple[int, ...] = (), pad_id: int | None = None):
        from tokenizers import processors

        self.tokenizer = tokenizer
        config = config or {}
        self.special_tokens = {name: _token_text(config[name]) for name in NAMED_SPECIAL_TOKENS
                               if _token_text(config.get(name)) is not None}
        missing = [token for token in self.special_tokens.values() if tokenizer.token_to_id(token) is None]
        if missing:  # transformers adds named special tokens the vocabulary lacks
            tokenizer.add_special_tokens(missing)
        if "add_bos_token" in config or "add_eos_token" in config or tokenizer.post_processor is None:
            bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
            add_bos = bool(config.get("add_bos_token", False)) and bos is not None
            add_eos = bool(config.get("add_eos_token", False)) and eos is not None
            single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
            pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
            specials = [(token, tokenizer.token_to_id(token)) for token, used in ((bos, add_bos), (eos, add_eos)) if used]
            tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and \
            json.loads(tokenizer.to_str())["model"]["type"] != "BPE"
        self.chat_template = chat_template
        self.stop_ids = tuple(stop_ids)
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids of the special tokens (BOS, EOS, chat markers ...), which text never holds."""
        return tuple(sorted(i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
        """``text`` -> int32 ``[N]`` ids, with the checkpoint's special tokens (BOS ...) unless
        ``add_special_tokens=False`` (a rendered chat already holds them)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def label(self, token: int) -> str:
        """How one token reads on its own (spaces shown as ␣)."""
        text = self.tokenizer.decode([int(token)], skip_special_tokens=False)
        return (text or self.tokenizer.id_to_token(int(token)) or "?").replace(" ", "␣").replace("\n", "\\n")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to read it: the checkpoint's Jinja chat
        template, rendered as transformers renders it (a sandbox, ``trim_blocks``,
        ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, the special tokens as variables)."""
        if self.chat_template is None:
            raise LoadError("this checkpoint has no chat template (no chat_template.jinja, and none in "
                            "tokenizer_config.json): it is not an instruct model; use --prompt instead of --chat")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> np.ndarray:
        """The rendered conversation's ids; it already holds its special tokens, so none are added (no double BOS)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    """Renders a Hugging Face chat template: Jinja in an immutable sandbox with ``trim_blocks``
    and ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text, and the
    globals chat templates call (``raise_exception``, ``strftime_now``)."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **variables)
    except jinja2.exceptions.TemplateError as error:
        raise LoadError(f"the chat template could not be rendered: {error}") from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        raise LoadError(f"{str(path)!r} is unreadable: {error}") from error


def _chat_template(folder: Path, config: dict) -> str | None:
    """``chat_template.jinja`` (what transformers saves now), else ``chat_template.json``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template


def stop_ids(folder: Path, hf: dict) -> tuple[tuple[int, ...], int | None]:
    """``(eos ids, pad id)`` for generation, as transformers reads them: ``generation_config.json``
    when the folder has one (its ``eos_token_id`` may be null: then nothing stops early), else
    ``config.json`` (of the text model of a multimodal checkpoint too)."""
    path = Path(folder) / "generation_config.json"
    sources = (_read_json(path),) if path.is_file() else (hf, hf.get("text_config") or {})
    eos = next((source["eos_token_id"] for source in sources if source.get("eos_token_id") is not None), None)
    pad = next((source["pad_token_id"] for source in sources if source.get("pad_token_id") is not None), None)
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return tuple(int(i) for i in eos), pad if pad is None else int(pad)


def load_tokenizer(folder: Path, hf: dict | None = None):
    """The folder's ``HFTokenizer`` (``tokenizer.json`` and, when present, ``tokenizer_config.json``,
    the chat template, the stop tokens), or ``None`` without a ``tokenizer.json``."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable tokenizer: {error}") from error
    config = _read_json(folder / "tokenizer_config.json")
    eos, pad = stop_ids(folder, hf if hf is not None else read_hf_config(folder))
    return HFTokenizer(backend, config, chat_template=_chat_template(folder, config), stop_ids=eos, pad_id=pad)


# ------------------------------------------------------------ 7. DeepSeek's MLA layer

MLA_LATENT_NORM_EPSILON = 1e-6


def mla_from_hf(tensors, hf: dict, *, prefix: str = "", dtype: str = "float32"):
    """One DeepSeek-V2/V3 attention layer's weights as ``(MLAParams, MLASettings)``.

    ``tensors``: a mapping from names to arrays (e.g. ``SafetensorsFolder`` or a dict);
    ``prefix``: the layer's prefix, e.g. ``"model.layers.0.self_attn."``. ``hf``: the
    ``config.json`` dict (``num_attention_heads`` H, ``qk_nope_head_dim`` D,
    ``qk_rope_head_dim`` R, ``v_head_dim`` E, ``kv_lora_rank`` L, ``q_lora_rank`` P or null,
    ``rope_interleave``). The settings (its RoPE, the latent norms' epsilon) go to the
    ``mla_*`` functions or the module.

    The latent norms' epsilon is 1e-6 whatever ``rms_norm_eps`` says: DeepSeek's code and
    transformers build ``q_a_layernorm``/``kv_a_layernorm`` with their default epsilon
    (``rms_norm_eps`` is the decoder layers' norms'); the parity test found it.

    ``kv_a_proj_with_mqa [L + R, C]`` splits into ``w_dkv`` and ``w_kr``; ``kv_b_proj
    [H (D + E), L]`` into ``w_uk`` and ``w_uv``; ``q_b_proj [H (D + R), P]`` (or ``q_proj``)
    into the content and RoPE queries.
    """
    H, D, R, E, L = (hf[key] for key in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                         "kv_lora_rank"))
    P = hf.get("q_lora_rank")
    _require(hf, not hf.get("attention_bias", False), "attention_bias=true", "attention_bias=false")

    def get(name, shape=None):
        key = prefix + name
        try:
            array = np.asarray(tensors[key])
        except KeyError as error:
            raise LoadError(f"tensor {key!r} is missing") from error
        if shape is not None and array.shape != shape:
            raise LoadError(f"tensor {key!r} has shape {array.shape}; the config needs {shape}")
        return array.astype(np.float32)

    C = get("kv_a_proj_with_mqa.weight").shape[-1]  # the model width, read off the first projection
    kv_a = get("kv_a_proj_with_mqa.weight", (L + R, C))
    kv_b = get("kv_b_proj.weight", (H * (D + E), L)).reshape(H, D + E, L)
    fields = dict(
        w_dkv=kv_a[:L].T,  # [C, L]
        w_kr=kv_a[L:].T,  # [C, R]
        kv_norm=get("kv_a_layernorm.weight", (L,)),
        w_uk=kv_b[:, :D].transpose(2, 0, 1),  # [L, H, D]
        w_uv=kv_b[:, D:].transpose(2, 0, 1),  # [L, H, E]
        w_o=get("o_proj.weight", (C, H * E)).T.reshape(H, E, C),
    )
    if P:
        q_b = get("q_b_proj.weight", (H * (D + R), P)).reshape(H, D + R, P)
        fields.update(w_dq=get("q_a_proj.weight", (P, C)).T, q_norm=get("q_a_layernorm.weight", (P,)),
                      w_uq=q_b[:, :D].transpose(2, 0, 1), w_qr=q_b[:, D:].transpose(2, 0, 1))
    else:
        q = get("q_proj.weight", (H * (D + R), C)).reshape(H, D + R, C)
        fields.update(w_q=q[:, :D].transpose(2, 0, 1), w_qr=q[:, D:].transpose(2, 0, 1))
    params = MLAParams(**{name: jnp.asarray(value, jnp.dtype(dtype)) for name, value in fields.items()})
    theta, scaling, _ = _rope(hf, allow=("default", "yarn"))
    settings = MLASettings(rope=Rope(theta, "interleaved" if hf.get("rope_interleave", True) else "half", scaling=scaling),
                           epsilon=MLA_LATENT_NORM_EPSILON)
    return params, settings


def mla_layer_from_hf(tensors, hf: dict, *, prefix: str = "", dtype: str = "float32") -> MultiHeadLatentAttention:
    """The same weights as a ``MultiHeadLatentAttention`` module."""
    params, settings = mla_from_hf(tensors, hf, prefix=prefix, dtype=dtype)
    L, H, D = params.w_uk.shape
    layer = MultiHeadLatentAttention(
        params.w_dkv.shape[0], heads=H, head_dim=D, value_dim=params.w_uv.shape[-1], latent_dim=L,
        rope_dim=params.w_kr.shape[-1], query_latent_dim=None if params.w_dq is None else params.w_dq.shape[-1],
        settings=settings, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0),
    )
    for name, value in params._asdict().items():
        if value is not None:
            getattr(layer, name)[...] = value
    return layer
