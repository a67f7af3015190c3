"""A model's weights in fewer bytes for decoding: bfloat16, or int8 with a scale per output channel.

    model = convert_weights(model, "int8")   # or "bfloat16"; "float32" returns the model as it is

Every matrix of a standard-attention model is stored as a ``PackedWeight``
(``jaxattn.functional.packed``): the attention projections ``w_q, w_k, w_v`` and ``w_o``, the
MLP's kernels, the output layer, and the embedding tables (a tied table serves as both; its
rows keep one scale each, so a lookup dequantizes one row). Norm scales, biases and sinks stay
float32; activations stay in the model's compute dtype (``config.dtype``), and attention obeys
the numerics contract as before. MLA's attention weights stay float32 (its absorbed einsums
read them whole); its MLP and embeddings are converted.

The converted model decodes with ``generate``, the serving engine and ``inspect`` as any other
(the CLI's ``--dtype bfloat16`` and ``--quantize int8``); it is for inference: ``train`` and the
checkpoints take float32 models. ``weight_bytes`` counts what a decode step reads.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxattn.functional.packed import WEIGHT_FORMATS, PackedWeight, pack_weight
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.layers import Dense, Embedding

# attention weight -> how many of its leading axes are inputs: w_q [C, H, D], w_o [H, E, C]
ATTENTION_INPUTS = {"w_q": 1, "w_k": 1, "w_v": 1, "w_o": 2}


def convert_weights(model, weights: str):
    """A copy of ``model`` (a ``TransformerLM``) whose matrices are stored as ``weights``:
    ``"float32"`` (the model itself, unchanged), ``"bfloat16"`` or ``"int8"``."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "float32":
        return model
    converted = nnx.clone(model)

    def pack(variable, contracted, *, table=False):
        value = variable.get_value()
        if isinstance(value, PackedWeight):
            raise ValueError(f"the model's weights are already converted ({value.format}); convert a float32 model")
        # A table [V, C] is packed as the output layer it is when tied, [C, V]: its values are its rows.
        variable.set_value(pack_weight(value.T if table else value, contracted, weights))

    for _, module in nnx.iter_modules(converted):
        if isinstance(module, MultiHeadAttention):
            for name, contracted in ATTENTION_INPUTS.items():
                pack(getattr(module, name), contracted)
        elif isinstance(module, Dense):
            pack(module.kernel, 1)
        elif isinstance(module, Embedding):
            pack(module.embedding, 1, table=True)
    return converted


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (scales included; a tied table counted once): what one
    decode step at batch 1 reads from memory at least."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
