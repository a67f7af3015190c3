"""Tiny random Hugging Face models and tokenizers for the parity tests and the golden fixtures.

Needs ``torch`` and ``transformers`` (the ``parity`` extra); jaxattn itself never imports
them. Every model is small, seeded, and initialised with large enough weights (and
non-trivial biases and norm scales) that a misplaced tensor shows in the logits. Every
tokenizer is saved by transformers' own tokenizer class for its family, with that family's
special tokens (a BOS template where the family has one) and, for instruct-style families,
a chat template.
"""

import json

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = "The next day is bright. The sky is clear and the day is long; the night is short."
# Strings whose ids must equal AutoTokenizer's: spaces, Unicode, digits, the special tokens' text.
TOKENIZER_TEXTS = ["The next day is bright", " a leading space", "naïve ünïcödé, tabs\tand\nlines 12345 😀", "",
                   "special tokens as text: <s> </s> <bos> <|im_end|>"]
PROMPT_TEXT = "The sky is"
CHAT_MESSAGE = "What is the sky like?"

# Each family's tokenizer: transformers' class, its special tokens, whether it adds BOS, a chat template.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
          "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] "
         "| trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
TOKENIZERS = {
    "gpt2": dict(cls="GPT2Tokenizer", specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>"),
    "llama3": dict(cls="PreTrainedTokenizerFast", specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, chat=LLAMA3),
    "llama2": dict(cls="LlamaTokenizer", specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>", add_bos=True),
    "qwen": dict(cls="Qwen2Tokenizer", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                 pad="<|endoftext|>", chat=CHATML),
    "gemma": dict(cls="GemmaTokenizer", specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                  bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True, chat=GEMMA),
    "neox": dict(cls="GPTNeoXTokenizer", specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>"),
    "smollm": dict(cls="PreTrainedTokenizerFast", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   eos="<|im_end|>", pad="<|endoftext|>", chat=CHATML),
}


def tiny_tokenizer(vocab_size=300, specials=()):
    """A byte-level BPE (GPT-2's scheme) trained on one sentence: any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=list(specials))
    tokenizer.train_from_iterator([TEXT] * 10, trainer)
    return tokenizer


def save_tokenizer(folder, style):
    """Saves a family's tokenizer with transformers' own class; returns it (as transformers reads it back)."""
    spec = TOKENIZERS[style]
    backend = tiny_tokenizer(300, spec["specials"])
    merges = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    named = {f"{name}_token": spec[name] for name in ("bos", "eos", "unk", "pad") if spec.get(name)}
    if spec["cls"] == "PreTrainedTokenizerFast":
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=spec.get("add_bos", False),
                                                         **named)
    else:
        cls = getattr(transformers, spec["cls"])
        extra = dict(add_bos_token=True) if spec.get("add_bos") else {}
        tokenizer = cls(vocab=backend.get_vocab(), merges=merges, **named, **extra)
        tokenizer.add_special_tokens({"additional_special_tokens": [t for t in spec["specials"] if t not in named.values()]})
    if spec.get("chat"):
        tokenizer.chat_template = spec["chat"]
    tokenizer.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def _configs(vocab_size):
    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.3, attn_implementation="eager")
    three = dict(common, num_hidden_layers=3)
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=4, n_positions=48,
                                        initializer_range=0.3, attn_implementation="eager", bos_token_id=0,
                                        eos_token_id=0),
        # Llama with GQA, a rope_theta that is not 10000, an untied head and a head_dim of its own.
        "llama": transformers.LlamaConfig(**common, num_key_value_heads=2, head_dim=6, rope_theta=500.0,
                                          tie_word_embeddings=False, max_position_embeddings=64),
        "llama_tied": transformers.LlamaConfig(**common, num_key_value_heads=1, rope_theta=10000.0,
                                               tie_word_embeddings=True, max_position_embeddings=64),
        # Llama 3.x: llama3 scaling from an 8-token original context.
        "llama3": transformers.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=64,
                                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0, original_max_position_embeddings=8)),
        "llama_linear": transformers.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=32,
                                                 rope_scaling=dict(rope_type="linear", factor=2.0)),
        "llama_dynamic": transformers.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=16,
                                                  rope_scaling=dict(rope_type="dynamic", factor=2.0)),
        "llama_yarn": transformers.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=64,
                                               rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                 original_max_position_embeddings=16)),
        "qwen2": transformers.Qwen2Config(**common, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=64),
        # Qwen2.5 long-context: YaRN; and windows on the layers from max_window_layers up.
        "qwen2_yarn": transformers.Qwen2Config(**three, num_key_value_heads=2, max_position_embeddings=64,
                                               use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                               rope_scaling=dict(rope_type="yarn", factor=2.0,
                                                                 original_max_position_embeddings=16)),
        "qwen3": transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
        # A sliding window shorter than the test sequences.
        "mistral": transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=5,
                                              max_position_embeddings=64),
        "gemma2": transformers.Gemma2Config(**three, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                            sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                                            final_logit_softcapping=3.0),
        "gemma3_text": transformers.Gemma3TextConfig(
            **dict(three, num_hidden_layers=4), num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            sliding_window=4, query_pre_attn_scalar=8, layer_types=["sliding_attention", "sliding_attention",
                                                                   "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "olmo2": transformers.Olmo2Config(**common, num_key_value_heads=2, max_position_embeddings=64),
        # Phi-3/4-mini: fused projections, partial rotary, LongRoPE past an 8-token original context.
        "phi3": transformers.Phi3Config(
            **dict(common, hidden_size=32), num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
            original_max_position_embeddings=8,
            partial_rotary_factor=0.5, rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.5],
                                                         long_factor=[2.0, 3.0])),
        "gpt_neox": transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24,
                                               num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                                               max_position_embeddings=64, initializer_range=0.3,
                                               attn_implementation="eager"),
        # Head width 12 with a quarter rotary: R = 3, odd; transformers turns 4 dimensions at theta^(-2i/3).
        "gpt_neox_odd": transformers.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=24,
                                                   num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                                   max_position_embeddings=64, initializer_range=0.3,
                                                   attn_implementation="eager"),
        "smollm3": transformers.SmolLM3Config(**dict(common, num_hidden_layers=4), num_key_value_heads=2, pad_token_id=0,
                                              max_position_embeddings=64, no_rope_layer_interval=2),
    }
    # Gemma 3 as published: the text model above beside a (tiny) vision tower, which jaxattn leaves aside.
    configs["gemma3"] = transformers.Gemma3Config(
        text_config=configs["gemma3_text"], attn_implementation="eager", mm_tokens_per_image=4,
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                           patch_size=4))
    return configs


CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM",
           "llama3": "LlamaForCausalLM", "llama_linear": "LlamaForCausalLM", "llama_dynamic": "LlamaForCausalLM",
           "llama_yarn": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen2_yarn": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
           "gpt_neox": "GPTNeoXForCausalLM", "gpt_neox_odd": "GPTNeoXForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
# The tokenizer each family's test checkpoint carries.
FAMILY_TOKENIZER = {"gpt2": "gpt2", "llama": "llama2", "llama_tied": "llama2", "llama3": "llama3", "llama_linear": "llama2",
                    "llama_dynamic": "llama2", "llama_yarn": "llama3", "qwen2": "qwen", "qwen2_yarn": "qwen",
                    "qwen3": "qwen", "mistral": "llama2", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma", "olmo2": "gpt2",
                    "phi3": "llama2", "gpt_neox": "neox", "gpt_neox_odd": "neox", "smollm3": "smollm"}
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


def tiny_checkpoint(folder, name, seed=0, *, eos_token_id=None):
    """A family's tiny model saved with its tokenizer (the vocabulary sized to it, the config's
    special ids the tokenizer's, as in a real checkpoint); the generation config's
    ``eos_token_id`` as given (``None``: never stop early)."""
    tokenizer = save_tokenizer(folder, FAMILY_TOKENIZER[name])
    model = tiny_model(name, vocab_size=len(tokenizer), seed=seed)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(folder)
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


def reference_attentions(model, tokens):
    """transformers' attention weights (eager attention) of one sequence: float32 [L, H, T, T]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens[None], dtype=torch.long), output_attentions=True)
    return np.stack([a[0].float().numpy() for a in out.attentions])


def reference_greedy(model, prompt, new_tokens=20, *, use_cache=True, stop=False):
    """transformers' greedy continuation of one prompt: int [n] (n = new_tokens unless ``stop``
    lets its generation config's eos end it sooner)."""
    kwargs = {} if stop else dict(min_new_tokens=new_tokens)
    with torch.no_grad():
        ids = torch.tensor(prompt[None], dtype=torch.long)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, **kwargs)
    return out[0, len(prompt):].numpy().astype(np.int32)


def reference_text(folder, model, prompt_text, new_tokens=20):
    """What transformers prints for a prompt: the text of its greedy continuation, read with
    AutoTokenizer and decoded with skip_special_tokens=True; it stops at the eos if one comes."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompt_text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return prompt_text + tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


def reference_chat_reply(folder, model, message, new_tokens=20):
    """What transformers answers (greedy) to one user message through the chat template,
    decoded with skip_special_tokens=True; ``None`` without a chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        return None
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def reference_tokens(folder):
    """AutoTokenizer's ids for TOKENIZER_TEXTS, and its chat template's text and ids for one message."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = {text: tokenizer(text).input_ids for text in TOKENIZER_TEXTS}
    chat = None
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": CHAT_MESSAGE}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chat = dict(text=text, ids=list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                                      return_dict=True)["input_ids"]))
    return json.loads(json.dumps({"ids": ids, "chat": chat}))


def tiny_deepseek_attention(*, rope_interleave=True, q_lora_rank=12, seed=0, rope_scaling=None):
    """One DeepSeek-V3 attention layer (MLA) and its config, from transformers."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=20, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_nope_head_dim=6,
        qk_rope_head_dim=4, v_head_dim=5, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, rope_interleave=rope_interleave, rope_theta=500.0, rms_norm_eps=1e-5, attn_implementation="eager",
        max_position_embeddings=64, rope_scaling=rope_scaling,
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
