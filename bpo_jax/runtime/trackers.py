"""Experiment trackers: every metrics record of a run (the online loop's, and the evaluations') goes to each
tracker the config's ``tracker`` key names, on the primary host only.

* ``tensorboard``: tensorboardX event files in ``<run_dir>/tensorboard`` (a local run_dir only);
* ``wandb``: a Weights & Biases run named after the run_dir's basename, with the full config. ``wandb`` is not a
  runtime requirement (``pip install wandb``); its own environment applies (``WANDB_MODE=offline``,
  ``WANDB_DIR``, ``WANDB_API_KEY``); ``WANDB_PROJECT`` defaults to ``bpo_jax``. The run's id is kept in
  ``<run_dir>/wandb_id``, so a resumed or evaluated run logs to the same W&B run;
* ``none``: nothing; ``auto`` (the default): tensorboard when tensorboardX is installed, else none.

    trackers = open_trackers(cfg)     # after check_available(cfg.tracker), before any compute
    trackers.log({"step": 3, "loss": 0.52, "phase": 1})
    trackers.close()
"""

from __future__ import annotations

import importlib.util
import os

TRACKERS = ("auto", "none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}


def resolved(names) -> tuple[str, ...]:
    """The trackers ``names`` stand for (``auto`` → tensorboard if tensorboardX is installed; ``none`` → none)."""
    out = []
    for name in names:
        if name == "auto":
            name = "tensorboard" if importlib.util.find_spec("tensorboardX") is not None else "none"
        if name != "none" and name not in out:
            out.append(name)
    return tuple(out)


def check_available(names) -> None:
    """Raise ValueError when a named tracker's package is not installed (run before any compute)."""
    for name in resolved(names):
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"tracker={name} needs the {package} package, which is not installed: "
                             f"pip install {package} (or drop it from tracker=...)")


def numeric(record: dict) -> dict:
    """The record's numbers (not ``step``, not booleans), as floats."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The open trackers of a run; ``log`` sends a record (with a ``step``) to each, ``close`` ends them."""

    def __init__(self, backends=()):
        self.backends = list(backends)

    def log(self, record: dict) -> None:
        values = numeric(record)
        for backend in self.backends:
            backend.log(int(record["step"]), values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def open_trackers(cfg) -> Trackers:
    """The trackers ``cfg.tracker`` names for ``cfg.run_dir`` on the primary host (none on the others)."""
    from bpo_jax.runtime import distributed

    if not distributed.is_primary():
        return Trackers()
    backends = []
    for name in resolved(cfg.tracker):
        if name == "tensorboard" and not distributed.is_remote(cfg.run_dir):
            backends.append(_TensorBoard(cfg))
        elif name == "wandb":
            backends.append(_WandB(cfg))
    return Trackers(backends)


def log_evaluation(cfg, step: int, metrics: dict) -> None:
    """Log an ``evaluate`` command's ``eval/...`` metrics at ``step`` to the run's trackers, as
    ``evaluate_<data>/...`` (``<data>``: the task name, or the data folder's basename)."""
    data = os.path.basename(str(cfg.data).rstrip("/")) or str(cfg.data)
    trackers = open_trackers(cfg)
    try:
        trackers.log({"step": step, **{k.replace("eval/", f"evaluate_{data}/", 1): v for k, v in metrics.items()}})
    finally:
        trackers.close()


def _config_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat().items()}


def run_name(cfg) -> str:
    """The run's name in the trackers: the basename of its run_dir."""
    return os.path.basename(str(cfg.run_dir).rstrip("/")) or str(cfg.run_dir)


class _TensorBoard:
    def __init__(self, cfg):
        import yaml
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))
        self.writer.add_text("run", run_name(cfg))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(_config_dict(cfg), sort_keys=False) + "```")

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg):
        import wandb

        from bpo_jax.runtime import distributed
        from bpo_jax.runtime import run_dir as rd

        id_file = rd.path(cfg.run_dir, "wandb_id")
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: a new run, its id kept
        local = not distributed.is_remote(cfg.run_dir)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bpo_jax"), name=run_name(cfg),
                                  id=run_id, resume="allow", config=_config_dict(cfg),
                                  dir=os.environ.get("WANDB_DIR") or (str(cfg.run_dir) if local else None))
        except Exception as err:  # wandb's own errors (not logged in, no network) are not ValueErrors
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"tracker=wandb could not start a W&B run ({first}); log in (wandb login, or "
                             f"WANDB_API_KEY), or set WANDB_MODE=offline") from err
        if run_id is None:
            id_file.write_text(self.run.id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # records' own steps, which may repeat (evaluations)

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def close(self) -> None:
        self.run.finish()
