"""Writes the golden parity fixtures: tiny random Hugging Face checkpoints and what
transformers computes with them, so that the tests check parity without PyTorch.

    pip install -e ".[test,parity]" && python -m tests.data.hf.make_fixtures

Each folder holds config.json, model.safetensors (float32) and expected.npz:
tokens [2, 11] (right-padded), lengths [2], logits [2, 11, V] (padding rows are whatever
transformers computed; the tests compare valid rows only), prompt and greedy (20 greedy
tokens). gpt2/ also holds a tokenizer.json; deepseek_mla/ holds one attention layer,
hidden [2, 7, C] and its output.
"""

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.lm.hf_models import (
    deepseek_reference,
    ragged_batch,
    reference_greedy,
    reference_logits,
    tiny_deepseek_attention,
    tiny_model,
    tiny_tokenizer,
)

HERE = Path(__file__).parent


def write_model(name, vocab_size=64, tokenizer=None):
    folder = HERE / name
    model = tiny_model(name, vocab_size=vocab_size)
    model.save_pretrained(folder)
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    tokens, lengths = ragged_batch(vocab_size)
    np.savez(folder / "expected.npz", tokens=tokens, lengths=lengths, logits=reference_logits(model, tokens, lengths),
             prompt=tokens[1, :7], greedy=reference_greedy(model, tokens[1, :7]))


def write_deepseek():
    folder = HERE / "deepseek_mla"
    folder.mkdir(exist_ok=True)
    layer, rotary, config = tiny_deepseek_attention()
    tensors = {f"model.layers.0.self_attn.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    config.to_json_file(str(folder / "config.json"))
    hidden = np.random.default_rng(0).standard_normal((2, 7, config.hidden_size)).astype(np.float32)
    np.savez(folder / "expected.npz", hidden=hidden, output=deepseek_reference(layer, rotary, hidden))


if __name__ == "__main__":
    tokenizer = tiny_tokenizer()
    write_model("gpt2", vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer)
    for name in ("llama", "qwen2", "mistral"):
        write_model(name)
    write_deepseek()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"fixtures written to {HERE}: {total / 1024:.0f} KiB in all")
