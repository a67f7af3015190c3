"""A pre-norm decoder-only transformer language model, built from a frozen ``TransformerConfig``.

    x = x + attn(norm_1(x))
    x = x + mlp(norm_2(x))

Shape letters: B batch, T tokens now, C model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import (
    AttentionContext,
    AttentionSettings,
    Kernels,
    KVCache,
    LatentCache,
    MLASettings,
    Rope,
    SlidingKVCache,
    dense_kernel,
    flash_kernel,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    sinusoidal_positions,
)
from jaxattn.functional.decode import DECODE_MAX_TOKENS
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.layers import Mlp, SwiGluMlp, constrain, default_kernel_init, logical, make_norm
from jaxattn.nn.mla import MultiHeadLatentAttention

POSITION_KINDS = ("learned", "sinusoidal", "rope")
MLP_KINDS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("standard", "mla")
# The kernels a Config can name; any other kernel can be passed as attention_fn=.
ATTENTION_KERNELS = {"dense": dense_kernel, "flash": flash_kernel}
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
    (``norm_epsilon``). ``attention_kernel``: ``"dense"`` (``dense_kernel``) or ``"flash"``
    (``flash_kernel``, memory linear in the sequence), for either attention.

    ``decode_max_tokens``: a call with a cache and at most this many new tokens (a decode
    step) uses ``decode_attention``, whose cost follows the tokens in the cache, not its
    capacity; 0 sends every call to ``attention_kernel`` (the default, 16, is measured in
    ``benchmarks/decode.py``). ``norm_epsilon`` is the norms' epsilon; ``qkv_bias``, ``out_bias`` and ``mlp_bias`` add
    biases to the attention's input and output projections and to the MLP (GPT-2 has all
    three, Qwen2 the first). A combination that a model would silently ignore is a
    ``ValueError`` that says what and why and what to do instead (e.g. a window or
    ``kv_heads != heads`` with MLA, ``latent_dim`` with standard attention).
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
    attention_kernel: str = "dense"
    decode_max_tokens: int = DECODE_MAX_TOKENS
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)  # normalised once: MHA
        if self.attention == "mla":  # normalised once: MLA's default widths
            for name, value in MLA_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {tuple(ATTENTION_KERNELS)}, got {self.attention_kernel!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a positive multiple of kv_heads={self.kv_heads}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, got {self.positions!r}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.decode_max_tokens, bool) or not isinstance(self.decode_max_tokens, int) or self.decode_max_tokens < 0:
            raise ValueError(f"decode_max_tokens must be an integer >= 0, got {self.decode_max_tokens!r}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"norm_epsilon must be > 0, got {self.norm_epsilon}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int or None, got {self.window!r}")
        for name in ("vocab_size", "width", "layers", "head_dim", "mlp_hidden", "max_length", "latent_dim", "rope_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
        if self.attention == "standard" and self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {self.head_dim}")

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


def cache_bytes_per_token(config: TransformerConfig) -> int:
    """``cache_elements_per_token`` times the bytes of one element of the compute dtype."""
    return cache_elements_per_token(config) * config.compute_dtype.itemsize


def attention_settings(config: TransformerConfig) -> AttentionSettings | MLASettings:
    """The static settings of every attention layer of a model."""
    rope = Rope(config.rope_theta, config.rope_style)
    if config.attention == "mla":
        return MLASettings(rope=rope, epsilon=config.norm_epsilon)
    return AttentionSettings(rope=rope if config.positions == "rope" else None, window=config.window)


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: TransformerConfig, *, kernels: Kernels = Kernels(), rngs: nnx.Rngs):
        dtype = config.compute_dtype
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers).
        out_stddev = 0.02 / math.sqrt(2 * config.layers)
        out_init = nnx.initializers.normal(stddev=out_stddev)
        self.attn_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        if config.attention == "mla":
            self.attn = MultiHeadLatentAttention(
                config.width, heads=config.heads, head_dim=config.head_dim, latent_dim=config.latent_dim,
                rope_dim=config.rope_dim, query_latent_dim=config.query_latent_dim, settings=attention_settings(config),
                kernels=kernels, dtype=dtype, out_stddev=out_stddev, rngs=rngs,
            )
        else:
            self.attn = MultiHeadAttention(
                config.width, heads=config.heads, kv_heads=config.kv_heads, head_dim=config.head_dim,
                settings=attention_settings(config), qkv_bias=config.qkv_bias, out_bias=config.out_bias, kernels=kernels,
                dtype=dtype, out_init=out_init, rngs=rngs,
            )
        self.mlp_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        mlp_class = SwiGluMlp if config.mlp == "swiglu" else Mlp
        self.mlp = mlp_class(config.width, config.mlp_hidden, bias=config.mlp_bias, dtype=dtype, out_init=out_init, rngs=rngs)

    def __call__(self, x, context: AttentionContext, *, cache=None, num_new=None):  # [B, T, C] -> [B, T, C]
        """``context``: the call's token side, from the model (with a cache, from its lengths)."""
        if cache is None:
            x = x + self.attn(self.attn_norm(x), context=context)
        else:
            attended, cache = self.attn(self.attn_norm(x), context=context, cache=cache, num_new=num_new)
            x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
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
    """

    def __init__(self, config: TransformerConfig, *, attention_fn=None, decode_fn=None, rngs: nnx.Rngs):
        """``attention_fn`` (a kernel ``(q, k, v, context)``) serves every attention call instead of
        the kernels ``config`` names, cached ones included, unless ``decode_fn`` is given too."""
        self.config = config
        dtype = config.compute_dtype
        kernels = Kernels.choose(attention_fn, decode_fn, default=ATTENTION_KERNELS[config.attention_kernel],
                                 decode_max_tokens=config.decode_max_tokens)
        self.embed = nnx.Embed(config.vocab_size, config.width, dtype=dtype,
                               embedding_init=logical(default_kernel_init, "vocab", "embed"), rngs=rngs)
        if config.positions == "learned":
            self.position_embed = nnx.Embed(config.max_length, config.width, dtype=dtype,
                                            embedding_init=logical(default_kernel_init, "positions", "embed"), rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(config, kernels=kernels, rngs=rngs) for _ in range(config.layers)])
        self.final_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        if not config.tied_embeddings:
            self.unembed = nnx.Linear(config.width, config.vocab_size, use_bias=False, dtype=dtype,
                                      kernel_init=logical(default_kernel_init, "embed", "vocab"), rngs=rngs)

    def init_cache(self, batch: int, max_length: int | None = None, *, chunk: int | None = None):
        """Empty per-layer caches: a ``KVCache`` of ``max_length`` slots (default the context),
        a ``SlidingKVCache`` for sliding-window layers (``window + chunk - 1`` slots, at most
        ``max_length``; ``chunk``, the most tokens one call adds, defaults to ``max_length``:
        pass the prompt's length, or 1 for steps only, to keep it near the window), or MLA's
        ``LatentCache``."""
        c = self.config
        max_length = c.max_length if max_length is None else max_length
        if max_length > c.max_length and c.positions != "rope":
            raise ValueError(
                f"a cache of {max_length} tokens exceeds the context max_length={c.max_length}: "
                f"{c.positions} positions exist only up to {c.max_length - 1}"
            )
        if c.attention == "mla":
            return tuple(
                LatentCache.create(
                    batch=batch, max_length=max_length, latent_dim=c.latent_dim, rope_dim=c.rope_dim, dtype=c.compute_dtype
                )
                for _ in range(c.layers)
            )
        shape = dict(batch=batch, kv_heads=c.kv_heads, head_dim=c.head_dim, dtype=c.compute_dtype)
        if c.window is not None:
            chunk = max_length if chunk is None else chunk
            return tuple(SlidingKVCache.create(window=c.window, chunk=chunk, max_length=max_length, **shape)
                         for _ in range(c.layers))
        return tuple(KVCache.create(max_length=max_length, **shape) for _ in range(c.layers))

    def __call__(self, tokens, positions=None, *, segment_ids=None, cache=None, num_new=None, record_weights=False):
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
        x = self.final_norm(x)
        if self.config.tied_embeddings:
            logits = self.embed.attend(x)  # [B, T, V]
        else:
            logits = self.unembed(x)  # [B, T, V]
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))
