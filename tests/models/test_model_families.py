"""Qwen3, Gemma 2 and Gemma 3 (text): logits parity with HF transformers past the sliding window, KV-cache
decoding and HF ``generate`` past the window, sampler log-probs, export round trip, config forms, refusals.

The tiny checkpoints are ``tiny_models.FAMILIES`` entries (float32, every weight perturbed): Gemma 2/3 have
``sliding_window=6`` with sliding and full layers, both softcaps (Gemma 2) or the final one (Gemma 3) small
enough to change the logits, ``query_pre_attn_scalar != head_dim``, and Gemma 3 a local RoPE base (100) far from
the global one (10000, linearly scaled); the sequences here are 23–24 tokens, four times the window.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, Qwen3Config

from bpo_jax.models import (
    ModelConfig,
    forward,
    init_cache,
    init_params,
    load_pretrained,
    param_axes,
    param_shapes,
    save_pretrained,
)
from bpo_jax.runtime import sharding as shd
from bpo_jax.sample.sampler import Decoding, generate
from testing import full_forward_logprobs
from tiny_models import _COMMON, FAMILIES, WINDOWED_FAMILIES, hf_logits, save_hf_model

NEW = WINDOWED_FAMILIES
T = 24
PADS = np.array([5, 0, 15])
MASK = (np.arange(T)[None] >= PADS[:, None]).astype(np.int32)
IDS = ((np.arange(3 * T).reshape(3, T) * 7 + 3) % 125 + 3) * MASK
PMASK = (np.arange(7)[None] >= np.array([3, 0, 5])[:, None]).astype(np.int32)
PROMPTS = IDS[1:2, :7] * PMASK  # left-padded prompts of 4, 7 and 2 tokens


@pytest.fixture(scope="module", params=NEW)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, path, seed=3)
    model, _ = load_pretrained(str(path))
    return request.param, hf_model, model


_forward = jax.jit(lambda cfg, params, ids, mask: forward(cfg, params, ids, attention_mask=mask)[0], static_argnums=0)


def _logits(cfg, params, ids=IDS, mask=MASK):
    return np.asarray(_forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.slow
def test_logits_match_hf_past_the_window_and_each_feature_matters(tiny):
    family, hf_model, model = tiny
    cfg, params = model.config, model.params
    real = MASK.astype(bool)
    want = hf_logits(hf_model, IDS, MASK)
    got = _logits(cfg, params)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    # What the config read, and that switching each feature off changes the logits (so parity above tests it).
    ablations = {}
    if cfg.qk_norm:
        ablations["q/k norm"] = dict(qk_norm=False)
    if family == "qwen3":
        assert cfg.qk_norm and not cfg.norm_plus_one and cfg.head_dim == 32 and not cfg.layer_types
    else:
        assert cfg.sandwich_norms and cfg.norm_plus_one and cfg.scale_embeddings and cfg.sliding_window == 6
        assert {"sliding_attention", "full_attention"} == set(cfg.layer_types)
        ablations["sliding window"] = dict(layer_types=("full_attention",) * cfg.num_layers)
        ablations["final softcap"] = dict(final_logit_softcapping=None)
        ablations["query_pre_attn_scalar"] = dict(query_pre_attn_scalar=None)
    if family == "gemma2":
        assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (2.0, 3.0) and not cfg.qk_norm
        ablations["attention softcap"] = dict(attn_logit_softcapping=None)
    if family == "gemma3":
        assert cfg.qk_norm and cfg.attn_logit_softcapping is None  # HF's Gemma 3 does not softcap attention
        assert (cfg.rope_theta, cfg.rope_local_theta) == (10000.0, 100.0)
        assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0} and not cfg.rope_local_scaling
        ablations["local RoPE base"] = dict(rope_local_theta=None)
        ablations["global linear RoPE scaling"] = dict(rope_scaling=())
    for name, change in ablations.items():
        diff = np.abs(_logits(cfg.replace(**change), params)[real] - want[real]).max()
        assert diff > 1e-2, f"{family}: turning off {name} changes the logits only by {diff}"


def test_kv_cache_decode_past_the_window_matches_full_forward(tiny):
    """Stacked layers under a scan with a stacked cache: prefill 8 tokens, then 16 one-token steps."""
    _, _, model = tiny
    cfg, params = model.config, model.params
    full = _logits(cfg, params)
    p = 8
    cache = init_cache(cfg, 3, T)
    pm = jnp.asarray(MASK[:, :p])
    pos = jnp.maximum(jnp.cumsum(pm, axis=1) - 1, 0)
    logits, cache = forward(cfg, params, jnp.asarray(IDS[:, :p]), positions=pos, attention_mask=pm, cache=cache)
    real = MASK[:, :p].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :p][real], atol=1e-5)
    step = jax.jit(lambda c, t, q, m, i: forward(cfg, params, t, positions=q, attention_mask=m, cache=c,
                                                 cache_index=i), donate_argnums=(0,))
    all_pos = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
    for j in range(p, T):  # row 2 is padding until slot 15: those steps write invalid slots, and are not compared
        lg, cache = step(cache, jnp.asarray(IDS[:, j : j + 1]), jnp.asarray(all_pos[:, j : j + 1]),
                         jnp.asarray(MASK[:, j : j + 1]), j)
        rows = MASK[:, j] == 1
        np.testing.assert_allclose(np.asarray(lg)[rows, 0], full[rows, j], atol=1e-5, err_msg=f"step {j}")


def test_greedy_matches_hf_generate_past_the_window(tiny):
    _, hf_model, model = tiny
    n = 16  # prompt 7 + 16 new tokens: well past the window of 6
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(PMASK), max_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, PROMPTS.shape[1]:]
    out = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=n, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.slow
def test_sampler_logprobs_equal_full_forward(tiny):
    _, _, model = tiny
    out = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=14, temperature=1.0, num_samples=2),
                   rng=jax.random.key(4), prompt_bucket=8)
    rows = np.repeat(np.arange(3), 2)
    ref = full_forward_logprobs(model, PROMPTS[rows], PMASK[rows], out.tokens, out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=2e-5)


def test_export_round_trip_through_hf(tiny, tmp_path):
    family, hf_model, model = tiny
    save_pretrained(model, None, str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(reloaded).__name__ == {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                       "gemma3": "Gemma3ForCausalLM"}[family]
    real = MASK.astype(bool)
    np.testing.assert_allclose(hf_logits(reloaded, IDS, MASK)[real], hf_logits(hf_model, IDS, MASK)[real],
                               atol=1e-5)
    model2, _ = load_pretrained(str(tmp_path / "out"))
    assert model2.config == model.config
    jax.tree.map(np.testing.assert_array_equal, model2.params, model.params)


def test_new_params_have_replicated_axes():
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    for family in NEW:
        cfg = ModelConfig.from_hf(FAMILIES[family]().to_dict())
        axes, shapes = param_axes(cfg)["layers"], param_shapes(cfg)["layers"]
        assert axes.keys() == shapes.keys()
        new = [k for k in ("q_norm", "k_norm", "post_attn_norm", "post_mlp_norm") if k in axes]
        assert new == {"qwen3": ["q_norm", "k_norm"], "gemma2": ["post_attn_norm", "post_mlp_norm"],
                       "gemma3": ["q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"]}[family]
        for k in new:
            assert axes[k] == ("layers", "norm")
            assert all(a is None for a in shd.spec_for(axes[k], shapes[k], mesh))


def test_config_forms_and_family_defaults():
    # Gemma 3: the transformers-5 per-layer-type rope_parameters and the older top-level keys (rope_theta,
    # rope_local_base_freq, rope_scaling for the global layers, sliding_window_pattern) read the same.
    new = FAMILIES["gemma3"]().to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
               sliding_window_pattern=2)
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)
    # HF defaults when config.json leaves keys out.
    g3 = ModelConfig.from_hf({k: v for k, v in old.items() if k not in ("rope_theta", "rope_local_base_freq",
                                                                         "rope_scaling", "sliding_window_pattern",
                                                                         "head_dim", "query_pre_attn_scalar",
                                                                         "final_logit_softcapping")})
    assert (g3.rope_theta, g3.rope_local_theta, g3.head_dim, g3.query_pre_attn_scalar) == (1e6, 1e4, 256, 256)
    assert g3.layer_types == ("sliding_attention",) * 4 and g3.final_logit_softcapping is None  # pattern 6
    g2 = {k: v for k, v in FAMILIES["gemma2"]().to_dict().items()
          if k not in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                       "query_pre_attn_scalar", "rope_parameters")}
    g2 = ModelConfig.from_hf(g2)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.sliding_window) == (50.0, 30.0, 4096)
    assert (g2.query_pre_attn_scalar, g2.rope_theta, g2.rope_local_theta) == (256, 10000.0, None)
    q3 = {k: v for k, v in FAMILIES["qwen3"]().to_dict().items() if k != "head_dim"}
    assert ModelConfig.from_hf(q3).head_dim == 128  # HF Qwen3's default, not hidden / heads
    # An explicit null turns a Gemma 2 softcap off.
    assert ModelConfig.from_hf({**FAMILIES["gemma2"]().to_dict(), "final_logit_softcapping": None}) \
        .final_logit_softcapping is None
    # to_hf round-trips through transformers' own config classes.
    for family, cls in (("qwen3", Qwen3Config), ("gemma2", Gemma2Config), ("gemma3", Gemma3TextConfig)):
        cfg = ModelConfig.from_hf(FAMILIES[family]().to_dict())
        hf = cfg.to_hf()
        assert ModelConfig.from_hf(cls(**{k: v for k, v in hf.items() if k != "model_type"}).to_dict()) == cfg


def test_unsupported_variants_are_refused():
    q3 = FAMILIES["qwen3"]().to_dict()
    with pytest.raises(ValueError, match=r"Qwen3 mixture-of-experts \(qwen3_moe\) is not supported"):
        ModelConfig.from_hf({**q3, "model_type": "qwen3_moe", "num_experts": 8})
    with pytest.raises(ValueError, match=r"Gemma 3 multimodal .*Gemma3ForConditionalGeneration.*gemma3_text"):
        ModelConfig.from_hf(Gemma3Config(text_config=Gemma3TextConfig(**_COMMON)).to_dict())
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        ModelConfig.from_hf({**q3, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    g3 = FAMILIES["gemma3"]().to_dict()
    rope = {**g3["rope_parameters"], "sliding_attention": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}
    with pytest.raises(ValueError, match=r"unsupported RoPE scaling 'dynamic' \(sliding_attention\)"):
        ModelConfig.from_hf({**g3, "rope_parameters": rope})
    with pytest.raises(ValueError, match=r"Qwen3 sliding-window attention \(use_sliding_window=true\)"):
        ModelConfig.from_hf({**q3, "use_sliding_window": True, "sliding_window": 16})
    with pytest.raises(ValueError, match="use_bidirectional_attention=true"):
        ModelConfig.from_hf({**g3, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match=r"unsupported layer_types \['chunked_attention'\]"):
        ModelConfig.from_hf({**g3, "layer_types": ["chunked_attention"] + g3["layer_types"][1:]})
    with pytest.raises(ValueError, match="attention sinks"):
        ModelConfig.from_hf({**q3, "use_sinks": True})
    with pytest.raises(ValueError, match="partial rotary"):
        ModelConfig.from_hf({**q3, "partial_rotary_factor": 0.5})


@pytest.mark.slow
def test_activation_space_lora_on_a_gemma3_stack():
    """LoRA factors next to q and down add ``(x A) B`` exactly as the merged weight ``W + A B`` does, with the
    q/k and sandwich norms around them (those are not LoRA targets)."""
    cfg = ModelConfig.from_hf(FAMILIES["gemma3"]().to_dict())
    params = jax.jit(lambda k: jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k, p.shape),
                                            init_params(cfg, k)))(jax.random.key(0))
    ids, mask = IDS[:, :16], MASK[:, :16]

    layers, merged = dict(params["layers"]), dict(params["layers"])
    for i, name in enumerate(("q", "down")):
        w = layers[name]
        a = jax.random.normal(jax.random.key(10 + i), (w.shape[0], w.shape[1], 4)) * 0.1
        b = jax.random.normal(jax.random.key(20 + i), (w.shape[0], 4, w.shape[2])) * 0.1
        layers[f"{name}_lora"] = {"a": a, "b": b}
        merged[name] = w + jnp.einsum("lir,lro->lio", a, b)
    with_lora = _logits(cfg, {**params, "layers": layers}, ids, mask)
    np.testing.assert_allclose(with_lora, _logits(cfg, {**params, "layers": merged}, ids, mask), atol=1e-4)
    assert not np.allclose(with_lora, _logits(cfg, params, ids, mask), atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # between them every feature qwen3 has too
def test_train_step_sharded_equals_one_device(family, tmp_path):
    """One LoRA ensemble step (reference=sft, so the reference forward runs too) on pairs sampled from the model:
    on a data=2 x fsdp=2 x tensor=2 mesh it gives the one-device loss and gradient norm, and it moves the loss."""
    from bpo_jax.config import TrainConfig
    from bpo_jax.runtime import distributed
    from bpo_jax.train import state as st
    from bpo_jax.train.pairs import build_pairs
    from bpo_jax.train.step import BATCH_KEYS, make_train_step

    save_hf_model(family, tmp_path, seed=3)
    model, _ = load_pretrained(str(tmp_path))
    cfg = TrainConfig(total_steps=2, num_phases=1, batch_size=4, learning_rate=5e-2, max_new_tokens=10,
                      lora_rank=4, ensemble_size=2, reference="sft")
    prompts, pmask = PROMPTS[[0, 1, 2, 0]], PMASK[[0, 1, 2, 0]]
    out = generate(model.params, prompts, pmask,
                   Decoding(max_new_tokens=10, num_samples=2, eos_token_ids=(), temperature=1.5), config=model.config,
                   rng=jax.random.key(0))  # past the window of 6
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    batch = build_pairs(prompts, pmask, toks, mask, np.asarray(out.logprobs), toks.sum(1), np.ones(4, bool),
                        eos_token_ids=())
    batch = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    results = []
    for mesh in (None, shd.make_mesh(data=2, fsdp=2, tensor=2)):
        base = model.params if mesh is None else shd.shard(
            model.params, shd.logical_to_sharding(param_axes(model.config), model.params, mesh))
        state = st.create_state(cfg, base, jax.random.key(1))
        step = make_train_step(cfg, model.config, st.shardings(state), prompt_len=7)
        b = batch if mesh is None else distributed.global_rows(batch, mesh)
        state, m1 = step(state, b)
        state, m2 = step(state, b)
        results.append([float(m[k]) for m in (m1, m2) for k in ("loss", "grad_norm")])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-6)
    assert abs(results[0][2] - results[0][0]) > 1e-4 and all(np.isfinite(results[0]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_shared_prompt_rows_equal_separate_rows(family):
    """``share_prompt``'s ``[prompt | chosen | rejected]`` rows give the chosen and rejected log-probs (and their
    gradients) of two separate ``[prompt | response]`` rows: left-padded prompts, responses of different lengths,
    an empty one, and sequences past Gemma's 6-token window (the window counts positions, not slots)."""
    from bpo_jax.train.step import pair_logps

    cfg = ModelConfig.from_hf(FAMILIES[family]().to_dict())
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), params)
    p, n = 7, 9
    rng = np.random.default_rng(0)
    pmask = PMASK  # prompts of 4, 7 and 2 tokens
    prompts = rng.integers(3, 120, (3, p)) * pmask
    lens = {"chosen": [9, 3, 5], "rejected": [6, 9, 0]}
    batch = {}
    for side, ls in lens.items():
        rmask = (np.arange(n)[None] < np.array(ls)[:, None]).astype(np.int32)
        batch[f"{side}_ids"] = jnp.asarray(np.concatenate([prompts, rng.integers(3, 120, (3, n)) * rmask], 1))
        batch[f"{side}_mask"] = jnp.asarray(np.concatenate([pmask, rmask], 1))

    def logps(params, share):  # the shared rows unembed in chunks of 4 positions, the separate ones at once
        return pair_logps(cfg, params, batch, p, 4 if share else 0, share_prompt=share)

    separate, shared = logps(params, False), logps(params, True)
    for a, b in zip(separate, shared):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    assert float(shared[1][2]) == 0.0 and float(shared[3][2]) == 0.0  # the empty response: no tokens, logp 0

    def margin(params, share):
        c, r, _, _ = logps(params, share)
        return jnp.sum(c * jnp.arange(1, 4)) - jnp.sum(r)

    g_sep, g_shared = (jax.grad(margin)(params, s) for s in (False, True))
    for a, b in zip(jax.tree.leaves(g_sep), jax.tree.leaves(g_shared)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("share", [False, True])
def test_fused_attention_call_equals_our_attention(family, share):
    """``attention=cudnn`` hands ``jax.nn.dot_product_attention`` our mask (causal by slot, key validity, the
    shared-prompt branches, the sliding window in positions), scale (Gemma's query_pre_attn_scalar) and GQA
    grouping. JAX's reference implementation of that very call (``fused="xla"``, what runs on a CPU) must give
    our attention's output, in float32, also at an odd length (padded by one masked slot for cuDNN)."""
    from bpo_jax.models import decoder

    cfg = ModelConfig.from_hf(FAMILIES[family]().to_dict())
    b, t, h, kvh, d = 3, 24, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert h > kvh  # grouped-query attention
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, kvh, d)) for kk in ks[1:])
    valid = jnp.asarray(MASK.astype(bool))
    q_slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    branches = None
    if share:  # [prompt (10 slots) | chosen (7) | rejected (7)], both responses' positions continuing the prompt's
        branch = jnp.asarray(np.broadcast_to(np.repeat([0, 1, 2], [10, 7, 7]), (b, t)))
        prompt_pos = np.maximum(np.cumsum(MASK[:, :10], 1) - 1, 0)
        response_pos = prompt_pos[:, -1:] + 1 + np.arange(7)
        branches = (branch, jnp.asarray(np.concatenate([prompt_pos, response_pos, response_pos], axis=1)))
    window = jnp.int32(cfg.sliding_window or np.iinfo(np.int32).max)
    ours = decoder._attention(q, k, v, q_slots, valid, cfg, window, branches)
    fused = decoder._attention(q, k, v, q_slots, valid, cfg, window, branches, fused="xla")
    real = MASK.astype(bool)  # rows' padding queries see no key: both give some average there, unused
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(ours)[real], rtol=1e-5, atol=1e-5)
    odd = (q[:, 1:], k[:, 1:], v[:, 1:], q_slots[:, 1:], valid[:, 1:], cfg, window, None)  # t = 23
    real = real[:, 1:]
    np.testing.assert_allclose(np.asarray(decoder._attention(*odd, fused="xla"))[real],
                               np.asarray(decoder._attention(*odd))[real], rtol=1e-5, atol=1e-5)


def _pair_batch():
    """Three pairs of 8-slot left-padded prompts and 16-slot responses (``MASK``'s padding), for ``pair_logps``."""
    rng = np.random.default_rng(0)
    return {f"{side}{key}": jnp.asarray(rng.integers(3, 120, (3, 16)) * MASK[:, 8:] if key == "_ids" else MASK[:, 8:])
            for side in ("chosen", "rejected") for key in ("_ids", "_mask")}


@pytest.mark.slow
def test_attention_setting_reaches_the_train_step_and_is_checked(monkeypatch):
    """``attention=cudnn`` (bfloat16) routes the train step's forward through ``jax.nn.dot_product_attention``
    (here forced to JAX's reference implementation, as a CPU has no cuDNN) and gives the log-probs of
    ``attention=xla`` to bfloat16 accuracy; float32 or a softcapping model are refused by the config."""
    from bpo_jax.train.step import pair_logps

    calls = []
    real_dpa = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kw):
        calls.append(implementation)
        return real_dpa(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    hf = FAMILIES["llama"]().to_dict()
    cfg = ModelConfig.from_hf(hf, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(3))
    batch = _pair_batch()
    xla = pair_logps(cfg, params, batch, 8, 0, share_prompt=True)
    assert not calls
    fused = pair_logps(cfg.replace(attention="cudnn"), params, batch, 8, 0, share_prompt=True)
    assert calls and set(calls) == {"cudnn"}
    for a, b in zip(xla[:2], fused[:2]):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=2e-2, atol=0.3)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ModelConfig.from_hf(hf, attention="cudnn")
    with pytest.raises(ValueError, match="softcap"):
        ModelConfig.from_hf(FAMILIES["gemma2"]().to_dict(), dtype="bfloat16", attention="cudnn")
    with pytest.raises(ValueError, match="attention='flash'"):
        ModelConfig.from_hf(hf, attention="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on NVIDIA GPUs only")
def test_cudnn_attention_matches_xla_on_gpu():
    """On a GPU: the train step's log-probs and their gradients with ``attention=cudnn`` equal ``attention=xla``
    to bfloat16 accuracy, with shared-prompt rows (branch mask), left padding and grouped-query heads."""
    from bpo_jax.train.step import pair_logps

    cfg = ModelConfig.from_hf(FAMILIES["llama"]().to_dict(), dtype="bfloat16")
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), params)
    batch = _pair_batch()

    def margin(params, c):
        ch, rj, _, _ = pair_logps(c, params, batch, 8, 0, share_prompt=True)
        return jnp.sum(ch * jnp.arange(1, 4)) - jnp.sum(rj), (ch, rj)

    (_, (c_x, r_x)), g_x = jax.value_and_grad(margin, has_aux=True)(params, cfg)
    (_, (c_c, r_c)), g_c = jax.value_and_grad(margin, has_aux=True)(params, cfg.replace(attention="cudnn"))
    for a, b in ((c_x, c_c), (r_x, r_c)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=2e-2, atol=0.2)
    for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_c)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(b - a) <= 0.05 * np.linalg.norm(a) + 1e-3
