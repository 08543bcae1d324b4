"""The run's settings grouped by concern: one frozen dataclass per group, each field with its help text and
whether a resume of the same run may change it (``resumable``: how the run executes, not what it computes).

Each group validates itself: ``checked()`` returns the group with its settings in canonical form (``remat:
true`` -> ``full``, LoRA target aliases, tracker lists) or raises ``ConfigError`` naming the key. Checks that
read two groups live in ``bpo_jax.config.train_config``. Field names are the flat keys a YAML file or a
``key=value`` override uses (unique across groups), so ``beta=0.1`` and ``loss.beta=0.1`` name the same setting.

Where the allowed values live. The config layer sits above the layers whose choices it checks and below the ones
that read it (``pyproject.toml``'s import-linter contracts): ``sample/``, ``models/`` (LoRA targets and merge
rules, numerics), ``data/`` (the official formats), ``runtime/`` (trackers) and ``losses`` take plain arguments,
never a config, so each of their choices is defined once beside the code that implements and checks it, and
imported here; ``train/``, ``eval/`` and ``bpo_jax.wiring`` read the config, so the choices that only they
implement (the pair rules, references, annotators, tasks) are defined here. Nothing below this layer imports it.
"""

from __future__ import annotations

import dataclasses

from bpo_jax.data.official import FORMATS as DATA_FORMATS
from bpo_jax.losses import validate_loss_args
from bpo_jax.models.lora import MERGE_RULES, canonical_targets
from bpo_jax.models.numerics import ATTENTION_IMPLS, remat_policy
from bpo_jax.runtime.trackers import TRACKERS
from bpo_jax.sample.sampler import SAMPLING_LAYOUTS

REFERENCES = ("behavior", "sft", "ema", "mixup", "fixed")
TFDS_TASKS = ("tldr", "hh_helpful", "hh_harmless")
ANNOTATORS = ("auto", "rouge", "reward_model", "judge")
LR_SCHEDULES = ("linear", "cosine")
# The pair rules, which train/ (a layer above) implements; bpo_jax.train.pairs explains each.
TIE_RULES = ("drop", "second")
IDENTICAL_RULES = ("resample", "shrink")
EOS_RULES = ("sampled", "append")


class ConfigError(ValueError):
    """A config key or value that cannot run."""


def setting(default, help: str, *, resumable: bool = False):
    """A group field: its default, its help text, and whether a resume may change it."""
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable})


def need(ok, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


class _Group:
    def checked(self):
        """The group in canonical form; raises ConfigError for a value that cannot run."""
        return self

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class BaseModel(_Group):
    """The model the policy starts from, and the dtypes it is loaded in."""
    model: str = setting("smollm2-135m-instruct", "shipped name, HF folder, .gguf file or Hub id org/name[@revision]")
    param_dtype: str = setting("float32", "dtype of the frozen base weights: float32 | bfloat16")
    dtype: str = setting("auto", "compute dtype: auto (float32 on CPU, bfloat16 on accelerators) | float32 | bfloat16")

    def checked(self):
        need(self.param_dtype in ("float32", "bfloat16") and self.dtype in ("auto", "float32", "bfloat16"),
             "param_dtype must be float32 or bfloat16, and dtype auto, float32 or bfloat16")
        return self


@dataclasses.dataclass(frozen=True)
class Numerics(_Group):
    """How the train step spends memory and time; the same maths either way."""
    remat: str = setting("none", "per-layer rematerialisation: none | full | dots (keep matmul outputs); true = full",
                         resumable=True)
    attention: str = setting("xla", "training/scoring attention: xla (any backend) | cudnn (NVIDIA fused, bf16/fp16)",
                             resumable=True)
    micro_batches: int = setting(1, "gradient accumulation inside the jitted step", resumable=True)
    logprob_chunk: int = setting(0, "unembed this many response positions at a time (0 = all at once)",
                                 resumable=True)
    share_prompt: bool = setting(True, "one row [prompt | chosen | rejected] per pair, the prompt run once",
                                 resumable=True)

    def checked(self):
        try:
            remat = remat_policy(self.remat)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        need(self.attention in ATTENTION_IMPLS, f"attention={self.attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
        need(self.micro_batches >= 1, f"micro_batches={self.micro_batches} must be >= 1")
        need(self.logprob_chunk >= 0, f"logprob_chunk={self.logprob_chunk} must be >= 0 (0 = no chunking)")
        return self.replace(remat=remat)


@dataclasses.dataclass(frozen=True)
class Schedule(_Group):
    """T optimizer steps in F annotation phases (K = T / F steps per phase), B pairs per step."""
    total_steps: int = setting(16, "T: optimizer steps in all")
    num_phases: int = setting(2, "F: annotation phases (1 = offline DAP, T = on-policy); π_β ← π_θ after each")
    batch_size: int = setting(8, "preference pairs per optimizer step (sft: rows per step)")

    @property
    def steps_per_phase(self) -> int:
        return self.total_steps // self.num_phases

    def checked(self):
        need(self.total_steps >= 1 and self.num_phases >= 1, "total_steps and num_phases must be >= 1")
        need(self.total_steps % self.num_phases == 0, f"total_steps={self.total_steps} must be a multiple of "
                                                      f"num_phases={self.num_phases} (K = T / F steps/phase)")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        return self


@dataclasses.dataclass(frozen=True)
class Loss(_Group):
    """The DAP loss (``bpo_jax.losses``)."""
    loss_type: str = setting("sigmoid", "sigmoid (DPO) | ipo | hinge (SLiC) | ... (bpo_jax.losses.LOSSES)")
    beta: float = setting(0.1, "β: the strength of the pull towards the reference")
    label_smoothing: float = setting(0.0, "conservative DPO's label noise ε")
    discopop_tau: float = setting(0.05, "discopop: τ > 0 of the log-ratio modulation σ(βh/τ)")

    def checked(self):
        try:
            validate_loss_args(self.loss_type, self.beta, self.label_smoothing, self.discopop_tau)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return self


@dataclasses.dataclass(frozen=True)
class TrustRegion(_Group):
    """The reference inside the loss: the model the policy is kept close to."""
    reference: str = setting("behavior", "behavior (BPO: π_β, the sampler) | sft | ema | mixup | fixed")
    ema_rate: float = setting(0.01, "ema: ref ← (1 − rate)·ref + rate·θ after every step")
    mixup_alpha: float = setting(0.6, "mixup (TR-DPO): ref ← α·θ + (1 − α)·ref every mixup_every steps")
    mixup_every: int = setting(8, "mixup: τ, the steps between reference updates")
    reference_path: str = setting("", "fixed: the model to use as the reference (a folder or Hub id, as model)")

    def checked(self):
        need(self.reference in REFERENCES, f"reference={self.reference!r}; valid: {', '.join(REFERENCES)}")
        need(self.reference != "fixed" or self.reference_path, "reference=fixed needs reference_path")
        need(0.0 < self.ema_rate <= 1.0, f"ema_rate={self.ema_rate} must be in (0, 1]")
        need(0.0 < self.mixup_alpha <= 1.0 and self.mixup_every >= 1,
             "mixup needs 0 < mixup_alpha <= 1, mixup_every >= 1")
        return self


@dataclasses.dataclass(frozen=True)
class Sampling(_Group):
    """How the behavior LLM samples two responses per prompt."""
    max_new_tokens: int = setting(128, "tokens per sampled response")
    temperature: float = setting(1.0, "sampling temperature (> 0: two greedy samples would be identical)")
    top_k: int = setting(0, "keep the k most likely tokens (0 = all)")
    top_p: float = setting(1.0, "nucleus sampling mass (1 = all)")
    sampling_batch_size: int = setting(0, "prompts per sampling call, a multiple of batch_size (0 = batch_size)")
    response_eos: str = setting("sampled", "how a trained response ends: sampled (the tokens as sampled; a truncated "
                                "one has no EOS) | append (every response ends with an EOS, one forced after a "
                                "truncated one, as the official code appends eos_token_id to each decoded response: "
                                "train/online_dpo_rand_trainer.py lines 699 and 328-332)")
    sampling_layout: str = setting("auto", "where pi_beta's weights sit while it samples (collection and greedy "
                                   "evaluation): replicated (over data/fsdp, split over tensor: no collectives per "
                                   "token; moved once per phase) | train (the training layout) | auto (replicated "
                                   "when that copy, twice while it is unstacked, fits 80% of the memory the state "
                                   "leaves free)", resumable=True)
    behavior_check_every: int = setting(8, "re-score a phase's first batch with pi_beta's own params to check the "
                                        "sampler's log-probs (phase/behavior_logp_gap: one forward) at phase 1 and "
                                        "then every this many phases (0 = phase 1 only); the pi_theta-vs-pi_beta "
                                        "gaps come from the train step at every phase start", resumable=True)

    def checked(self):
        need(self.behavior_check_every >= 0, f"behavior_check_every={self.behavior_check_every} must be >= 0")
        need(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        need(self.temperature > 0.0, f"temperature={self.temperature}: the behavior LLM samples two responses per "
                                     f"prompt, and greedy decoding (0) makes them identical; use a temperature > 0")
        need(self.top_k >= 0 and 0.0 < self.top_p <= 1.0, "need top_k >= 0 and 0 < top_p <= 1")
        need(self.sampling_batch_size >= 0, f"sampling_batch_size={self.sampling_batch_size} must be >= 0")
        need(self.response_eos in EOS_RULES, f"response_eos={self.response_eos!r}; valid: {', '.join(EOS_RULES)}")
        need(self.sampling_layout in SAMPLING_LAYOUTS,
             f"sampling_layout={self.sampling_layout!r}; valid: {', '.join(SAMPLING_LAYOUTS)}")
        return self


@dataclasses.dataclass(frozen=True)
class Lora(_Group):
    """The trainable parameters: full fine-tuning, one LoRA adapter, or an ensemble merged into π_β."""
    lora_rank: int = setting(0, "LoRA rank r (0 = full fine-tuning)")
    lora_alpha: float = setting(16.0, "LoRA α: the adapter's scale is α / r")
    lora_targets: tuple = setting(("q", "k", "v", "o", "gate", "up", "down"), "the projections that get adapters")
    ensemble_size: int = setting(1, "N LoRA adapters trained on the same pairs, merged into π_β")
    ensemble_merge: str = setting("mean_delta", "how the N adapters merge (bpo_jax.models.lora): mean_delta (the "
                                  "exact mean of the weight deltas) | peft_linear (PEFT's add_weighted_adapter linear)")
    lora_init_from: tuple = setting((), "PEFT adapter folders, one per member, to start from (as the official "
                                    "code does); empty: B = 0, A Kaiming-uniform, as PEFT initialises one")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def checked(self):
        need(self.lora_rank >= 0 and self.ensemble_size >= 1, "lora_rank must be >= 0 and ensemble_size >= 1")
        need(self.lora_rank > 0 or self.ensemble_size == 1,
             f"ensemble_size={self.ensemble_size} needs LoRA (lora_rank > 0); full fine-tuning trains one model")
        need(self.ensemble_merge in MERGE_RULES,
             f"ensemble_merge={self.ensemble_merge!r}; valid: {', '.join(MERGE_RULES)}")
        need(not self.lora_init_from or (self.lora_rank > 0 and len(self.lora_init_from) == self.ensemble_size),
             f"lora_init_from names {len(self.lora_init_from)} adapter folders; it needs one per ensemble member "
             f"(ensemble_size={self.ensemble_size}) and lora_rank > 0")
        try:
            targets = canonical_targets(self.lora_targets)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        need(len(targets) > 0 or self.lora_rank == 0, "lora_targets is empty")
        return self.replace(lora_targets=targets)


@dataclasses.dataclass(frozen=True)
class Optimizer(_Group):
    """The paper's optimizer: grad-norm clipping, then AdamW with a linear decay to 0 over T steps, no warmup."""
    learning_rate: float = setting(5e-5, "peak learning rate, decayed linearly to 0 over total_steps")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    adam_eps: float = setting(1e-8, "AdamW's ε (optax's and torch's default; the official code's uses 1e-6)")
    max_grad_norm: float = setting(1.0, "clip the gradients' global norm to this")
    lr_schedule: str = setting("linear", "the learning rate from learning_rate to 0 over the run's steps, no warmup: "
                               "linear (the paper's DAP) | cosine (the official SFT: HF's cosine schedule)")

    def checked(self):
        need(self.learning_rate > 0 and self.weight_decay >= 0 and self.max_grad_norm > 0 and self.adam_eps > 0,
             "need learning_rate > 0, weight_decay >= 0, max_grad_norm > 0, adam_eps > 0")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        return self

    def schedule(self, total_steps: int):
        """The learning rate at step t of ``total_steps`` (T), from η = ``learning_rate`` to 0: ``linear``
        η (1 − t/T); ``cosine`` η (1 + cos(π t/T)) / 2 (transformers' cosine schedule without warmup)."""
        import optax

        if self.lr_schedule == "cosine":
            return optax.cosine_decay_schedule(self.learning_rate, total_steps)
        return optax.linear_schedule(self.learning_rate, 0.0, total_steps)

    def build(self, total_steps: int):
        """The optax chain over ``total_steps`` steps."""
        import optax

        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm),
                           optax.adamw(self.schedule(total_steps), eps=self.adam_eps, weight_decay=self.weight_decay))


@dataclasses.dataclass(frozen=True)
class Task(_Group):
    """The prompts: which task, where its files are, how long a prompt may be."""
    data: str = setting("minisum", "minisum (the demo) | a folder in its format | tldr | hh_helpful | hh_harmless | "
                        "a dataset in TRL's formats (hf://datasets/org/name[@rev], or parquet files)")
    data_dir: str = setting("", "tfds tasks: their files (a folder, or a dataset in TRL's formats); empty = the "
                            "shipped samples; with data=minisum, a dataset here is the data",
                            resumable=True)
    tfds_dir: str = setting("", "tfds tasks: where prepared copies go; empty = ~/tensorflow_datasets/bpo_jax",
                            resumable=True)
    data_format: str = setting("auto", "tfds tasks: auto (per file, from its first row) | official (BPO's "
                               "sft_*_data rows) | raw (the public hh-rlhf / summarize-from-feedback rows)")
    max_prompt_length: int = setting(256, "tokens per prompt, after the chat template")
    split: str = setting("train,test", "the data's training and test splits, TRAIN,TEST (file names, or a Hub "
                         "dataset's splits, e.g. train_prefs,test_prefs)")

    def checked(self):
        need(len(self.split.split(",")) == 2 and all(s.strip() for s in self.split.split(",")),
             f"split={self.split!r}: name the training and test splits, TRAIN,TEST")
        need(self.data_format in DATA_FORMATS, f"data_format={self.data_format!r}; valid: {', '.join(DATA_FORMATS)}")
        need("://" not in self.tfds_dir, f"tfds_dir={self.tfds_dir!r}: the prepared copy must be on a local or "
             f"mounted file system (the processes that share it take turns on a lock file beside it); give a local "
             f"folder (each machine prepares its own copy) or leave it empty")
        need(self.max_prompt_length >= 1, "need max_prompt_length >= 1")
        return self


@dataclasses.dataclass(frozen=True)
class Feedback(_Group):
    """The annotator that picks the winner of each pair: ROUGE, a reward model or an API judge."""
    annotator: str = setting("auto", "auto (rouge for minisum data, else reward_model) | rouge | reward_model | judge")
    reward_model: str = setting("", "HF *ForSequenceClassification folder or Hub id (annotator=reward_model)")
    reward_batch_size: int = setting(16, "(prompt, response) pairs per reward-model call", resumable=True)
    reward_max_length: int = setting(1024, "tokens per (prompt, response) under the RM's chat template")
    tied_pairs: str = setting("drop", "equally scored pairs: drop (no preference) | second (the official label)")
    identical_pairs: str = setting("resample", "pairs of two identical responses (and ties under tied_pairs=drop): "
                                   "resample (sample more prompts until the phase has K·B pairs) | shrink (a step "
                                   "trains on the pairs kept among its B prompts, the rest masked, as the official "
                                   "code drops them: train/online_dpo_rand_trainer.py line 720, loss lines 954 "
                                   "and 1366)")
    judge_url: str = setting("", "annotator=judge: OpenAI-compatible .../chat/completions URL")
    judge_model: str = setting("", "annotator=judge: the model name sent with each request")
    judge_api_key_env: str = setting("", "the environment variable holding the judge's API key (empty = none)",
                                     resumable=True)
    judge_timeout: float = setting(60.0, "seconds per judge request", resumable=True)
    judge_retries: int = setting(3, "retries of a failed judge request", resumable=True)
    judge_concurrency: int = setting(8, "judge requests in flight at once", resumable=True)
    judge_max_requests: int = setting(0, "HTTP requests one command may send to the judge, retries included "
                                      "(0 = no cap)", resumable=True)

    def checked(self):
        need(self.annotator in ANNOTATORS, f"annotator={self.annotator!r}; valid: {', '.join(ANNOTATORS)}")
        need(self.annotator != "judge" or (self.judge_url and self.judge_model),
             "annotator=judge needs judge_url and judge_model")
        need(self.judge_timeout > 0 and self.judge_retries >= 0, "need judge_timeout > 0 and judge_retries >= 0")
        need(self.judge_concurrency >= 1 and self.judge_max_requests >= 0,
             f"need judge_concurrency >= 1 and judge_max_requests >= 0 (0 = no cap), got {self.judge_concurrency} "
             f"and {self.judge_max_requests}")
        need(self.reward_batch_size >= 1 and self.reward_max_length >= 1,
             "reward_batch_size and reward_max_length must be >= 1")
        need(self.tied_pairs in TIE_RULES, f"tied_pairs={self.tied_pairs!r}; valid: {', '.join(TIE_RULES)}")
        need(self.identical_pairs in IDENTICAL_RULES,
             f"identical_pairs={self.identical_pairs!r}; valid: {', '.join(IDENTICAL_RULES)}")
        return self


@dataclasses.dataclass(frozen=True)
class Eval(_Group):
    """The greedy evaluation on the test prompts (win rate against the human references)."""
    eval_size: int = setting(0, "test prompts to evaluate (0 = all)", resumable=True)
    eval_batch_size: int = setting(16, "test prompts per greedy decoding call (each host)", resumable=True)
    eval_max_new_tokens: int = setting(64, "tokens per greedy test response", resumable=True)
    eval_every: int = setting(0, "evaluate every this many steps (0 = no periodic evaluation)",
                              resumable=True)
    eval_sft_logratio: bool = setting(False, "also log eval/sft_logratio: the policy's log-ratio to the SFT model "
                                      "on its greedy responses (one extra forward)", resumable=True)
    eval_reward_max_length: int = setting(0, "reward-model tokens per test response (0 = reward_max_length; the "
                                          "official evaluation cuts at max_prompt_length + max_new_tokens)")

    def checked(self):
        need(self.eval_size >= 0 and self.eval_max_new_tokens >= 1, "need eval_size >= 0, eval_max_new_tokens >= 1")
        need(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        need(self.eval_every >= 0, "eval_every must be >= 0 (0 = off)")
        need(self.eval_reward_max_length >= 0, "need eval_reward_max_length >= 0 (0 = reward_max_length)")
        return self


@dataclasses.dataclass(frozen=True)
class RunSettings(_Group):
    """Where the run lives and what it keeps: seed, folder, checkpoints, trackers, the exported policy."""
    seed: int = setting(0, "the run's random seed (sampling, adapter initialisation, prompt order)")
    run_dir: str = setting("runs/default", "the run's folder (local or gs://): config, metrics, checkpoints",
                           resumable=True)
    checkpoint_every: int = setting(0, "checkpoint every this many steps (0 = at phase boundaries only)",
                                    resumable=True)
    keep_checkpoints: int = setting(3, "checkpoints kept (the oldest are deleted)", resumable=True)
    tracker: tuple = setting(("auto",), "where metrics go besides metrics.jsonl: tensorboard, wandb, both, or "
                             "none; auto = tensorboard when tensorboardX is installed", resumable=True)
    export_policy: bool = setting(True, "write the final merged policy as an HF folder to <run_dir>/policy",
                                  resumable=True)

    def checked(self):
        need(self.checkpoint_every >= 0 and self.keep_checkpoints >= 1,
             "checkpoint_every must be >= 0 (0 = off); keep_checkpoints >= 1")
        tracker = self.tracker
        if isinstance(tracker, str):  # tracker="wandb" from Python, as a YAML scalar reads
            tracker = tuple(t.strip() for t in tracker.split(",") if t.strip())
        alone = len(tracker) <= 1 or not {"auto", "none"} & set(tracker)
        need(all(t in TRACKERS for t in tracker) and alone,
             f"tracker={','.join(tracker)}; valid: one or more of tensorboard, wandb, or none or auto alone")
        return self.replace(tracker=tuple(dict.fromkeys(tracker)))  # each tracker once


@dataclasses.dataclass(frozen=True)
class Mesh(_Group):
    """The device mesh: data × fsdp × tensor axes (one may be -1: all the rest)."""
    mesh_data: int = setting(-1, "devices along the data axis (-1 = all the rest)", resumable=True)
    mesh_fsdp: int = setting(1, "devices along the fsdp axis (weights sharded, gathered per layer)", resumable=True)
    mesh_tensor: int = setting(1, "devices along the tensor axis (kept inside one host)", resumable=True)
    mesh_device_ids: tuple = setting((), "an explicit device order (ids, row-major over data, fsdp, tensor); "
                                     "empty = bpo_jax's, which keeps each tensor group inside a host",
                                     resumable=True)
    mesh_slices: str = setting("auto", "slices joined by the data-centre network, which only the data axis "
                               "crosses: auto (0) = from the devices' slice_index (TPU multislice); N = N slices "
                               "(where devices report one: N groups of consecutive processes); 1 = one slice, "
                               "any axis may cross (warned)", resumable=True)

    def checked(self):
        need(all(str(i).isdigit() for i in self.mesh_device_ids),
             f"mesh_device_ids={list(self.mesh_device_ids)} must be device ids (non-negative integers)")
        slices = str(self.mesh_slices).strip().lower()
        need(slices == "auto" or slices.isdigit(),
             f"mesh_slices={self.mesh_slices!r}: auto (or 0) or a positive number of slices")
        return self.replace(mesh_device_ids=tuple(int(i) for i in self.mesh_device_ids),
                            mesh_slices="auto" if slices in ("auto", "0") else str(int(slices)))


@dataclasses.dataclass(frozen=True)
class Sft(_Group):
    """``python -m bpo_jax sft``: supervised fine-tuning on (prompt, response) rows, the loss on the response tokens
    only, one adapter (or model) per seed. It also reads ``model``, the ``lora_*`` keys, ``batch_size`` (rows per
    optimizer step), ``micro_batches``, the optimizer group (``lr_schedule: cosine`` as the official SFT),
    ``max_prompt_length``, ``max_new_tokens`` (response tokens kept), ``seed``, the run group and the mesh."""
    sft_data: str = setting("", "the SFT rows: empty = the task's (data) training prompts and human references, "
                            "held out: its test split; or a folder of official {prompt, label} rows (the official "
                            "sft_<task>_data: train.jsonl, held out: dev.jsonl, else test.jsonl)")
    sft_seeds: int = setting(1, "N: adapters trained one after another, seeds seed .. seed + N - 1 (each its own "
                             "initialisation and data order), written to <run_dir>/adapters/seed_<k>")
    sft_epochs: float = setting(1.0, "passes over the SFT rows per seed: floor(epochs x rows / batch_size) steps")
    sft_steps: int = setting(0, "optimizer steps per seed (0 = from sft_epochs)")
    sft_eval_size: int = setting(0, "held-out rows scored for the loss before and after each seed (0 = all)",
                                 resumable=True)

    def checked(self):
        need(self.sft_seeds >= 1 and self.sft_steps >= 0 and self.sft_eval_size >= 0,
             f"need sft_seeds >= 1, sft_steps >= 0, sft_eval_size >= 0; got {self.sft_seeds}, {self.sft_steps}, "
             f"{self.sft_eval_size}")
        need(self.sft_epochs > 0, f"sft_epochs={self.sft_epochs} must be > 0")
        return self


# The groups in order: TrainConfig's fields, the dotted keys' first part, the help listing.
GROUPS = {"base": BaseModel, "numerics": Numerics, "schedule": Schedule, "loss": Loss, "trust_region": TrustRegion,
          "sampling": Sampling, "lora": Lora, "optimizer": Optimizer, "task": Task, "feedback": Feedback,
          "eval": Eval, "run": RunSettings, "mesh": Mesh, "sft": Sft}
