"""A run's directory, local or on shared object storage (``gs://…``, through etils ``epath``).

With several processes the run directory must be storage that every host sees (a TPU pod writes to a GCS
bucket): orbax writes each host's part of a checkpoint there. Small files (the config, ``metrics.jsonl``, the
plot) are written by the primary host only.

JSON-lines files (``JsonlLog``): the module keeps no state. Whoever owns such a file in a process makes one
``JsonlLog`` for it and hands that object to everything else there that writes or reads the file (the train
command its ``metrics.jsonl``, shared by the step-0 record, the loop, its checkpoints and the final record;
``sft`` its ``metrics.jsonl``; ``evaluate`` ``eval.jsonl``). There must be one per file in a process: two would
order its lines by flush rather than by append, and a read through one would miss the other's waiting lines.

* ``append(record)`` writes on the primary host only (a no-op on the others). A local file gets the line at once.
* An object store cannot append, and writing an object costs a round trip (GCS also allows about one write per
  second per object), so a remote file's lines wait in its log and ``flush()`` writes them in one rewrite of the
  object: when a line is appended while the oldest waiting one is ``flush_seconds`` (default
  ``FLUSH_SECONDS``) old; at every checkpoint (a ``bpo_jax.train.checkpoint.Checkpointer`` flushes the logs it
  was given before it saves, so the rows up to a checkpoint's step are stored before the checkpoint is); after a
  train or sft run's final record and after ``evaluate``'s record; when the file is read through its log
  (``read()``); and at exit (a log with waiting lines is registered with ``atexit`` until they are written).
  A failed write keeps the lines waiting and raises.
* A run killed with SIGKILL can lose only rows of steps after its last checkpoint, and the resumed run redoes
  those steps and writes them again; rows that were stored are then there twice, as in a local file (readers
  keep the last record of a step).
* A last line cut short (a writer killed mid-write, a full disk) is no record: ``read_jsonl`` leaves it out, and a
  new ``JsonlLog`` on the primary host moves it to ``<file>.cut`` before anything is appended after it (a resume
  would otherwise fail on it, or glue it to its first record).
* ``read_jsonl(file)`` reads a file that no log of this process writes (another run's) as it is stored.
"""

from __future__ import annotations

import atexit
import json
import logging
import time

from etils import epath

from bpo_jax.runtime import distributed

log = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0  # the longest a remote line waits for a flush while lines keep coming


def path(run_dir: str, *parts: str) -> epath.Path:
    p = epath.Path(run_dir)
    return p.joinpath(*parts) if parts else p


def make(run_dir: str) -> None:
    """Create the run directory (primary host; the others wait for it)."""
    if distributed.is_primary():
        path(run_dir).mkdir(parents=True, exist_ok=True)
    distributed.barrier("bpo_jax.runtime.run_dir.make")


def read_jsonl(file: epath.Path | str) -> list[dict]:
    """Every record stored in a JSON-lines file ([] when there is none). Lines still waiting in a ``JsonlLog``
    are not there: read a file this process writes with its log's ``read``. Text after the last newline that is
    not a whole record is a write cut short (a killed writer, a full disk) or still in progress: no record, left
    out. Any other line that is not JSON is a ``ValueError`` naming the file and line."""
    file = epath.Path(file)
    if not file.exists():
        return []
    *lines, tail = file.read_text().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{n}: not valid JSON ({err.msg})") from None
    last = _record(tail)  # a whole record that only lacks its newline, or None
    return records if last is None else [*records, last]


def _record(text: str) -> dict | None:
    """``text`` as a JSON record, or None (empty, or cut short)."""
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


class JsonlLog:
    """This process's writer of one JSON-lines file, local or remote, as the module docstring says: ``append``
    a record, ``flush`` the waiting lines (a no-op when none wait, and for a local file), ``read`` every record,
    the waiting ones included. ``flush_seconds``: the age of the oldest waiting line at which an ``append``
    flushes. On the primary host a remote log opens its file system when it is made (one metadata read): the
    flush at exit could not, as an exiting interpreter imports no module and starts no thread."""

    def __init__(self, file: epath.Path | str, *, flush_seconds: float = FLUSH_SECONDS):
        self.file = epath.Path(file)
        self._remote = distributed.is_remote(str(file))
        self.flush_seconds = flush_seconds
        self._pending: list[str] = []  # remote lines not yet written, in order
        self._oldest = 0.0  # when the oldest pending line was appended (time.monotonic)
        if distributed.is_primary():
            self._end_cut_line()  # (remote: also opens the file system now, as said above)

    def _end_cut_line(self) -> None:
        """A file whose last line was cut short (its writer killed mid-write, a full disk) would glue that text to
        the next record appended. The cut text is moved to ``<file>.cut`` (appended there, never lost) and the
        file ends after its last whole line; a last record that only lacks its newline gets one."""
        if not self.file.exists():
            return
        data = self.file.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        head = data[: data.rfind(b"\n") + 1]
        tail = data[len(head):]
        if _record(tail.decode(errors="replace")) is not None:
            self._store(data + b"\n", keep=len(data))
            return
        aside = self.file.with_name(self.file.name + ".cut")
        aside.write_bytes((aside.read_bytes() if aside.exists() else b"") + tail + b"\n")
        self._store(head, keep=len(head))
        log.warning(f"{self.file} ended with a line cut short ({len(tail)} bytes, an interrupted write): moved to "
                    f"{aside}; the file now ends at its last whole record")

    def _store(self, data: bytes, *, keep: int) -> None:
        """``data`` as the file's content, whose first ``keep`` bytes are already there: a local file is cut or
        appended to in place (never rewritten whole); an object is rewritten."""
        if self._remote:
            self.file.write_bytes(data)
            return
        with open(self.file, "r+b") as f:
            f.truncate(keep)
            f.seek(keep)
            f.write(data[keep:])

    def append(self, record: dict) -> None:
        """Append one JSON line (primary host only; a no-op elsewhere): at once to a local file; to a remote one
        by the next ``flush``, which this call makes when the oldest waiting line is ``flush_seconds`` old."""
        if not distributed.is_primary():
            return
        line = json.dumps(record) + "\n"
        if not self._remote:
            with open(self.file, "a") as f:
                f.write(line)
            return
        if not self._pending:
            self._oldest = time.monotonic()
            atexit.register(self.flush)  # until these lines are written
        self._pending.append(line)
        if time.monotonic() - self._oldest >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the waiting lines with one rewrite of the object. A failed write keeps them waiting and raises."""
        if not self._pending:
            return
        old = self.file.read_text() if self.file.exists() else ""
        self.file.write_text(old + "".join(self._pending))
        self._pending.clear()
        atexit.unregister(self.flush)

    def read(self) -> list[dict]:
        """Every record of the file, this log's waiting lines included (they are flushed first)."""
        self.flush()
        return read_jsonl(self.file)
