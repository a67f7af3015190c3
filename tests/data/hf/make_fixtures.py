"""Writes the golden parity fixtures: tiny random Hugging Face checkpoints of every family
jaxattn opens, with their tokenizers, and what transformers computes with them, so that the
tests check parity without PyTorch.

    pip install -e ".[test,parity]" && python -m tests.data.hf.make_fixtures

Each folder holds what ``save_pretrained`` writes (config.json, generation_config.json,
model.safetensors in float32, tokenizer.json, tokenizer_config.json, the chat template) and
expected.npz: tokens [2, 11] (right-padded), lengths [2], logits [2, 11, V] (the tests compare
valid rows only), prompt and greedy (20 greedy tokens), attentions [L, H, 11, 11] (the
attention weights of the first row); and expected.json: AutoTokenizer's ids
for a set of strings, the chat template's text and ids and the greedy reply to one message,
and what ``generate`` prints for PROMPT_TEXT (greedy, 20 tokens, stopping at the checkpoint's eos, chosen so that it comes
early). deepseek_mla/ holds one attention layer, hidden [2, 7, C] and its output.
"""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.lm.hf_models import (
    ARCHITECTURES,
    CHAT_MESSAGE,
    PROMPT_TEXT,
    deepseek_reference,
    ragged_batch,
    reference_attentions,
    reference_chat_reply,
    reference_greedy,
    reference_logits,
    reference_text,
    reference_tokens,
    tiny_checkpoint,
    tiny_deepseek_attention,
)

HERE = Path(__file__).parent


def early_eos(model, folder):
    """An eos token that greedy decoding of PROMPT_TEXT writes at its 6th step (or later, or
    if greedy repeats itself by then, earlier but not first), and not before: so that
    generation stops early, at a known place."""
    import transformers

    ids = np.asarray(transformers.AutoTokenizer.from_pretrained(folder)(PROMPT_TEXT).input_ids, np.int32)
    greedy = reference_greedy(model, ids, 20)
    for index in [*range(5, 20), *range(4, 0, -1)]:
        if greedy[index] not in greedy[:index]:
            return int(greedy[index])
    return None


def write_checkpoint(name, seed=0):
    """The family's checkpoint, its expected logits and greedy tokens, and its tokenizer's,
    chat template's and printed text's expectations."""
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    model = tiny_checkpoint(folder, name, seed=seed)
    tokens, lengths = ragged_batch(model.get_input_embeddings().num_embeddings, seed=seed)
    np.savez(folder / "expected.npz", tokens=tokens, lengths=lengths, logits=reference_logits(model, tokens, lengths),
             prompt=tokens[1, :7], greedy=reference_greedy(model, tokens[1, :7]),
             attentions=reference_attentions(model, tokens[0]))
    model.generation_config.eos_token_id = early_eos(model, folder)
    model.generation_config.save_pretrained(folder)
    expected = reference_tokens(folder)
    expected["printed"] = reference_text(folder, model, PROMPT_TEXT)
    expected["chat_reply"] = reference_chat_reply(folder, model, CHAT_MESSAGE)
    expected["eos_token_id"] = model.generation_config.eos_token_id
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))


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
    for name in ARCHITECTURES:
        write_checkpoint(name)
    write_deepseek()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"fixtures written to {HERE}: {total / 1024:.0f} KiB in all")
