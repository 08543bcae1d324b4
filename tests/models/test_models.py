"""Decoder parity with HF transformers (PyTorch), KV cache, export round trip, GGUF import, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from bpo_jax.models import (
    Decoder,
    ModelConfig,
    forward,
    hidden_states,
    init_cache,
    init_params,
    load_pretrained,
    param_axes,
    save_pretrained,
    unembed,
    unstack_layers,
)
from bpo_jax.models.gguf_source import permute, unpermute
from testing import tiny_model_config
from tiny_models import _COMMON, CORE_FAMILIES, FAMILIES, hf_logits, save_hf_model

LEFT_PADDED = np.array([[0, 0, 0, 5, 9, 17, 3, 44], [7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 0, 0, 0, 21, 99]])
MASK = (np.arange(8)[None] >= np.array([3, 0, 6])[:, None]).astype(np.int32)


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, path)
    model, tokenizer = load_pretrained(str(path))
    return request.param, path, hf_model, model


def test_logits_match_hf_with_left_padding(tiny):
    family, _, hf_model, model = tiny
    want = hf_logits(hf_model, LEFT_PADDED, MASK)
    got = np.asarray(forward(model.config, model.params, jnp.asarray(LEFT_PADDED), attention_mask=jnp.asarray(MASK))[0])
    real = MASK.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    # The NNX module call on an unpadded batch agrees too.
    np.testing.assert_allclose(np.asarray(model(LEFT_PADDED[1:2])), hf_logits(hf_model, LEFT_PADDED[1:2], MASK[1:2]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_kv_cache_prefill_and_decode_match_full_forward(tiny, layout):
    """Both layer layouts: stacked weights under a scan, and the sampler's unstacked (unrolled) one."""
    _, _, _, model = tiny
    cfg, params = model.config, model.params
    per_layer = layout == "unstacked"
    if per_layer:
        params = unstack_layers(params)
        assert isinstance(params["layers"], tuple) and len(params["layers"]) == cfg.num_layers
    prompt, pmask = jnp.asarray(LEFT_PADDED[:, :5]), jnp.asarray(MASK[:, :5])
    response = jnp.asarray(LEFT_PADDED[:, 5:]) % 50 + 3
    full_ids = jnp.concatenate([prompt, response], axis=1)
    full_mask = jnp.concatenate([pmask, jnp.ones_like(response)], axis=1)
    full, _ = forward(cfg, params, full_ids, attention_mask=full_mask)

    cache = init_cache(cfg, 3, 8, per_layer=per_layer)
    pos = jnp.maximum(jnp.cumsum(pmask, axis=1) - 1, 0)
    logits, cache = forward(cfg, params, prompt, positions=pos, attention_mask=pmask, cache=cache, cache_index=0)
    np.testing.assert_allclose(logits[pmask.astype(bool)], full[:, :5][pmask.astype(bool)], atol=1e-5)
    step = jax.jit(lambda p, t, q, c, i: forward(cfg, p, t, positions=q, attention_mask=jnp.ones_like(t),
                                                 cache=c, cache_index=i), donate_argnums=(3,))
    last = pos[:, -1]
    for j in range(3):
        last = last + 1
        lg, cache = step(params, response[:, j : j + 1], last[:, None], cache, 5 + j)
        np.testing.assert_allclose(lg[:, 0], full[:, 5 + j], atol=1e-5)
    if per_layer:  # and the unrolled full forward equals the scanned one
        np.testing.assert_allclose(forward(cfg, params, full_ids, attention_mask=full_mask)[0], full, atol=1e-5)


def test_export_round_trip_through_hf(tiny, tmp_path):
    _, _, _, model = tiny
    save_pretrained(model, None, str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ours = np.asarray(model(LEFT_PADDED, attention_mask=jnp.asarray(MASK)))
    real = MASK.astype(bool)
    np.testing.assert_allclose(hf_logits(reloaded, LEFT_PADDED, MASK)[real], ours[real], atol=1e-4)
    model2, _ = load_pretrained(str(tmp_path / "out"))
    assert model2.config.replace(pad_token_id=None) == model.config.replace(pad_token_id=None)


def test_sharded_safetensors_index_loads(tmp_path):
    hf_model = save_hf_model("llama", tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model, _ = load_pretrained(str(tmp_path))
    np.testing.assert_allclose(np.asarray(model(LEFT_PADDED[1:2])), hf_logits(hf_model, LEFT_PADDED[1:2], MASK[1:2]),
                               atol=1e-4)


@pytest.mark.parametrize("hf_config", [
    Qwen2Config(**{**_COMMON, "num_hidden_layers": 1}, tie_word_embeddings=True),  # tied Qwen2; a 1-layer stack
    LlamaConfig(**_COMMON, hidden_act="gelu"),  # exact (erf) GELU outside Gemma
], ids=["qwen2_tied_1layer", "llama_gelu"])
def test_more_variants_match_hf_and_export(hf_config, tmp_path):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(str(tmp_path / "hf"))
    real = MASK.astype(bool)
    want = hf_logits(hf_model, LEFT_PADDED, MASK)[real]
    np.testing.assert_allclose(np.asarray(model(LEFT_PADDED, attention_mask=jnp.asarray(MASK)))[real], want, atol=1e-4)
    save_pretrained(model, None, str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(hf_logits(reloaded, LEFT_PADDED, MASK)[real], want, atol=1e-5)


@pytest.mark.slow
def test_nnx_module_split_axes_and_chunkable_head():
    cfg = ModelConfig.from_hf(FAMILIES["qwen2"]().to_dict())
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    specs = nnx.get_partition_spec(state)["weights"]
    assert tuple(specs["layers"]["q_bias"].get_value()) == param_axes(cfg)["layers"]["q_bias"] == ("layers", "heads")
    ids = jnp.asarray(LEFT_PADDED)
    logits = nnx.merge(graphdef, state)(ids)
    np.testing.assert_allclose(logits, forward(cfg, model.params, ids)[0], atol=1e-6)
    h, _ = hidden_states(cfg, model.params, ids)
    chunks = [h[:, i : i + 3] @ unembed(cfg, model.params) for i in range(0, 8, 3)]
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", True])
def test_remat_gives_the_same_gradients(policy):
    cfg = ModelConfig.from_hf(FAMILIES["gemma"]().to_dict())
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(LEFT_PADDED)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(forward(c, p, ids, attention_mask=jnp.asarray(MASK))[0])[..., 7])

    g0 = jax.grad(loss)(params, cfg)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.slow
def test_remat_policies_trade_memory_in_order():
    """XLA's temporary memory for a gradient: none keeps every layer's activations, dots only the matmul
    outputs, full only the layer inputs."""
    cfg = tiny_model_config(vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=4, num_kv_heads=4,
                            head_dim=16)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def temp(policy):
        c = cfg.replace(remat=policy)
        fn = jax.jit(jax.grad(lambda p, x: jnp.mean(forward(c, p, x)[0])))
        return fn.lower(params, ids).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = temp("none"), temp("dots"), temp("full")
    assert none > dots > full, (none, dots, full)
    with pytest.raises(ValueError, match="remat='some'; valid: none, full, dots"):
        cfg.replace(remat="some")


def test_config_forms_agree():
    new = FAMILIES["llama3_rope"]().to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)
    assert dict(ModelConfig.from_hf(new).rope_scaling)["rope_type"] == "llama3"


def test_config_family_defaults_and_refusals():
    gemma = {k: v for k, v in FAMILIES["gemma"]().to_dict().items() if k != "head_dim"}
    assert ModelConfig.from_hf(gemma).head_dim == 256  # HF Gemma's default, not hidden / heads
    assert ModelConfig.from_hf({**gemma, "hidden_act": "gelu"}).hidden_act == "gelu_tanh"  # legacy Gemma value
    llama = FAMILIES["llama"]().to_dict()
    assert ModelConfig.from_hf({**llama, "hidden_act": "gelu"}).hidden_act == "gelu"
    with pytest.raises(ValueError, match="unsupported activation 'relu2'"):
        ModelConfig.from_hf({**llama, "hidden_act": "relu2"})
    with pytest.raises(ValueError, match="Mistral sliding-window attention"):
        ModelConfig.from_hf({**llama, "model_type": "mistral", "sliding_window": 4096})
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        ModelConfig.from_hf({**llama, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(str(tmp_path))
    save_hf_model("llama", tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'; bpo_jax supports: llama"):
        load_pretrained(str(tmp_path / "m"))
    cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\), "
                                         r"expected \(80, 64\)"):
        load_pretrained(str(tmp_path / "m"))
    cfg_path.write_text(json.dumps(cfg))
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="checkpoint is missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(str(tmp_path / "m"))
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_pretrained(str(tmp_path / "m"))


@pytest.mark.slow
def test_tokenizer_larger_than_vocab_is_refused(smollm2, tmp_path):
    save_hf_model("llama", tmp_path)  # vocab 128
    smollm2[1].save_pretrained(str(tmp_path))  # a 49152-token tokenizer
    with pytest.raises(ValueError, match="tokenizer has 49152 tokens but the model's vocab_size is 128"):
        load_pretrained(str(tmp_path))


def test_gguf_qk_permutation_round_trip():
    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8, in-dim 3
    p = permute(w, 2)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute(p, 2), w)
    # Per head, llama.cpp interleaves the two rotary halves: rows (0, 4, 1, 5, ...) of head 0.
    np.testing.assert_array_equal(p[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


@pytest.mark.slow
def test_smollm2_gguf_answers_paris(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 49152, True)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text).input_ids
    cache = init_cache(cfg, 1, len(ids) + 8)
    step = jax.jit(lambda p, t, q, c, i: forward(cfg, p, t, positions=q, cache=c, cache_index=i, last_only=True))
    logits, cache = step(model.params, jnp.asarray([ids]), jnp.arange(len(ids))[None], cache, 0)
    out = []
    for j in range(8):
        out.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = step(model.params, jnp.asarray([[out[-1]]]), jnp.asarray([[len(ids) + j]]), cache,
                             len(ids) + j)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_smollm2_exports_as_an_hf_llama_folder(smollm2, tmp_path):
    model, tok = smollm2
    out = save_pretrained(model, tok, str(tmp_path / "smollm2"))
    assert json.loads((tmp_path / "smollm2" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    text = reloaded_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                            add_generation_prompt=True)
    assert text == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = np.asarray([reloaded_tok(text).input_ids])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = hf_logits(hf, ids, np.ones_like(ids))
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
@pytest.mark.parametrize("dtype,accumulate", [("float32", None), ("bfloat16", "float32")])
def test_linear_gradients_equal_autodiff(shape, dtype, accumulate):
    """``decoder._matmul``'s hand-written backward (the weight gradient with the smaller operand transposed,
    XLA's CPU backend otherwise transposes the larger one inside a slow fusion) equals autodiff of the same
    contraction, in float32 and with bfloat16 inputs accumulated in float32 (the LoRA path)."""
    from bpo_jax.models.decoder import _matmul

    x = jax.random.normal(jax.random.key(0), (2, 5, shape[0])).astype(dtype)
    w = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (2, 5, shape[1]))

    def plain(x, w):
        return x @ w if accumulate is None else jnp.einsum("...i,io->...o", x, w, preferred_element_type=accumulate)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)) * g)

    ours = jax.grad(loss(lambda x, w: _matmul(x, w, accumulate)), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
