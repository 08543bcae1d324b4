"""``TrainConfig``: one typed config for a BPO run, from YAML plus ``key=value`` overrides, validated up front.

    cfg = load_config("configs/smollm2_cpu_demo.yaml", ["total_steps=4", "reference=sft"])

Unknown keys and impossible values raise ``ConfigError`` naming the key before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

import numpy as np
import yaml

from bpo_jax.data.official import FORMATS as DATA_FORMATS
from bpo_jax.losses import BATCH_COUPLED, validate_loss_args
from bpo_jax.numerics import ATTENTION_IMPLS, remat_policy
from bpo_jax.runtime.trackers import TRACKERS
from bpo_jax.train.lora import MERGE_RULES, canonical_targets
from bpo_jax.train.pairs import TIE_RULES

REFERENCES = ("behavior", "sft", "ema", "mixup", "fixed")
TFDS_TASKS = ("tldr", "hh_helpful", "hh_harmless")
ANNOTATORS = ("auto", "rouge", "reward_model", "judge")


class ConfigError(ValueError):
    """A config key or value that cannot run."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Model
    model: str = "smollm2-135m-instruct"  # shipped name, HF folder, .gguf or Hub id org/name[@revision]
    param_dtype: str = "float32"
    dtype: str = "auto"  # compute dtype: auto = float32 on CPU, bfloat16 on accelerators
    remat: str = "none"  # per-layer rematerialisation: none | full | dots (keep matmul outputs); true = full
    attention: str = "xla"  # training/scoring attention: xla (any backend) | cudnn (NVIDIA fused, bf16/fp16 dtype)
    # Schedule: T steps in F annotation phases, K = T / F steps per phase
    total_steps: int = 16  # T
    num_phases: int = 2  # F
    batch_size: int = 8  # preference pairs per optimizer step
    micro_batches: int = 1  # gradient accumulation inside the jitted step
    logprob_chunk: int = 0  # train step: unembed this many response positions at a time (0 = all at once)
    share_prompt: bool = True  # train step: one row [prompt | chosen | rejected] per pair, the prompt run once
    # Loss
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    # Reference inside the loss
    reference: str = "behavior"  # behavior (BPO) | sft | ema | mixup | fixed
    ema_rate: float = 0.01  # ema: ref ← (1 − rate)·ref + rate·θ after every step
    mixup_alpha: float = 0.6  # mixup (TR-DPO): ref ← α·θ + (1 − α)·ref ...
    mixup_every: int = 8  # ... every τ steps
    reference_path: str = ""  # fixed: model to use as the reference (a folder or Hub id, as model)
    # Sampling from the behavior LLM
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sampling_batch_size: int = 0  # prompts per sampling call, a multiple of batch_size (0 = batch_size)
    # Trainable parameters
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")
    ensemble_size: int = 1  # N LoRA adapters, merged (mean of weight deltas) into π_β
    # How the N adapters merge into π_β / the evaluated and exported model (bpo_jax.train.lora): mean_delta (the exact
    # mean of the weight deltas) | peft_linear (PEFT's add_weighted_adapter(combination_type="linear"))
    ensemble_merge: str = "mean_delta"
    # PEFT adapter folders, one per member, to start the ensemble from (as the paper's official code starts from N
    # different-seed SFT adapters); empty: B = 0, A Kaiming-uniform as PEFT initialises a fresh adapter
    lora_init_from: tuple = ()
    # Optimizer (paper: AdamW, linear decay, no warmup, grad-norm clip 1.0)
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-8  # optax's and torch's default; the official code's transformers.AdamW uses 1e-6
    max_grad_norm: float = 1.0
    # Data and evaluation
    data: str = "minisum"  # minisum (the demo) | a folder in its format | tldr | hh_helpful | hh_harmless
    data_dir: str = ""  # tfds tasks: the raw files (manual_dir); "" = the shipped samples in data/samples/<task>
    tfds_dir: str = ""  # tfds tasks: where prepared copies go; "" = ~/tensorflow_datasets/bpo_jax
    data_format: str = "auto"  # tfds tasks: auto (per file, from its first row) | official (BPO's sft_*_data
    # {prompt, label} rows, rendered as plain text) | raw (the public hh-rlhf / summarize-from-feedback rows)
    annotator: str = "auto"  # auto (rouge for minisum data, else reward_model) | rouge | reward_model | judge
    reward_model: str = ""  # HF *ForSequenceClassification folder or Hub id (annotator=reward_model)
    reward_batch_size: int = 16
    reward_max_length: int = 1024  # tokens per (prompt, response) under the RM's chat template, when annotating
    # ... and when evaluating (0 = reward_max_length); the official evaluation cuts at max_prompt_length +
    # max_new_tokens (xu1998hz/BPO train/online_dpo_rand_trainer.py:1025-1028 with config.max_length, :1154)
    eval_reward_max_length: int = 0
    tied_pairs: str = "drop"  # equally scored pairs: drop (no preference) | second (the official code's label)
    judge_url: str = ""  # annotator=judge: OpenAI-compatible .../chat/completions URL; nothing is sent otherwise
    judge_model: str = ""
    judge_api_key_env: str = ""  # name of the environment variable holding the API key ("" = no key)
    judge_timeout: float = 60.0
    judge_retries: int = 3
    judge_concurrency: int = 8  # judge requests in flight at once
    judge_max_requests: int = 0  # HTTP requests one command may send to the judge, retries included (0 = no cap)
    max_prompt_length: int = 256  # tokens, after the chat template
    eval_size: int = 0  # test prompts to evaluate (0 = all)
    eval_batch_size: int = 16  # test prompts per greedy decoding call (each host)
    eval_max_new_tokens: int = 64
    # also log eval/sft_logratio: π_θ's log-ratio to the SFT model on its greedy responses (one extra forward)
    eval_sft_logratio: bool = False
    # Run
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 0  # 0 = only at phase boundaries
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0 = no periodic evaluation
    # where metrics go besides metrics.jsonl (bpo_jax.runtime.trackers): tensorboard, wandb (pip install wandb),
    # both, or none; auto = tensorboard when tensorboardX is installed, else none
    tracker: tuple = ("auto",)
    export_policy: bool = True  # write the final merged policy as an HF folder to <run_dir>/policy
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # An explicit device order for the mesh (device ids, row-major over data, fsdp, tensor); () = bpo_jax's, which
    # keeps each tensor group inside a host. A layout that makes hosts share batch rows is refused.
    mesh_device_ids: tuple = ()

    @property
    def steps_per_phase(self) -> int:
        return self.total_steps // self.num_phases

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def __post_init__(self):
        validate(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _list_item(key: str, value) -> bool:
    """A valid item of a list key: a name, or for ``mesh_device_ids`` a device id."""
    return isinstance(value, str) or (key == "mesh_device_ids" and type(value) is int)


def _coerce(key: str, value: Any):
    """Convert a YAML value or an override string to the field's type, or raise ConfigError."""
    hint = _HINTS[key]
    scalar = isinstance(value, (str, int, float)) and not (isinstance(value, bool) and hint in (int, float))
    if hint is not tuple and not scalar:  # a list, a mapping, null, or a bool where a number is wanted
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}")
    if hint is tuple and not (isinstance(value, str) or (isinstance(value, (list, tuple))
                                                         and all(_list_item(key, v) for v in value))):
        raise ConfigError(f"{key}={value!r} is not a list of names")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def _check_keys(keys, source: str):
    for k in keys:
        if k not in _FIELDS:
            close = difflib.get_close_matches(k, list(_FIELDS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(_FIELDS)}"
            raise ConfigError(f"unknown config key {k!r} in {source}{hint}")


def load_config(path: str | None = None, overrides=()) -> TrainConfig:
    """Defaults ← YAML file (if given) ← ``key=value`` overrides; then validate."""
    values: dict[str, Any] = {}
    if path:
        try:
            from etils import epath  # also gs:// (a multi-host run's config.yaml)

            data = yaml.safe_load(epath.Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {path!r} is not valid YAML{where}: {what}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
        _check_keys(data, path)
        values.update({k: _coerce(k, v) for k, v in data.items()})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        _check_keys([k], "the command line")
        values[k] = _coerce(k, yaml.safe_load(v) if _HINTS[k] is not str else v)
    return TrainConfig(**values)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write every key of ``cfg`` as YAML that ``load_config`` reads back to an equal config."""
    from etils import epath

    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    epath.Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


# Keys that may change between the runs of one run_dir (how it runs, not what it computes). Every other key
# defines the run: a resume with a different value is refused (``run_identity_changes``).
OPERATIONAL_KEYS = ("run_dir", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_size", "eval_max_new_tokens",
                    "eval_sft_logratio",
                    "export_policy", "mesh_data", "mesh_fsdp", "mesh_tensor", "mesh_device_ids", "remat",
                    "micro_batches", "logprob_chunk", "share_prompt", "attention", "eval_batch_size",
                    "reward_batch_size", "data_dir", "tfds_dir", "judge_timeout", "judge_retries", "judge_api_key_env",
                    "judge_concurrency", "judge_max_requests", "tracker")


def run_identity_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``key: old -> new`` for each run-defining key that differs (empty: the same run)."""
    return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}" for f in dataclasses.fields(TrainConfig)
            if f.name not in OPERATIONAL_KEYS and getattr(saved, f.name) != getattr(new, f.name)]


def validate_for_model(cfg: TrainConfig, vocab_size: int, max_positions: int) -> None:
    """Checks that need the loaded model's sizes; run before any compute."""
    if cfg.top_k > vocab_size:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the model's vocabulary ({vocab_size} tokens)")
    longest = cfg.max_prompt_length + max(cfg.max_new_tokens, cfg.eval_max_new_tokens)
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


def _need(ok, msg) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError for values that cannot run; canonicalise the LoRA target names, remat, tracker and
    mesh device ids in place (during construction). One check per concern, in the order below."""
    _check_schedule_and_loss(cfg)
    _check_data_and_reference(cfg)
    _check_sampling_and_training(cfg)
    _check_evaluation_and_annotation(cfg)
    _canonicalise(cfg)


def _check_schedule_and_loss(cfg: TrainConfig) -> None:
    """T, F, the batch and its splits, the loss's arguments."""
    _need(cfg.total_steps >= 1 and cfg.num_phases >= 1, "total_steps and num_phases must be >= 1")
    _need(cfg.total_steps % cfg.num_phases == 0,
          f"total_steps={cfg.total_steps} must be a multiple of num_phases={cfg.num_phases} (K = T / F steps/phase)")
    _need(cfg.sampling_batch_size >= 0 and cfg.sampling_batch_size % cfg.batch_size == 0,
          f"sampling_batch_size={cfg.sampling_batch_size} must be a multiple of batch_size={cfg.batch_size} "
          f"(0 = batch_size)")
    _need(cfg.eval_batch_size >= 1, f"eval_batch_size={cfg.eval_batch_size} must be >= 1")
    _need(cfg.logprob_chunk >= 0, f"logprob_chunk={cfg.logprob_chunk} must be >= 0 (0 = no chunking)")
    _need(cfg.batch_size >= 1 and cfg.micro_batches >= 1 and cfg.batch_size % cfg.micro_batches == 0,
          f"batch_size={cfg.batch_size} must be a positive multiple of micro_batches={cfg.micro_batches}")
    try:
        validate_loss_args(cfg.loss_type, cfg.beta, cfg.label_smoothing)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_data_and_reference(cfg: TrainConfig) -> None:
    """How the task's files are read, and the reference inside the loss."""
    _need(cfg.data_format in DATA_FORMATS, f"data_format={cfg.data_format!r}; valid: {', '.join(DATA_FORMATS)}")
    _need(cfg.reference in REFERENCES, f"reference={cfg.reference!r}; valid: {', '.join(REFERENCES)}")
    _need(cfg.reference != "fixed" or cfg.reference_path, "reference=fixed needs reference_path")
    _need(0.0 < cfg.ema_rate <= 1.0, f"ema_rate={cfg.ema_rate} must be in (0, 1]")
    _need(0.0 < cfg.mixup_alpha <= 1.0 and cfg.mixup_every >= 1, "mixup needs 0 < mixup_alpha <= 1, mixup_every >= 1")


def _check_sampling_and_training(cfg: TrainConfig) -> None:
    """The behavior LLM's sampling, the trainable parameters, the optimizer and the dtypes."""
    _need(cfg.max_new_tokens >= 1, "max_new_tokens must be >= 1")
    _need(cfg.temperature > 0.0, f"temperature={cfg.temperature}: the behavior LLM samples two responses per prompt, "
                                 f"and greedy decoding (0) makes them identical; use a temperature > 0")
    _need(cfg.top_k >= 0 and 0.0 < cfg.top_p <= 1.0, "need top_k >= 0 and 0 < top_p <= 1")
    _need(cfg.lora_rank >= 0 and cfg.ensemble_size >= 1, "lora_rank must be >= 0 and ensemble_size >= 1")
    _need(cfg.lora_rank > 0 or cfg.ensemble_size == 1,
          f"ensemble_size={cfg.ensemble_size} needs LoRA (lora_rank > 0); full fine-tuning trains one model")
    _need(cfg.ensemble_merge in MERGE_RULES, f"ensemble_merge={cfg.ensemble_merge!r}; valid: {', '.join(MERGE_RULES)}")
    _need(not cfg.lora_init_from or (cfg.lora_rank > 0 and len(cfg.lora_init_from) == cfg.ensemble_size),
          f"lora_init_from names {len(cfg.lora_init_from)} adapter folders; it needs one per ensemble member "
          f"(ensemble_size={cfg.ensemble_size}) and lora_rank > 0")
    _need(cfg.learning_rate > 0 and cfg.weight_decay >= 0 and cfg.max_grad_norm > 0 and cfg.adam_eps > 0,
          "need learning_rate > 0, weight_decay >= 0, max_grad_norm > 0, adam_eps > 0")
    _need(cfg.param_dtype in ("float32", "bfloat16") and cfg.dtype in ("auto", "float32", "bfloat16"),
          "param_dtype must be float32 or bfloat16, and dtype auto, float32 or bfloat16")


def _check_evaluation_and_annotation(cfg: TrainConfig) -> None:
    """Evaluation, checkpoints, the annotator (reward model, judge, ties) and batch-coupled losses."""
    _need(cfg.max_prompt_length >= 1 and cfg.eval_size >= 0 and cfg.eval_max_new_tokens >= 1,
          "need max_prompt_length >= 1, eval_size >= 0, eval_max_new_tokens >= 1")
    _need(min(cfg.checkpoint_every, cfg.eval_every) >= 0 and cfg.keep_checkpoints >= 1,
          "checkpoint_every and eval_every must be >= 0 (0 = off); keep_checkpoints >= 1")
    _need(cfg.annotator in ANNOTATORS, f"annotator={cfg.annotator!r}; valid: {', '.join(ANNOTATORS)}")
    _need(not (cfg.data in TFDS_TASKS and cfg.annotator == "rouge"),
          f"data={cfg.data} has no gold summaries for annotator=rouge; use annotator=reward_model")
    uses_rm = cfg.annotator == "reward_model" or (cfg.annotator == "auto" and cfg.data in TFDS_TASKS)
    _need(not uses_rm or cfg.reward_model, f"data={cfg.data} with annotator={cfg.annotator} needs reward_model "
                                           f"(an HF *ForSequenceClassification folder)")
    _need(cfg.annotator != "judge" or (cfg.judge_url and cfg.judge_model), "annotator=judge needs judge_url and "
                                                                           "judge_model")
    _need(cfg.judge_timeout > 0 and cfg.judge_retries >= 0, "need judge_timeout > 0 and judge_retries >= 0")
    _need(cfg.judge_concurrency >= 1 and cfg.judge_max_requests >= 0,
          f"need judge_concurrency >= 1 and judge_max_requests >= 0 (0 = no cap), got {cfg.judge_concurrency} and "
          f"{cfg.judge_max_requests}")
    _need(cfg.reward_batch_size >= 1 and cfg.reward_max_length >= 1 and cfg.eval_reward_max_length >= 0,
          "reward_batch_size and reward_max_length must be >= 1, eval_reward_max_length >= 0 (0 = reward_max_length)")
    _need(cfg.tied_pairs in TIE_RULES, f"tied_pairs={cfg.tied_pairs!r}; valid: {', '.join(TIE_RULES)}")
    _need(cfg.micro_batches == 1 or cfg.loss_type not in BATCH_COUPLED,
          f"loss_type={cfg.loss_type} couples the pairs of a batch (it sorts or averages over them), so "
          f"micro_batches={cfg.micro_batches} would change the loss, not only the memory; use micro_batches=1")


def _canonicalise(cfg: TrainConfig) -> None:
    """The settings with several spellings, set once to their canonical form (frozen dataclass: during
    construction only)."""
    try:
        object.__setattr__(cfg, "remat", remat_policy(cfg.remat))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _need(cfg.attention in ATTENTION_IMPLS, f"attention={cfg.attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    _need(cfg.attention != "cudnn" or cfg.dtype in ("bfloat16", "float16", "auto"),
          f"attention=cudnn needs dtype bfloat16 or float16 (cuDNN's fused attention has no float32 kernel); "
          f"dtype is {cfg.dtype}")
    try:
        targets = canonical_targets(cfg.lora_targets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _need(len(targets) > 0 or cfg.lora_rank == 0, "lora_targets is empty")
    object.__setattr__(cfg, "lora_targets", targets)  # frozen dataclass: set once, during construction
    if isinstance(cfg.tracker, str):  # TrainConfig(tracker="wandb") from Python, as a YAML scalar reads
        object.__setattr__(cfg, "tracker", tuple(t.strip() for t in cfg.tracker.split(",") if t.strip()))
    alone = len(cfg.tracker) <= 1 or not {"auto", "none"} & set(cfg.tracker)
    _need(all(t in TRACKERS for t in cfg.tracker) and alone,
          f"tracker={','.join(cfg.tracker)}; valid: one or more of tensorboard, wandb, or none or auto alone")
    object.__setattr__(cfg, "tracker", tuple(dict.fromkeys(cfg.tracker)))  # each tracker once
    _need(all(str(i).isdigit() for i in cfg.mesh_device_ids),
          f"mesh_device_ids={list(cfg.mesh_device_ids)} must be device ids (non-negative integers)")
    object.__setattr__(cfg, "mesh_device_ids", tuple(int(i) for i in cfg.mesh_device_ids))
