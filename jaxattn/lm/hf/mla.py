"""DeepSeek-V2/V3's attention layer as MLA: chapter 7 of reading a checkpoint.

``mla_from_hf``: DeepSeek's MLA weights (``q_a_proj`` ... ``o_proj``) as ``MLAParams``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.functional import MLAParams, MLASettings, Rope
from jaxattn.lm.hf.config import LoadError, require_setting, rope_from_hf
from jaxattn.nn import MultiHeadLatentAttention

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
    require_setting(hf, not hf.get("attention_bias", False), "attention_bias=true", "attention_bias=false")

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
    theta, scaling, _ = rope_from_hf(hf, allow=("default", "yarn"))
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
