"""A training run's folder: its configuration, orbax checkpoints and a lock.

    RUN/run.json          model TransformerConfig, TrainConfig and data name (written once)
    RUN/checkpoints/N/    orbax checkpoint of step N (the last few are kept):
                          ``state`` = {step, params, opt_state}, ``history`` = the loss curve
    RUN/.lock             held (``fcntl.flock``) by the process that trains in RUN

A folder that already holds a run is never replaced unless asked (``overwrite``);
resuming checks that the folder really holds a run; two processes never train into one
folder at once (the second is told who holds it). Loading a model for inference reads
the parameters only, not the optimizer state.

Folders written by release 0.2.0 still load: its ``run.json`` stored MLA's widths for
standard attention too (dropped on reading, ``migrate_model_config``), and its attention
layers kept flat ``q_proj``/``k_proj``/``v_proj``/``o_proj`` kernels ``[C, H*D]`` where this
release keeps head-shaped ``w_q [C, H, D]`` ... (reshaped on reading, ``LEGACY_ATTENTION``;
the optimizer's moments too, so such a run can be resumed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxattn.nn import TransformerConfig, TransformerLM

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"


class CheckpointError(ValueError):
    """A run folder that is missing, holds no checkpoint, cannot be read, or is in use."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# ------------------------------------------------------- what release 0.2.0 wrote


def migrate_model_config(saved: dict) -> dict:
    """``run.json``'s model config as this release reads it. Release 0.2.0 wrote MLA's
    ``latent_dim``/``rope_dim`` (64, 16) for standard attention too, which it ignored and
    this release refuses: they are dropped there."""
    saved = dict(saved)
    if saved.get("attention", "standard") == "standard":
        for name in ("latent_dim", "rope_dim"):
            saved.pop(name, None)
    return saved


# This release's attention parameter -> release 0.2.0's (flat nnx.Linear) name.
LEGACY_ATTENTION = {"w_q": ("q_proj", "kernel"), "w_k": ("k_proj", "kernel"), "w_v": ("v_proj", "kernel"),
                    "w_o": ("o_proj", "kernel"), "b_q": ("q_proj", "bias"), "b_k": ("k_proj", "bias"),
                    "b_v": ("v_proj", "bias"), "b_o": ("o_proj", "bias")}


def _flat_shape(name: str, shape: tuple) -> tuple:
    """The 0.2.0 shape of a head-shaped attention parameter: heads and head width merged."""
    if name == "w_o":  # [H, E, C] -> [H*E, C]
        return (shape[0] * shape[1], shape[2])
    if name == "b_o":  # [C]
        return shape
    return shape[:-2] + (shape[-2] * shape[-1],)  # [C, H, D] -> [C, H*D]; [H, D] -> [H*D]


def _map_attention(tree, convert):
    """Applies ``convert(attn_dict)`` to every standard attention layer's parameter dict (one
    holding ``w_q``) found in ``tree``: dicts, lists, tuples and NamedTuples (optimizer state)."""
    if isinstance(tree, dict):
        if "w_q" in tree or "q_proj" in tree:
            return convert(tree)
        return {key: _map_attention(value, convert) for key, value in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_attention(value, convert) for value in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_attention(value, convert) for value in tree)
    return tree


def legacy_layout(tree):
    """A tree (arrays or ``ShapeDtypeStruct``) in this release's attention layout -> 0.2.0's,
    the shapes of a template to restore such a checkpoint into (on the host)."""

    def convert(attn):
        old = {}
        for name, value in attn.items():
            module, leaf = LEGACY_ATTENTION[name]
            old.setdefault(module, {})[leaf] = jax.ShapeDtypeStruct(_flat_shape(name, value.shape), value.dtype)
        return old

    return _map_attention(tree, convert)


def from_legacy_layout(tree, template):
    """Restored 0.2.0 values -> this release's layout, shaped (and placed) as ``template``."""

    def convert(old):
        return {name: old[module][leaf] for name, (module, leaf) in LEGACY_ATTENTION.items()
                if module in old and leaf in old[module]}

    reshaped = _map_attention(tree, convert)
    return jax.tree.map(lambda value, like: jax.device_put(np.asarray(value).reshape(like.shape),
                                                           getattr(like, "sharding", None)), reshaped, template)


class RunFolder:
    """The folder of one training run. ``overwrite`` allows replacing another run in it."""

    def __init__(self, path, *, overwrite: bool = False, keep: int = 3):
        self.path = Path(path).absolute()
        self.overwrite = overwrite
        self.keep = keep
        self._manager = None

    # ----------------------------------------------------------------- metadata

    def holds_run(self) -> bool:
        return (self.path / RUN_FILE).is_file()

    def read_run(self) -> dict:
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.path)!r} does not exist")
        if not self.holds_run():
            raise CheckpointError(f"{str(self.path)!r} holds no training run ({RUN_FILE} is missing)")
        try:
            return json.loads((self.path / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{str(self.path / RUN_FILE)!r} is unreadable: {error}") from error

    def model_config(self) -> TransformerConfig:
        try:
            return TransformerConfig(**migrate_model_config(self.read_run()["model"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{str(self.path / RUN_FILE)!r} has no valid model config: {error}") from error

    def start(self, config: TransformerConfig, train_config, data_name: str) -> None:
        """Claims the folder for a new run; refuses to replace another run unless ``overwrite``."""
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            if not self.overwrite:
                what = "a training run" if self.holds_run() else "other files"
                raise CheckpointError(
                    f"{str(self.path)!r} already holds {what}; pass --resume to continue it, "
                    "--overwrite to replace it, or choose another --out"
                )
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            (self.path / RUN_FILE).unlink(missing_ok=True)
            self._manager = None
        self.path.mkdir(parents=True, exist_ok=True)
        run = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(train_config), "data": data_name}
        (self.path / RUN_FILE).write_text(json.dumps(run, indent=2))

    # -------------------------------------------------------------------- lock

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder for one training process.

        An advisory ``fcntl.flock`` on ``RUN/.lock``: the operating system releases it
        when the process ends, however it ends, so a crash leaves no stale lock. A
        second process gets a ``CheckpointError`` naming the holder (pid, host, start).
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: run without a lock rather than not at all
            warnings.warn("run folders cannot be locked on this platform (no fcntl); do not train twice into one folder")
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise CheckpointError(
                    f"{str(self.path)!r} is in use: {holder} is training in it. Wait for that run to end "
                    "(or stop it; its checkpoint is kept), or choose another --out"
                ) from error
            handle.seek(0)
            handle.truncate()
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            handle.write(f"process {os.getpid()} on host {socket.gethostname()} (since {started})")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -------------------------------------------------------------- checkpoints

    def keep_last(self, count: int) -> None:
        """Keep only the newest ``count`` checkpoints from now on (a run's ``keep_checkpoints``)."""
        if count != self.keep:
            self.keep, self._manager = count, None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
            self._manager = ocp.CheckpointManager(self.path / CHECKPOINTS, options=options)
        return self._manager

    def latest_step(self):
        if not (self.path / CHECKPOINTS).is_dir():
            return None
        return self.manager.latest_step()

    def save(self, state, history: dict) -> None:
        """Saves ``state`` (``step``, ``params``, ``opt_state``) as checkpoint ``state.step``
        (once: an existing step is kept)."""
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), history=ocp.args.JsonSave(history))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def _step_to_restore(self) -> int:
        self.read_run()
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"{str(self.path)!r} holds no checkpoint to restore")
        return step

    def _restore(self, step: int, args):
        try:
            return self.manager.restore(step, args=args)
        except Exception as error:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"checkpoint {step} in {str(self.path)!r} cannot be restored: {error}") from error

    def _is_legacy(self, step: int) -> bool:
        """Whether checkpoint ``step`` keeps release 0.2.0's flat attention kernels."""
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that the item folder has no step metadata: it need not
        try:
            params = dict(ocp.StandardCheckpointer().metadata(self.path / CHECKPOINTS / str(step) / "state")
                          .item_metadata["params"])
        except Exception:  # a damaged folder: restoring it will say what is wrong
            return False
        finally:
            absl.setLevel(level)
        found = []
        _map_attention(params, lambda attn: found.append("q_proj" in attn) or attn)
        return any(found)

    def restore(self, template_state):
        """Restores the latest checkpoint into the structure (and shardings) of
        ``template_state``, for resuming training. Returns ``(state, history)``."""
        step = self._step_to_restore()
        tree = {"step": template_state.step, "params": template_state.params, "opt_state": template_state.opt_state}
        legacy = self._is_legacy(step)
        item = legacy_layout(_abstract(tree)) if legacy else _abstract(tree)
        if legacy:  # restored on the host in the old shapes, then reshaped and placed as the template
            item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), item)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(item), history=ocp.args.JsonRestore())
        restored = self._restore(step, args)
        state = from_legacy_layout(restored["state"], tree) if legacy else restored["state"]
        return type(template_state)(state["step"], state["params"], state["opt_state"]), restored["history"]

    def history(self) -> dict:
        """The history saved with the latest checkpoint (losses, validation, what ``measure``
        recorded), without reading any array."""
        step = self._step_to_restore()
        return self._restore(step, ocp.args.Composite(history=ocp.args.JsonRestore()))["history"]

    def restore_params(self, template_params):
        """Restores only the parameters of the latest checkpoint (no optimizer state is
        read), into the structure, dtypes and shardings of ``template_params`` (arrays or
        ``jax.ShapeDtypeStruct``)."""
        step = self._step_to_restore()
        legacy = self._is_legacy(step)
        params = _abstract(template_params)
        item = {"params": legacy_layout(params) if legacy else params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        restored = self._restore(step, args)["state"]["params"]
        return from_legacy_layout(restored, params) if legacy else restored

    def load_model(self) -> TransformerLM:
        """The trained model of the latest checkpoint (for generation and the tour).

        The model is built abstractly (``nnx.eval_shape``: no random initialisation) and
        filled with the restored parameters.
        """
        config = self.model_config()
        abstract_model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract_model)
        params = self.restore_params(nnx.to_pure_dict(abstract_state))
        nnx.replace_by_pure_dict(abstract_state, params)
        return nnx.merge(graphdef, abstract_state)
