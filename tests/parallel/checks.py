"""Checks that need 8 devices: run as ``python -m tests.parallel.checks NAME [NAME ...]`` in a process of
their own (the device count is fixed when JAX starts), by tests/parallel/test_parallel.py.

Each check asserts; a clean exit is a pass.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from jaxattn.functional import multi_head_attention  # noqa: E402
from jaxattn.functional.ring import ring_attention, ring_attention_shard, zigzag_order  # noqa: E402
from jaxattn.lm import parallel  # noqa: E402
from jaxattn.lm.checkpoint import RunFolder  # noqa: E402
from jaxattn.lm.train import TrainConfig, init_model, init_state, make_optimizer, make_steps, place_batch  # noqa: E402
from jaxattn.nn import TransformerConfig  # noqa: E402
from tests.reference import normal, reference_attention, value_and_grads  # noqa: E402

CONFIG = TransformerConfig(width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=48, max_length=64)


def ring():
    """Ring attention equals multi_head_attention (and a float64 reference) in values and
    gradients: causal and not, GQA and MQA, 3 and 6 tokens per device, the zigzag layout,
    padding and packed sequences, with the batch and heads sharded too."""
    mesh = parallel.mesh_from_spec("data=2,seq=4")
    B, H = 2, 6
    for T, K, layout, extra in ((24, 3, "contiguous", {}), (24, 1, "zigzag", {}), (48, 2, "zigzag", {"window": 7}),
                                (24, 6, "contiguous", {"kv_lengths": np.array([13, 24])}),
                                (28, 2, "contiguous", {"kv_lengths": np.array([28, 19])})):  # chunks of 7: prime
        q, k, v = normal((B, T, H, 5), seed=T), normal((B, T, K, 5), seed=K), normal((B, T, K, 7), seed=3)
        for causal in (True, False) if T == 24 and K == 3 else (True,):  # not causal once: the rest is the mask
            order = zigzag_order(T, 4) if layout == "zigzag" else jnp.arange(T)
            back = jnp.argsort(order)

            def kernel(q, k, v, order=order, back=back, causal=causal, T=T, **masking):
                # the tokens in the layout's order (with their positions), the output back in order
                # (kv_lengths counts keys in the arrays' order: it comes with the contiguous layout only)
                positions = dict(q_positions=order, kv_positions=order) if causal else {}
                out = ring_attention(q[:, order], k[:, order], v[:, order], mesh=mesh, batch_axis="data", is_causal=causal,
                                     block_q=3, block_kv=2 if T == 24 else 3, **positions, **masking)
                # chunks of 7 tokens in sub-blocks of 3 (padded to 9), not of 1
                return out[:, back]

            out, grads = jax.jit(lambda q, k, v: value_and_grads(kernel, q, k, v, **extra))(q, k, v)
            expected = value_and_grads(multi_head_attention, q, k, v, is_causal=causal, **extra)
            chex.assert_trees_all_close(out, expected[0], rtol=1e-5, atol=1e-5)
            chex.assert_trees_all_close(tuple(grads), tuple(expected[1]), rtol=1e-4, atol=1e-5)
    # Packed sequences, causal, against the float64 reference; heads over a model axis.
    mesh = parallel.mesh_from_spec("model=2,seq=4")
    T = 24
    segments = np.repeat(np.arange(3), [7, 9, 8])
    q, k, v = normal((1, T, 4, 5), seed=7), normal((1, T, 2, 5), seed=8), normal((1, T, 2, 5), seed=9)
    out = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh, head_axis="model", is_causal=True, block_q=2, block_kv=3,
                                                 q_segment_ids=segments, kv_segment_ids=segments))(q, k, v)
    expected = reference_attention(q, k, v, q_positions=np.arange(T), kv_positions=np.arange(T),
                                   q_segment_ids=segments, kv_segment_ids=segments)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
    # The per-device form, in a shard_map of one's own: each device gives the padding of its own
    # chunk as lengths counted from its first key (a whole chunk of padding on the last device).
    lengths = np.array([13])  # the same mesh: its model axis holds copies
    tokens = PartitionSpec(None, "seq")

    def per_device(q, k, v):
        local = jnp.clip(jnp.asarray(lengths) - jax.lax.axis_index("seq") * (T // 4), 0, T // 4)
        return ring_attention_shard(q, k, v, axis_name="seq", kv_lengths=local, block_q=2, block_kv=4)

    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(tokens,) * 3, out_specs=tokens, check_vma=False))(q, k, v)
    chex.assert_trees_all_close(out, reference_attention(q, k, v, kv_lengths=lengths), rtol=1e-5, atol=1e-5)


def ring_logits():
    """Soft-capping and sinks in ring attention: values and gradients (d sinks too) equal the
    float64 reference, with the heads (and so the sinks) split over a model axis and the
    sequence over a ring of 4; each sink enters a row's softmax once, not once per hop."""
    sinks = np.array([0.5, -1.0, 2.0, 0.3])
    for spec, head_axis in (("model=2,seq=4", "model"), ("data=2,seq=4", None)):
        mesh = parallel.mesh_from_spec(spec)
        T = 24
        order = zigzag_order(T, 4)
        q, k, v = normal((2, T, 4, 5), seed=1, scale=2.0), normal((2, T, 2, 5), seed=2, scale=2.0), normal((2, T, 2, 6), seed=3)
        cotangent = normal((2, T, 4, 6), seed=4)

        def loss(q, k, v, sinks):
            out = ring_attention(q[:, order], k[:, order], v[:, order], mesh=mesh, head_axis=head_axis, is_causal=True,
                                 q_positions=order, kv_positions=order, block_q=3, block_kv=3, logit_softcap=3.0,
                                 sinks=sinks)[:, jnp.argsort(order)]
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            q, k, v, jnp.asarray(sinks, jnp.float32))
        expected = reference_attention(q, k, v, q_positions=np.arange(T), kv_positions=np.arange(T), logit_softcap=3.0,
                                       sinks=sinks, cotangent=cotangent)
        chex.assert_trees_all_close(out, expected[0], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(tuple(grads), tuple(expected[1:]), rtol=1e-4, atol=1e-5)


def sharded_step():
    """One train step on data=2,model=2,seq=2 gives the loss and gradients of one device,
    and the parameters really are split: each device holds its slice."""
    mesh = parallel.mesh_from_spec("data=2,model=2,seq=2")
    tc = TrainConfig(batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=0)
    optimizer = make_optimizer(tc)
    batch = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    results = {}
    for name, m in (("one device", None), ("mesh", mesh)):
        model = init_model(CONFIG, 0, mesh=m)
        state = init_state(model, optimizer, mesh=m)
        train_step, window_losses, _ = make_steps(model, optimizer, mesh=m, state=state)
        grads = jax.grad(lambda p, b: window_losses(p, b).mean())(state.params, place_batch(batch, m))
        new_state, loss = train_step(state, place_batch(batch, m))
        results[name] = (float(parallel.fetch(loss)), jax.tree.map(parallel.fetch, grads), new_state)
    (loss_1, grads_1, _), (loss_m, grads_m, state_m) = results["one device"], results["mesh"]
    np.testing.assert_allclose(loss_m, loss_1, rtol=1e-6)
    chex.assert_trees_all_close(grads_m, grads_1, rtol=1e-4, atol=1e-7)
    w_q = state_m.params["blocks"][0]["attn"]["w_q"]  # [C=32, H=4, D=8]: embed over data, heads over model
    assert {shard.data.shape for shard in w_q.addressable_shards} == {(16, 2, 8)}, w_q.sharding
    down = state_m.opt_state[1][0].mu["blocks"][1]["mlp"]["down"]["kernel"]  # [48, 32]: model x data, moments too
    assert {shard.data.shape for shard in down.addressable_shards} == {(24, 16)}, down.sharding
    norm = state_m.params["blocks"][0]["attn_norm"]["scale"]
    assert {shard.data.shape for shard in norm.addressable_shards} == {(32,)}  # replicated


def _moved(axis: str, to):
    return {**parallel.LOGICAL_AXES, axis: to}


# Today's table, the output projection declared the other way round, and each logical axis moved
# on its own; with the vocabulary over data (release 0.2.0's embedding layout) and o_proj flipped,
# XLA's gather bug (tests/parallel/xla_gather_bug.py) gave a wrong loss before the workaround.
TABLES = {
    "today": (parallel.LOGICAL_AXES, False),
    "o_proj flipped": (parallel.LOGICAL_AXES, True),
    "embed on model": (_moved("embed", "model"), False),
    "heads on data": (_moved("heads", "data"), False),
    "kv_heads on data": (_moved("kv_heads", "data"), False),
    "mlp on data": (_moved("mlp", "data"), False),
    "vocab on model": (_moved("vocab", "model"), False),
    "vocab on data": (_moved("vocab", "data"), False),  # the embedding table laid out as release 0.2.0 did
    "vocab on data, o_proj flipped": (_moved("vocab", "data"), True),
    "head_dim on model": (_moved("head_dim", "model"), False),
}
MESHES = ("data=8", "seq=8", "data=2,model=4", "model=2,seq=4", "data=2,model=2,seq=2")
# Every table runs on the meshes that split data and model at once (2 x 2 x 2 is where XLA's gather
# bug showed); the one-axis meshes run today's table both ways round (each moved axis would split
# nothing there, or what data=2,model=4 splits already).
EVERY_TABLE_ON = ("data=2,model=4", "data=2,model=2,seq=2")
LAYOUT_CONFIG = TransformerConfig(width=32, layers=1, heads=8, kv_heads=4, head_dim=4, mlp_hidden=48, max_length=64)


def layouts():
    """A layout must never change values: loss and gradients of one step equal one device's
    (rtol 1e-5) for every table on every mesh, and each array really has the layout asked for.
    A table that, on a mesh, lays out every parameter and reads every rule as an earlier table
    did there (seq=8 splits no parameter at all) is the same program: it is named, not rerun."""
    tc = TrainConfig(batch_size=8, seq_len=16)
    optimizer = make_optimizer(tc)
    batch = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)

    host = init_state(init_model(LAYOUT_CONFIG, 0), optimizer)  # the values, made once

    def loss_and_grads(mesh, rules, flipped):
        model = nnx.eval_shape(lambda: init_model(LAYOUT_CONFIG, 0, mesh=mesh, rules=rules))  # structure only
        if flipped:  # w_o [H, E, C] declared with heads and width swapped: H over data, C over model
            for block in model.blocks:
                block.attn.w_o.set_metadata(out_sharding=("embed", None, "heads"))
        state = host if mesh is None else parallel.shard(
            host, parallel.state_specs(host, model, optimizer, mesh, rules), mesh)
        gradients = make_steps(model, optimizer, mesh=mesh, state=state, rules=rules).gradients
        loss, grads = gradients(state.params, place_batch(batch, mesh, rules))
        return float(parallel.fetch(loss)), jax.tree.map(parallel.fetch, grads), state, model

    def layout(mesh, rules, flipped):
        """Every parameter's PartitionSpec and the rules as this mesh reads them (an axis it does
        not split is no axis), as one hashable value: equal values make the same program."""
        model = nnx.eval_shape(lambda: init_model(LAYOUT_CONFIG, 0, mesh=mesh, rules=rules))
        if flipped:
            for block in model.blocks:
                block.attn.w_o.set_metadata(out_sharding=("embed", None, "heads"))
        specs = jax.tree.leaves(parallel.param_specs(model, mesh, rules),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        read = sorted((name, axis if mesh.shape.get(axis, 1) > 1 else None) for name, axis in rules.items())
        return str(specs) + str(read)

    loss_1, grads_1, _, _ = loss_and_grads(None, parallel.LOGICAL_AXES, False)
    for spec in MESHES:
        mesh = parallel.mesh_from_spec(spec)
        seen = {}  # a table that lays every parameter out as an earlier one did is the same program
        for name, (rules, flipped) in TABLES.items():
            if spec not in EVERY_TABLE_ON and name not in ("today", "o_proj flipped"):
                continue
            same = seen.setdefault(layout(mesh, rules, flipped), name)
            if same != name:
                print(f"{spec:>22} {name:>29}: the layout of {same!r} (checked)", flush=True)
                continue
            loss_m, grads_m, state, model = loss_and_grads(mesh, rules, flipped)
            np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5, err_msg=f"{name} on {spec}")
            chex.assert_trees_all_close(grads_m, grads_1, rtol=1e-5, atol=1e-7, custom_message=f"{name} on {spec}")
            asked = parallel.param_specs(model, mesh, rules)
            jax.tree.map(lambda x, want: x.sharding.spec == want or (_ for _ in ()).throw(
                AssertionError(f"{name} on {spec}: {x.sharding.spec} != {want}")), state.params, asked,
                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
            split = [x for x in jax.tree.leaves(state.params) if {s.data.shape for s in x.addressable_shards} != {x.shape}]
            wanted = [want for want in jax.tree.leaves(asked, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
                      if any(axis is not None for axis in want)]
            assert len(split) == len(wanted), f"{name} on {spec}: {len(split)} arrays split, {len(wanted)} asked"
            print(f"{spec:>22} {name:>29}: loss {loss_m:.7f} (one device {loss_1:.7f})", flush=True)


def zigzag():
    """``zigzag_order`` balances causal work: every device of the ring sees the same number of
    (query, key) pairs, while the contiguous order gives device i about 2i + 1 times the first's."""
    T = 48
    for n in (2, 4, 8):
        for order, balanced in ((np.asarray(zigzag_order(T, n)), True), (np.arange(T), False)):
            chunks = order.reshape(n, T // n)
            work = [int(sum((order <= q).sum() for q in chunk)) for chunk in chunks]  # keys each device's queries see
            assert (len(set(work)) == 1) == balanced, (n, balanced, work)
        assert sum(work) == T * (T + 1) // 2


def checkpoint():
    """A checkpoint saved from one mesh restores onto another with identical values."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="jaxattn-checkpoint-")
    tc = TrainConfig(batch_size=4, seq_len=16, learning_rate=1e-2, warmup_steps=0)
    optimizer = make_optimizer(tc)
    mesh = parallel.mesh_from_spec("data=2,model=2,seq=2")
    model = init_model(CONFIG, 0, mesh=mesh)
    state = init_state(model, optimizer, mesh=mesh)
    train_step = make_steps(model, optimizer, mesh=mesh, state=state).train
    state, _ = train_step(state, place_batch(np.ones((4, 17), np.int32), mesh))
    run = RunFolder(folder)
    run.start(CONFIG, tc, "ones")
    run.save(state, {"step": [], "train_loss": [], "val_step": [], "val_bpb": []})
    for spec in ("data=4,model=2", "seq=8", None):
        other = None if spec is None else parallel.mesh_from_spec(spec)
        template = init_state(init_model(CONFIG, 1, mesh=other), optimizer, mesh=other)  # other values, other layout
        restored, _ = RunFolder(folder).restore(template)
        chex.assert_trees_all_equal(jax.tree.map(parallel.fetch, restored), jax.tree.map(parallel.fetch, state))
        if other is not None:
            kernel = restored.params["blocks"][0]["mlp"]["up"]["kernel"]
            assert kernel.sharding.mesh.shape == other.shape
    shutil.rmtree(folder)


if __name__ == "__main__":  # several checks in one process: JAX starts once
    for name in sys.argv[1:]:
        globals()[name]()
        print(f"{name}: ok", flush=True)
