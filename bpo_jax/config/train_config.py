"""``TrainConfig``: a BPO run's settings, one group per concern (``bpo_jax.config.groups``), checked when built;
and ``StepConfig``: the part of it the jitted train step computes with.

    cfg = TrainConfig(total_steps=64, beta=0.1)                  # flat keys, as YAML and the command line
    cfg = TrainConfig(loss=Loss(beta=0.1), schedule=Schedule(total_steps=64))  # or whole groups
    cfg.loss.beta == cfg.beta                                    # each setting lives in its group; flat reads alias it

A setting has one home, its group; ``cfg.<key>`` reads it from there, so a flat key and its dotted form
(``loss.beta``) are the same setting.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from bpo_jax.config.groups import (
    GROUPS,
    TFDS_TASKS,
    BaseModel,
    ConfigError,
    Eval,
    Feedback,
    Lora,
    Loss,
    Mesh,
    Numerics,
    Optimizer,
    RunSettings,
    Sampling,
    Schedule,
    Sft,
    Task,
    TrustRegion,
    need,
)
from bpo_jax.losses import BATCH_COUPLED

# Every flat key -> the group that holds it, and each key's type (for coercing YAML and override strings).
KEY_GROUP = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
KEY_TYPES = {k: t for cls in GROUPS.values() for k, t in typing.get_type_hints(cls).items()}
RESUMABLE_KEYS = tuple(f.name for cls in GROUPS.values() for f in dataclasses.fields(cls) if f.metadata["resumable"])


class _FlatReads:
    """``cfg.<key>``: a flat key read from the group that holds it; ``lora_scale`` from the LoRA group."""

    def __getattr__(self, name):
        group = KEY_GROUP.get(name)
        if group is None or group not in type(self).__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    @property
    def lora_scale(self) -> float:
        return self.lora.lora_scale


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig(_FlatReads):
    base: BaseModel
    numerics: Numerics
    schedule: Schedule
    loss: Loss
    trust_region: TrustRegion
    sampling: Sampling
    lora: Lora
    optimizer: Optimizer
    task: Task
    feedback: Feedback
    eval: Eval
    run: RunSettings
    mesh: Mesh
    sft: Sft

    def __init__(self, **settings):
        """Groups by name and/or flat keys (a flat key wins over the same setting in a group passed with it);
        each group is checked, then the checks that read two groups. Raises ConfigError naming the key."""
        groups = {name: settings.pop(name, cls()) for name, cls in GROUPS.items()}
        unknown = [k for k in settings if k not in KEY_GROUP]
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}")
        for name in groups:
            mine = {k: v for k, v in settings.items() if KEY_GROUP[k] == name}
            group = groups[name].replace(**mine) if mine else groups[name]
            object.__setattr__(self, name, group.checked())  # construction: the only time a field is set
        check_across_groups(self)

    @property
    def steps_per_phase(self) -> int:
        return self.schedule.steps_per_phase

    @property
    def step_config(self) -> StepConfig:
        return StepConfig(self.loss, self.trust_region, self.lora, self.optimizer, self.numerics,
                          self.total_steps, self.dtype)

    def groups(self) -> dict:
        return {name: getattr(self, name) for name in GROUPS}

    def to_flat(self) -> dict:
        """Every flat key and its value (what ``save_config`` writes and the trackers log)."""
        return {k: getattr(getattr(self, g), k) for k, g in KEY_GROUP.items()}

    def replace(self, **kw) -> TrainConfig:
        """A new, checked config with some groups and/or flat keys changed."""
        return TrainConfig(**self.groups(), **kw)


@dataclasses.dataclass(frozen=True)
class StepConfig(_FlatReads):
    """What the jitted train step computes with, and nothing else: its static argument, so a change to an
    evaluation, checkpoint, data or mesh key leaves it equal and cannot cause another compilation."""
    loss: Loss
    trust_region: TrustRegion
    lora: Lora
    optimizer: Optimizer
    numerics: Numerics
    total_steps: int  # the learning-rate schedule's length
    dtype: str  # the run's compute dtype (auto: the model's), checked against the model config's

    @property
    def step_config(self) -> StepConfig:
        return self


def check_across_groups(cfg: TrainConfig) -> None:
    """The checks that read settings of two groups."""
    need(cfg.batch_size % cfg.micro_batches == 0,
         f"batch_size={cfg.batch_size} must be a positive multiple of micro_batches={cfg.micro_batches}")
    need(cfg.sampling_batch_size % cfg.batch_size == 0,
         f"sampling_batch_size={cfg.sampling_batch_size} must be a multiple of batch_size={cfg.batch_size} "
         f"(0 = batch_size)")
    need(cfg.attention != "cudnn" or cfg.dtype in ("bfloat16", "float16", "auto"),
         f"attention=cudnn needs dtype bfloat16 or float16 (cuDNN's fused attention has no float32 kernel); "
         f"dtype is {cfg.dtype}")
    need(not (cfg.data in TFDS_TASKS and cfg.annotator == "rouge"),
         f"data={cfg.data} has no gold summaries for annotator=rouge; use annotator=reward_model")
    uses_rm = cfg.annotator == "reward_model" or (cfg.annotator == "auto" and cfg.data in TFDS_TASKS)
    need(not uses_rm or cfg.reward_model, f"data={cfg.data} with annotator={cfg.annotator} needs reward_model "
                                          f"(an HF *ForSequenceClassification folder)")
    need(cfg.micro_batches == 1 or cfg.loss_type not in BATCH_COUPLED,
         f"loss_type={cfg.loss_type} couples the pairs of a batch (it sorts or averages over them), so "
         f"micro_batches={cfg.micro_batches} would change the loss, not only the memory; use micro_batches=1")
    need(cfg.identical_pairs == "resample" or cfg.loss_type not in BATCH_COUPLED,
         f"loss_type={cfg.loss_type} couples the pairs of a batch, so identical_pairs=shrink's masked rows would "
         f"enter its batch sort or mean; use identical_pairs=resample")


def run_identity_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``key: old -> new`` for each key that defines the run (not ``resumable``) and differs: empty for the same
    run. A resume may change only the resumable keys (how the run executes, not what it computes)."""
    old, now = saved.to_flat(), new.to_flat()
    return [f"{k}: {old[k]!r} -> {now[k]!r}" for k in KEY_GROUP if k not in RESUMABLE_KEYS and old[k] != now[k]]


def validate_for_model(cfg: TrainConfig, vocab_size: int, max_positions: int) -> None:
    """Checks that need the loaded model's sizes; run before any compute."""
    if cfg.top_k > vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the model's vocabulary ({vocab_size} tokens)")
    response = cfg.max_new_tokens + (cfg.response_eos == "append")  # an appended EOS takes one more position
    longest = cfg.max_prompt_length + max(response, cfg.eval_max_new_tokens)
    if longest > max_positions:
        raise ConfigError(f"max_prompt_length={cfg.max_prompt_length} plus up to {longest - cfg.max_prompt_length} new "
                          f"tokens is {longest} positions, more than the model's {max_positions}")


def validate_for_processes(cfg: TrainConfig, processes: int, devices: int) -> None:
    """Checks that need the process and device counts (``bpo_jax.runtime.distributed``); run before any compute.

    With several processes each host owns ``batch_size / processes`` pairs of every step, which must split over
    its own batch shards (``mesh_data × mesh_fsdp`` devices in all); reward-model calls split the same way.
    """
    sizes = [cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or devices % known or (-1 not in sizes and known != devices):
        raise ConfigError(f"mesh_data={cfg.mesh_data} x mesh_fsdp={cfg.mesh_fsdp} x mesh_tensor={cfg.mesh_tensor} "
                          f"does not fit {devices} devices (one axis may be -1: all the rest)")
    slices = 0 if cfg.mesh_slices == "auto" else int(cfg.mesh_slices)
    if slices > 1 and processes % slices:
        raise ConfigError(f"mesh_slices={slices} does not split {processes} processes into equal slices")
    if processes == 1:
        return
    shards = (devices // known if -1 in sizes[:2] else 1) * int(np.prod([s for s in sizes[:2] if s != -1]))
    if shards % processes:
        raise ConfigError(f"{shards} batch shards (mesh_data x mesh_fsdp) do not split over {processes} processes; "
                          f"keep mesh_tensor within one host")
    for key in ("batch_size", "reward_batch_size"):
        value = getattr(cfg, key)
        if value % shards:
            raise ConfigError(f"{key}={value} does not split over {processes} processes x {shards // processes} "
                              f"batch shards each; use a multiple of {shards}")
