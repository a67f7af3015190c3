"""Real checkpoints: Hugging Face GPT-2, Llama, Qwen2 and Mistral folders as a ``TransformerLM``,
and one DeepSeek-V2/V3 attention layer as MLA.

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
6. ``HFTokenizer``: ``tokenizer.json`` through the ``tokenizers`` library.
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

from jaxattn.functional import MLAParams, MLASettings, Rope
from jaxattn.nn import MultiHeadLatentAttention, TransformerConfig, TransformerLM

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")
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


def _rope_theta(hf: dict) -> float:
    """RoPE's base, from ``rope_parameters`` (transformers >= 5) or ``rope_theta``; any rope
    scaling is refused."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    _require(hf, rope_type == "default", f"rope_type={rope_type!r} (rope scaling)", "rope_type 'default' (no scaling)")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


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


def _llama_like_config(hf: dict, dtype: str) -> TransformerConfig:
    model_type = hf["model_type"]
    activation = hf.get("hidden_act", "silu")
    _require(hf, activation == "silu", f"hidden_act={activation!r}", "'silu' (SwiGLU)")
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    if model_type == "qwen2":
        _require(hf, not hf.get("use_sliding_window", False), "use_sliding_window=true (windows on some layers only)",
                 "use_sliding_window=false")
    heads = hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)
    return TransformerConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp="swiglu", mlp_hidden=hf["intermediate_size"], positions="rope", rope_theta=_rope_theta(hf),
        rope_style="half", norm="rms", norm_epsilon=hf.get("rms_norm_eps", 1e-6), window=window,
        tied_embeddings=hf.get("tie_word_embeddings", False), max_length=hf.get("max_position_embeddings", 2048),
        dtype=dtype, qkv_bias=model_type == "qwen2" or attention_bias, out_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
    )


CONFIGS = {"gpt2": _gpt2_config, "llama": _llama_like_config, "qwen2": _llama_like_config, "mistral": _llama_like_config}


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

LLAMA_TABLE = _rows(
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.scale"),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"blocks.{{i}}.attn.w_{p}", _transpose_heads) for p in "qkvo"),
    *((f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"blocks.{{i}}.attn.b_{p}", _heads) for p in "qkv"),
    ("model.layers.{i}.self_attn.o_proj.bias", "blocks.{i}.attn.b_o"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.scale"),
    *((f"model.layers.{{i}}.mlp.{p}_proj.weight", f"blocks.{{i}}.mlp.{p}.kernel", _transpose) for p in ("gate", "up", "down")),
    *((f"model.layers.{{i}}.mlp.{p}_proj.bias", f"blocks.{{i}}.mlp.{p}.bias") for p in ("gate", "up", "down")),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "unembed.kernel", _transpose),
)

WEIGHT_TABLES = {"gpt2": GPT2_TABLE, "llama": LLAMA_TABLE, "qwen2": LLAMA_TABLE, "mistral": LLAMA_TABLE}
# Names a checkpoint may hold that are buffers, not parameters (causal-mask caches, RoPE tables).
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$")
# GPT2LMHeadModel prefixes its names with "transformer."; the table is written without it.
PREFIXES = {"gpt2": "transformer."}


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
    prefix = PREFIXES.get(model_type, "")
    available = {name.removeprefix(prefix): name for name in tensors.names()}
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
    return nnx.merge(graphdef, abstract_state), load_tokenizer(folder)


# ------------------------------------------------------------------ 6. the tokenizer


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the interface of jaxattn's byte tokenizer:
    ``encode(text) -> int32 [N]``, ``decode(ids) -> str``, ``label(id) -> str``, ``vocab_size``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def label(self, token: int) -> str:
        """How one token reads on its own (spaces shown as ␣)."""
        text = self.tokenizer.decode([int(token)], skip_special_tokens=False)
        return (text or self.tokenizer.id_to_token(int(token)) or "?").replace(" ", "␣").replace("\n", "\\n")


def load_tokenizer(folder: Path):
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return HFTokenizer(Tokenizer.from_file(str(path)))
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable tokenizer: {error}") from error


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
        except KeyError:
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
    settings = MLASettings(rope=Rope(_rope_theta(hf), "interleaved" if hf.get("rope_interleave", True) else "half"),
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
