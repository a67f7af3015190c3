"""Tokenizer, corpus, training, checkpoints and generation."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.lm.checkpoint import CheckpointError, RunFolder
from jaxattn.lm.data import Corpus, batch_at, evaluation_windows, load_corpus
from jaxattn.lm.generate import Sampling, generate, sample_token
from jaxattn.lm.tokenizer import decode, encode
from jaxattn.lm.train import TrainConfig, init_model, init_state, make_optimizer, train
from jaxattn.nn import Config, TransformerLM

TINY = Config(vocab_size=256, width=16, layers=1, heads=2, kv_heads=1, head_dim=8, mlp_hidden=32, max_length=64)
TINY_TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=2, eval_every=3,
                         eval_windows=2, checkpoint_every=2, keep_checkpoints=2)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def corpus():
    tokens = encode(TEXT)
    return Corpus(tokens[:1600], tokens[1600:], "fox")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode(text):
    tokens = encode(text)
    assert tokens.dtype == np.int32 and (len(tokens) == 0 or tokens.max() < 256)
    assert decode(tokens) == text


def test_decode_rejects_non_bytes():
    with pytest.raises(ValueError, match=r"range \[0, 300\]"):
        decode([0, 300])


def test_default_corpus_split_is_deterministic():
    first, second = load_corpus(), load_corpus()
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.validation, second.validation)
    total = len(first.train) + len(first.validation)
    assert len(first.train) == int(0.9 * total)
    from pydoc_data.topics import topics

    assert decode(first.train[:200]) == topics[sorted(topics)[0]][:200]


def test_corpus_from_file_and_bad_files(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("ab" * 50, encoding="utf-8")
    corpus = load_corpus(path)
    assert decode(np.concatenate([corpus.train, corpus.validation])) == "ab" * 50
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="has 0 bytes"):
        load_corpus(tmp_path / "empty.txt")


def test_batches_depend_only_on_seed_and_step(corpus):
    a = batch_at(corpus.train, 7, batch=3, length=5, seed=1)
    np.testing.assert_array_equal(a, batch_at(corpus.train, 7, batch=3, length=5, seed=1))
    assert not np.array_equal(a, batch_at(corpus.train, 8, batch=3, length=5, seed=1))
    windows = evaluation_windows(np.arange(11), length=5)
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10]])


def test_training_reduces_loss(tmp_path, corpus):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 30, "eval_every": 100, "checkpoint_every": 100})
    summary = train(TINY, tc, corpus, RunFolder(tmp_path / "run"), progress=False, say=lambda *_: None)
    history = json.loads(json.dumps(summary))
    assert history["validation_bits_per_byte"] < 6.0  # uniform guessing is 8 bits/byte
    run = RunFolder(tmp_path / "run")
    _, saved_history = run.restore(init_state(init_model(TINY, 0), make_optimizer(tc)))
    assert saved_history["train_loss"][-1] < saved_history["train_loss"][0] - 0.5
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_checkpoint_round_trip_and_resume_matches_uninterrupted(tmp_path, corpus, monkeypatch):
    quiet = dict(progress=False, say=lambda *_: None)
    train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "straight"), **quiet)
    # The same run, interrupted (Ctrl-C) when it asks for the batch of step 5, then resumed.
    import jaxattn.lm.train as train_module

    def interrupting_batch_at(tokens, step, **kwargs):
        if step == 5:
            raise KeyboardInterrupt
        return batch_at(tokens, step, **kwargs)

    monkeypatch.setattr(train_module, "batch_at", interrupting_batch_at)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "resumed"), **quiet)
    monkeypatch.undo()
    assert RunFolder(tmp_path / "resumed").latest_step() == 5  # saved on the way out
    train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "resumed"), resume=True, **quiet)

    template = init_state(init_model(TINY, 0), make_optimizer(TINY_TRAIN))
    straight, _ = RunFolder(tmp_path / "straight").restore(template)
    resumed, _ = RunFolder(tmp_path / "resumed").restore(template)
    assert int(straight.step) == int(resumed.step) == 6
    chex.assert_trees_all_equal(straight.params, resumed.params)
    chex.assert_trees_all_equal(straight.opt_state, resumed.opt_state)
    # Restored parameters are the model's: a loaded model gives the saved params' logits.
    model = RunFolder(tmp_path / "straight").load_model()
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), straight.params)


def test_run_folder_is_never_replaced_without_overwrite(tmp_path, corpus):
    quiet = dict(progress=False, say=lambda *_: None)
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **quiet)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="already holds a training run; pass --resume"):
        train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **quiet)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already holds other files"):
        train(TINY, tc, corpus, RunFolder(tmp_path / "mine"), **quiet)
    train(TINY, tc, corpus, RunFolder(tmp_path / "mine", overwrite=True), **quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="does not exist"):
        RunFolder(tmp_path / "nothing").load_model()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no training run"):
        RunFolder(tmp_path / "empty").load_model()
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), progress=False, say=lambda *_: None)
    for path in (tmp_path / "run" / "checkpoints").rglob("*"):
        if path.is_file() and "state" in str(path):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be restored"):
        RunFolder(tmp_path / "run").load_model()
    (tmp_path / "run" / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        RunFolder(tmp_path / "run").load_model()


@pytest.fixture(scope="module")
def small_model():
    return TransformerLM(
        Config(vocab_size=256, width=24, layers=2, heads=4, kv_heads=2, head_dim=6, mlp_hidden=40, max_length=48),
        rngs=nnx.Rngs(0),
    )


def test_cached_and_uncached_greedy_generation_agree(small_model):
    prompts = [encode("hello"), encode("hi")]
    cached = generate(small_model, prompts, max_new_tokens=12)
    uncached = generate(small_model, prompts, max_new_tokens=12, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    # Greedy means each token is the argmax of the full forward pass over what came before.
    sequence = jnp.concatenate([jnp.asarray(prompts[1]), cached[1]])
    logits = small_model(sequence[None, :-1])[0]
    np.testing.assert_array_equal(jnp.argmax(logits[len(prompts[1]) - 1 :], -1), cached[1])


def test_sampling_is_seeded_and_top_k_one_is_greedy(small_model):
    prompts = [encode("abc")]
    sampled = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(small_model, prompts, max_new_tokens=10, sampling=sampled, seed=3)
    b = generate(small_model, prompts, max_new_tokens=10, sampling=sampled, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = generate(small_model, prompts, max_new_tokens=10)
    np.testing.assert_array_equal(generate(small_model, prompts, max_new_tokens=10, sampling=Sampling(1.0, top_k=1)), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda key: sample_token(logits, key, Sampling(1.0, top_p=0.75)))(
        jax.random.split(jax.random.key(0), 400)
    )
    assert set(np.unique(draws).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    frequency_of_first = float((draws == 0).mean())
    assert 0.55 < frequency_of_first < 0.70  # 0.5 / 0.8 = 0.625


def test_prompt_longer_than_context_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match="a prompt of 40 tokens plus 10 new tokens exceeds the model's context length max_length=48"):
        generate(small_model, [np.zeros(40, np.int32)], max_new_tokens=10)
    with pytest.raises(ValueError, match="at least one token"):
        generate(small_model, [np.zeros(0, np.int32)], max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1.0)
