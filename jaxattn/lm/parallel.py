"""Training on a mesh of devices, on one host or several: JAX's own SPMD runtime.

A mesh has three named axes (``mesh_from_spec("data=2,model=2,seq=2")``):

- ``data``: the batch is split over it, and the parameters and optimizer state too
  (FSDP: each device keeps a slice of every matrix; it is gathered where used, and
  gradients are reduced and scattered back);
- ``model``: attention heads and MLP hidden units are split over it (tensor parallelism:
  each device computes its heads; the output projections are summed across it);
- ``seq``: the sequence is split over it, and attention runs by ring
  (``jaxattn.functional.ring_attention``) in the load-balanced ``zigzag_order``.

``param_specs`` says how each parameter of a ``TransformerLM`` is laid out (the rules are
by parameter name, so they hold for any size of model); an axis is used only where it
divides the dimension. The compiled train step takes and returns state with these
shardings; XLA inserts the communication. ``initialize`` starts ``jax.distributed``
so that the same program runs across processes and hosts (CPU collectives: gloo).
"""

from __future__ import annotations

import re
from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn.functional.ring import ring_attention

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

# Parameter name (the last two parts of its path) -> how its axes are split: "model" for
# the head or hidden-unit axis, "fsdp" for the other matrix axis (split over data).
_RULES = {
    ("q_proj", "kernel"): ("fsdp", "model"), ("k_proj", "kernel"): ("fsdp", "model"),
    ("v_proj", "kernel"): ("fsdp", "model"), ("o_proj", "kernel"): ("model", "fsdp"),
    ("q_proj", "bias"): ("model",), ("k_proj", "bias"): ("model",), ("v_proj", "bias"): ("model",),
    ("up", "kernel"): ("fsdp", "model"), ("gate", "kernel"): ("fsdp", "model"), ("down", "kernel"): ("model", "fsdp"),
    ("up", "bias"): ("model",), ("gate", "bias"): ("model",),
    ("embed", "embedding"): ("fsdp", None), ("unembed", "kernel"): ("fsdp", None),
    # MLA: heads over model, the model width over data.
    ("attn", "w_q"): ("fsdp", "model", None), ("attn", "w_qr"): (None, "model", None), ("attn", "w_uq"): (None, "model", None),
    ("attn", "w_uk"): (None, "model", None), ("attn", "w_uv"): (None, "model", None), ("attn", "w_o"): ("model", None, "fsdp"),
    ("attn", "w_dkv"): ("fsdp", None), ("attn", "w_kr"): ("fsdp", None), ("attn", "w_dq"): ("fsdp", None),
}


def _spec_for(path: tuple, shape: tuple, mesh: Mesh) -> P:
    names = tuple(str(getattr(key, "key", key)) for key in path)
    rule = _RULES.get(names[-2:], ())
    axes = []
    for dim, role in zip(shape, rule):
        axis = {"fsdp": "data", "model": "model"}.get(role)
        axes.append(axis if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0 else None)
    return P(*axes)


def param_specs(params: dict, mesh: Mesh):
    """The ``PartitionSpec`` of every parameter (a tree like ``params``): heads and hidden
    units over ``model``, the other matrix axis over ``data``; norms and anything the rules
    do not name are replicated."""
    return jax.tree_util.tree_map_with_path(lambda path, x: _spec_for(path, x.shape, mesh), params)


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


def batch_spec(mesh: Mesh) -> P:
    """Token batches ``[B, T + 1]``: rows over ``data`` (the ring splits the sequence)."""
    return P("data" if mesh.shape["data"] > 1 else None, None)


def ring_kernel(mesh: Mesh):
    """The attention kernel of a model trained on ``mesh``: ring attention over ``seq``, with
    the batch over ``data`` and the heads over ``model``."""
    return partial(
        ring_attention, mesh=mesh, seq_axis="seq",
        batch_axis="data" if mesh.shape["data"] > 1 else None,
        head_axis="model" if mesh.shape["model"] > 1 else None,
    )
