"""Parameters, feed-forward layers and norms of a transformer block.

Every parameter is made with the names of its axes (``logical``): ``("embed", "mlp")`` for
an MLP's up projection, ``("embed", "heads", "head_dim")`` for a query projection. The
names say what each axis is, not how it is laid out; ``jaxattn.lm.parallel`` maps them to
mesh axes with one table. Norm scales carry no names (replicated).

Activations are named too (``constrain``): batch (B) and length (T) besides the above.

The names: vocab (V), embed (C, the model width), heads (H), kv_heads (K), head_dim (D or E),
mlp (the MLP's hidden units), latent (L), query_latent (P), rope (R), positions (the
learned position table's rows), batch (B), length (T).

Shape letters: B batch, T tokens, C model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

from jaxattn.functional.packed import PackedWeight, packed_matmul

# GPT-2's initialisation: small normal weights keep the residual stream's scale in check.
default_kernel_init = nnx.initializers.normal(stddev=0.02)


def logical(init, *axes: str | None):
    """``init`` for a parameter whose axes are named ``axes`` (Flax ``nnx.with_partitioning``;
    nothing is placed on devices until a mesh is chosen)."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def mesh_spec(axes, shape, mesh_shape: dict, rules: dict) -> PartitionSpec:
    """The layout of an array whose axes are named ``axes``: each name becomes the mesh axis
    ``rules`` gives it, where that mesh axis has more than one device and divides the array's
    axis (else the axis is replicated); a mesh axis is used once per array, by its first name."""
    used, layout = set(), []
    for name, size in zip(axes, shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh_shape.get(axis, 1) <= 1 or size % mesh_shape[axis]:
            layout.append(None)
            continue
        used.add(axis)
        layout.append(axis)
    return PartitionSpec(*layout)


def constrain(x, axes):
    """``x`` laid out by the names of its axes while a mesh and logical axis rules are in force
    (``jaxattn.lm.parallel`` sets both while it traces a sharded step); otherwise ``x`` as is."""
    rules = dict(spmd.get_logical_axis_rules() or ())
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, mesh_spec(axes, x.shape, dict(mesh.shape), rules))


def param(rngs: nnx.Rngs, init, shape: tuple, axes: tuple) -> nnx.Param:
    """A parameter of ``shape`` drawn from ``init``, its axes named ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"name every axis of a parameter: shape {shape}, axes {axes}")
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """``x W + b``: ``kernel [in, out]``, ``bias [out]`` (as ``nnx.Linear`` names them, so run folders
    and checkpoints load either way), computed in ``dtype``. The kernel may be a ``PackedWeight``
    (``jaxattn.lm.quantize``: bfloat16 or int8, stored output-major for decoding)."""

    def __init__(self, width_in: int, width_out: int, *, use_bias: bool = False, dtype=jnp.float32,
                 kernel_init=default_kernel_init, bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (width_in, width_out), jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (width_out,), jnp.float32)) if use_bias else None

    def __call__(self, x):  # [..., in] -> [..., out]
        y = packed_matmul(x.astype(self.dtype), self.kernel.get_value(), 1)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embedding(nnx.Module):
    """A table ``embedding [V, C]`` (``nnx.Embed``'s name): rows looked up by token id, and, tied,
    the output layer. The table may be a ``PackedWeight`` of the output layer's ``[C, V]`` (its
    values are then the table's rows, one scale per row)."""

    def __init__(self, rows: int, width: int, *, dtype=jnp.float32, embedding_init=default_kernel_init, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(embedding_init(rngs.params(), (rows, width), jnp.float32))

    def __call__(self, ids):  # int [...] -> [..., C]
        table = self.embedding.get_value()
        if not isinstance(table, PackedWeight):
            return jnp.take(table, ids, axis=0).astype(self.dtype)
        rows = jnp.take(table.values, ids, axis=0).astype(jnp.float32)
        if table.scale is not None:
            rows = rows * jnp.take(table.scale, ids)[..., None]
        return rows.astype(self.dtype)


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's gelu_new, Gemma's gelu_pytorch_tanh
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # the exact erf form (GPT-NeoX)
    "silu": jax.nn.silu,  # SwiGLU's gate (Llama)
}


class Mlp(nnx.Module):
    """``W_2 act(W_1 x + b_1) + b_2``: the feed-forward layer of GPT-2 (hidden width usually
    4C; GELU in its tanh form, Hendrycks & Gimpel 2016) and GPT-NeoX (exact GELU)."""

    def __init__(self, width: int, hidden: int, *, bias: bool = False, activation: str = "gelu_tanh",
                 dtype=jnp.float32, out_init=default_kernel_init, rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros_init()
        self.activation = activation
        self.up = Dense(width, hidden, use_bias=bias, dtype=dtype, kernel_init=logical(default_kernel_init, "embed", "mlp"),
                        bias_init=logical(zeros, "mlp"), rngs=rngs)
        self.down = Dense(hidden, width, use_bias=bias, dtype=dtype, kernel_init=logical(out_init, "mlp", "embed"),
                          bias_init=logical(zeros, "embed"), rngs=rngs)

    def __call__(self, x):  # [B, T, C] -> [B, T, C]
        return self.down(ACTIVATIONS[self.activation](self.up(x)))


class GatedMlp(nnx.Module):
    """``W_2 (act(W_gate x) * W_1 x)`` (Shazeer 2020, arXiv 2002.05202): SwiGLU with ``silu``
    (Llama, Qwen, OLMo 2, Phi-3), GeGLU with ``gelu_tanh`` (Gemma)."""

    def __init__(self, width: int, hidden: int, *, bias: bool = False, activation: str = "silu", dtype=jnp.float32,
                 out_init=default_kernel_init, rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros_init()
        self.activation = activation
        up = dict(use_bias=bias, dtype=dtype, kernel_init=logical(default_kernel_init, "embed", "mlp"),
                  bias_init=logical(zeros, "mlp"), rngs=rngs)
        self.gate = Dense(width, hidden, **up)
        self.up = Dense(width, hidden, **up)
        self.down = Dense(hidden, width, use_bias=bias, dtype=dtype, kernel_init=logical(out_init, "mlp", "embed"),
                          bias_init=logical(zeros, "embed"), rngs=rngs)

    def __call__(self, x):  # [B, T, C] -> [B, T, C]
        return self.down(ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


# The name of the first releases: the gated MLP with SiLU.
SwiGluMlp = GatedMlp


def make_norm(kind: str, width: int, *, epsilon: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    """``"rms"``: RMSNorm (Zhang & Sennrich 2019), ``"layer"``: LayerNorm (Ba et al. 2016), from Flax."""
    if kind == "rms":
        return nnx.RMSNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
