"""Tiny random HF checkpoints of each supported family, saved as safetensors folders for parity tests. Importing
this module is torch-free (transformers and torch are imported when a checkpoint is built); the torch-free
helpers (a tiny ``ModelConfig``, random pair batches, the minisum folder writer) are in ``testing.py``."""


def _hf(name: str, **kw):
    """``transformers.<name>(**kw)``, importing transformers only now."""
    import transformers

    return getattr(transformers, name)(**kw)


_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": lambda: _hf("LlamaConfig", **_COMMON, tie_word_embeddings=False),
    "llama3_rope": lambda: _hf("LlamaConfig", **_COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda: _hf("Qwen2Config", **_COMMON, tie_word_embeddings=False),
    "gemma": lambda: _hf("GemmaConfig", **{**_COMMON, "num_key_value_heads": 1}, head_dim=32,
                         hidden_activation="gelu_pytorch_tanh"),
    # Qwen3: per-head q/k RMSNorm; head_dim 32 != hidden / heads.
    "qwen3": lambda: _hf("Qwen3Config", **_COMMON, head_dim=32, tie_word_embeddings=False),
    # Gemma 2: 3 layers (sliding, full, sliding), a window shorter than the test sequences, both softcaps small
    # enough to bite, and query_pre_attn_scalar != head_dim.
    "gemma2": lambda: _hf("Gemma2Config", **{**_COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=6,
                          query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                          hidden_activation="gelu_pytorch_tanh"),
    # Gemma 3 (text): 4 layers with both kinds, (1 + w) q/k norms, a local RoPE base far from the global one (and
    # linear scaling on the global layers only), a final-logit softcap.
    "gemma3": lambda: _hf("Gemma3TextConfig", **{**_COMMON, "num_hidden_layers": 4}, head_dim=32,
                          sliding_window=6,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                       "full_attention"],
                          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
                          query_pre_attn_scalar=16, final_logit_softcapping=3.0),
}
# The families with sliding windows, softcaps and q/k norms: tests/models/test_model_families.py checks them past the
# window; test_models.py and test_sampling.py run their per-family checks on the others.
WINDOWED_FAMILIES = ("qwen3", "gemma2", "gemma3")
CORE_FAMILIES = tuple(f for f in FAMILIES if f not in WINDOWED_FAMILIES)


def hf_logits(model, ids, mask):
    """An HF causal LM's logits for a left-padded numpy batch, positions counted from each row's first real token
    (as bpo_jax counts them)."""
    import numpy as np
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.numpy()


def make_hf_model(family: str, seed: int = 0):
    """A random HF model with every weight (norms and biases too) perturbed away from its init value."""
    import torch
    from transformers import AutoModelForCausalLM

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
    import torch
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


DEBERTA_V3 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
                  share_att_key=True, norm_rel_ebd="layer_norm", type_vocab_size=0, position_biased_input=False,
                  layer_norm_eps=1e-7)


def deberta_tokenizer():
    """A tiny DeBERTa-v2/v3 tokenizer (a Unigram model over a few words and single characters; no sentencepiece
    needed): ``[CLS] question [SEP] answer [SEP]`` with token types 0 then 1."""
    import string

    from transformers import DebertaV2Tokenizer

    words = ["▁the", "▁The", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "▁is", "▁What", "▁Explain", "▁nuclear", "▁fusion",
             "▁like", "▁I", "▁am", "▁five", "▁sun", "▁fuses", "▁atoms", "▁and", "▁that", "▁gives", "▁energy", "▁lot",
             "▁of", "▁so", "▁much", "▁Human", "▁Assistant"]
    chars = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    vocab = ([(t, 0.0) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")] + [(w, -3.0) for w in words]
             + [(ch, -6.0) for ch in chars])
    return DebertaV2Tokenizer(vocab=vocab, unk_token="[UNK]")


def save_hf_deberta_reward_model(path, seed: int = 0, **overrides):
    """A random HF ``DebertaV2ForSequenceClassification`` (num_labels=1; ``DEBERTA_V3`` updated by ``overrides``)
    with every weight perturbed like ``make_hf_model``, and the ``deberta_tokenizer``, saved in ``path``."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tokenizer = deberta_tokenizer()
    torch.manual_seed(seed)
    config = DebertaV2Config(**{**DEBERTA_V3, "vocab_size": 160, "num_labels": 1, **overrides})
    model = DebertaV2ForSequenceClassification(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.classifier.weight.mul_(10.0)  # scores that differ between rows by O(0.1), so 1e-4 parity is tight
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer
