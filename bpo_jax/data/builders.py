"""tensorflow-datasets builders for the paper's three tasks, read from local raw files (no download).

    sources = prepare("tldr", manual_dir="data/samples/tldr")      # {"train": ..., "test": ...}
    sources["test"][0]  # {"id": b"...", "roles": [b"user"], "contents": [b"..."], "reference": b"..."}

``prepare`` builds the array_record files once (``tfds`` without TensorFlow) and returns random-access
``tfds.data_source`` splits for ``grain``: ``train`` holds the prompts the behavior LLM samples for, ``test``
the evaluation prompts with their human references. The prepared copy lives under ``data_dir`` in a folder
keyed by the raw files' paths, sizes and modification times, so pointing ``manual_dir`` at other files (say,
the real ones after the samples) prepares them afresh instead of silently reusing stale data.

Raw files per task (``manual_dir`` holds them; ``.jsonl`` or ``.jsonl.gz``):

==============  ===========================================  =========================================
task            where the public files come from             files in ``manual_dir``
==============  ===========================================  =========================================
``tldr``        OpenAI summarize-from-feedback,              ``train.jsonl``, ``test.jsonl``
                ``tldr_3_filtered``
``hh_helpful``  Anthropic ``hh-rlhf/helpful-base``           ``train.jsonl.gz``, ``test.jsonl.gz``
``hh_harmless`` Anthropic ``hh-rlhf/harmless-base``          ``train.jsonl.gz``, ``test.jsonl.gz``
==============  ===========================================  =========================================
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from bpo_jax.data.formats import find_file, hh_example, read_jsonl, tldr_example

SPLITS = ("train", "test")


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared layout: every split's examples are ``{"id", "roles", "contents", "reference"}``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    parse = None  # staticmethod(row, where) -> example

    def _info(self):
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict({
            "id": text, "roles": tfds.features.Sequence(text), "contents": tfds.features.Sequence(text),
            "reference": text})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(find_file(str(dl_manager.manual_dir), split)) for split in SPLITS}

    def _generate_examples(self, path):
        for n, row in read_jsonl(path):
            yield n, type(self).parse(row, f"{path}:{n}")


class BpoTldr(_TaskBuilder):
    """Reddit TL;DR summarisation (OpenAI tldr_3_filtered): one user turn per post; reference = its TL;DR."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put OpenAI's summarize-from-feedback tldr_3_filtered train.jsonl and "
                                    "test.jsonl (rows: id, subreddit, title, post, summary) in manual_dir.")
    parse = staticmethod(tldr_example)


class BpoHhHelpful(_TaskBuilder):
    """Anthropic HH helpfulness (hh-rlhf helpful-base), split at the last assistant turn."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put hh-rlhf helpful-base/train.jsonl.gz and test.jsonl.gz in manual_dir."
    parse = staticmethod(hh_example)


class BpoHhHarmless(_TaskBuilder):
    """Anthropic HH harmlessness (hh-rlhf harmless-base), split at the last assistant turn."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put hh-rlhf harmless-base/train.jsonl.gz and test.jsonl.gz in manual_dir."
    parse = staticmethod(hh_example)


BUILDERS = {"tldr": BpoTldr, "hh_helpful": BpoHhHelpful, "hh_harmless": BpoHhHarmless}
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data",
                           "samples")


def prepare(task: str, manual_dir: str = "", data_dir: str = "") -> dict:
    """Build (once) and open task ``task``'s splits as tfds data sources (one process; a run over several
    hosts coordinates the build with ``bpo_jax.tasks``).

    ``manual_dir``: the raw files (default: the shipped samples, ``data/samples/<task>``); ``data_dir``: where
    prepared copies go (default ``~/tensorflow_datasets/bpo_jax``).
    """
    target = Prepared.check(task, manual_dir, data_dir)
    target.build()
    return target.open()


class Prepared:
    """One task's prepared copy: ``check`` validates the raw files and names the folder (nothing is written);
    ``build`` writes it unless it is already there (tfds builds into a temporary folder and renames it into
    place, so two processes must never build one folder at once: they take turns on a lock file); ``open``
    returns the splits."""

    def __init__(self, task: str, folder: str, manual_dir: str, root: str):
        self.task, self.folder, self.manual_dir, self.root = task, folder, manual_dir, root

    @property
    def builder(self):
        """A fresh tfds builder each time: one made before another process finished the build would not see
        it (tfds reads a data set's info when the builder is made)."""
        return BUILDERS[self.task](data_dir=self.folder, file_format="array_record")

    @classmethod
    def check(cls, task: str, manual_dir: str = "", data_dir: str = "") -> "Prepared":
        return cls(*_validated_builder(task, manual_dir, data_dir))

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
                "Prepared.check(*sys.argv[1:4])._build()")
        done = subprocess.run([sys.executable, "-c", code, self.task, self.manual_dir, self.root])
        if done.returncode:
            raise RuntimeError(f"preparing {self.task} in {self.root} failed (exit {done.returncode}; its output is above)")

    def _build(self) -> None:
        self.builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=self.manual_dir),
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


def _validated_builder(task: str, manual_dir: str, data_dir: str):
    """``(task, prepared folder, manual_dir, root)`` after every raw row is validated (errors name file:line and field)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; tfds tasks: {', '.join(BUILDERS)}")
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir or os.path.join(SAMPLES_DIR, task)))
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir!r} does not exist. "
                                f"{BUILDERS[task].MANUAL_DOWNLOAD_INSTRUCTIONS}")
    files = [find_file(manual_dir, split) for split in SPLITS]
    for path in files:  # validate every row before building anything (errors name file:line and field)
        for n, row in read_jsonl(path):
            BUILDERS[task].parse(row, f"{path}:{n}")
    key = hashlib.sha256(repr([(p, os.path.getsize(p), os.path.getmtime(p)) for p in files]).encode()).hexdigest()
    root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets", "bpo_jax"))
    return task, os.path.join(root, key[:16]), manual_dir, root


def split_examples(source) -> list[dict]:
    """Every example of a split, in the split's (deterministic) order."""
    return [source[i] for i in range(len(source))]
