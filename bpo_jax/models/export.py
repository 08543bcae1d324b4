"""``save_pretrained``: write a model as an HF folder (config.json, model.safetensors, tokenizer files).

HF transformers (PyTorch) loads the folder to the same logits; this is how a BPO-trained policy goes back to
the HF ecosystem. Files are written to a temporary name in ``out_dir`` and renamed into place, so an
interrupted export never leaves a half-written ``model.safetensors`` over a good one.
"""

from __future__ import annotations

import json
import os

import numpy as np

from bpo_jax import sharding as shd
from bpo_jax.models.hf_names import entries, get_path


def save_pretrained(model, tokenizer, out_dir: str, *, params=None) -> str:
    """Write ``model`` (a ``Decoder``, or its config with ``params=``) and ``tokenizer`` (may be None) to
    ``out_dir``; return ``out_dir``."""
    from safetensors.numpy import save_file

    config = model.config
    params = shd.gather(model.params if params is None else params)
    tensors = {}
    for e in entries(config):
        arr = np.asarray(get_path(params, e.path))
        if arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)  # safetensors.numpy has no bfloat16; config records the intent
        for i, name in enumerate(e.hf_names):
            t = arr[i] if len(e.hf_names) > 1 else arr
            tensors[name] = np.ascontiguousarray(t.T if e.transposed else t)
    os.makedirs(out_dir, exist_ok=True)
    hf = config.to_hf()
    hf["torch_dtype"] = "float32"
    tmp = os.path.join(out_dir, ".model.safetensors.partial")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, ".config.json.partial"), "w") as f:
        json.dump(hf, f, indent=2)
    os.replace(os.path.join(out_dir, ".config.json.partial"), os.path.join(out_dir, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
