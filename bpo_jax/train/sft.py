"""Supervised fine-tuning (SFT) of N seed adapters, one after another: the stage before BPO (the official
``train/sft_train.py``, run once per seed), whose adapters start ``train``'s ensemble (``lora_init_from``).

For each seed k = 0 … N − 1 (random seed ``seed + k``):

  1. a fresh state (``state.create_state`` with one member): LoRA factors initialised as PEFT's from the seed's
     key (B = 0), or the float32 master weights; the optimizer over S steps with ``lr_schedule``;
  2. S steps of the SFT step (``bpo_jax.train.sft_step``) on batches from the seed's own permutation of the rows,
     a fresh one each epoch (``ArrayPrompts``);
  3. its held-out loss; the adapter written as a PEFT folder ``<run_dir>/adapters/seed_<k>`` (full fine-tuning:
     an HF folder ``<run_dir>/policies/seed_<k>``).

The starting model's held-out loss (the base: a fresh adapter adds nothing) is measured once, at step 0. A
``report(params, label) -> metrics`` (``bpo_jax.wiring.sft_report``: the win rate and the identical-sample rate on
the task's test prompts) adds its metrics to the step-0 record and to each seed's final one.
S = ``sft_steps``, else floor(``sft_epochs`` × rows / ``batch_size``) (the official max_step, sft_train.py:105).

Checkpoints: one orbax manager whose step is the global step g = k·S + s (seed k at its step s), written every
``checkpoint_every`` steps and at each seed's end with the seed's data position. Rerunning the same command
resumes exactly: seeds that reached (k + 1)·S are done (the last one's folder is written if it is missing) and
the interrupted seed continues from its checkpoint. SIGTERM saves the step and raises ``Preempted``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np
from tqdm.auto import tqdm

from bpo_jax.config import TrainConfig
from bpo_jax.data.prompts import ArrayPrompts
from bpo_jax.data.sft import SftArrays, encode_rows, sft_rows
from bpo_jax.runtime import distributed
from bpo_jax.runtime import run_dir as rd
from bpo_jax.train import state as st
from bpo_jax.train.checkpoint import Checkpointer
from bpo_jax.train.loop import Preempted, Preemption
from bpo_jax.train.sft_step import heldout_nll, make_sft_step
from bpo_jax.train.step import step_model_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SftRun:
    """What ``train_seeds`` needs: the config, the mesh (None on one device), the base model and its tokenizer,
    and the encoded training and held-out rows (``bpo_jax.data.sft``)."""
    cfg: TrainConfig
    mesh: object
    model: object
    tokenizer: object
    train: SftArrays
    heldout: SftArrays
    source: str = ""
    dropped: tuple = (0, 0)  # rows whose prompt was over max_prompt_length: (train, held out)


def setup(cfg: TrainConfig, sources: dict | None = None) -> SftRun:
    """Load the base model on the config's mesh and encode the SFT rows (``sources``: a tfds task's prepared
    splits, ``bpo_jax.data.sft.sft_rows``); a held-out split smaller than ``sft_eval_size`` is a ValueError."""
    from bpo_jax.models import load_pretrained

    mesh = None
    if jax.device_count() > 1:
        mesh = distributed.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor, cfg.mesh_device_ids,
                                     cfg.mesh_slices)
    model, tok = load_pretrained(cfg.model, mesh=mesh, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                                 remat=cfg.remat, attention=cfg.attention)
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer files; SFT needs one")
    rows = sft_rows(cfg, sources)
    eos = model.config.eos_token_id
    (train, heldout), dropped = encode_rows(tok, (rows.train, rows.heldout), eos_id=eos[0] if isinstance(
        eos, tuple) else eos, max_prompt_length=cfg.max_prompt_length, max_response_length=cfg.max_new_tokens)
    if cfg.sft_eval_size > len(heldout.ids):
        raise ValueError(f"sft_eval_size={cfg.sft_eval_size} but the held-out split has {len(heldout.ids)} rows; "
                         f"use sft_eval_size <= {len(heldout.ids)} (0 = all)")
    n = cfg.sft_eval_size or len(heldout.ids)
    return SftRun(cfg, mesh, model, tok, train, SftArrays(heldout.ids[:n], heldout.mask[:n], heldout.prompt_len),
                  rows.source, tuple(dropped))


def steps_per_seed(cfg: TrainConfig, rows: int) -> int:
    """S: ``sft_steps``, else floor(``sft_epochs`` × rows / ``batch_size``), at least 1."""
    return cfg.sft_steps or max(1, math.floor(cfg.sft_epochs * rows / cfg.batch_size))


def seed_config(cfg: TrainConfig, k: int, steps: int) -> TrainConfig:
    """The config seed k trains with: T = its S steps, one member from a fresh init, seed ``seed + k``."""
    return cfg.replace(total_steps=steps, num_phases=1, ensemble_size=1, lora_init_from=(), reference="behavior",
                       seed=cfg.seed + k)


def output_folder(cfg: TrainConfig, k: int) -> str:
    """Seed k's PEFT folder (LoRA) or HF folder (full fine-tuning)."""
    return str(rd.path(cfg.run_dir, "adapters" if cfg.lora_rank else "policies", f"seed_{k}"))


def _written(cfg: TrainConfig, folder: str) -> bool:
    return rd.path(folder, "adapter_config.json" if cfg.lora_rank else "config.json").exists()  # written last


def fresh_state(cfg_k: TrainConfig, base) -> st.TrainState:
    """Seed k's starting state (no behavior copy: SFT samples nothing)."""
    return st.create_state(cfg_k, base, jax.random.key(cfg_k.seed)).replace(behavior=None)


def heldout_loss(run: SftRun, params) -> float:
    """The mean response NLL of the held-out rows under ``params``, in global batches of ``batch_size`` rows (the
    last one filled with a copy of row 0 whose response carries no weight)."""
    cfg, h, b = run.cfg, run.heldout, run.cfg.batch_size
    mine = distributed.host_batch_rows(run.mesh, b)
    model_config = step_model_config(cfg, run.model.config)
    filler = h.mask[:1].copy()
    filler[:, h.prompt_len:] = 0
    total = np.zeros(2)
    for i in range(0, len(h.ids), b):
        pad = b - len(h.ids[i:i + b])
        ids = np.concatenate([h.ids[i:i + b], np.repeat(h.ids[:1], pad, 0)])
        mask = np.concatenate([h.mask[i:i + b], np.repeat(filler, pad, 0)])
        batch = distributed.global_rows({"ids": ids[mine], "mask": mask[mine]}, run.mesh)
        total += np.asarray(heldout_nll(model_config, params, batch, prompt_len=h.prompt_len,
                                        micro_batches=cfg.micro_batches, chunk=cfg.logprob_chunk))
    return float(total[0] / max(total[1], 1.0))


def train_seeds(run: SftRun, *, stop: Preemption, trackers, report=None) -> list[str]:
    """Train (or resume, or skip) every seed as the module docstring says; returns the seeds' output folders."""
    cfg = run.cfg
    steps = steps_per_seed(cfg, len(run.train.ids))
    metrics = rd.JsonlLog(rd.path(cfg.run_dir, "metrics.jsonl"))  # this process's one writer of the file
    ckpt = Checkpointer(cfg.run_dir, cfg.keep_checkpoints, logs=(metrics,))

    def write(record):
        metrics.append(record)
        trackers.log(record)

    try:
        restored = ckpt.restore_latest(fresh_state(seed_config(cfg, 0, steps), run.model.params), mesh=run.mesh)
        latest, state0, meta = (restored[0], restored[1], restored[3]) if restored else (0, None, {})
        if not any(r.get("step") == 0 and r.get("eval/heldout_rows") == len(run.heldout.ids)
                   for r in metrics.read()):  # sft_eval_size may change on resume
            before = heldout_loss(run, run.model.params)
            log.info(f"step 0: held-out loss {before:.4f} ({len(run.heldout.ids)} rows)")
            extra = report(run.model.params, "step 0") if report else {}
            write({"step": 0, "eval/heldout_loss": before, "eval/heldout_rows": len(run.heldout.ids), **extra})
        folders = []
        for k in range(cfg.sft_seeds):
            cfg_k, folder = seed_config(cfg, k, steps), output_folder(cfg, k)
            if latest >= (k + 1) * steps:  # trained: its checkpoint, or a later seed's, is on disk
                if not _written(cfg, folder):
                    if latest != (k + 1) * steps:
                        raise ValueError(f"seed {k} finished training but {folder} is missing and its checkpoint "
                                         f"is gone; start a new run_dir")
                    _finish(run, cfg_k, k, state0, folder, write, report)  # stopped between its last step and here
                    state0 = None  # the restored state has served
                log.info(f"seed {k}: done, {folder}")
            else:
                resume = (state0, meta["data"][distributed.process_index()]) if latest > k * steps else None
                state0 = None  # held by resume, or not this seed's
                state = _train_one(run, cfg_k, k, steps, ckpt, resume, stop, write)
                _finish(run, cfg_k, k, state, folder, write, report)
            folders.append(folder)
        metrics.flush()  # the last seed's final record, written after its last checkpoint
        return folders
    finally:
        ckpt.close()


def _train_one(run: SftRun, cfg_k: TrainConfig, k: int, steps: int, ckpt: Checkpointer, resume, stop: Preemption,
               write) -> st.TrainState:
    """Seed k's S steps, from a fresh state or ``resume`` = (restored state, this host's data position)."""
    cfg, mesh = run.cfg, run.mesh
    state = fresh_state(cfg_k, run.model.params) if resume is None else resume[0]
    stream = ArrayPrompts(list(range(len(run.train.ids))), run.train.ids, run.train.mask, batch_size=cfg.batch_size,
                          seed=cfg_k.seed, rows=distributed.host_batch_rows(mesh, cfg.batch_size))
    if resume is not None:
        stream.set_state(resume[1])
        log.info(f"seed {k}: resumed at step {int(state.step)} of {steps}")
    step_fn = make_sft_step(cfg_k, run.model.config, st.shardings(state), prompt_len=run.train.prompt_len)
    bar = tqdm(total=steps, initial=int(state.step), desc=f"sft seed {k}", unit="step",
               disable=not distributed.is_primary())
    try:
        while (s := int(state.step)) < steps:
            batch = stream.next_batch()
            state, metrics = step_fn(state, distributed.global_rows({"ids": batch.ids, "mask": batch.mask}, mesh))
            g = k * steps + s + 1
            record = {"step": g, "seed": k, "seed_step": s + 1, **{n: float(v) for n, v in metrics.items()}}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at seed {k} step {s + 1}; stopping. The last "
                                         f"good checkpoint in {ckpt.directory} is untouched.")
            write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            preempted = stop.requested()
            if preempted or s + 1 == steps or (cfg.checkpoint_every and (s + 1) % cfg.checkpoint_every == 0):
                ckpt.save(g, state, None, {"seed": k, "data": distributed.gather_json(stream.get_state())})
            if preempted:
                raise Preempted(f"SIGTERM: saved a checkpoint at seed {k} step {s + 1} in {ckpt.directory}")
    finally:
        bar.close()
    return state


def _finish(run: SftRun, cfg_k: TrainConfig, k: int, state: st.TrainState, folder: str, write, report) -> None:
    """Seed k's end: its held-out loss (and ``report``) logged, its adapter (or model) written."""
    params = st.policy_params(cfg_k, state, run.model.config.dtype)
    after = heldout_loss(run, params)
    log.info(f"seed {k}: held-out loss {after:.4f} after {cfg_k.total_steps} steps")
    extra = report(params, f"seed {k}") if report else {}
    write({"step": (k + 1) * cfg_k.total_steps, "seed": k, "eval/heldout_loss": after,
           "eval/heldout_rows": len(run.heldout.ids), **extra})
    _export(run, cfg_k, state, folder)
    log.info(f"seed {k}: written to {folder}")


def _export(run: SftRun, cfg_k: TrainConfig, state: st.TrainState, folder: str) -> None:
    """Seed k's result: its adapter as a PEFT folder (primary host), or the full model as an HF folder."""
    if not cfg_k.lora_rank:
        from bpo_jax.models import Decoder, save_pretrained

        save_pretrained(Decoder.from_params(run.model.config, st.export_params(cfg_k, state)), run.tokenizer, folder)
        return
    factors = distributed.gather_to_host(state.trainable)
    if distributed.is_primary():
        _write_peft(folder, {t: {"a": f["a"][0], "b": f["b"][0]} for t, f in factors.items()}, cfg_k)


def _write_peft(folder: str, factors: dict, cfg: TrainConfig) -> None:
    """``peft_adapters.write_adapter``, also to object storage (written locally, then copied up)."""
    from bpo_jax.models.peft_adapters import CONFIG_FILE, WEIGHTS_FILE, write_adapter

    kw = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, base_model=cfg.model)
    if not distributed.is_remote(folder):
        write_adapter(folder, factors, **kw)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(tmp, factors, **kw)
        dest = rd.path(folder)
        dest.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # the config last: it marks the folder complete
            rd.path(tmp, name).copy(dest / name, overwrite=True)


def train_command(folders: list[str], cfg: TrainConfig) -> str:
    """The ``train`` overrides that start an ensemble from these seeds' adapters (or, full fine-tuning, one
    model)."""
    if not cfg.lora_rank:  # train fine-tunes one model: any of them
        return f"model={folders[0]}" + (f" (or model= any of {', '.join(folders[1:])})" if len(folders) > 1 else "")
    return (f"lora_init_from={','.join(folders)} ensemble_size={len(folders)} lora_rank={cfg.lora_rank} "
            f"lora_alpha={cfg.lora_alpha:g} lora_targets={','.join(cfg.lora_targets)}")
