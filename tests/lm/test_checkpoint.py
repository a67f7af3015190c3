"""Run folders: round trips, resuming, never overwriting, clear errors, one trainer at a time."""

import dataclasses
import json
import multiprocessing
import shutil
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn.lm.train as train_module
from jaxattn.lm.checkpoint import CheckpointError, RunFolder
from jaxattn.lm.data import Corpus, batch_at
from jaxattn.lm.tokenizer import encode
from jaxattn.lm.train import TrainConfig, init_model, init_state, make_optimizer, train
from tests.tiny import QUIET, TINY, TINY_TRAIN


def test_checkpoint_round_trip_and_resume_matches_uninterrupted(tmp_path, corpus, monkeypatch):
    train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "straight"), **QUIET)
    # checkpoints at steps 2, 4 and 6; the run keeps its last keep_checkpoints=2
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
    # The same run, interrupted (Ctrl-C) when it asks for the batch of step 5, then resumed.
    messages = []

    def interrupting_batch_at(tokens, step, **kwargs):
        if step == 5:
            raise KeyboardInterrupt
        return batch_at(tokens, step, **kwargs)

    monkeypatch.setattr(train_module, "batch_at", interrupting_batch_at)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "resumed"), progress=False, say=messages.append)
    monkeypatch.undo()
    assert RunFolder(tmp_path / "resumed").latest_step() == 5  # saved on the way out
    assert "checkpoint saved" in messages[-1] and "Continue with --resume" in messages[-1]
    train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "resumed"), resume=True, **QUIET)

    template = init_state(init_model(TINY, 0), make_optimizer(TINY_TRAIN))
    straight, _ = RunFolder(tmp_path / "straight").restore(template)
    resumed, _ = RunFolder(tmp_path / "resumed").restore(template)
    assert int(straight.step) == int(resumed.step) == 6
    chex.assert_trees_all_equal(straight.params, resumed.params)
    chex.assert_trees_all_equal(straight.opt_state, resumed.opt_state)
    # A model loaded for inference has exactly the saved parameters.
    model = RunFolder(tmp_path / "straight").load_model()
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), straight.params)


def test_loading_for_inference_reads_no_optimizer_state(tmp_path, corpus):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    run = RunFolder(tmp_path / "run")
    saved, _ = run.restore(init_state(init_model(TINY, 0), make_optimizer(tc)))
    # Damage the run's record of the optimizer: a params-only load must not notice.
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    record["train"] = {"learning_rate": "not even a number"}
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    model = RunFolder(tmp_path / "run").load_model()
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), saved.params)


def test_run_folder_is_never_replaced_without_overwrite(tmp_path, corpus):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="already holds a training run; pass --resume"):
        train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already holds other files"):
        train(TINY, tc, corpus, RunFolder(tmp_path / "mine"), **QUIET)
    train(TINY, tc, corpus, RunFolder(tmp_path / "mine", overwrite=True), **QUIET)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="does not exist"):
        RunFolder(tmp_path / "nothing").load_model()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no training run"):
        RunFolder(tmp_path / "empty").load_model()
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    for path in (tmp_path / "run" / "checkpoints").rglob("*"):
        if path.is_file() and "state" in str(path):
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be restored"):
        RunFolder(tmp_path / "run").load_model()
    (tmp_path / "run" / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        RunFolder(tmp_path / "run").load_model()


def _hold_lock(path, ready, release):
    with RunFolder(path).lock():
        ready.set()
        release.wait(30)


def test_a_run_folder_is_locked_while_a_process_trains_in_it(tmp_path, corpus):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(CheckpointError, match=rf"is in use: process {holder.pid} on host .* is training in it"):
            train(TINY, TINY_TRAIN, corpus, RunFolder(tmp_path / "run"), resume=True, **QUIET)
    finally:
        release.set()
        holder.join(30)
    # The holder is gone (whatever way it ended): the folder can be used again.
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 1})
    train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    assert RunFolder(tmp_path / "run").latest_step() == 1


RELEASE_0_2_0 = Path(__file__).parent.parent / "data" / "release-0.2.0"


def test_a_run_folder_written_by_release_0_2_0_loads_and_resumes(tmp_path):
    # Written by `jaxattn train` of release 0.2.0 (see tests/data/release-0.2.0/README.md): its
    # run.json stores latent_dim/rope_dim for standard attention, its attention layers flat
    # q_proj/k_proj/v_proj/o_proj kernels, and its logits on a text were recorded by that release.
    folder = tmp_path / "run"
    shutil.copytree(RELEASE_0_2_0 / "run", folder)
    saved = json.loads((folder / "run.json").read_text())["model"]
    assert saved["attention"] == "standard" and saved["latent_dim"] == 64  # what this release would refuse
    model = RunFolder(folder).load_model()
    assert model.blocks[0].attn.w_q.shape == (16, 4, 32)  # head-shaped now
    expected = np.load(RELEASE_0_2_0 / "expected_logits.npz")
    chex.assert_trees_all_close(model(jnp.asarray(expected["tokens"])), expected["logits"], atol=1e-6, rtol=1e-6)
    # Resuming restores the optimizer's moments in the new layout too, and training goes on.
    config = RunFolder(folder).model_config()
    tc = TrainConfig(**json.loads((folder / "run.json").read_text())["train"])
    template = init_state(init_model(config, 0), make_optimizer(tc))
    state, history = RunFolder(folder).restore(template)
    assert int(state.step) == 2 and history["step"]
    mu = state.opt_state[1][0].mu["blocks"][0]["attn"]
    assert mu["w_o"].shape == (4, 32, 16) and float(jnp.abs(mu["w_o"]).sum()) > 0  # moved, not zeroed
    tokens = encode("The next day is bright and the sky is clear. " * 4)
    corpus = Corpus(tokens[:120], tokens[120:], "sky")
    summary = train(config, dataclasses.replace(tc, steps=3, eval_windows=1, seq_len=16, batch_size=2), corpus,
                    RunFolder(folder), resume=True, **QUIET)
    assert summary["steps"] == 3
