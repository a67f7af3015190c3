"""From a checkpoint's folder to a ``TransformerConfig``: chapters 1 and 2 of reading a checkpoint.

1. ``model_folder``: a local folder, or a hub id fetched with ``huggingface_hub``
   (safetensors, config and tokenizer files only).
2. ``transformer_config``: ``config.json`` -> ``TransformerConfig``, one function per
   ``model_type``; a setting that would change the maths without jaxattn following it
   (rope scaling, another activation, ...) is an error that says what is supported.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxattn.functional import RopeScaling
from jaxattn.nn import TransformerConfig

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


def require_setting(hf: dict, condition: bool, setting: str, supported: str) -> None:
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


def rope_from_hf(hf: dict, layer_type: str | None = None, default_theta: float = 10000.0, *, allow=("default",) + tuple(ROPE_TYPES)):
    """``(theta, RopeScaling | None, rotary fraction)`` of one layer type; a RoPE type jaxattn
    does not implement (or the family does not use) is refused by name."""
    parameters = _rope_parameters(hf, layer_type, default_theta)
    kind = parameters["rope_type"]
    if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"
    require_setting(hf, kind in allow, f"rope_type={kind!r}", ", ".join(repr(k) for k in allow))
    fraction = float(parameters.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return float(parameters["rope_theta"]), None, fraction
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "short_factor", "long_factor"}
    unknown = sorted(set(parameters) - known)
    require_setting(hf, not unknown, f"rope parameters {unknown}", f"{sorted(known)}")
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
    require_setting(hf, not unknown and len(types) == layers, f"layer_types={types}",
             f"one of {sorted(LAYER_KINDS)} for each of the {layers} layers")
    kinds = tuple(LAYER_KINDS[t] for t in types)
    if "local" in kinds:
        require_setting(hf, hf.get("sliding_window") is not None, "sliding layers without sliding_window", "a sliding_window")
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
    require_setting(hf, activation in ("gelu_new", "gelu_pytorch_tanh"), f"activation_function={activation!r}",
             "'gelu_new' / 'gelu_pytorch_tanh' (GELU, tanh form)")
    require_setting(hf, not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true",
             "false (logits scaled by 1/sqrt(D) only)")
    require_setting(hf, hf.get("scale_attn_weights", True), "scale_attn_weights=false", "true")
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
    theta, scaling, fraction = rope_from_hf(hf, global_type, default_theta)
    fields.update(rope_theta=theta, rope_scaling=scaling, rotary_fraction=fraction)
    if scaling is not None and scaling.kind in ("linear", "dynamic"):  # max_position_embeddings is the trained length
        fields["max_length"] = int(fields["max_length"] * scaling.factor)
    kinds = fields.get("layer_types") or ()
    if local_type is not None and "local" in kinds:
        local_theta, local_scaling, local_fraction = rope_from_hf(hf, local_type, default_local_theta or default_theta,
                                                           allow=("default",))
        require_setting(hf, local_fraction == fraction, f"partial_rotary_factor {local_fraction} on sliding layers",
                 f"the global layers' {fraction}")
        if local_theta != theta or scaling is not None:
            fields["local_rope_theta"] = local_theta
    return fields


def _llama_config(hf: dict, dtype: str) -> TransformerConfig:
    model_type = hf["model_type"]
    activation = hf.get("hidden_act", "silu")
    require_setting(hf, activation == "silu", f"hidden_act={activation!r}", "'silu' (SwiGLU)")
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
    require_setting(hf, activation in ("gelu_pytorch_tanh", "gelu_new"), f"hidden_activation={activation!r}",
             "'gelu_pytorch_tanh' (GeGLU, tanh form)")
    require_setting(hf, not hf.get("use_bidirectional_attention", False), "use_bidirectional_attention=true", "false")
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
    require_setting(hf, activation == "silu", f"hidden_act={activation!r}", "'silu' (SwiGLU)")
    fields = _decoder(hf, dtype)
    kinds = _layer_types(hf, fields["layers"])
    fields.update(window=hf.get("sliding_window") if kinds else None)
    return TransformerConfig(**_with_rope(hf, fields))


def _gpt_neox_config(hf: dict, dtype: str) -> TransformerConfig:
    activation = hf.get("hidden_act", "gelu")
    require_setting(hf, activation in ("gelu", "gelu_new", "gelu_pytorch_tanh"), f"hidden_act={activation!r}",
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
    require_setting(hf, text != {}, "no text_config", "a text_config")
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
