"""Tiny random Hugging Face models for the parity tests and the golden fixtures.

Needs ``torch`` and ``transformers`` (the ``parity`` extra); jaxattn itself never imports
them. Every model is small, seeded, and initialised with large enough weights (and
non-trivial biases and norm scales) that a misplaced tensor shows in the logits.
"""

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = "The next day is bright. The sky is clear and the day is long; the night is short."


def tiny_tokenizer(vocab_size=300):
    """A byte-level BPE (GPT-2's scheme) trained on one sentence: any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([TEXT] * 10, trainer)
    return tokenizer


def _configs(vocab_size):
    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.3, attn_implementation="eager")
    return {
        "gpt2": transformers.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=4, n_positions=48,
                                        initializer_range=0.3, attn_implementation="eager", bos_token_id=0,
                                        eos_token_id=0),
        # Llama with GQA, a rope_theta that is not 10000, an untied head and a head_dim of its own.
        "llama": transformers.LlamaConfig(**common, num_key_value_heads=2, head_dim=6, rope_theta=500.0,
                                          tie_word_embeddings=False, max_position_embeddings=64),
        "llama_tied": transformers.LlamaConfig(**common, num_key_value_heads=1, rope_theta=10000.0,
                                               tie_word_embeddings=True, max_position_embeddings=64),
        "qwen2": transformers.Qwen2Config(**common, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=64),
        # A sliding window shorter than the test sequences.
        "mistral": transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=5,
                                              max_position_embeddings=64),
    }


CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ARCHITECTURES = tuple(CLASSES)


def tiny_model(name, vocab_size=64, seed=0):
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[name])(_configs(vocab_size)[name]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:  # biases and norm scales: away from 0 and 1
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
    model.generation_config.eos_token_id = None  # always generate the number of tokens asked for
    model.generation_config.pad_token_id = 0
    return model


def ragged_batch(vocab_size, seed=0):
    """Two right-padded sequences of lengths 11 and 7: tokens int [2, 11], lengths [2]."""
    rng = np.random.default_rng(seed)
    lengths = np.array([11, 7])
    tokens = rng.integers(1, vocab_size, (2, 11))
    tokens[1, 7:] = 0
    return tokens.astype(np.int32), lengths


def reference_logits(model, tokens, lengths):
    """transformers' logits of a right-padded batch (the padding masked), float32 [B, T, V]."""
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def reference_greedy(model, prompt, new_tokens=20):
    """transformers' greedy continuation of one prompt: int [new_tokens]."""
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].numpy().astype(np.int32)


def tiny_deepseek_attention(*, rope_interleave=True, q_lora_rank=12, seed=0):
    """One DeepSeek-V3 attention layer (MLA) and its config, from transformers."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=20, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6,
        qk_rope_head_dim=4, v_head_dim=5, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, rope_interleave=rope_interleave, rope_theta=500.0, rms_norm_eps=1e-5, attn_implementation="eager",
    )
    layer = deepseek.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(0.3 * torch.randn_like(parameter) + (1.0 if parameter.ndim == 1 else 0.0))
    rotary = deepseek.DeepseekV3RotaryEmbedding(config)
    return layer, rotary, config


def deepseek_reference(layer, rotary, hidden):
    """The layer's causal output on hidden [B, T, C] (float32 NumPy)."""
    B, T, _ = hidden.shape
    h = torch.tensor(hidden)
    position_embeddings = rotary(h, torch.arange(T)[None].expand(B, T))
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        return layer(h, position_embeddings, mask)[0].numpy()
