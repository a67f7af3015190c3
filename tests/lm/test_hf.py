"""Hugging Face checkpoints: parity with transformers (golden fixtures always, live when
PyTorch is installed), the tokenizer, and clear errors for every broken input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import mla_naive
from jaxattn.lm.generate import generate
from jaxattn.lm.hf import LoadError, load_hf_model, mla_from_hf, mla_layer_from_hf, read_hf_config, SafetensorsFolder

FIXTURES = Path(__file__).parent.parent / "data" / "hf"
ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral")
# CI installs the parity extra and sets this, so that the live tests cannot be skipped there.
REQUIRE_LIVE = os.environ.get("JAXATTN_REQUIRE_PARITY") == "1"


def check_logits_and_greedy(model, tokens, lengths, logits, prompt, greedy):
    ours = np.asarray(model(jnp.asarray(tokens)))
    for row, length in enumerate(lengths):  # right padding: valid rows never see it
        np.testing.assert_allclose(ours[row, :length], logits[row, :length], atol=1e-4, rtol=0)
    for use_cache in (True, False):
        tokens_out = generate(model, [prompt], max_new_tokens=len(greedy), use_cache=use_cache)
        np.testing.assert_array_equal(np.asarray(tokens_out[0]), greedy)


# ------------------------------------------------------------------ golden (no PyTorch)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_golden_parity_with_transformers(name):
    model, _ = load_hf_model(FIXTURES / name)
    expected = np.load(FIXTURES / name / "expected.npz")
    check_logits_and_greedy(model, expected["tokens"], expected["lengths"], expected["logits"], expected["prompt"],
                            expected["greedy"])


def test_golden_deepseek_mla_layer():
    folder = FIXTURES / "deepseek_mla"
    hf = read_hf_config(folder)
    expected = np.load(folder / "expected.npz")
    params, settings = mla_from_hf(SafetensorsFolder(folder), hf, prefix="model.layers.0.self_attn.")
    chex.assert_trees_all_close(mla_naive(params, jnp.asarray(expected["hidden"]), settings=settings), expected["output"],
                                atol=1e-5, rtol=0)
    layer = mla_layer_from_hf(SafetensorsFolder(folder), hf, prefix="model.layers.0.self_attn.")
    chex.assert_trees_all_close(layer(jnp.asarray(expected["hidden"])), expected["output"], atol=1e-5, rtol=0)


def test_tokenizer_round_trips_and_fits_the_model():
    model, tokenizer = load_hf_model(FIXTURES / "gpt2")
    assert tokenizer.vocab_size == model.config.vocab_size
    for text in ("The next day is bright", "naïve ünïcödé, tabs\tand\nlines 12345 😀"):
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and ids.max() < model.config.vocab_size
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("The next day")) < len("The next day")  # merges were learned


def test_bfloat16_loading():
    model, _ = load_hf_model(FIXTURES / "llama", dtype="bfloat16")
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    ours = np.asarray(model(jnp.asarray(expected["tokens"][:1])), np.float32)
    np.testing.assert_allclose(ours[0], expected["logits"][0], atol=0.15 * np.abs(expected["logits"]).max())


def test_import_and_load_without_pytorch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"  # importing them now fails
        "import jaxattn, jaxattn.lm.hf, jaxattn.lm.inspection\n"
        "from jaxattn.lm.hf import load_hf_model\n"
        f"model, tokenizer = load_hf_model({str(FIXTURES / 'gpt2')!r})\n"
        "logits = model(tokenizer.encode('The sky')[None])\n"
        "assert logits.shape[-1] == model.config.vocab_size == tokenizer.vocab_size, logits.shape\n"
        "print('loaded', sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded ['torch', 'transformers']", result.stdout  # only the blocking None entries


# --------------------------------------------------------------------- bad input


@pytest.fixture
def llama_copy(tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", folder)
    return folder


def test_missing_config_and_unsupported_model_type(tmp_path, llama_copy):
    with pytest.raises(LoadError, match="has no config.json"):
        load_hf_model(tmp_path)
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(LoadError, match=r"model_type 'bert' is not supported; supported: gpt2, llama, qwen2, mistral"):
        load_hf_model(llama_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}}, "rope_type='llama3'"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'.*supported: 'silu'"),
        ({"num_key_value_heads": 4}, r"model.layers.0.self_attn.k_proj.weight' in 'model.safetensors' has shape \(12, 16\)"),
    ],
)
def test_config_that_would_change_the_maths_or_does_not_fit(llama_copy, change, message):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LoadError, match=message):
        load_hf_model(llama_copy)


def _rewrite_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    save_file(edit(tensors), str(folder / "model.safetensors"))


def test_missing_wrong_shaped_and_unknown_tensors(llama_copy):
    _rewrite_tensors(llama_copy, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(LoadError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' \(for blocks.1.mlp.up.kernel\) is missing from model.safetensors"):
        load_hf_model(llama_copy)
    shutil.copy(FIXTURES / "llama" / "model.safetensors", llama_copy / "model.safetensors")
    _rewrite_tensors(llama_copy, lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:-1]})
    with pytest.raises(LoadError, match=r"tensor 'model.norm.weight' .* has shape \(15,\).* needs \(16,\)"):
        load_hf_model(llama_copy)
    shutil.copy(FIXTURES / "llama" / "model.safetensors", llama_copy / "model.safetensors")
    _rewrite_tensors(llama_copy, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(6, np.float32)})
    with pytest.raises(LoadError, match=r"1 tensor\(s\) that this 'llama' configuration has no place for: model.layers.0.self_attn.q_norm.weight"):
        load_hf_model(llama_copy)


def test_corrupt_safetensors_names_the_file(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64)
    with pytest.raises(LoadError, match=r"model.safetensors' is not a readable safetensors file"):
        load_hf_model(llama_copy)
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoadError, match=r"holds no \*.safetensors weights \(found pytorch_model.bin: PyTorch pickles are not read"):
        load_hf_model(llama_copy)


def test_a_hub_id_offline_says_so_and_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoadError, match=r"could not fetch 'openai-community/gpt2' from the Hugging Face Hub .*pass its local folder"):
        load_hf_model("openai-community/gpt2")
    with pytest.raises(LoadError, match="model folder './no/such/folder' does not exist"):
        load_hf_model("./no/such/folder")


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(FIXTURES / "llama" / "config.json", folder)
    tensors = load_file(str(FIXTURES / "llama" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_hf_model(folder)
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(expected["tokens"][:1])))[0], expected["logits"][0], atol=1e-4)


# ------------------------------------------------------------- live (PyTorch + transformers)


@pytest.fixture(scope="module")
def hf_models():
    if REQUIRE_LIVE:
        import torch  # noqa: F401  (fail, not skip, where CI promised PyTorch)
        import transformers  # noqa: F401
    else:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    from tests.lm import hf_models

    return hf_models


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama_tied", "qwen2", "mistral"])
def test_live_parity_with_transformers(hf_models, tmp_path, name):
    reference = hf_models.tiny_model(name, vocab_size=80, seed=7)
    reference.save_pretrained(tmp_path / name)
    model, _ = load_hf_model(tmp_path / name)
    tokens, lengths = hf_models.ragged_batch(80, seed=3)
    logits = hf_models.reference_logits(reference, tokens, lengths)
    prompt = tokens[1, :7]
    check_logits_and_greedy(model, tokens, lengths, logits, prompt, hf_models.reference_greedy(reference, prompt))


@pytest.mark.parametrize("rope_interleave, q_lora_rank", [(True, 12), (False, None)])
def test_live_deepseek_mla_layer(hf_models, rope_interleave, q_lora_rank):
    layer, rotary, config = hf_models.tiny_deepseek_attention(rope_interleave=rope_interleave, q_lora_rank=q_lora_rank,
                                                             seed=5)
    hidden = np.random.default_rng(1).standard_normal((2, 9, config.hidden_size)).astype(np.float32)
    tensors = {f"self_attn.{k}": v.detach().numpy() for k, v in layer.state_dict().items()}
    params, settings = mla_from_hf(tensors, config.to_dict(), prefix="self_attn.")
    assert settings.rope.style == ("interleaved" if rope_interleave else "half")
    chex.assert_trees_all_close(mla_naive(params, jnp.asarray(hidden), settings=settings),
                                hf_models.deepseek_reference(layer, rotary, hidden), atol=1e-5, rtol=0)
