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
    KVCache,
    LatentCache,
    SlidingKVCache,
    flash_attention,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    multi_head_attention,
    sinusoidal_positions,
)
from jaxattn.functional.decode import DECODE_MAX_TOKENS
from jaxattn.functional.kv_cache import positions_from_cache
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.mla import MultiHeadLatentAttention
from jaxattn.nn.layers import Mlp, SwiGluMlp, default_kernel_init, make_norm

POSITION_KINDS = ("learned", "sinusoidal", "rope")
MLP_KINDS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("standard", "mla")
# The kernels a Config can name; any other kernel can be passed as attention_fn=.
ATTENTION_KERNELS = {"dense": multi_head_attention, "flash": flash_attention}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything that defines a ``TransformerLM``. Saved as JSON next to checkpoints.

    ``kv_heads`` < ``heads`` gives GQA (1 gives MQA; ``None`` means ``heads``, i.e. MHA);
    ``window`` makes every layer a causal sliding-window layer whose cache holds only
    ``window`` tokens; ``max_length`` is the context length (learned positions and the
    default cache). ``attention="mla"`` uses multi-head latent attention (``latent_dim``
    L, ``rope_dim`` R, ``query_latent_dim`` P) instead of MHA/GQA/MQA. ``attention_kernel``:
    ``"dense"`` (``multi_head_attention``) or ``"flash"`` (``flash_attention``, memory
    linear in the sequence), for either attention.

    ``decode_max_tokens``: a call with a cache and at most this many new tokens (a decode
    step) uses ``decode_attention``, whose cost follows the tokens in the cache, not its
    capacity; 0 sends every call to ``attention_kernel`` (the default, 16, is measured in
    ``benchmarks/decode.py``). ``norm_epsilon`` is the norms' epsilon; ``qkv_bias``, ``out_bias`` and ``mlp_bias`` add
    biases to the attention's input and output projections and to the MLP (GPT-2 has all
    three, Qwen2 the first). A combination that a model would silently ignore is a
    ``ValueError`` that says what and why (e.g. a window or ``kv_heads != heads`` with MLA).
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
    latent_dim: int = 64
    rope_dim: int = 16
    query_latent_dim: int | None = None
    attention_kernel: str = "dense"
    decode_max_tokens: int = DECODE_MAX_TOKENS
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)  # normalised once: MHA
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
            if getattr(self, name) < 1:
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
        elif self.query_latent_dim is not None:
            raise ValueError(
                f"query_latent_dim={self.query_latent_dim} compresses MLA's queries; attention='standard' "
                "would ignore it (set attention='mla' or leave it None)"
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


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: TransformerConfig, *, attention_fn=None, rngs: nnx.Rngs):
        dtype = config.compute_dtype
        attention_fn = ATTENTION_KERNELS[config.attention_kernel] if attention_fn is None else attention_fn
        # GPT-2: scale the residual projections by 1/sqrt(2 * layers).
        out_init = nnx.initializers.normal(stddev=0.02 / math.sqrt(2 * config.layers))
        self.attn_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        if config.attention == "mla":
            self.attn = MultiHeadLatentAttention(
                config.width,
                heads=config.heads,
                head_dim=config.head_dim,
                latent_dim=config.latent_dim,
                rope_dim=config.rope_dim,
                query_latent_dim=config.query_latent_dim,
                rope_theta=config.rope_theta,
                rope_style=config.rope_style,
                attention_fn=attention_fn,
                decode_max_tokens=config.decode_max_tokens,
                dtype=dtype,
                out_stddev=0.02 / math.sqrt(2 * config.layers),
                rngs=rngs,
            )
        else:
            self.attn = self._standard_attention(config, attention_fn, out_init, rngs)
        self.mlp_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        mlp_class = SwiGluMlp if config.mlp == "swiglu" else Mlp
        self.mlp = mlp_class(config.width, config.mlp_hidden, bias=config.mlp_bias, dtype=dtype, out_init=out_init, rngs=rngs)

    @staticmethod
    def _standard_attention(config: TransformerConfig, attention_fn, out_init, rngs):
        return MultiHeadAttention(
            config.width,
            heads=config.heads,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            rope_theta=config.rope_theta if config.positions == "rope" else None,
            rope_style=config.rope_style,
            window=config.window,
            qkv_bias=config.qkv_bias,
            out_bias=config.out_bias,
            attention_fn=attention_fn,
            decode_max_tokens=config.decode_max_tokens,
            dtype=config.compute_dtype,
            out_init=out_init,
            rngs=rngs,
        )

    def __call__(self, x, positions=None, *, cache=None, num_new=None):  # [B, T, C] -> [B, T, C]
        """``positions`` int ``[B, T]`` or ``[T]`` without a cache; with one they come from it."""
        if cache is None:
            x = x + self.attn(self.attn_norm(x), positions)
        else:
            attended, cache = self.attn(self.attn_norm(x), positions, cache=cache, num_new=num_new)
            x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x if cache is None else (x, cache)


class TransformerLM(nnx.Module):
    """Decoder-only language model: tokens ``[B, T]`` -> logits ``[B, T, V]`` (float32).

    ``positions`` (int ``[B, T]`` or ``[T]``, default ``arange(T)``) say where the tokens
    sit: tokens may come in any order (a sequence-parallel layout such as
    ``zigzag_order``), the masks and position encodings follow the positions. With
    ``cache=`` (from ``init_cache``) it returns ``(logits, new_cache)``: the T tokens
    continue each sequence of the cache (a prompt or one decode step, same code), their
    positions come from the cache; ``num_new [B]`` says how many of them are real in each
    row of a ragged batch.
    """

    def __init__(self, config: TransformerConfig, *, attention_fn=None, rngs: nnx.Rngs):
        """``attention_fn`` overrides the kernel that ``config.attention_kernel`` names."""
        self.config = config
        dtype = config.compute_dtype
        self.embed = nnx.Embed(
            config.vocab_size, config.width, dtype=dtype, embedding_init=default_kernel_init, rngs=rngs
        )
        if config.positions == "learned":
            self.position_embed = nnx.Embed(
                config.max_length, config.width, dtype=dtype, embedding_init=default_kernel_init, rngs=rngs
            )
        self.blocks = nnx.List([TransformerBlock(config, attention_fn=attention_fn, rngs=rngs) for _ in range(config.layers)])
        self.final_norm = make_norm(config.norm, config.width, epsilon=config.norm_epsilon, dtype=dtype, rngs=rngs)
        if not config.tied_embeddings:
            self.unembed = nnx.Linear(
                config.width, config.vocab_size, use_bias=False, dtype=dtype, kernel_init=default_kernel_init, rngs=rngs
            )

    def init_cache(self, batch: int, max_length: int | None = None):
        """Empty per-layer caches: ``KVCache`` of ``max_length`` (default the context),
        a ``SlidingKVCache`` of the window for sliding-window models, or MLA's
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
            return tuple(SlidingKVCache.create(window=c.window, **shape) for _ in range(c.layers))
        return tuple(KVCache.create(max_length=max_length, **shape) for _ in range(c.layers))

    def __call__(self, tokens, positions=None, *, cache=None, num_new=None):
        B, T = tokens.shape
        if cache is None:
            if T > self.config.max_length:
                raise ValueError(f"{T} tokens exceed the context length max_length={self.config.max_length}")
            positions = jnp.arange(T, dtype=jnp.int32) if positions is None else jnp.asarray(positions)  # [T] or [B, T]
        else:
            if len(cache) != len(self.blocks):
                raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}")
            positions = positions_from_cache(cache[0], T, positions)  # [B, T], for the position embeddings
        x = self.embed(tokens)  # [B, T, C]
        if self.config.positions == "learned":
            x = x + self.position_embed(jnp.minimum(positions, self.config.max_length - 1))
        elif self.config.positions == "sinusoidal":
            table = sinusoidal_positions(self.config.max_length, self.config.width)  # [max_length, C]
            x = x + table[jnp.minimum(positions, self.config.max_length - 1)].astype(x.dtype)
        new_cache = []
        for layer, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, positions)
            else:
                x, layer_cache = block(x, cache=cache[layer], num_new=num_new)  # positions from the cache
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        if self.config.tied_embeddings:
            logits = self.embed.attend(x)  # [B, T, V]
        else:
            logits = self.unembed(x)  # [B, T, V]
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, tuple(new_cache))
