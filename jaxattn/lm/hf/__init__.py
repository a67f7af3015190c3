"""Real checkpoints: Hugging Face folders of GPT-2, Llama (1-3.x, with every RoPE scaling),
Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), OLMo 2, Phi-3/4-mini, GPT-NeoX/Pythia
and SmolLM3 as a ``TransformerLM``, with their tokenizer as transformers reads it (special
tokens, chat template, end-of-sequence ids); and one DeepSeek-V2/V3 attention layer as MLA.

One chapter a file, in the order a checkpoint is read:

- ``config.py``: the folder (local, or fetched from the hub) and ``config.json`` ->
  ``TransformerConfig``; a setting jaxattn does not follow is an error naming it.
- ``weights.py``: one weight table per architecture, the safetensors reader and
  ``load_hf_model``, which never leaves a half-loaded model behind.
- ``tokenizer.py``: ``HFTokenizer``, the same ids as ``AutoTokenizer``; chat templates; stop ids.
- ``mla.py``: DeepSeek's attention layer as ``MLAParams``.

PyTorch is never imported.
"""

from jaxattn.lm.hf.config import (
    CONFIGS,
    DTYPES,
    LAYER_KINDS,
    ROPE_TYPES,
    SUPPORTED_MODEL_TYPES,
    LoadError,
    model_folder,
    read_hf_config,
    transformer_config,
)
from jaxattn.lm.hf.mla import mla_from_hf, mla_layer_from_hf
from jaxattn.lm.hf.tokenizer import HFTokenizer, load_tokenizer, render_chat_template, stop_ids
from jaxattn.lm.hf.weights import WEIGHT_TABLES, Row, SafetensorsFolder, load_hf_model, read_weights

__all__ = [
    "CONFIGS", "DTYPES", "LAYER_KINDS", "ROPE_TYPES", "SUPPORTED_MODEL_TYPES", "WEIGHT_TABLES", "HFTokenizer",
    "LoadError", "Row", "SafetensorsFolder", "load_hf_model", "load_tokenizer", "mla_from_hf", "mla_layer_from_hf",
    "model_folder", "read_hf_config", "read_weights", "render_chat_template", "stop_ids", "transformer_config",
]
