"""A training run's folder: its configuration, orbax checkpoints and loss curve.

    RUN/run.json          model Config, TrainConfig and data name (written once)
    RUN/checkpoints/N/    orbax checkpoint of step N (the last few are kept)
    RUN/loss.png          train loss and validation bits/byte

A folder that already holds a run is never replaced unless asked (``overwrite``), and
resuming checks that the folder really holds a run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxattn import viz
from jaxattn.nn import Config, TransformerLM

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """A run folder that is missing, holds no checkpoint, or cannot be read."""


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
            raise CheckpointError(f"{str(self.path / RUN_FILE)!r} is unreadable: {error}") from None

    def model_config(self) -> Config:
        try:
            return Config(**self.read_run()["model"])
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{str(self.path / RUN_FILE)!r} has no valid model config: {error}") from None

    def start(self, config: Config, train_config, data_name: str) -> None:
        """Claims the folder for a new run; refuses to replace another run unless ``overwrite``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not self.overwrite:
                what = "a training run" if self.holds_run() else "other files"
                raise CheckpointError(
                    f"{str(self.path)!r} already holds {what}; pass --resume to continue it, "
                    "--overwrite to replace it, or choose another --out"
                )
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)
            (self.path / RUN_FILE).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        run = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(train_config), "data": data_name}
        (self.path / RUN_FILE).write_text(json.dumps(run, indent=2))

    # -------------------------------------------------------------- checkpoints

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
        """Saves ``state`` as checkpoint ``state.step`` (once: an existing step is kept)."""
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, template_state):
        """Restores the latest checkpoint into the structure of ``template_state``.

        Returns ``(state, history)``.
        """
        self.read_run()
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"{str(self.path)!r} holds no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as error:  # orbax raises many types for a damaged folder
            raise CheckpointError(f"checkpoint {step} in {str(self.path)!r} cannot be restored: {error}") from None
        return type(template_state)(*restored["state"]), restored["history"]

    def load_model(self) -> TransformerLM:
        """The trained model of the latest checkpoint (for generation and the tour)."""
        from jaxattn.lm.train import TrainConfig, init_model, init_state, make_optimizer

        config = self.model_config()
        train_config = TrainConfig(**self.read_run().get("train", {}))
        model = init_model(config, 0)
        state, _ = self.restore(init_state(model, make_optimizer(train_config)))
        nnx.update(model, state.params)
        return model

    def plot_history(self, history: dict) -> Path:
        series = {"train loss (bits/byte)": (history["step"], [x / 0.6931471805599453 for x in history["train_loss"]])}
        if history["val_step"]:
            series["validation (bits/byte)"] = (history["val_step"], history["val_bpb"])
        return viz.line_chart(series, self.path / "loss.png", title="Training", xlabel="step", ylabel="bits per byte")
