"""A run's task from its config: the training prompt stream, the test prompts with human references, and the
annotator that ranks samples and judges the win rate.

- ``data=minisum`` (or a folder of ``train.jsonl`` / ``test.jsonl`` in its format): the CPU demo task, scored
  by ROUGE-L against held-out gold summaries (``annotator=rouge``) or by a reward model.
- ``data=tldr | hh_helpful | hh_harmless``: the paper's tasks through the tfds builders, from the files in
  ``data_dir`` (the official BPO ``sft_*_data`` files or the raw public ones, per ``data_format``; default: the
  shipped raw samples), scored by a reward model (``reward_model=<HF folder>``). Over-long test prompts are cut
  per task: a TL;DR post keeps its start, an HH dialogue its end (``builders``' ``keep``).
- a prompt dataset in TRL's formats (``bpo_jax.data.trl_formats``): ``data=hf://datasets/org/name[@revision]``
  (or ``org/name`` that is no local path; fetched into the HF cache, offline from it: ``bpo_jax.models.hub``),
  or a parquet file or folder; the same given as ``data_dir`` with ``data=minisum`` (the default); the
  generic ``dataset`` tfds task, scored by a reward model. A paper task reads such a dataset too
  (``data=tldr data_dir=hf://datasets/...``). ``split`` names the training and test splits.

Any task can instead be judged by an LLM over an OpenAI-compatible API (``annotator=judge``, ``judge_url``,
``judge_model``; ``bpo_jax.eval.judge``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bpo_jax.config import TrainConfig
from bpo_jax.data import builders, minisum, trl_formats
from bpo_jax.data.prompts import (
    ArrayPrompts,
    GrainPrompts,
    encode,
    encode_truncated,
    example_prompt,
    example_reference,
    left_pad,
)
from bpo_jax.eval.annotators import RewardModelAnnotator, RougeAnnotator
from bpo_jax.runtime import distributed


@dataclass
class Task:
    name: str
    train: object  # a prompt stream (bpo_jax.data.prompts), or None when only evaluating
    eval_prompts: list  # texts or conversations
    eval_ids: np.ndarray
    eval_mask: np.ndarray
    references: list
    annotator: object  # labels the sampled pairs
    score_name: str  # what the annotator's scores are, for printing
    truncated: int = 0  # test prompts cut to max_prompt_length (the annotator still sees them whole)
    eval_annotator: object = None  # scores the test set: the annotator, or the RM at eval_reward_max_length
    eval_groups: list | None = None  # each test prompt's group, when the data gives them (``prompt_groups``)

    def __post_init__(self):
        if self.eval_annotator is None:
            self.eval_annotator = self.annotator


@dataclass
class Run:
    """What a command needs for a config: the mesh, the policy model and tokenizer, the fixed reference's
    weights (``reference=fixed``, else None), the EOS ids and the task."""

    mesh: object
    model: object
    tokenizer: object
    reference: object
    eos_token_ids: tuple
    task: Task


def training_run(model, tokenizer, prompts, annotator, *, mesh=None, eos_token_ids=(), reference=None) -> Run:
    """A ``Run`` for ``bpo_jax.train.loop.train`` from parts built by hand: a loaded model (``.config``,
    ``.params``: the SFT start), its tokenizer, a prompt stream (``bpo_jax.data.prompts``) and an annotator
    (``(prompts, responses) -> scores``); no test set (evaluate with your own ``evaluate`` callable)."""
    empty = np.zeros((0, 1), np.int32)
    task = Task("custom", prompts, [], empty, empty, [], annotator, "score")
    return Run(mesh, model, tokenizer, reference, tuple(eos_token_ids), task)


def setup_run(cfg: TrainConfig, *, train: bool = True) -> Run:
    """Load the policy (sharded over the config's mesh when there is more than one device) and build the task."""
    import jax

    from bpo_jax.models import load_pretrained

    if annotator_kind(cfg) == "reward_model" and not cfg.reward_model:  # before any load
        raise ValueError(f"data {data_name(cfg)!r} has no gold summaries: it needs reward_model (an HF "
                         f"*ForSequenceClassification folder or Hub id) or annotator=judge")
    mesh = None
    if jax.device_count() > 1:  # checked before any compute: hosts must own disjoint batch rows
        mesh = distributed.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor, cfg.mesh_device_ids,
                                     cfg.mesh_slices)
    # Each host reads its own copy of the weights (no collective): a failure on one host stops every host alike.
    model, tok = distributed.agreed(load_pretrained, cfg.model, mesh=mesh, param_dtype=cfg.param_dtype,
                                    dtype=cfg.dtype, remat=cfg.remat, attention=cfg.attention)
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer files; training and evaluation need one")
    reference = None
    if cfg.reference == "fixed":
        reference = distributed.agreed(load_pretrained, cfg.reference_path, mesh=mesh, param_dtype=cfg.param_dtype,
                                       dtype=cfg.dtype)[0].params
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, tuple) else (eos,)
    tfds = tfds_task(cfg)
    sources = prepare_tfds(*tfds, cfg.tfds_dir, cfg.data_format, splits(cfg)) if tfds else None
    task = build_task(cfg, tok, mesh=mesh, train=train, sources=sources)
    return Run(mesh, model, tok, reference, eos, task)


def annotator_kind(cfg: TrainConfig) -> str:
    """``rouge``, ``reward_model`` or ``judge``; ``auto`` is the reward model when one is configured or the data
    has no gold summaries."""
    if cfg.annotator != "auto":
        return cfg.annotator
    return "reward_model" if tfds_task(cfg) or cfg.reward_model else "rouge"


def tfds_task(cfg: TrainConfig) -> tuple[str, str] | None:
    """``(tfds task, where its files are)`` of ``cfg``, or None for minisum-format data: a paper task reads
    ``data_dir``; a dataset (``is_dataset``) as ``data``, or as ``data_dir`` with ``data=minisum`` (whose own
    files ship), is the generic ``dataset`` task."""
    if cfg.data in builders.BUILDERS:
        return cfg.data, cfg.data_dir
    if is_dataset(cfg.data):
        return "dataset", cfg.data
    if cfg.data == "minisum" and cfg.data_dir and is_dataset(cfg.data_dir):
        return "dataset", cfg.data_dir
    return None


def data_name(cfg: TrainConfig) -> str:
    """The data's name in messages: the dataset of the generic ``dataset`` task, else ``data``."""
    found = tfds_task(cfg)
    return found[1] if found and found[0] == "dataset" else cfg.data


def is_dataset(location: str) -> bool:
    """Whether ``location`` is prompt data in TRL's formats: a Hub dataset id (``bpo_jax.models.hub.
    is_dataset_id``), or a parquet file or a folder holding parquet files."""
    from bpo_jax.models.hub import is_dataset_id

    return is_dataset_id(location) or (os.path.exists(location) and trl_formats.is_parquet_data(location))


def splits(cfg: TrainConfig) -> tuple[str, str]:
    """The data's (training, test) split names, from ``split``."""
    train, test = (s.strip() for s in cfg.split.split(","))
    return train, test


def local_data(location: str, names=builders.SPLITS) -> str:
    """``location`` as a local path: a Hub dataset id fetched (its ``names`` splits' parquet files) into the HF
    cache, or found there offline (``bpo_jax.models.hub.resolve_dataset``); anything else as it is."""
    from bpo_jax.models.hub import is_dataset_id, resolve_dataset

    return resolve_dataset(location, tuple(names)) if location and is_dataset_id(location) else location


def build_task(cfg: TrainConfig, tokenizer, *, mesh=None, train: bool = True, sources: dict | None = None) -> Task:
    """Load data and annotator for ``cfg``; errors name the file, line or key at fault. ``sources``: a tfds
    task's splits when already prepared (``prepare_tfds``; else prepared here)."""
    if tfds_task(cfg):
        eval_prompts, references, encoded, stream, gold, groups = _tfds_data(cfg, tokenizer, sources, train)
    else:
        eval_prompts, references, encoded, stream, gold, groups = _folder_data(cfg, tokenizer, mesh, train)
    annotator, eval_annotator, score_name = annotators(cfg, gold, mesh)
    encoded = encoded or [(encode(tokenizer, p), False) for p in eval_prompts]
    eval_ids, eval_mask = left_pad([ids for ids, _ in encoded])
    if eval_ids.shape[1] > cfg.max_prompt_length:
        raise ValueError(f"a test prompt has {eval_ids.shape[1]} tokens, over max_prompt_length="
                         f"{cfg.max_prompt_length}")
    return Task(data_name(cfg), stream, eval_prompts, eval_ids, eval_mask, references, annotator, score_name,
                truncated=sum(cut for _, cut in encoded), eval_annotator=eval_annotator, eval_groups=groups)


def _tfds_data(cfg: TrainConfig, tokenizer, sources, train: bool):
    """A tfds task: (test prompts, references, encoded test prompts, the train stream or None, gold = None,
    groups = None)."""
    task, location = tfds_task(cfg)
    sources = sources or prepare_tfds(task, location, cfg.tfds_dir, cfg.data_format, splits(cfg))
    test = builders.split_examples(sources["test"])
    # Every test prompt, the long ones truncated, as the official evaluation has it (it evaluates the whole
    # test split, online_dpo_rand_trainer.py eval_over_steps); eval_size > 0 takes the first ones. A
    # dialogue is cut from its start so that its last user turn stays (builders' keep).
    test = test[: _eval_size(cfg, len(test), f"task {task!r} ({location})" if location else f"task {task!r}")]
    eval_prompts = [example_prompt(ex) for ex in test]
    keep = builders.TASKS[task].keep
    encoded = [encode_truncated(tokenizer, p, cfg.max_prompt_length, keep) for p in eval_prompts]
    stream = None
    if train:
        stream = distributed.agreed(  # its probe of the prompts is host-local: one outcome for every host
            GrainPrompts, sources["train"], tokenizer, batch_size=cfg.batch_size,
            max_prompt_length=cfg.max_prompt_length, seed=cfg.seed, shard_index=distributed.process_index(),
            shard_count=distributed.process_count())
    return eval_prompts, [example_reference(ex) for ex in test], encoded, stream, None, None


def _folder_data(cfg: TrainConfig, tokenizer, mesh, train: bool):
    """A minisum-format folder: (test prompts, references, None, the train stream or None, gold summaries, the
    test prompts' groups or None)."""
    test_rows, folder = _folder_test_rows(cfg)
    train_rows = minisum.load_rows(os.path.join(folder, "train.jsonl"))
    stream = None
    if train:
        texts = [minisum.prompt_text(r) for r in train_rows]
        ids, mask = minisum.encode_prompts(tokenizer, texts, cfg.max_prompt_length)
        stream = ArrayPrompts(texts, ids, mask, batch_size=cfg.batch_size, seed=cfg.seed,
                              rows=distributed.host_batch_rows(mesh, cfg.batch_size))
    gold = {minisum.prompt_text(r): r["gold"] for r in train_rows + test_rows}
    return ([minisum.prompt_text(r) for r in test_rows], [r["reference"] for r in test_rows], None, stream, gold,
            minisum.groups(test_rows))


def prompt_groups(cfg: TrainConfig) -> dict | None:
    """The test prompts' groups (prompt text -> group), when the data gives its test rows a ``group`` (a
    minisum-format folder: ``bpo_jax.data.minisum``); None for data without groups. Reads no model."""
    if tfds_task(cfg):
        return None
    rows, _ = _folder_test_rows(cfg)
    groups = minisum.groups(rows)
    return None if groups is None else {minisum.prompt_text(r): g for r, g in zip(rows, groups)}


def _folder_test_rows(cfg: TrainConfig) -> tuple[list, str]:
    """A minisum-format folder's test rows (the first ``eval_size``) and the folder."""
    folder = minisum.DATA_DIR if cfg.data == "minisum" else cfg.data
    path = os.path.join(folder, "test.jsonl")
    rows = minisum.load_rows(path)
    return rows[: _eval_size(cfg, len(rows), path)], folder


def annotators(cfg: TrainConfig, gold, mesh):
    """(the pairs' annotator, the test set's annotator or None for the same, what its scores are) for the config's
    ``annotator`` kind; ``gold``: the gold summaries by prompt (minisum-format data), or None."""
    kind = annotator_kind(cfg)
    if kind == "rouge":
        if gold is None:
            raise ValueError(f"annotator=rouge needs gold summaries (minisum-format data); task {data_name(cfg)!r} "
                             f"needs annotator=reward_model")
        return RougeAnnotator(gold), None, "gold ROUGE-L"
    if kind == "judge":
        from bpo_jax.eval.judge import Judge

        api_key = os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None
        if cfg.judge_api_key_env and not api_key:
            raise ValueError(f"judge_api_key_env={cfg.judge_api_key_env!r} but that environment variable is unset")
        judge = Judge(cfg.judge_url, cfg.judge_model, api_key=api_key, timeout=cfg.judge_timeout,
                      retries=cfg.judge_retries, cache_path=_judge_cache(cfg.run_dir),
                      seed=cfg.seed, concurrency=cfg.judge_concurrency, max_requests=cfg.judge_max_requests)
        return judge, None, "judge preference"
    from bpo_jax.models import load_reward_model

    rm, rm_tokenizer = distributed.agreed(load_reward_model, cfg.reward_model, mesh=mesh, param_dtype=cfg.param_dtype,
                                          dtype=cfg.dtype)  # host-local reads, as the policy's
    per_host = max(1, cfg.reward_batch_size // distributed.process_count())  # rows per call, each host
    annotator = RewardModelAnnotator(rm, rm_tokenizer, batch_size=per_host, max_length=cfg.reward_max_length)
    eval_annotator = None  # the annotator itself unless the RM scores the test set at another length
    if cfg.eval_reward_max_length and cfg.eval_reward_max_length != cfg.reward_max_length:
        eval_annotator = RewardModelAnnotator(rm, rm_tokenizer, batch_size=per_host,
                                              max_length=cfg.eval_reward_max_length)
    return annotator, eval_annotator, "reward"


def prepare_tfds(task: str, data_dir: str, tfds_dir: str, data_format: str = "auto",
                 split_names=builders.SPLITS) -> dict:
    """A tfds task's splits, built once per file system: every process builds under a lock file in
    ``tfds_dir``, so on a shared home directory the first builds and the others find its copy, and on node-local
    disks each machine builds its own. A Hub dataset in ``data_dir`` is first fetched into each host's HF cache
    (``local_data``); ``split_names``: the data's training and test splits. No host waits in a collective while
    another builds; each stage ends in a shared decision, so an error on one host (a missing raw file, a bad
    row, a dataset not in the cache) stops every host alike."""
    local = distributed.agreed(local_data, data_dir, split_names)
    target = distributed.agreed(builders.Prepared.check, task, local, tfds_dir, data_format, split_names)
    distributed.agreed(target.build)
    return distributed.agreed(target.open)


def _judge_cache(run_dir: str) -> str:
    """The judge's verdict cache: a local file per host (each host judges its own rows; files cannot be shared
    for appending), under the run directory when it is local, else under ``~/.cache/bpo_jax``."""
    one = distributed.process_count() == 1
    name = "judge_cache.jsonl" if one else f"judge_cache.p{distributed.process_index()}.jsonl"
    folder = run_dir if not distributed.is_remote(run_dir) else os.path.join(
        os.path.expanduser("~/.cache/bpo_jax"), run_dir.replace("://", "_").replace("/", "_"))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def _eval_size(cfg: TrainConfig, available: int, source: str) -> int:
    if cfg.eval_size > available:
        raise ValueError(f"eval_size={cfg.eval_size} but {source} has {available} test prompts; use eval_size <= "
                         f"{available} (0 = all)")
    return cfg.eval_size or available
