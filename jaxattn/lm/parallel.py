"""Training on a mesh of devices, on one host or several: JAX's own SPMD runtime.

A mesh has three named axes (``mesh_from_spec("data=2,model=2,seq=2")``):

- ``data``: the batch is split over it, and the parameters and optimizer state too
  (FSDP: each device keeps a slice of every matrix; it is gathered where used, and
  gradients are reduced and scattered back);
- ``model``: attention heads and MLP hidden units are split over it (tensor parallelism:
  each device computes its heads; the output projections are summed across it);
- ``seq``: the sequence is split over it, and attention runs by ring
  (``jaxattn.functional.ring_attention``) in the load-balanced ``zigzag_order``.

Every parameter is made with the names of its axes (``jaxattn.nn.layers``: ``("embed",
"heads", "head_dim")`` for a query projection); ``LOGICAL_AXES`` is the one table that maps
those names to mesh axes, and ``param_specs`` applies it (an axis is used only where it
divides the dimension, and once per array). The compiled train step takes and returns
state with these shardings; XLA inserts the communication. While a sharded step is traced
(``layout``), the model lays a few activations out by name too (``jaxattn.nn.layers.constrain``).

A layout must never change values. One did: on a 2 x 2 x 2 mesh, XLA's partitioner (both
GSPMD and Shardy, jax 0.10.2, CPU) returns wrong rows from a gather (the embedding lookup)
whose table is split over one mesh axis when its output is asked to be split over all
three; which layout propagation asks for depends on unrelated parameters' layouts, so
flipping the output projection's rule changed the loss by 0.13%. ``tests/parallel/
xla_gather_bug.py`` reproduces it in 20 lines; the model works around it by laying the
lookup's output out like the token ids (``("batch", "length", "embed")``), after which the
partitioner reshards correctly. ``tests/parallel/checks.py`` (``layouts``) checks loss and
gradients against one device for many tables and meshes.

``initialize`` starts ``jax.distributed`` so that the same program runs across processes
and hosts (CPU collectives: gloo).
"""

from __future__ import annotations

import contextlib
import re
from functools import partial

import jax
import numpy as np
import optax
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn.functional.ring import ring_kernel
from jaxattn.nn.layers import mesh_spec

MESH_AXES = ("data", "model", "seq")


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run: process ``process_id`` of ``num_processes``, all
    reaching the coordinator at ``HOST:PORT``. Must come before any JAX computation."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if not re.fullmatch(r"[\w.\-]+:\d+", coordinator or ""):
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def mesh_from_spec(spec: str, devices=None) -> Mesh:
    """``"data=2,model=2,seq=2"`` -> a ``Mesh`` with axes ("data", "model", "seq") over all
    devices (of every process). Axes left out have size 1; the product must be the device count."""
    devices = jax.devices() if devices is None else devices
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh spec parts are AXIS=SIZE with AXIS in {MESH_AXES}, got {part!r} in {spec!r}")
        sizes[name] = int(value)
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {total} devices, there are {len(devices)} "
            "(on a CPU, --cpu-devices N, or XLA_FLAGS=--xla_force_host_platform_device_count=N, makes N virtual devices)"
        )
    return Mesh(np.array(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


# --------------------------------------------------------------------- layout rules

# The one table: the name of a parameter's (or activation's) axis -> the mesh axis it is
# split over (None: replicated). FSDP splits the model width over "data"; tensor
# parallelism splits heads and hidden units over "model"; the batch goes over "data".
LOGICAL_AXES = {
    "batch": "data",
    "length": None,
    "vocab": None,
    "embed": "data",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "latent": None,
    "query_latent": None,
    "rope": None,
    "positions": None,
}


def param_specs(model, mesh: Mesh, rules: dict = LOGICAL_AXES):
    """The ``PartitionSpec`` of every parameter of ``model`` (a pure dict like
    ``nnx.to_pure_dict(nnx.state(model))``), from the axis names each parameter was made
    with and the table ``rules``; unnamed axes (norm scales) are replicated."""
    state = nnx.state(model, nnx.Param)
    names = nnx.to_pure_dict(nnx.get_partition_spec(state))  # the logical names, as a PartitionSpec per leaf
    shapes = nnx.to_pure_dict(state)
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(lambda axes, x: mesh_spec(tuple(axes), x.shape, mesh_shape, rules), names, shapes,
                        is_leaf=lambda x: isinstance(x, P))


def state_specs(state, model, optimizer, mesh: Mesh, rules: dict = LOGICAL_AXES):
    """The specs of a ``TrainState``: the parameters' (``param_specs``), the optimizer's moments
    like their parameters (``optax.tree_map_params``), everything else replicated."""
    params = param_specs(model, mesh, rules)
    opt = optax.tree_map_params(optimizer, lambda _, spec: spec, state.opt_state, params,
                                transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    return type(state)(P(), params, opt)


@contextlib.contextmanager
def layout(mesh: Mesh, rules: dict = LOGICAL_AXES):
    """While tracing a sharded program: the mesh and the table in force, so that the model's
    named activations (``jaxattn.nn.layers.constrain``) are laid out by them."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), spmd.logical_axis_rules(tuple(rules.items())):
        yield


def shard(tree, specs, mesh: Mesh):
    """Places a tree of host values (identical on every process) on the mesh, each leaf
    with its ``PartitionSpec``; works across processes (each fills its own devices)."""

    def place(x, spec):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree.map(place, tree, specs)


def fetch(x) -> np.ndarray:
    """The whole value of an array on this host, also when its shards live on other
    processes' devices (then gathered from all of them)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def batch_spec(mesh: Mesh, rules: dict = LOGICAL_AXES) -> P:
    """Token batches ``[B, T + 1]``: rows over the batch's mesh axis (the ring splits the sequence)."""
    axis = rules.get("batch")
    return P(axis if axis is not None and mesh.shape[axis] > 1 else None, None)


def mesh_kernel(mesh: Mesh, rules: dict = LOGICAL_AXES):
    """The attention kernel of a model trained on ``mesh``: ring attention over ``seq``, with
    the batch and the heads over the mesh axes the table gives them (each mesh axis once)."""
    batch, heads = rules.get("batch"), rules.get("heads")
    batch = batch if batch is not None and batch != "seq" and mesh.shape[batch] > 1 else None
    heads = heads if heads is not None and heads not in ("seq", batch) and mesh.shape[heads] > 1 else None
    return partial(ring_kernel, mesh=mesh, seq_axis="seq", batch_axis=batch, head_axis=heads)
