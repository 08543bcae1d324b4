"""LoRA adapters as PEFT folders: read one into an ensemble member, write the members and their merge back.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per target module,
``base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``
(torch's ``[out, in]`` layout); PEFT adds ``(lora_alpha / r) · x Aᵀ Bᵀ`` (``lora_alpha / √r`` with
``use_rslora``) to the module's output. bpo_jax keeps ``a [L, in, r]`` and ``b [L, r, out]`` per target with the
same product, so reading transposes and stacks the layers, and writing undoes it.

This is how the paper's ensemble starts (its official code loads N different-seed SFT LoRA adapters on the raw
base model: ``lora_init_from``), and how LoRA results go back to HF: ``peft.PeftModel.from_pretrained(base,
folder)`` gives the same logits as bpo_jax. The merged ensemble (π_β and the evaluated model, by
``ensemble_merge``: ``lora.merged_adapter``) is one adapter: ``mean_delta`` (the mean of the members' deltas) is
the members' factors concatenated with the scale divided by N (``lora.concat``), written with ``r = N·r`` and
``lora_alpha = α``, since ``α / (N·r) = (α / r) / N``; ``peft_linear`` is what PEFT's
``add_weighted_adapter(combination_type="linear")`` writes: rank r with ``lora_alpha = r`` (scale 1).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import numpy as np

from bpo_jax.models.hf_names import layer_module
from bpo_jax.models.lora import TARGETS, merged_adapter

MODULES = {t: layer_module(t) for t in TARGETS}  # "q" -> "self_attn.q_proj"
PREFIX = "base_model.model.model.layers"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class Adapter(NamedTuple):
    factors: dict  # target -> {"a": [L, in, r], "b": [L, r, out]} float32 NumPy
    rank: int
    alpha: float
    scale: float  # what the product a b is multiplied by


def read_adapter(folder: str, layer_shapes: dict) -> Adapter:
    """Read a PEFT LoRA folder for a base whose target weights have ``layer_shapes[target] = (L, in, out)``.
    Raises ValueError naming the file and what does not fit (an unsupported PEFT option, a missing or
    misshapen tensor, a tensor for a module bpo_jax does not adapt)."""
    cfg_path, w_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            raise ValueError(f"LoRA adapter {folder!r}: no {os.path.basename(path)} (a PEFT adapter folder holds "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(cfg_path) as f:
            pc = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
    where = f"LoRA adapter {folder!r}"
    if pc.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {pc.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
                   "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    for key, ok in unsupported.items():
        if pc.get(key, ok) not in (ok, None, {}, []):
            raise ValueError(f"{where}: {key}={pc[key]!r} is not supported (bpo_jax reads plain LoRA: "
                             f"{', '.join(f'{k}={v!r}' for k, v in unsupported.items())})")
    rank, alpha = int(pc["r"]), float(pc.get("lora_alpha", 8))
    scale = alpha / (np.sqrt(rank) if pc.get("use_rslora") else rank)

    from safetensors.numpy import load_file

    tensors = {k.replace(".default.", "."): v for k, v in load_file(w_path).items()}
    factors = {}
    for name in TARGETS:
        a_names = [f"{PREFIX}.{layer}.{MODULES[name]}.lora_A.weight" for layer in range(_layers(layer_shapes))]
        if not any(n in tensors for n in a_names):
            continue
        n_layers, d_in, d_out = layer_shapes[name]
        a, b = [], []
        for layer in range(n_layers):
            stem = f"{PREFIX}.{layer}.{MODULES[name]}"
            for suffix, want in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank))):
                key = f"{stem}.{suffix}.weight"
                if key not in tensors:
                    raise ValueError(f"{where}: tensor {key} is missing (the adapter must cover every layer)")
                if tuple(tensors[key].shape) != want:
                    raise ValueError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, expected "
                                     f"{want} for this base model")
                (a if suffix == "lora_A" else b).append(tensors.pop(key).astype(np.float32).T)
        factors[name] = {"a": np.stack(a), "b": np.stack(b)}
    if tensors:
        raise ValueError(f"{where}: tensors for modules bpo_jax does not adapt, e.g. {sorted(tensors)[0]} (LoRA "
                         f"targets are the decoder's {', '.join(MODULES[t].split('.')[1] for t in TARGETS)})")
    if not factors:
        raise ValueError(f"{where}: no LoRA tensors found in {WEIGHTS_FILE}")
    return Adapter(factors, rank, alpha, float(scale))


def _layers(layer_shapes: dict) -> int:
    return next(iter(layer_shapes.values()))[0]


def write_adapter(folder: str, factors: dict, *, rank: int, alpha: float, base_model: str = "") -> str:
    """Write one adapter (``factors[target] = {"a": [L, in, r], "b": [L, r, out]}``, product scaled by
    ``alpha / rank``) as a PEFT LoRA folder; return ``folder``. Files are written under temporary names and
    renamed into place."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, f in factors.items():
        a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
        for layer in range(a.shape[0]):
            stem = f"{PREFIX}.{layer}.{MODULES[name]}"
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
              "target_modules": sorted(MODULES[t].split(".")[1] for t in factors)}
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{WEIGHTS_FILE}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_FILE))
    tmp = os.path.join(folder, f".{CONFIG_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(folder, CONFIG_FILE))
    return folder


def write_ensemble(out_dir: str, lora: dict, *, rank: int, alpha: float, base_model: str = "",
                   merge: str = "mean_delta") -> list[str]:
    """The N members (``lora[target] = {"a": [N, L, in, r], "b": [N, L, r, out]}``) as ``out_dir/member_<i>``
    and their merge by ``merge`` (``lora.merged_adapter``: ``mean_delta``, rank N·r, same alpha;
    ``peft_linear``, rank r, alpha r) as ``out_dir/merged``; returns the folders.
    ``out_dir`` may be object storage (``gs://…``): the folders are written locally, then copied up."""
    if "://" in out_dir:
        import tempfile

        from etils import epath

        with tempfile.TemporaryDirectory() as tmp:
            local = write_ensemble(tmp, lora, rank=rank, alpha=alpha, base_model=base_model, merge=merge)
            for folder in local:
                dest = epath.Path(out_dir) / os.path.basename(folder)
                dest.mkdir(parents=True, exist_ok=True)
                for name in (CONFIG_FILE, WEIGHTS_FILE):
                    epath.Path(folder, name).copy(dest / name, overwrite=True)
        return [f"{out_dir}/{os.path.basename(f)}" for f in local]
    lora = {t: {k: np.asarray(v) for k, v in f.items()} for t, f in lora.items()}
    n = next(iter(lora.values()))["a"].shape[0]
    folders = [write_adapter(os.path.join(out_dir, f"member_{i}"), {t: {"a": f["a"][i], "b": f["b"][i]}
                                                                     for t, f in lora.items()},
                             rank=rank, alpha=alpha, base_model=base_model) for i in range(n)]
    factors, scale = merged_adapter(lora, alpha / rank, merge)
    merged_rank = next(iter(factors.values()))["a"].shape[-1]  # product scale = alpha' / rank'
    folders.append(write_adapter(os.path.join(out_dir, "merged"), jax.tree.map(np.asarray, factors),
                                 rank=merged_rank, alpha=scale * merged_rank, base_model=base_model))
    return folders


def read_ensemble(folders, layer_shapes: dict, *, rank: int, scale: float, targets) -> dict:
    """The ensemble's starting factors from N PEFT folders, one per member (``lora_init_from``), stacked as
    ``{target: {"a": [N, L, in, r], "b": [N, L, r, out]}}``; each must have the run's rank, scale and targets."""
    members = []
    for folder in folders:
        ad = read_adapter(folder, {t: layer_shapes[t] for t in TARGETS if t in layer_shapes})
        if ad.rank != rank or not np.isclose(ad.scale, scale, rtol=1e-6):
            raise ValueError(f"LoRA adapter {folder!r} has r={ad.rank}, lora_alpha={ad.alpha:g} (scale "
                             f"{ad.scale:g}); the run has lora_rank={rank} and scale lora_alpha/lora_rank = "
                             f"{scale:g}: set lora_rank and lora_alpha to the adapter's")
        if set(ad.factors) != set(targets):
            raise ValueError(f"LoRA adapter {folder!r} adapts {sorted(ad.factors)}; the run's lora_targets are "
                             f"{sorted(targets)}: set lora_targets to the adapter's")
        members.append(ad.factors)
    return {t: {k: np.stack([m[t][k] for m in members]) for k in ("a", "b")} for t in targets}
