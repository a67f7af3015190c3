"""Training: the loss falls, hyper-parameters are checked up front, decay hits matrices only."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.train import TrainConfig, init_model, init_state, make_optimizer, train
from tests.tiny import QUIET, TINY, TINY_TRAIN


def test_training_reduces_loss(tmp_path, corpus):
    tc = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 30, "eval_every": 100, "checkpoint_every": 100})
    summary = train(TINY, tc, corpus, RunFolder(tmp_path / "run"), **QUIET)
    assert summary["validation_bits_per_byte"] < 6.0  # uniform guessing is 8 bits/byte
    history = summary["history"]
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.5
    assert summary["train_bits_per_byte"] == pytest.approx(history["train_loss"][-1] / math.log(2))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", float("nan"), "learning_rate must be a finite number, got nan"),
        ("learning_rate", float("inf"), "learning_rate must be a finite number"),
        ("learning_rate", 0.0, r"learning_rate must be a number > 0, got 0.0"),
        ("learning_rate", -1e-3, "learning_rate must be a number > 0"),
        ("weight_decay", -0.1, "weight_decay must be a number >= 0, got -0.1"),
        ("grad_clip", 0.0, "grad_clip must be a number > 0"),
        ("min_learning_rate_ratio", 1.5, r"min_learning_rate_ratio must be a number >= 0 and <= 1, got 1.5"),
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
        ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_hyper_parameters_are_rejected_before_training(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_weight_decay_shrinks_matrices_and_leaves_norm_scales_alone():
    tc = TrainConfig(steps=10, learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    model = init_model(TINY, 0)
    optimizer = make_optimizer(tc)
    state = init_state(model, optimizer)
    zeros = jax.tree.map(jnp.zeros_like, state.params)  # no gradient: only the decay moves weights
    updates, _ = optimizer.update(zeros, state.opt_state, state.params)
    lr = 0.1  # the schedule's value at step 0 without warmup
    for path, (param, update) in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                     zip(jax.tree.leaves(state.params), jax.tree.leaves(updates))):
        name = jax.tree_util.keystr(path[0])
        if param.ndim >= 2:  # matrices and embeddings decay: p <- p - lr * wd * p
            chex.assert_trees_all_close(update, -lr * 0.5 * param, rtol=1e-5, atol=1e-8)
        else:  # norm scales (and biases) do not
            np.testing.assert_array_equal(update, 0.0, err_msg=name)
    assert any(p.ndim == 1 for p in jax.tree.leaves(state.params))  # the model has norm scales
