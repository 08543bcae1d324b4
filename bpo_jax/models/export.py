"""``save_pretrained``: write a model as an HF folder (config.json, model.safetensors, tokenizer files).

HF transformers (PyTorch) loads the folder to the same logits; this is how a BPO-trained policy (or the shipped
GGUF SmolLM2, which becomes a Llama folder) goes back to the HF ecosystem. Tensors keep the params' dtype
(float32 or bfloat16), recorded as the config's ``dtype``. Files are written to a temporary name in ``out_dir``
and renamed into place, so an interrupted export never leaves a half-written ``model.safetensors`` over a good
one.

With several processes every host calls ``save_pretrained``; the weights travel to the primary in row blocks of
at most ``distributed.GATHER_BYTES`` (a stacked weight one or a few layers at a time, at least one layer;
``distributed.gather_to_primary``), so a device holds at most one such block beyond its own shards, and the
primary alone holds the model in host memory while it writes.
"""

from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors.numpy then writes as BF16)
import numpy as np

from bpo_jax.models.hf_names import entries, get_path
from bpo_jax.runtime import distributed


def save_pretrained(model, tokenizer, out_dir: str, *, params=None) -> str:
    """Write ``model`` (a ``Decoder``, or anything with ``.config``, with ``params=`` overriding its weights) and
    ``tokenizer`` (may be None) to ``out_dir`` (a folder, or ``gs://…``); return ``out_dir``. With several
    processes every host must call it (the weights are gathered from all of them); the primary host writes."""
    params = distributed.gather_to_primary(model.params if params is None else params)
    if not distributed.is_primary():
        return out_dir
    if "://" not in out_dir:
        _write_folder(model.config, params, tokenizer, out_dir)
        return out_dir
    import tempfile

    from etils import epath

    with tempfile.TemporaryDirectory() as tmp:  # object storage: write locally, then copy up
        _write_folder(model.config, params, tokenizer, tmp)
        dest = epath.Path(out_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            epath.Path(tmp, name).copy(dest / name, overwrite=True)
    return out_dir


def _write_folder(config, params, tokenizer, out_dir: str) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for e in entries(config):
        arr = np.asarray(get_path(params, e.path))
        for i, name in enumerate(e.hf_names):
            t = arr[i] if e.stacked else arr
            tensors[name] = np.ascontiguousarray(t.T if e.transposed else t)
    os.makedirs(out_dir, exist_ok=True)
    hf = config.to_hf()
    hf["dtype"] = str(np.asarray(params["embed"]).dtype)
    _write_atomic(out_dir, "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomic(out_dir, "config.json", lambda tmp: _dump_json(hf, tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_atomic(out_dir: str, name: str, write) -> None:
    tmp = os.path.join(out_dir, f".{name}.partial")
    write(tmp)
    os.replace(tmp, os.path.join(out_dir, name))
