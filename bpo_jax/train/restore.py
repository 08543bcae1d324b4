"""A trained policy from what a user names, for the commands that evaluate one (``evaluate``, ``compare``).

A source (``policy_source``) is one of:

- a run directory (its ``config.yaml``, written by ``train``): its latest checkpoint, or step N;
- one checkpoint of a run, ``<run_dir>/checkpoints/<N>``: that step;
- a model: an HF folder (``config.json``: an exported policy, a base model), a ``.gguf`` file, a shipped name or
  a Hub id (``bpo_jax.models.hub``).

A run's π_θ is restored as ``train`` evaluates it (``restore_policy``): a fresh state of the run's shape around its
base weights is the template, the checkpoint's state is restored into it on this command's mesh, and the ensemble is
merged (``state.policy_params``). Any number of processes reads a run that any other number wrote
(``Checkpointer.restore_state``): a run trained on a pod is evaluated on one machine, and the other way round. With
several processes the primary host's listing of the checkpoints decides the step for every host
(``checkpoint_step``): while training still writes checkpoints, hosts listing the folder each on their own could
pick different steps, or some none.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from bpo_jax.config import TrainConfig, load_config
from bpo_jax.runtime import distributed
from bpo_jax.runtime import run_dir as rd


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """What a user named: a run (``run_dir``, and ``step`` when a checkpoint folder names one) or a model
    (``model``: a local path, ``load_pretrained`` reads it)."""

    name: str  # as given
    run_dir: str | None = None
    step: int | None = None
    model: str | None = None

    @property
    def is_run(self) -> bool:
        return self.run_dir is not None


def policy_source(name: str) -> PolicySource:
    """Classify ``name`` (module docstring). Raises a one-line ``ValueError`` for an existing path that is none of
    them, and ``bpo_jax.models.hub``'s one-line errors for a missing path or an unknown model name."""
    from bpo_jax.models.hub import resolve_model

    path = name.rstrip("/") or name
    if rd.path(path, "config.yaml").exists():
        return PolicySource(name, run_dir=path)
    parent, step = os.path.split(path)
    run = os.path.dirname(parent)
    if os.path.basename(parent) == "checkpoints" and step.isdigit() and rd.path(run, "config.yaml").exists():
        return PolicySource(name, run_dir=run or ".", step=int(step))
    if rd.path(path).exists() and not (rd.path(path, "config.json").exists() or path.endswith(".gguf")):
        raise ValueError(f"{name!r} is neither a run directory (config.yaml), a checkpoint "
                         f"(<run_dir>/checkpoints/<step>) nor a model (an HF folder with config.json, a .gguf file)")
    return PolicySource(name, model=resolve_model(path))


def run_config(run_dir: str, overrides=()) -> TrainConfig:
    """The run's saved ``config.yaml`` with ``key=value`` overrides, ``run_dir`` the run's own. Raises
    ``FileNotFoundError`` for a directory without one, ``ConfigError`` (a ``ValueError``) for a bad override."""
    cfg_path = str(rd.path(run_dir, "config.yaml"))
    if not rd.path(cfg_path).exists():
        raise FileNotFoundError(f"{cfg_path!r} not found; give a run directory written by `train`")
    return load_config(cfg_path, list(overrides) + [f"run_dir={run_dir}"])


def checkpoint_step(ckpt, step: int | None = None) -> int:
    """``step`` when ``ckpt`` (a ``Checkpointer``) has it, else (``None``) its latest; the primary host's listing
    decides for every host. Raises a one-line ``ValueError`` naming the steps there are."""
    steps = distributed.gather_json(ckpt.steps())[0]
    chosen = step if step is not None else (steps[-1] if steps else None)
    if chosen is None or chosen not in steps:
        at = f"at step {chosen} " if chosen is not None else ""
        raise ValueError(f"no checkpoint {at}in {ckpt.directory} (have: {steps or 'none'})")
    return chosen


def restore_policy(cfg: TrainConfig, ckpt, step: int, model):
    """π_θ's weights at ``step`` of the run ``cfg`` (``ckpt`` its ``Checkpointer``), ready for the sampler in the
    compute dtype of ``model`` (the run's base model, loaded on this run's mesh, whose shardings the state takes:
    any number of processes reads a run written by any other). A fixed reference's weights are in the
    checkpoint: the template takes the base's shapes for them."""
    from bpo_jax.train import state as st

    reference = model.params if cfg.reference == "fixed" else None
    template = st.create_state(cfg, model.params, jax.random.key(cfg.seed), reference=reference,
                               compute_dtype=model.config.dtype)
    state = ckpt.restore_state(step, template)  # to read: any process count, not only the run's
    return st.policy_params(cfg, state, model.config.dtype)
