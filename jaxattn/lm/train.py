"""Training a ``TransformerLM`` on bytes: AdamW, warmup + cosine, clipping, bits per byte.

The model's parameters travel as a plain nested dict (``nnx.to_pure_dict``), so the
jitted step, optax and orbax all see one ordinary pytree; ``nnx.merge`` rebuilds the
module inside the step. Losses are reported in bits per byte everywhere (progress bar,
history, summary, plot): one token is one byte, so that is the cross entropy in bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxattn.functional.checks import check_int, check_number
from jaxattn.functional.ring import zigzag_order
from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.data import Corpus, batch_at, evaluation_windows
from jaxattn.lm import parallel
from jaxattn.nn import TransformerConfig, TransformerLM

BITS_PER_NAT = 1 / math.log(2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation side of a run (the model side is ``Config``)."""

    steps: int = 700
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 4e-3
    warmup_steps: int = 50
    min_learning_rate_ratio: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 48
    log_every: int = 20
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0

    def __post_init__(self):
        """Rejects hyper-parameters that could only end in NaN or nothing, before any step runs."""
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        check_number("learning_rate", self.learning_rate, above=0)
        check_number("grad_clip", self.grad_clip, above=0)
        check_number("weight_decay", self.weight_decay, minimum=0)
        check_number("min_learning_rate_ratio", self.min_learning_rate_ratio, minimum=0, maximum=1)


def default_model_config(attention: str = "gqa") -> TransformerConfig:
    """The default byte-level model (about 0.8M parameters): sized so that
    ``jaxattn train`` reaches its validation target in about ten minutes on 2 CPU cores.

    ``attention`` picks the family: ``"mha"`` (K = H), ``"gqa"`` (K = H / 2), ``"mqa"`` (K = 1),
    or ``"mla"`` (latent width L = 64, decoupled RoPE width R = 16).
    """
    heads = 4
    kv_heads = {"mha": heads, "gqa": heads // 2, "mqa": 1, "mla": heads}
    if attention not in kv_heads:
        raise ValueError(f"attention must be one of {sorted(kv_heads)}, got {attention!r}")
    mla = dict(attention="mla", latent_dim=64, rope_dim=16) if attention == "mla" else {}
    return TransformerConfig(
        width=128, layers=4, heads=heads, kv_heads=kv_heads[attention], head_dim=32, mlp_hidden=352, max_length=1024, **mla,
    )


def induction_model_config() -> TransformerConfig:
    """The induction preset's model: 2 layers of attention only (no MLP), the smallest model in
    which an induction head can form (it needs a head in an earlier layer to compose with).
    Layer 0 is local with a window of 2 (each token sees itself and the one before it), so the
    only thing it can pass on about the past is the previous token: the textbook circuit is then
    the one way to copy a repeat. With a global layer 0 plain repeats gave no circuit in 10,000
    steps, and with pairs ``a b a b`` added to start a previous-token head the model wired another
    circuit, which the induction score does not count (docs/inspect.md, "Watch an induction
    circuit form")."""
    return TransformerConfig(width=64, layers=2, heads=4, head_dim=16, attention_only=True, max_length=64, norm="layer",
                             qkv_bias=True, window=2, layer_types=("local", "global"))


INDUCTION_TRAIN = TrainConfig(steps=8000, batch_size=32, seq_len=64, learning_rate=3e-3, warmup_steps=100,
                              weight_decay=0.0, eval_every=250, eval_windows=16, log_every=50, checkpoint_every=2000,
                              keep_checkpoints=1)


class Preset(NamedTuple):
    """A named run: its model, its optimisation, the corpus it trains on (``None``: the default
    text or ``--data``), and ``measure`` for ``train`` (``None``: nothing beyond the losses)."""

    config: TransformerConfig
    train: TrainConfig
    corpus: Corpus | None
    measure: Callable | None


PRESETS = ("default", "induction")


def preset(name: str, *, attention: str = "gqa") -> Preset:
    """``"default"``: the byte-level model of ``default_model_config(attention)`` on text;
    ``"induction"``: ``induction_model_config`` on ``repeated_tokens``, its induction score and
    loss on the repeated half measured at every evaluation (``induction_measure``)."""
    if name == "default":
        return Preset(default_model_config(attention), TrainConfig(), None, None)
    if name == "induction":
        from jaxattn.lm.data import repeated_tokens
        from jaxattn.lm.inspection import induction_measure
        from jaxattn.lm.tokenizer import ByteTokenizer

        return Preset(induction_model_config(), INDUCTION_TRAIN, repeated_tokens(), induction_measure(ByteTokenizer()))
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    params: dict
    opt_state: optax.OptState


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay and global-norm clipping."""
    warmup = min(tc.warmup_steps, tc.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_learning_rate_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=_decay_mask),
    )


def _decay_mask(params):
    """Weight decay on matrices only (not on norm scales or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def init_model(config: TransformerConfig, seed: int, *, mesh=None, rules=parallel.LOGICAL_AXES) -> TransformerLM:
    """The model at initialisation; on a mesh its attention runs by ring (``parallel.mesh_kernel``)."""
    attention_fn = None if mesh is None else parallel.mesh_kernel(mesh, rules)
    return TransformerLM(config, attention_fn=attention_fn, rngs=nnx.Rngs(seed))


def init_state(model: TransformerLM, optimizer, *, mesh=None, rules=parallel.LOGICAL_AXES) -> TrainState:
    """Step 0, the parameters and a fresh optimizer state; on a mesh, every array laid out
    by ``parallel.state_specs`` (the table ``rules``; the optimizer's moments like their parameters)."""
    params = nnx.to_pure_dict(nnx.state(model))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    if mesh is None:
        return state
    return parallel.shard(state, parallel.state_specs(state, model, optimizer, mesh, rules), mesh)


def check_mesh(tc: "TrainConfig", mesh) -> None:
    """The batch must split over ``data``, each sequence into the 2 * seq chunks of the zigzag layout."""
    if mesh is None:
        return
    data, seq = mesh.shape["data"], mesh.shape["seq"]
    if tc.batch_size % data:
        raise ValueError(f"batch_size={tc.batch_size} does not split over the mesh's data axis of {data} devices")
    if seq > 1 and tc.seq_len % (2 * seq):
        raise ValueError(f"seq_len={tc.seq_len} must be a multiple of {2 * seq} (two chunks per device of the seq axis)")


class Steps(NamedTuple):
    """The compiled functions of a run: ``train(state, batch) -> (state, loss)``,
    ``window_losses(params, batch) -> [B]`` (mean nats per window, for evaluation) and
    ``gradients(params, batch) -> (loss, grads)``."""

    train: Callable
    window_losses: Callable
    gradients: Callable


def make_steps(model: TransformerLM, optimizer, *, mesh=None, state=None, rules=parallel.LOGICAL_AXES) -> Steps:
    """The jitted steps of a run (``Steps``) for ``model``'s structure.

    On a mesh the train step takes and returns ``state`` with its shardings (``state`` gives
    them), every step is traced under ``parallel.layout`` (the table ``rules``) and, when the
    sequence is split, feeds the tokens in ``zigzag_order`` (the loss, a mean over tokens,
    does not depend on their order).
    """
    graphdef = nnx.graphdef(model)
    seq = 1 if mesh is None else mesh.shape["seq"]

    def token_losses(params, batch):  # batch int32 [B, T + 1] -> nats [B, T]
        inputs, targets, positions = batch[:, :-1], batch[:, 1:], None
        if seq > 1:  # each device of the ring gets an early and a late chunk: balanced causal work
            positions = zigzag_order(inputs.shape[1], seq)
            inputs, targets = inputs[:, positions], targets[:, positions]
        logits = nnx.merge(graphdef, params)(inputs, positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    def loss_of(params, batch):
        return token_losses(params, batch).mean()

    def train_step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_of)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), loss

    def window_losses(params, batch):  # [B] mean nats per window
        return token_losses(params, batch).mean(axis=1)

    gradients = jax.value_and_grad(loss_of)
    if mesh is None:
        return Steps(jax.jit(train_step), jax.jit(window_losses), jax.jit(gradients))
    shardings = parallel.shardings_of(state)

    def under_layout(compiled):
        def run(*args):
            with parallel.layout(mesh, rules):
                return compiled(*args)

        return run

    return Steps(under_layout(jax.jit(train_step, out_shardings=(shardings, None), donate_argnums=0)),
                 under_layout(jax.jit(window_losses)), under_layout(jax.jit(gradients)))


def place_batch(batch: np.ndarray, mesh=None, rules=parallel.LOGICAL_AXES):
    """A host batch ``[B, T + 1]`` on the device, or split over the batch's mesh axis."""
    if mesh is None:
        return jnp.asarray(batch)
    return parallel.shard(batch, parallel.batch_spec(mesh, rules), mesh)


def bits_per_byte(eval_loss, params, windows: np.ndarray, batch_size: int, *, mesh=None) -> float:
    """Mean cross entropy over ``windows`` in bits (one token is one byte). On a mesh a
    last, smaller chunk is padded with copies to split evenly, and the copies are not counted."""
    rows = 1 if mesh is None else mesh.shape["data"]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], -len(chunk) % rows, axis=0)])
        losses = parallel.fetch(eval_loss(params, place_batch(padded, mesh)))
        total += float(losses[: len(chunk)].sum())
        count += len(chunk)
    return total / count * BITS_PER_NAT


def train(
    config: TransformerConfig,
    tc: TrainConfig,
    corpus: Corpus,
    run: RunFolder,
    *,
    resume: bool = False,
    progress: bool = True,
    say=print,
    mesh=None,
    measure: Callable[[TransformerLM], dict] | None = None,
) -> dict:
    """Trains, evaluates, checkpoints into ``run``; returns the final summary.

    The batch of step s depends only on ``(tc.seed, s)``, so a run resumed from a
    checkpoint continues exactly as an uninterrupted one would. The run folder is
    locked for the whole run (``RunFolder.lock``). On Ctrl-C the state is saved, the
    message says how to continue, and ``KeyboardInterrupt`` is raised again.

    ``mesh`` (``parallel.mesh_from_spec``): train on all its devices, with parameters,
    optimizer state and batches sharded (``parallel``); the same seed gives the same
    losses as on one device, up to float rounding. In a multi-process run every process
    calls ``train``; process 0 alone writes ``run.json``, holds the lock and reports.

    ``measure(model) -> {name: number}``: called with the model as it stands at step 0, at
    every evaluation and at the end; its numbers join the history under ``"measured"``
    (``{"step": [...], name: [...]}``), e.g. an induction score as it forms.
    """
    check_mesh(tc, mesh)
    lead = jax.process_index() == 0
    with run.lock() if lead else contextlib.nullcontext():
        return _train(config, tc, corpus, run, resume=resume, progress=progress and lead, say=say if lead else _silent,
                      mesh=mesh, measure=measure)


def _silent(*_args, **_kwargs):
    return None


def _measured(measure, model, state, history) -> None:
    """Appends ``measure``'s numbers for ``state``'s parameters to ``history["measured"]``."""
    if measure is None:
        return
    now = nnx.state(model)
    nnx.replace_by_pure_dict(now, state.params)
    nnx.update(model, now)  # the module now holds this step's parameters
    record = history.setdefault("measured", {"step": []})
    record["step"].append(int(state.step))
    for name, value in measure(model).items():
        record.setdefault(name, []).append(float(value))


def _train(config, tc, corpus, run, *, resume, progress, say, mesh, measure) -> dict:
    run.keep_last(tc.keep_checkpoints)
    model = init_model(config, tc.seed, mesh=mesh)
    optimizer = make_optimizer(tc)
    state = init_state(model, optimizer, mesh=mesh)
    train_step, eval_loss, _ = make_steps(model, optimizer, mesh=mesh, state=state)
    history = {"step": [], "train_loss": [], "val_step": [], "val_bpb": []}  # train_loss in nats, val_bpb in bits/byte
    if resume:
        state, history = run.restore(state)
        say(f"Resumed {run.path} at step {int(state.step)}")
    else:
        if jax.process_index() == 0:
            run.start(config, tc, corpus.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxattn: run folder ready")
    windows_now = evaluation_windows(corpus.validation, length=tc.seq_len, max_windows=tc.eval_windows)
    all_windows = evaluation_windows(corpus.validation, length=tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len
    first = int(state.step)
    start_time = time.perf_counter()
    if first == 0:
        _measured(measure, model, state, history)
    bar = tqdm(range(first, tc.steps), initial=first, total=tc.steps, disable=not progress, unit="step", desc="train")
    loss = float("nan")
    try:
        for step in bar:
            batch = place_batch(batch_at(corpus.train, step, batch=tc.batch_size, length=tc.seq_len, seed=tc.seed), mesh)
            state, loss_array = train_step(state, batch)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps or done == first + 1:
                loss = float(parallel.fetch(loss_array))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {done}; lower --learning-rate")
                history["step"].append(done)
                history["train_loss"].append(loss)
                elapsed = time.perf_counter() - start_time
                bar.set_postfix(
                    train_bits_per_byte=f"{loss * BITS_PER_NAT:.3f}",
                    tok_per_s=f"{(done - first) * tokens_per_step / elapsed:,.0f}",
                )
            if done % tc.eval_every == 0 and done < tc.steps:
                bpb = bits_per_byte(eval_loss, state.params, windows_now, tc.batch_size, mesh=mesh)
                history["val_step"].append(done)
                history["val_bpb"].append(bpb)
                _measured(measure, model, state, history)
                measured = "".join(f", {name} {values[-1]:.3f}" for name, values in history.get("measured", {}).items()
                                   if name != "step")
                bar.write(f"step {done}: validation {bpb:.3f} bits/byte ({len(windows_now)} windows spread over the "
                          f"text){measured}")
            if done % tc.checkpoint_every == 0 and done < tc.steps:
                run.save(state, history)
    except KeyboardInterrupt:
        bar.close()
        run.save(state, history)
        say(f"Interrupted at step {int(state.step)}; checkpoint saved in {run.path}. Continue with --resume.")
        raise
    bar.close()
    elapsed = time.perf_counter() - start_time
    final_bpb = bits_per_byte(eval_loss, state.params, all_windows, tc.batch_size, mesh=mesh)
    history["val_step"].append(int(state.step))
    history["val_bpb"].append(final_bpb)
    _measured(measure, model, state, history)
    run.save(state, history)
    summary = {
        "steps": int(state.step),
        "train_bits_per_byte": loss * BITS_PER_NAT,
        "validation_bits_per_byte": final_bpb,
        "seconds": round(elapsed, 1),
        "tokens_per_second": round((int(state.step) - first) * tokens_per_step / max(elapsed, 1e-9)),
        "run": str(run.path),
        "history": history,
    }
    say(
        f"Trained {summary['steps']} steps in {elapsed:.0f} s ({summary['tokens_per_second']:,} tokens/s): "
        f"train {summary['train_bits_per_byte']:.3f} bits/byte, validation {final_bpb:.3f} bits/byte "
        f"on {corpus.name}; checkpoint in {run.path}"
    )
    return summary
