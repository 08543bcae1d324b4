"""A run's directory, local or on shared object storage (``gs://…``, through etils ``epath``).

With several processes the run directory must be storage that every host sees (a TPU pod writes to a GCS
bucket): orbax writes each host's part of a checkpoint there. Small files (the config, ``metrics.jsonl``, the
plot) are written by the primary host only.

JSON-lines files (``append_jsonl``): a local file gets each line appended at once. An object store cannot
append, and writing an object costs a round trip (GCS also allows about one write per second per object), so
for a remote file the lines wait in this process and are written in one rewrite of the object by ``flush``:
at every checkpoint (``bpo_jax.train.checkpoint`` flushes before it saves, so the rows up to a checkpoint's
step are stored before the checkpoint is), after a train run's final record, when the file is read here
(``read_jsonl``), when a waiting line is older than ``FLUSH_SECONDS``, and at exit. A run killed with SIGKILL
can lose only rows of steps after its last checkpoint, and the resumed run redoes those steps and writes them
again; rows that were stored are then there twice, as in a local file (readers keep the last record of a step).
"""

from __future__ import annotations

import atexit
import json
import time

from etils import epath

from bpo_jax.runtime import distributed

FLUSH_SECONDS = 60.0  # the longest a remote line waits for a flush while lines keep coming

_pending: dict[str, list[str]] = {}  # remote file -> lines not yet written, in order
_oldest: dict[str, float] = {}  # remote file -> when its oldest pending line was appended


def path(run_dir: str, *parts: str) -> epath.Path:
    p = epath.Path(run_dir)
    return p.joinpath(*parts) if parts else p


def make(run_dir: str) -> None:
    """Create the run directory (primary host; the others wait for it)."""
    if distributed.is_primary():
        path(run_dir).mkdir(parents=True, exist_ok=True)
    distributed.barrier("bpo_jax.runtime.run_dir.make")


def append_jsonl(file: epath.Path, record: dict) -> None:
    """Append one JSON line (primary host only; a no-op elsewhere): at once to a local file, by the next
    ``flush`` to a remote one (the module docstring says when)."""
    if not distributed.is_primary():
        return
    line = json.dumps(record) + "\n"
    if not distributed.is_remote(str(file)):
        with open(file, "a") as f:
            f.write(line)
        return
    key = str(file)
    if not _pending:
        atexit.register(flush)  # once per batch of pending lines; flush is a no-op when nothing waits
    _pending.setdefault(key, []).append(line)
    _oldest.setdefault(key, time.monotonic())
    if time.monotonic() - _oldest[key] >= FLUSH_SECONDS:
        flush(file)


def flush(file: epath.Path | None = None) -> None:
    """Write the lines waiting for ``file`` (default: for every file) with one rewrite of each object. A failed
    write keeps the lines waiting and raises."""
    for key in [str(file)] if file is not None else list(_pending):
        lines = _pending.get(key)
        if not lines:
            continue
        target = epath.Path(key)
        old = target.read_text() if target.exists() else ""
        target.write_text(old + "".join(lines))
        del _pending[key], _oldest[key]
    if not _pending:
        atexit.unregister(flush)


def read_jsonl(file: epath.Path) -> list[dict]:
    """Every record of a JSON-lines file, this process's waiting lines included."""
    flush(file)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
