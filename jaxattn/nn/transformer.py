"""A decoder-only transformer language model, built from a frozen ``TransformerConfig``.

    x = embed(tokens)  (times sqrt(C): Gemma)
    for each layer:                                          norm_placement:
        x = x + attn(norm(x));  x = x + mlp(norm(x))         "pre" (GPT-2, Llama, Qwen, Mistral)
        x = x + norm(attn(x));  x = x + norm(mlp(x))         "post" (OLMo 2)
        x = x + norm(attn(norm(x)));  x = ... mlp ...        "sandwich" (Gemma 2 and 3)
        x = x + attn(norm(x)) + mlp(norm'(x))                parallel_residual (GPT-NeoX, Pythia)
    logits = unembed(norm(x))  (soft-capped: Gemma 2)

Each layer's attention has settings of its own (``TransformerConfig.attention_settings``):
local (sliding-window) or global, its RoPE base, RoPE or none (NoPE), the QK-norm, the
logits' scale and soft-cap; a cache per layer kind (window-sized for local layers).

Shape letters: B batch, T tokens now, C model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import (
    AttentionContext,
    AttentionSettings,
    Kernels,
    KVCache,
    LatentCache,
    MLASettings,
    PagedKVCache,
    PagedLatentCache,
    Rope,
    SlidingKVCache,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    sinusoidal_positions,
)
from jaxattn.functional.checks import check_int, check_number
from jaxattn.functional.decode import DECODE_MAX_TOKENS
from jaxattn.functional.kernels import KERNEL_NAMES
from jaxattn.functional.packed import PackedWeight, packed_matmul
from jaxattn.functional.softmax import soft_cap
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.functional.positions import RopeScaling
from jaxattn.nn.layers import Dense, Embedding, GatedMlp, Mlp, constrain, default_kernel_init, logical, make_norm
from jaxattn.nn.mla import MultiHeadLatentAttention

POSITION_KINDS = ("learned", "sinusoidal", "rope")
# name -> (MLP class, activation): GPT-2's tanh GELU, GPT-NeoX's exact GELU, SwiGLU, Gemma's GeGLU.
MLP_KINDS = {"gelu": (Mlp, "gelu_tanh"), "gelu_exact": (Mlp, "gelu"), "swiglu": (GatedMlp, "silu"),
             "geglu": (GatedMlp, "gelu_tanh")}
LAYER_KINDS = ("global", "local")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("standard", "mla")
MLA_DEFAULTS = {"latent_dim": 64, "rope_dim": 16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything that defines a ``TransformerLM``. Saved as JSON next to checkpoints.

    ``kv_heads`` < ``heads`` gives GQA (1 gives MQA; ``None`` means ``heads``, i.e. MHA);
    ``window`` makes every layer a causal sliding-window layer whose cache holds only
    ``window`` tokens; ``max_length`` is the context length (learned positions and the
    default cache). ``attention="mla"`` uses multi-head latent attention (``latent_dim``
    L, default 64, ``rope_dim`` R, default 16, ``query_latent_dim`` P) instead of
    MHA/GQA/MQA, with its own decoupled RoPE (``rope_theta``, ``rope_style``) and latent norms
    (``norm_epsilon``). ``attention_kernel``, for either attention: ``"auto"`` (the platform's
    table in ``jaxattn.functional.kernels``: the XLA kernels on a CPU, cuDNN or Pallas on a GPU,
    Pallas on a TPU), ``"dense"`` (``dense_kernel``), ``"flash"`` (``flash_kernel``, memory linear
    in the sequence), ``"pallas"`` (the Pallas kernels; interpret mode on a CPU) or ``"cudnn"``.

    ``decode_max_tokens``: a call with a cache and at most this many new tokens (a decode
    step) uses ``decode_attention``, whose cost follows the tokens in the cache, not its
    capacity; 0 sends every call to ``attention_kernel`` (the default, 16, is measured in
    ``benchmarks/decode.py``). ``norm_epsilon`` is the norms' epsilon; ``qkv_bias``, ``out_bias``
    and ``mlp_bias`` add biases to the attention's input and output projections and to the
    MLP (GPT-2 has all three, Qwen2 the first). ``mlp``: ``"gelu"`` (tanh form), ``"gelu_exact"``,
    ``"swiglu"`` or ``"geglu"``. ``attention_only``: blocks without an MLP, the models in which
    Elhage et al. (2021) and Olsson et al. (2022) watched induction heads form.

    Attention as today's models do it (each layer's settings: ``attention_settings``):
      layer_types: per layer ``"global"`` or ``"local"`` (a sliding window of ``window``);
        ``None``: every layer local when ``window`` is set, else global (Gemma 2: 1:1,
        Gemma 3: 5 local to 1 global).
      local_rope_theta: the RoPE base of local layers, which then use plain RoPE (Gemma 3: 10k
        local, 1M global); ``None``: every layer uses ``rope_theta`` and ``rope_scaling``.
      nope_layers: layers with no position encoding at all (SmolLM3: every 4th).
      rotary_fraction: the part of each head RoPE rotates (GPT-NeoX: 0.25).
      rope_scaling: a ``RopeScaling`` (linear, dynamic, llama3, yarn, longrope), or its dict.
      qk_norm: ``"head"`` (Qwen3, Gemma 3) or ``"projection"`` (OLMo 2) RMSNorm of q and k.
      attention_scale: the logits' multiplier instead of ``1/sqrt(D)`` (Gemma: ``256^-1/2``).
      attention_softcap, final_softcap: ``cap tanh(s / cap)`` on the attention logits and on
        the model's output logits (Gemma 2: 50 and 30).
      attention_sinks: one learned logit per head in every softmax denominator (gpt-oss).
      norm_placement: ``"pre"``, ``"post"`` (OLMo 2) or ``"sandwich"`` (Gemma 2/3);
      parallel_residual: attention and MLP side by side (GPT-NeoX); embed_scale: the
        embeddings times ``sqrt(C)`` (Gemma).

    A combination that a model would silently ignore is a ``ValueError`` that says what and
    why and what to do instead (e.g. a window or ``kv_heads != heads`` with MLA,
    ``latent_dim`` with standard attention, ``nope_layers`` without RoPE).
    """

    vocab_size: int = 256
    width: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 32
    mlp: str = "swiglu"
    mlp_hidden: int = 704
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_style: str = "half"
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    window: int | None = None
    tied_embeddings: bool = True
    max_length: int = 1024
    dtype: str = "float32"
    attention: str = "standard"
    latent_dim: int | None = None
    rope_dim: int | None = None
    query_latent_dim: int | None = None
    attention_kernel: str = "auto"
    decode_max_tokens: int = DECODE_MAX_TOKENS
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    nope_layers: tuple[int, ...] = ()
    rotary_fraction: float = 1.0
    rope_scaling: RopeScaling | None = None
    qk_norm: str | None = None
    attention_scale: float | None = None
    attention_softcap: float | None = None
    attention_sinks: bool = False
    final_softcap: float | None = None
    norm_placement: str = "pre"
    parallel_residual: bool = False
    embed_scale: bool = False
    attention_only: bool = False

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)  # normalised once: MHA
        # Normalised once: JSON's lists and dicts (run.json, --model-config) as the hashable forms.
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "nope_layers", tuple(self.nope_layers))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.attention == "mla":  # normalised once: MLA's default widths
            for name, value in MLA_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        if self.attention_kernel not in KERNEL_NAMES:
            raise ValueError(f"attention_kernel must be one of {KERNEL_NAMES}, got {self.attention_kernel!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a positive multiple of kv_heads={self.kv_heads}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {tuple(MLP_KINDS)}, got {self.mlp!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_int("decode_max_tokens", self.decode_max_tokens, minimum=0)
        if not self.norm_epsilon > 0:
            raise ValueError(f"norm_epsilon must be > 0, got {self.norm_epsilon}")
        if self.window is not None:
            check_int("window", self.window)
        for name in ("vocab_size", "width", "layers", "head_dim", "mlp_hidden", "max_length", "latent_dim", "rope_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        if self.attention == "mla":
            if self.window is not None:
                raise ValueError(
                    f"attention='mla' would ignore window={self.window}: MLA's latent cache keeps every token and "
                    "its layer takes no window; use attention='standard' for sliding-window layers"
                )
            if self.kv_heads != self.heads:
                raise ValueError(
                    f"attention='mla' would ignore kv_heads={self.kv_heads}: every MLA head decompresses its own "
                    f"keys and values from the shared latent; leave kv_heads unset (or equal to heads={self.heads})"
                )
            if self.rope_dim % 2:
                raise ValueError(f"MLA's decoupled RoPE width rope_dim must be even, got {self.rope_dim}")
            if self.qkv_bias or self.out_bias:
                raise ValueError("attention='mla' would ignore qkv_bias/out_bias: MLA's projections have no biases")
            if self.positions != "rope":
                raise ValueError(
                    f"attention='mla' encodes positions with its own decoupled RoPE (rope_dim={self.rope_dim}); "
                    f"positions={self.positions!r} would add a second encoding on top: leave positions='rope'"
                )
        else:
            for name in ("latent_dim", "rope_dim", "query_latent_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)} is a width of MLA; attention='standard' would ignore it "
                        "(set attention='mla', or leave it None)"
                    )
        if self.attention == "standard" and self.positions == "rope" and self.head_dim % 2 and self.rotary_fraction == 1:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {self.head_dim}")
        self._check_todays_attention()

    def _check_todays_attention(self):
        """The settings of today's attention: valid, and used by the model they describe."""
        for name in ("local_rope_theta", "attention_scale", "attention_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, above=0)
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if self.attention_only and self.parallel_residual:
            raise ValueError("parallel_residual puts an MLP beside attention; attention_only has no MLP to put there")
        if self.parallel_residual and self.norm_placement != "pre":
            raise ValueError(f"parallel_residual normalises the layer's input for both branches: it takes "
                             f"norm_placement='pre', got {self.norm_placement!r}")
        if self.qk_norm is not None and self.qk_norm not in ("head", "projection"):
            raise ValueError(f"qk_norm must be 'head', 'projection' or None, got {self.qk_norm!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.layers or any(kind not in LAYER_KINDS for kind in self.layer_types):
                raise ValueError(f"layer_types must give each of the {self.layers} layers one of {LAYER_KINDS}, "
                                 f"got {self.layer_types}")
            if "local" in self.layer_types and self.window is None:
                raise ValueError("layer_types has local layers: set window (their sliding window)")
            if "local" not in self.layer_types and self.window is not None:
                raise ValueError(f"window={self.window} would be ignored: layer_types has no local layer")
        if sorted(set(self.nope_layers)) != sorted(self.nope_layers) or any(
                not 0 <= layer < self.layers for layer in self.nope_layers):
            raise ValueError(f"nope_layers must be distinct layers in [0, {self.layers}), got {self.nope_layers}")
        rotated = int(self.head_dim * self.rotary_fraction)
        if not 0 < self.rotary_fraction <= 1 or (self.rotary_fraction != 1 and (rotated < 1 or rotated + rotated % 2 >
                                                                                 self.head_dim)):
            raise ValueError(f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} must rotate at least "
                             f"one pair of dimensions within the head (an odd width R turns R + 1, as transformers does)")
        rope_only = dict(nope_layers=self.nope_layers != (), rotary_fraction=self.rotary_fraction != 1,
                         rope_scaling=self.rope_scaling is not None, local_rope_theta=self.local_rope_theta is not None)
        for name, used in rope_only.items():
            if used and self.positions != "rope":
                raise ValueError(f"{name}={getattr(self, name)} shapes RoPE; positions={self.positions!r} would ignore it")
        if self.local_rope_theta is not None and "local" not in self.kinds():
            raise ValueError(f"local_rope_theta={self.local_rope_theta} would be ignored: no layer is local")
        if self.attention == "mla":
            for name, used in dict(layer_types=self.layer_types is not None, nope_layers=self.nope_layers != (),
                                   rotary_fraction=self.rotary_fraction != 1, qk_norm=self.qk_norm is not None,
                                   attention_sinks=self.attention_sinks).items():
                if used:
                    raise ValueError(f"attention='mla' would ignore {name}={getattr(self, name)!r}: MLA's layer has "
                                     "its own latent norms and decoupled RoPE; use attention='standard' for it")

    def kinds(self) -> tuple[str, ...]:
        """Each layer's kind, ``"global"`` or ``"local"``."""
        if self.layer_types is not None:
            return self.layer_types
        return ("local" if self.window is not None else "global",) * self.layers

    def attention_settings(self, layer: int) -> AttentionSettings | MLASettings:
        """The static settings of layer ``layer``'s attention (the per-layer attention config)."""
        local = self.kinds()[layer] == "local"
        own_theta = local and self.local_rope_theta is not None
        rope = Rope(
            self.local_rope_theta if own_theta else self.rope_theta, self.rope_style,
            rotary_fraction=None if self.rotary_fraction == 1 else self.rotary_fraction,
            scaling=None if own_theta else self.rope_scaling,
        )
        if self.attention == "mla":
            return MLASettings(rope=rope, epsilon=self.norm_epsilon, scale=self.attention_scale,
                               logit_softcap=self.attention_softcap)
        has_rope = self.positions == "rope" and layer not in self.nope_layers
        return AttentionSettings(rope=rope if has_rope else None, window=self.window if local else None,
                                 scale=self.attention_scale, logit_softcap=self.attention_softcap, qk_norm=self.qk_norm,
                                 norm_epsilon=self.norm_epsilon)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


# The name of the first releases; the same class.
Config = TransformerConfig


def cache_elements_per_token(config: TransformerConfig) -> int:
    """Numbers one layer's cache holds per token: ``K (D + E)`` for MHA/GQA/MQA,
    ``L + R`` for MLA (DeepSeek-V2, Table 1). A sliding window bounds the tokens, not this."""
    if config.attention == "mla":
        return latent_cache_elements_per_token(latent_dim=config.latent_dim, rope_dim=config.rope_dim)
    return kv_cache_elements_per_token(kv_heads=config.kv_heads, head_dim=config.head_dim)


CACHE_DTYPES = ("int8",)  # besides the compute dtype


def cache_dtype(config: TransformerConfig, dtype=None):
    """The dtype of a model's caches: its compute dtype (``None``, or that dtype named), or
    ``"int8"`` (``Int8Tokens`` entries: ``jaxattn.functional.kv_cache``)."""
    if dtype is None:
        return config.compute_dtype
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype != config.compute_dtype and str(dtype) not in CACHE_DTYPES:
        raise ValueError(f"a cache holds the model's dtype ({config.compute_dtype}) or one of {CACHE_DTYPES}, got {dtype!r}")
    return dtype


def cache_bytes_per_token(config: TransformerConfig) -> int:
    """``cache_elements_per_token`` times the bytes of one element of the compute dtype."""
    return cache_elements_per_token(config) * config.compute_dtype.itemsize


def tied_logits(x, table):
    """``x [B, T, C]`` against the embedding table ``[V, C]`` (or its ``PackedWeight``): logits
    ``[B, T, V]`` in x's dtype. A decode step (at most 16 tokens) computes ``table @ x^T``, a
    matrix-vector product that reads the table row by row as it lies in memory; ``x @ table^T``,
    the form for many tokens, made XLA on the CPU read a float32 table across rows (GPT-2's
    50257 x 768: the output layer's share of a traced step in ``benchmarks/decode_profile.py``
    went from 20 ms to 6)."""
    B, T, C = x.shape
    if isinstance(table, PackedWeight):  # already output-major: x @ values^T, converted inside
        return packed_matmul(x, table, 1)
    table = table.astype(x.dtype)
    if B * T > DECODE_MAX_TOKENS:
        return x @ table.T
    logits = jax.lax.dot_general(table, x.reshape(B * T, C), (((1,), (1,)), ((), ())))  # [V, B * T]
    return logits.T.reshape(B, T, -1)


class TransformerBlock(nnx.Module):
    """One layer: attention and MLP with their residuals, norms where ``norm_placement`` puts
    them (``attn_norm``/``mlp_norm`` before a sublayer, ``attn_out_norm``/``mlp_out_norm`` after)."""

    def __init__(self, config: TransformerConfig, layer: int = 0, *, kernels: Kernels = Kernels(), rngs: nnx.Rngs):
        dtype = config.compute_dtype
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers).
        out_stddev = 0.02 / math.sqrt(2 * config.layers)
        out_init = nnx.initializers.normal(stddev=out_stddev)
        settings = config.attention_settings(layer)
        if config.attention == "mla":
            self.attn = MultiHeadLatentAttention(
                config.width, heads=config.heads, head_dim=config.head_dim, latent_dim=config.latent_dim,
                rope_dim=config.rope_dim, query_latent_dim=config.query_latent_dim, settings=settings,
                kernels=kernels, dtype=dtype, out_stddev=out_stddev, rngs=rngs,
            )
        else:
            self.attn = MultiHeadAttention(
                config.width, heads=config.heads, kv_heads=config.kv_heads, head_dim=config.head_dim,
                settings=settings, qkv_bias=config.qkv_bias, out_bias=config.out_bias, sinks=config.attention_sinks,
                kernels=kernels, dtype=dtype, out_init=out_init, rngs=rngs,
            )
        mlp_class, activation = MLP_KINDS[config.mlp]
        self.mlp = None if config.attention_only else mlp_class(
            config.width, config.mlp_hidden, bias=config.mlp_bias, activation=activation, dtype=dtype, out_init=out_init,
            rngs=rngs)

        def norm(where: tuple[str, ...], *, for_mlp: bool = False):
            if config.norm_placement not in where or (for_mlp and self.mlp is None):
                return None
            return make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)

        self.attn_norm, self.mlp_norm = norm(("pre", "sandwich")), norm(("pre", "sandwich"), for_mlp=True)
        self.attn_out_norm, self.mlp_out_norm = norm(("post", "sandwich")), norm(("post", "sandwich"), for_mlp=True)
        self.parallel_residual = config.parallel_residual

    @staticmethod
    def _around(norm, x):
        return x if norm is None else norm(x)

    def __call__(self, x, context: AttentionContext, *, cache=None, num_new=None):  # [B, T, C] -> [B, T, C]
        """``context``: the call's token side, from the model (with a cache, from its lengths)."""
        with jax.named_scope("attention"):
            attended = self.attn(self._around(self.attn_norm, x), context=context, cache=cache, num_new=num_new)
        if cache is not None:
            attended, cache = attended
        attended = self._around(self.attn_out_norm, attended)
        with jax.named_scope("mlp"):
            if self.parallel_residual:  # x + attn(norm(x)) + mlp(norm'(x)): both read the layer's input
                x = x + attended + self.mlp(self.mlp_norm(x))
            else:
                x = x + attended
                if self.mlp is not None:
                    x = x + self._around(self.mlp_out_norm, self.mlp(self._around(self.mlp_norm, x)))
        return x if cache is None else (x, cache)


class TransformerLM(nnx.Module):
    """Decoder-only language model: tokens ``[B, T]`` -> logits ``[B, T, V]`` (float32).

    ``positions`` (int ``[B, T]`` or ``[T]``, default ``arange(T)``) say where the tokens
    sit: tokens may come in any order (a sequence-parallel layout such as
    ``zigzag_order``), the masks and position encodings follow the positions.
    ``segment_ids`` (int ``[B, T]`` or ``[T]``) pack several sequences into one row: a token
    attends only within its segment. With ``cache=`` (from ``init_cache``) it returns
    ``(logits, new_cache)``: the T tokens continue each sequence of the cache (a prompt or
    one decode step, same code), their positions come from the cache; ``num_new [B]`` says
    how many of them are real in each row of a ragged batch. The call's context is built
    once here and shared by every layer. ``record_weights=True`` makes every attention layer
    sow its weights (read them with ``jaxattn.lm.inspection.capture_attention``).
    ``logits_at`` (int ``[B, n]``, indices into each row's T tokens) computes the logits only
    there, ``[B, n, V]``: a prompt needs only its last token's, and the output layer over
    every prompt position would cost as much as a layer or more (V >> C).
    """

    def __init__(self, config: TransformerConfig, *, attention_fn=None, decode_fn=None, rngs: nnx.Rngs):
        """``attention_fn`` (a kernel ``(q, k, v, context)``) serves every attention call instead of
        the kernels ``config`` names, cached ones included, unless ``decode_fn`` is given too."""
        self.config = config
        dtype = config.compute_dtype
        if attention_fn is None and decode_fn is None:
            kernels = Kernels.named(config.attention_kernel, decode_max_tokens=config.decode_max_tokens)
        else:
            kernels = Kernels.choose(attention_fn, decode_fn, default=Kernels.named(config.attention_kernel).full,
                                     decode_max_tokens=config.decode_max_tokens)
        self.embed = Embedding(config.vocab_size, config.width, dtype=dtype,
                               embedding_init=logical(default_kernel_init, "vocab", "embed"), rngs=rngs)
        if config.positions == "learned":
            self.position_embed = Embedding(config.max_length, config.width, dtype=dtype,
                                            embedding_init=logical(default_kernel_init, "positions", "embed"), rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(config, layer, kernels=kernels, rngs=rngs) for layer in range(config.layers)])
        self.final_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        if not config.tied_embeddings:
            self.unembed = Dense(config.width, config.vocab_size, use_bias=False, dtype=dtype,
                                 kernel_init=logical(default_kernel_init, "embed", "vocab"), rngs=rngs)


    def use_kernels(self, name: str) -> None:
        """Serve attention with the kernels ``name`` stands for (``Kernels.named``: "auto", "dense",
        "flash", "pallas", "cudnn") from now on: every layer's kernels and the config's
        ``attention_kernel``. The parameters are untouched."""
        kernels = Kernels.named(name, decode_max_tokens=self.config.decode_max_tokens)
        self.config = dataclasses.replace(self.config, attention_kernel=name)
        for block in self.blocks:
            block.attn.kernels = kernels
    def init_cache(self, batch: int, max_length: int | None = None, *, chunk: int | None = None, dtype=None):
        """Empty per-layer caches: a ``KVCache`` of ``max_length`` slots (default the context)
        for a global layer, a ``SlidingKVCache`` for a local (sliding-window) layer
        (``window + chunk - 1`` slots, at most ``max_length``; ``chunk``, the most tokens one call
        adds, defaults to ``max_length``: pass the prompt's length, or 1 for steps only, to
        keep it near the window), or MLA's ``LatentCache``. ``dtype``: the compute dtype
        (default), or ``"int8"`` for int8 entries with a scale per token and head."""
        c = self.config
        dtype = cache_dtype(c, dtype)
        max_length = c.max_length if max_length is None else max_length
        if max_length > c.max_length and c.positions != "rope":
            raise ValueError(
                f"a cache of {max_length} tokens exceeds the context max_length={c.max_length}: "
                f"{c.positions} positions exist only up to {c.max_length - 1}"
            )
        if c.attention == "mla":
            return tuple(
                LatentCache.create(batch=batch, max_length=max_length, latent_dim=c.latent_dim, rope_dim=c.rope_dim, dtype=dtype)
                for _ in range(c.layers)
            )
        shape = dict(batch=batch, kv_heads=c.kv_heads, head_dim=c.head_dim, dtype=dtype)
        chunk = max_length if chunk is None else chunk
        return tuple(SlidingKVCache.create(window=c.window, chunk=chunk, max_length=max_length, **shape)
                     if kind == "local" else KVCache.create(max_length=max_length, **shape) for kind in c.kinds())

    def init_paged_cache(self, batch: int, *, pages: int, page_size: int, pages_per_sequence: int, dtype=None):
        """Empty paged caches, one per layer (``PagedKVCache``, or ``PagedLatentCache`` for MLA):
        pools of ``pages`` pages of ``page_size`` tokens, ``batch`` page tables of
        ``pages_per_sequence`` entries. Local (windowed) layers keep their pages too; the window
        is a mask. For the serving engine (``jaxattn.lm.engine``), which hands out the pages.
        ``dtype`` as in ``init_cache``."""
        c = self.config
        dtype = cache_dtype(c, dtype)
        if pages_per_sequence * page_size > c.max_length and c.positions != "rope":
            raise ValueError(f"{pages_per_sequence} pages of {page_size} tokens exceed the context max_length="
                             f"{c.max_length}: {c.positions} positions exist only up to {c.max_length - 1}")
        pool = dict(batch=batch, pages=pages, page_size=page_size, pages_per_sequence=pages_per_sequence)
        if c.attention == "mla":
            return tuple(PagedLatentCache.create(**pool, latent_dim=c.latent_dim, rope_dim=c.rope_dim, dtype=dtype)
                         for _ in range(c.layers))
        return tuple(PagedKVCache.create(**pool, kv_heads=c.kv_heads, head_dim=c.head_dim, dtype=dtype)
                     for _ in range(c.layers))

    def __call__(self, tokens, positions=None, *, segment_ids=None, cache=None, num_new=None, record_weights=False,
                 logits_at=None):
        B, T = tokens.shape
        if cache is None:
            if T > self.config.max_length:
                raise ValueError(f"{T} tokens exceed the context length max_length={self.config.max_length}")
        elif len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}")
        context = AttentionContext.for_tokens(T, positions, lengths=None if cache is None else cache[0].lengths,
                                              segment_ids=segment_ids, B=B, record_weights=record_weights)
        # The embedding lookup laid out like the tokens: see jaxattn.lm.parallel (an XLA gather bug).
        x = constrain(self.embed(tokens), ("batch", "length", "embed"))  # [B, T, C]
        if self.config.embed_scale:  # Gemma: sqrt(C), rounded to the compute dtype as Gemma does
            x = x * jnp.asarray(math.sqrt(self.config.width), x.dtype)
        positions = jnp.minimum(context.q_positions, self.config.max_length - 1)  # [B|1, T]
        if self.config.positions == "learned":
            x = x + self.position_embed(positions)
        elif self.config.positions == "sinusoidal":
            table = sinusoidal_positions(self.config.max_length, self.config.width)  # [max_length, C]
            x = x + table[positions].astype(x.dtype)
        new_cache = []
        for layer, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, context)
            else:
                x, layer_cache = block(x, context, cache=cache[layer], num_new=num_new)
                new_cache.append(layer_cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[..., None], axis=1)  # [B, n, C]
        with jax.named_scope("unembed"):
            x = self.final_norm(x)
            if self.config.tied_embeddings:
                logits = tied_logits(x, self.embed.embedding.get_value())  # [B, T, V]
            else:
                logits = self.unembed(x)  # [B, T, V]
            logits = logits.astype(jnp.float32)
            if self.config.final_softcap is not None:  # Gemma 2: cap tanh(z / cap) on the output logits
                logits = soft_cap(logits, self.config.final_softcap)
        return logits if cache is None else (logits, tuple(new_cache))
