"""tensorflow-datasets builders for the paper's three tasks and for prompt datasets in TRL's formats, read from
local files (no download; ``bpo_jax.wiring.tasks`` fetches a Hub dataset into the HF cache first).

    sources = prepare("tldr", manual_dir="data/samples/tldr")      # {"train": ..., "test": ...}
    sources["test"][0]  # {"id": b"...", "roles": [b"user"], "contents": [b"..."], "reference": b"..."}

``prepare`` builds the array_record files once (``tfds`` without TensorFlow) and returns random-access
``tfds.data_source`` splits for ``grain``: ``train`` holds the prompts the behavior LLM samples for, ``test``
the evaluation prompts with their human references. The prepared copy lives under ``data_dir`` in a folder
keyed by the raw files' paths, sizes and modification times, so pointing ``manual_dir`` at other files (say,
the real ones after the samples) prepares them afresh instead of silently reusing stale data.

Files per task (``manual_dir`` holds them; ``.jsonl`` or ``.jsonl.gz``), in either of two formats, found per
file from its first row (``data_format=auto``; ``official`` or ``raw`` forces one): the official BPO files
(``{"prompt", "label"}`` rows, ``bpo_jax.data.official``; the folder is the official repo's ``sft_tldr_data``,
``sft_hh_data`` or ``sft_harm_data``, whose ``sampling.jsonl`` is the train split), or the raw public ones:

==============  ===========================================  =========================================
task            where the public files come from             files in ``manual_dir``
==============  ===========================================  =========================================
``tldr``        OpenAI summarize-from-feedback,              ``train.jsonl``, ``test.jsonl``
                ``tldr_3_filtered``
``hh_helpful``  Anthropic ``hh-rlhf/helpful-base``           ``train.jsonl.gz``, ``test.jsonl.gz``
``hh_harmless`` Anthropic ``hh-rlhf/harmless-base``          ``train.jsonl.gz``, ``test.jsonl.gz``
==============  ===========================================  =========================================

A folder (or file) of parquet is read in TRL's formats instead (prompt-only, prompt-completion, preference;
standard or conversational: ``bpo_jax.data.trl_formats``), for a paper task or for the generic ``dataset`` task
(``BpoDataset``). ``splits`` names the data's training and test splits (default ``train``, ``test``): the
files' names (``<split>.jsonl``, or the parquet files of that split); the tfds splits are ``train`` and ``test``.

Prompts render as each format's source does: official prompts and TRL's standard ones as plain text (no chat
template, as the official trainer and TRL tokenize them), raw and conversational ones as chat turns through the
chat template. Over-long test prompts are cut per task (``keep``): a TL;DR post keeps its start (and the TL;DR
cue), an HH dialogue its end (its last user turn and the assistant cue; ``bpo_jax.data.prompts.
encode_truncated``), as does a ``dataset`` prompt.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from bpo_jax.data import official, trl_formats
from bpo_jax.data.formats import hh_example, hh_first_turn_example, read_jsonl, split_file, tldr_example

SPLITS = ("train", "test")


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared layout: every split's examples are ``{"id", "roles", "contents", "reference"}``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": "Official BPO files; a render field (chat | plain)."}
    parse = None  # staticmethod(row, where) -> example: the raw format's parser
    task = ""  # the TASKS key
    keep = "start"  # which end of an over-long test prompt to keep: start (documents) | end (dialogues)
    data_format = "auto"  # auto | official | raw (set on the instance by Prepared)
    splits = SPLITS  # the data's names of the train and test splits (set on the instance by Prepared)
    source = ""  # the files: a folder, or one parquet file (set on the instance by Prepared)

    def _info(self):
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict({
            "id": text, "roles": tfds.features.Sequence(text), "contents": tfds.features.Sequence(text),
            "reference": text, "render": text})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

    def _split_generators(self, dl_manager):
        files = data_files(self.task, self.source, self.splits)
        return {split: self._generate_examples(paths, split == "test") for split, paths in files.items()}

    def _generate_examples(self, paths, test):
        for i, path in enumerate(paths):
            for n, example in parse_file(self.task, path, self.data_format, test=test):
                yield (n if len(paths) == 1 else f"{i:05d}:{n}"), example


def data_files(task: str, folder: str, splits=SPLITS) -> dict:
    """``{"train": [files], "test": [files]}`` of the data at ``folder``, ``splits`` naming the data's train and
    test splits: parquet files by split (``trl_formats.split_files``), else ``<split>.jsonl[.gz]`` (the official
    layout's ``sampling.jsonl`` for ``train``; ``formats.split_file``). A missing split is a FileNotFoundError
    naming the folder."""
    if trl_formats.is_parquet_data(folder):
        return {tfds_split: trl_formats.split_files(folder, name, train=tfds_split == "train")
                for tfds_split, name in zip(SPLITS, splits)}
    if task == "dataset":
        raise FileNotFoundError(f"no parquet files in {folder!r}: a dataset's prompts are parquet files in TRL's "
                                f"formats (a Hub dataset id, or a folder or file of parquet)")
    return {tfds_split: [split_file(folder, name)] for tfds_split, name in zip(SPLITS, splits)}


def parse_file(task: str, path: str, data_format: str = "auto", *, test: bool = False):
    """``(row, example)`` for every row of the file at ``path``, in the file's format: parquet in TRL's formats
    (``trl_formats``; ``test``: the rows must carry references), JSONL as ``official.file_format`` finds it
    (``data_format`` or its first row's shape; raw examples get ``render="chat"``, official ones ``plain``). A row
    of neither shape, or of the other one, is a ValueError naming the file and line."""
    if path.endswith(trl_formats.PARQUET):
        if data_format != "auto":
            raise ValueError(f"data_format={data_format} reads JSONL files; {path} is parquet, read in TRL's "
                             f"formats (data_format=auto)")
        yield from trl_formats.parse_file(path, test=test)
        return
    fmt = official.file_format(task, path, read_jsonl(path), data_format)
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        official.check_row(task, fmt, row, where)
        if fmt == "official":
            yield n, official.official_example(task, row, where)
        else:
            yield n, {**BUILDERS[task].parse(row, where), "render": "chat"}


class BpoTldr(_TaskBuilder):
    """Reddit TL;DR summarisation (OpenAI tldr_3_filtered): one user turn per post; reference = its TL;DR."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the official BPO sft_tldr_data files (sampling.jsonl, test.jsonl of "
                                    "github.com/xu1998hz/BPO) or OpenAI's summarize-from-feedback "
                                    "tldr_3_filtered train.jsonl and test.jsonl (rows: id, subreddit, title, "
                                    "post, summary) in manual_dir.")
    parse = staticmethod(tldr_example)
    task = "tldr"


class BpoHhHelpful(_TaskBuilder):
    """Anthropic HH helpfulness (hh-rlhf helpful-base): single-turn prompts, each dialogue's first exchange."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the official BPO sft_hh_data files (sampling.jsonl, test.jsonl of "
                                    "github.com/xu1998hz/BPO) or hh-rlhf helpful-base/train.jsonl.gz and "
                                    "test.jsonl.gz in manual_dir.")
    parse = staticmethod(hh_first_turn_example)
    task, keep = "hh_helpful", "end"


class BpoHhHarmless(_TaskBuilder):
    """Anthropic HH harmlessness (hh-rlhf harmless-base), split at the last assistant turn."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the official BPO sft_harm_data files (sampling.jsonl, test.jsonl of "
                                    "github.com/xu1998hz/BPO) or hh-rlhf harmless-base/train.jsonl.gz and "
                                    "test.jsonl.gz in manual_dir.")
    parse = staticmethod(hh_example)
    task, keep = "hh_harmless", "end"


class BpoDataset(_TaskBuilder):
    """A prompt dataset in TRL's formats (parquet; a Hub dataset's files): prompts as stored, references from the
    completion or chosen column; an over-long test prompt keeps its end (its last user turn)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Give a Hub dataset id (hf://datasets/org/name) or a folder of parquet files in "
                                    "TRL's formats: prompt-only, prompt-completion or preference.")
    task, keep = "dataset", "end"


BUILDERS = {"tldr": BpoTldr, "hh_helpful": BpoHhHelpful, "hh_harmless": BpoHhHarmless}  # the paper's tasks (data=)
TASKS = {**BUILDERS, "dataset": BpoDataset}  # and the generic one: what a Prepared copy can hold
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data",
                           "samples")


def prepare(task: str, manual_dir: str = "", data_dir: str = "", data_format: str = "auto",
            splits=SPLITS) -> dict:
    """Build (once) and open task ``task``'s splits as tfds data sources (one process; a run over several
    hosts coordinates the build with ``bpo_jax.wiring.tasks``).

    ``manual_dir``: the raw files (default: the shipped samples, ``data/samples/<task>``); ``data_dir``: where
    prepared copies go (default ``~/tensorflow_datasets/bpo_jax``); ``data_format``: ``auto`` (per file),
    ``official`` or ``raw``; ``splits``: the data's names of the train and test splits.
    """
    target = Prepared.check(task, manual_dir, data_dir, data_format, splits)
    target.build()
    return target.open()


class Prepared:
    """One task's prepared copy: ``check`` validates the raw files and names the folder (nothing is written);
    ``build`` writes it unless it is already there (tfds builds into a temporary folder and renames it into
    place, so two processes must never build one folder at once: they take turns on a lock file); ``open``
    returns the splits."""

    def __init__(self, task: str, folder: str, manual_dir: str, root: str, data_format: str = "auto",
                 splits=SPLITS):
        self.task, self.folder, self.manual_dir, self.root = task, folder, manual_dir, root
        self.data_format, self.splits = data_format, tuple(splits)

    @property
    def builder(self):
        """A fresh tfds builder each time: one made before another process finished the build would not see
        it (tfds reads a data set's info when the builder is made)."""
        builder = TASKS[self.task](data_dir=self.folder, file_format="array_record")
        builder.data_format, builder.splits, builder.source = self.data_format, self.splits, self.manual_dir
        return builder

    @classmethod
    def check(cls, task: str, manual_dir: str = "", data_dir: str = "", data_format: str = "auto",
              splits=SPLITS) -> "Prepared":
        """The prepared copy of ``task``'s files in ``manual_dir`` (a local folder, or a parquet file) under
        ``data_dir``, after every row is validated; ``splits``: the names of its train and test splits (a
        ``TRAIN,TEST`` string or a pair)."""
        splits = tuple(splits.split(",")) if isinstance(splits, str) else tuple(splits)
        return cls(*_validated_builder(task, manual_dir, data_dir, data_format, splits))

    def is_built(self) -> bool:
        return self.builder.is_prepared()

    def build(self) -> None:
        """Build unless built; processes sharing the folder take turns (a lock file beside it), so the first
        builds and the others find its copy."""
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, f".{self.builder.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.is_built():
                self._build_apart() if _joined() else self._build()

    def _build_apart(self) -> None:
        """``_build`` in a fresh Python process: in a process that has joined a multi-host run, the build put
        data on devices that the other hosts never matched (seen as a collective mismatch right after it)."""
        import subprocess
        import sys

        code = ("import sys; from bpo_jax.data.builders import Prepared; "
                "Prepared.check(*sys.argv[1:6])._build()")
        argv = [sys.executable, "-c", code, self.task, self.manual_dir, self.root, self.data_format,
                ",".join(self.splits)]
        done = subprocess.run(argv)
        if done.returncode:
            raise RuntimeError(f"preparing {self.task} in {self.root} failed (exit {done.returncode}; its output is "
                               f"above)")

    def _build(self) -> None:
        folder = self.manual_dir if os.path.isdir(self.manual_dir) else os.path.dirname(self.manual_dir)
        self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder),
                                          download_dir=os.path.join(self.root, "downloads"))

    def open(self) -> dict:
        builder = self.builder
        if not builder.is_prepared():
            raise FileNotFoundError(f"the prepared {builder.name} data set is not in {builder.data_dir}: another "
                                    f"process's build is not visible here")
        return builder.as_data_source()


def _joined() -> bool:
    """True in a process that has joined a multi-process JAX run."""
    import sys

    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def _validated_builder(task: str, manual_dir: str, data_dir: str, data_format: str = "auto", splits=SPLITS):
    """``(task, prepared folder, manual_dir, root, data_format, splits)`` after every row is validated (errors
    name file:line and field); the folder is keyed by the files, the format and the split names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tfds tasks: {', '.join(TASKS)}")
    if len(splits) != 2 or not all(splits):
        raise ValueError(f"splits={','.join(splits)!r}: name the train and test splits, TRAIN,TEST")
    manual_dir = manual_dir or (os.path.join(SAMPLES_DIR, task) if task != "dataset" else "")
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else ""
    if not (manual_dir and os.path.exists(manual_dir)):
        raise FileNotFoundError(f"manual_dir {manual_dir!r} does not exist. "
                                f"{TASKS[task].MANUAL_DOWNLOAD_INSTRUCTIONS}")
    files = data_files(task, manual_dir, splits)
    for split, paths in files.items():  # validate every row before building anything (errors name file:line)
        for path in paths:
            for _ in parse_file(task, path, data_format, test=split == "test"):
                pass
    stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for paths in files.values() for p in paths]
    key = hashlib.sha256(repr((stats, data_format, splits)).encode()).hexdigest()
    root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets", "bpo_jax"))
    return task, os.path.join(root, key[:16]), manual_dir, root, data_format, splits


def split_examples(source) -> list[dict]:
    """Every example of a split, in the split's (deterministic) order."""
    return [source[i] for i in range(len(source))]
