"""Tiny random HF checkpoints of each supported family, saved as safetensors folders for parity tests, and a
tiny task folder in the demo's (minisum) format."""

import json

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "llama3_rope": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**{**_COMMON, "num_key_value_heads": 1}, head_dim=32,
                                 hidden_activation="gelu_pytorch_tanh"),
}


def make_hf_model(family: str, seed: int = 0):
    """A random HF model with every weight (norms and biases too) perturbed away from its init value."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(family: str, path, seed: int = 0, **kw):
    model = make_hf_model(family, seed)
    model.save_pretrained(path, **kw)
    return model


def save_hf_reward_model(family: str, path, seed: int = 0):
    """A random HF ``*ForSequenceClassification`` reward model (num_labels=1), perturbed like ``make_hf_model``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_with_one_label(FAMILIES[family]()),
                                                               dtype=torch.float32)
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _with_one_label(config):
    config.num_labels = 1
    return config


def write_minisum_folder(folder, rows: int = 6):
    """``folder/{train,test}.jsonl`` of ``rows`` short documents in the minisum format; returns ``folder``."""
    data = [{"id": f"r{i}", "document": f"Town {i} opened a park with {i + 3} benches on Monday.",
             "reference": f"Town {i} has a new park.", "gold": f"Town {i} opened a park with {i + 3} benches."}
            for i in range(rows)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder
