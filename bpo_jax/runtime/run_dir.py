"""A run's directory, local or on shared object storage (``gs://…``, through etils ``epath``).

With several processes the run directory must be storage that every host sees (a TPU pod writes to a GCS
bucket): orbax writes each host's part of a checkpoint there. Small files (the config, ``metrics.jsonl``, the
plot) are written by the primary host only. Object stores cannot append, so ``append_jsonl`` rewrites a remote
file whole (a run's metrics are a few thousand short lines at most).
"""

from __future__ import annotations

import json

from etils import epath

from bpo_jax.runtime import distributed


def path(run_dir: str, *parts: str) -> epath.Path:
    p = epath.Path(run_dir)
    return p.joinpath(*parts) if parts else p


def make(run_dir: str) -> None:
    """Create the run directory (primary host; the others wait for it)."""
    if distributed.is_primary():
        path(run_dir).mkdir(parents=True, exist_ok=True)
    distributed.barrier("bpo_jax.runtime.run_dir.make")


def append_jsonl(file: epath.Path, record: dict) -> None:
    """Append one JSON line (primary host only; a no-op elsewhere)."""
    if not distributed.is_primary():
        return
    line = json.dumps(record) + "\n"
    if distributed.is_remote(str(file)):
        old = file.read_text() if file.exists() else ""
        file.write_text(old + line)
    else:
        with open(file, "a") as f:
            f.write(line)


def read_jsonl(file: epath.Path) -> list[dict]:
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
