"""Closed-form checks of bench/memory_plan.py (plans are computed with eval_shape, never allocated)."""

import functools
import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bpo_jax.config import load_config
from bpo_jax.models import decoder
from bpo_jax.runtime import sharding as shd
from bpo_jax.train import state as st
from testing import ROOT, tiny_model_config

SCRIPT = os.path.join(ROOT, "bench", "memory_plan.py")
_spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
mp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp)

TINY = tiny_model_config(vocab_size=128, hidden_size=64, intermediate_size=96, head_dim=16, param_dtype="bfloat16",
                         dtype="bfloat16")


def _mesh(data=1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _cfg(*overrides):
    return load_config(None, ["param_dtype=bfloat16", *overrides])


def test_base_bytes_equal_real_params():
    params = decoder.init_params(TINY, jax.random.key(0))
    want = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    r = mp.plan(_cfg(), TINY, _mesh(), 16)
    assert r["resident"]["base"] == want
    assert r["base_count"] == sum(x.size for x in jax.tree.leaves(params))


def test_fsdp_shard_of_divisible_leaf_is_exactly_one_nth():
    base = jax.eval_shape(functools.partial(decoder.init_params, TINY), jax.random.key(0))
    for n in (2, 4, 8):  # hidden 64 divides by each
        mesh = mp.abstract_mesh(_mesh(fsdp=n))
        spec = shd.spec_for(("layers", "embed", "heads"), base["layers"]["q"].shape, mesh)
        sharding = jax.sharding.NamedSharding(mesh, spec)
        full = base["layers"]["q"].size * 2
        assert mp.shard_bytes(base["layers"]["q"], sharding) * n == full


def test_non_dividing_dimension_stays_replicated():
    odd = TINY.replace(hidden_size=36)  # 36 % 8 != 0: the embed dim cannot go over fsdp=8
    total = mp.plan(_cfg(), odd, _mesh(), 16)["resident"]["base"]
    assert mp.plan(_cfg(), odd, _mesh(fsdp=8), 16)["resident"]["base"] == total
    # while with fsdp=4 every leaf with an embed dim shrinks 4x and the norms stay whole
    base = jax.eval_shape(functools.partial(decoder.init_params, odd), jax.random.key(0))
    norms = sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(base)[0] if "norm" in jax.tree_util.keystr(k))
    sharded = mp.plan(_cfg(), odd, _mesh(fsdp=4), 16)["resident"]["base"]
    assert sharded == (total - norms * 2) // 4 + norms * 2


def test_lora_trainable_count():
    n, r = 3, 4
    cfg = _cfg(f"lora_rank={r}", f"ensemble_size={n}", "lora_targets=q,v,down")
    dims = {"q": (64, TINY.q_size), "v": (64, TINY.kv_size), "down": (96, 64)}
    want = n * sum(r * (i + o) for i, o in dims.values()) * TINY.num_layers
    res = mp.plan(cfg, TINY, _mesh(), 16)
    assert res["trainable_count"] == want
    # AdamW: two float32 moments shaped like the trainable leaves (plus int32 counters, one per member)
    assert res["resident"]["opt_state"] == 2 * want * 4 + 2 * n * 4
    # float32 masters whatever param_dtype is (bfloat16 here): trainable and behavior snapshot at 4 bytes
    assert res["resident"]["trainable"] == res["resident"]["behavior"] == want * 4
    assert res["trainable_dtype"] == res["opt_dtype"] == "float32"


def test_kv_cache_bytes():
    cfg = _cfg("batch_size=8", "max_prompt_length=40", "max_new_tokens=24")
    s = 4  # data=2 x fsdp=2
    r = mp.plan(cfg, TINY, _mesh(data=2, fsdp=2), 16)
    rows, slots = 2 * 8, 64 + 24  # 8 prompts (a multiple of 4) x 2 samples; prompt width bucketed to 64
    assert (r["kv_rows"], r["kv_len"]) == (rows, slots)
    kv = TINY.num_layers * 2 * rows * slots * TINY.num_kv_heads * TINY.head_dim * 2 // s + rows * slots // s
    assert r["sampling"]["kv_cache"] == kv
    # sampling_batch_size: a call samples up to that many prompts, in whole batches, at most the phase's K·B
    for steps, phases, want in ((8, 2, 32), (4, 2, 16)):  # K = 4: 32 prompts a call; K = 2: the phase's 16
        more = mp.plan(cfg.replace(sampling_batch_size=32, total_steps=steps, num_phases=phases), TINY,
                       _mesh(data=2, fsdp=2), 16)
        assert more["kv_rows"] == 2 * want and more["sampling"]["kv_cache"] == kv * want // 8


def test_evaluation_decodes_each_hosts_prompts_beside_a_new_policy_copy():
    """Evaluation: π_θ made anew (π_β's kept shapes), its unstacked copy alive throughout, then greedy decoding
    of eval_batch_size prompts per host, the SFT log-ratio forward and the RM's scoring one after another (the
    phase counts the largest). With 4 hosts over data 2 x fsdp 2 each host holds one batch shard and decodes
    its own 8 prompts: the KV cache has 4 x 8 rows, 1 sample each."""
    cfg = _cfg("lora_rank=4", "ensemble_size=2", "eval_batch_size=8", "max_prompt_length=40",
               "eval_max_new_tokens=24", "eval_sft_logratio=true")
    r = mp.plan(cfg, TINY, _mesh(data=2, fsdp=2), 16, rm=TINY, hosts=4)
    assert r["evaluation"]["policy"] == r["resident"]["behavior"]
    assert r["sampling_layout"] == "replicated"  # as π_β: the copy, and its layers again while unstacking
    assert r["evaluation"]["policy_unstacked"] == r["sampling"]["sampling_copy"]
    assert r["eval_steps"]["unstacking"] == r["sampling"]["behavior_unstacked"]
    train = mp.plan(cfg.replace(sampling_layout="train"), TINY, _mesh(data=2, fsdp=2), 16, rm=TINY, hosts=4)
    assert train["evaluation"]["policy_unstacked"] == train["sampling"]["behavior_unstacked"]
    assert "unstacking" not in train["eval_steps"]
    rows, slots, s = 4 * 8, 64 + 24, 4
    kv = TINY.num_layers * 2 * rows * slots * TINY.num_kv_heads * TINY.head_dim * 2 // s + rows * slots // s
    prefill = mp.tree_bytes(*_prompt_cache(rows, 64, s)) + mp.working_set(TINY, rows // s, 64, 1)
    assert r["eval_steps"]["decode"] == kv + prefill
    assert r["eval_steps"]["rm_scoring"] == r["annotation"]["rm_forward"]
    t = 64 + 24  # one forward over [prompt | response], unembedded 16 positions at a time
    want = (rows // s) * t * TINY.hidden_size * 2 + mp.working_set(TINY, rows // s, t, 1) + (rows // s) * 16 * 128 * 4
    assert r["eval_steps"]["sft_logratio"] == want
    assert r["phases"]["evaluation"] == sum(r["evaluation"].values()) + max(r["eval_steps"].values())
    one_host = mp.plan(cfg, TINY, _mesh(data=2, fsdp=2), 16, rm=TINY)  # 8 prompts over 4 shards
    assert one_host["eval_steps"]["decode"] < r["eval_steps"]["decode"]
    assert "sft_logratio" not in mp.plan(_cfg(), TINY, _mesh(), 16)["eval_steps"]


def _prompt_cache(rows, slots, shards):
    cache = jax.eval_shape(lambda: decoder.init_cache(TINY, rows, slots, per_layer=True))
    mesh = mp.abstract_mesh(_mesh(data=2, fsdp=2))
    assert shards == shd.batch_shards(mesh)
    return cache, shd.cache_shardings(cache, mesh)


def test_verdict_and_peak():
    r = mp.plan(_cfg(), TINY, _mesh(), 16)
    assert r["peak"] == sum(r["resident"].values()) + max(r["phases"].values())
    assert r["phases"]["train_step"] == sum(r["train"].values())
    assert mp.verdict(15 * mp.GiB, 16 * mp.GiB).startswith("fits (tight)")
    assert mp.verdict(17 * mp.GiB, 16 * mp.GiB).startswith("does NOT fit")


def test_mesh_parsing_and_chip_counts():
    cfg = _cfg()
    assert mp.parse_mesh("data=1,fsdp=-1,tensor=1", 8, cfg) == _mesh(fsdp=8)
    assert [mp.DEVICES[d][1] for d in ("v4-8", "v5e-8", "v5p-8", "v5e-32", "h100")] == [4, 8, 4, 32, 1]
    with pytest.raises(SystemExit):
        mp.parse_mesh("data=1,fsdp=3,tensor=1", 8, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("lora_rank=8", "ensemble_size=2"), ("lora_rank=0", "reference=ema"),
                                       ("lora_rank=8", "ensemble_size=2", "ensemble_merge=peft_linear")])
def test_shardings_match_real_placement(overrides):
    """The plan's shardings equal where create_state really puts the leaves (needs the 8 fake CPU devices)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    cfg = _cfg(*overrides)
    sizes = _mesh(data=2, fsdp=2, tensor=2)
    mesh = shd.make_mesh(**sizes)
    params = decoder.init_params(TINY, jax.random.key(0))
    base = shd.shard(params, shd.logical_to_sharding(decoder.param_axes(TINY), params, mesh))
    real = st.create_state(cfg, base, jax.random.key(1), compute_dtype=TINY.dtype)
    _, abstract = mp.abstract_state(cfg, TINY)
    planned = mp.state_shardings(cfg, TINY, abstract, mp.abstract_mesh(sizes))
    for tree, shs in zip((real.base, real.trainable, real.behavior, real.opt_state, real.reference), planned,
                         strict=True):
        if tree is None:
            continue
        shs = jax.tree.leaves(shs, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        for x, s in zip(jax.tree.leaves(tree), shs, strict=True):
            assert x.sharding.shard_shape(x.shape) == s.shard_shape(x.shape)
    want = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(real.trainable))
    resident = mp.plan(cfg, TINY, sizes, 16)["resident"]
    assert resident["trainable"] == want
    assert resident["behavior"] == sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                       for x in jax.tree.leaves(real.behavior))
    np.testing.assert_equal(len(jax.tree.leaves(real.opt_state)), len(jax.tree.leaves(abstract.opt_state)))


@pytest.mark.slow
def test_all_prints_every_device():
    out = subprocess.run([sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "tldr_gemma2b.yaml"),
                          "--all"], capture_output=True, text=True, timeout=300, check=True).stdout
    for device in mp.DEVICES:
        assert f"| {device} |" in out
    assert out.count("\n") == 1 + len(mp.CASES) * len(mp.DEVICES)
    assert "fp32" not in out.splitlines()[0]


def test_single_plan_cli():
    out = subprocess.run([sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "tldr_gemma2b.yaml"),
                          "--model-config", os.path.join(ROOT, "configs", "models", "gemma-2b.json"),
                          "--device", "v5e-8", "micro_batches=2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "mesh data=1 fsdp=8 tensor=1" in out and "2.51B params" in out and "HBM 16 GiB" in out
    assert "trainable (float32)" in out and "AdamW mu+nu (float32)" in out and "lora_merged" not in out


def _base_bytes(tree, itemsize=None):
    return sum(x.size * (itemsize or x.dtype.itemsize) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("remat,share", [(False, True), (True, False)])
def test_lora_train_step_is_activation_space(remat, share):
    """No merged target weights (nor their cotangent) in the step; x A per target per layer instead. Rows:
    one [prompt | chosen | rejected] row per pair with share_prompt, else two [prompt | response] rows."""
    n, r, targets = 2, 4, ("q", "v", "down")
    args = (f"lora_rank={r}", f"ensemble_size={n}", "lora_targets=" + ",".join(targets), "batch_size=4",
            "max_prompt_length=24", "max_new_tokens=8", f"remat={str(remat).lower()}",
            f"share_prompt={str(share).lower()}")
    cfg = _cfg(*args)
    mc = TINY.replace(remat=remat)
    res = mp.plan(cfg, mc, _mesh(), 16)
    rows, t = (4, 24 + 2 * 8) if share else (2 * 4, 24 + 8)
    assert (res["train_rows"], res["train_len"]) == (rows, t)
    assert set(res["train"]) == {"grads_and_update", "member_factors", "lora_xa", "activations", "logits"}
    layers = 2 if remat else TINY.num_layers + 1
    assert res["train"]["lora_xa"] == layers * rows * t * r * 2 * len(targets)  # bfloat16 compute
    trainable = res["resident"]["trainable"]
    assert res["train"]["member_factors"] == trainable // n
    assert res["train"]["grads_and_update"] == 3 * trainable // n
    assert res["train"]["logits"] == 2 * 2 * 4 * 8 * TINY.vocab_size * 4  # 2 x 8 response rows x 8 positions, f32
    # π_β is kept merged (mean_delta: rank N·r, the members' bytes; peft_linear: rank r, 1/N of them) and attached
    # as it is (no copy) to sample; the unstacked copy holds it with the layers
    base = jax.eval_shape(functools.partial(decoder.init_params, TINY), jax.random.key(0))
    assert res["resident"]["behavior"] == trainable and "behavior_merged" not in res["sampling"]
    assert res["sampling"]["behavior_unstacked"] == _base_bytes(base["layers"]) + res["resident"]["behavior"]
    linear = mp.plan(_cfg(*args, "ensemble_merge=peft_linear"), mc, _mesh(), 16)
    assert linear["resident"]["behavior"] == trainable // n


def test_full_ft_masters_and_casts():
    """Full FT: a float32 master copy; π_β kept in the compute dtype, as the step runs it (norms float32), and
    sampled with no cast copy; the step casts the unembedding and one layer at a time to the compute dtype."""
    cfg = _cfg("lora_rank=0", "ensemble_size=1")
    res = mp.plan(cfg, TINY, _mesh(), 16)
    base = jax.eval_shape(functools.partial(decoder.init_params, TINY), jax.random.key(0))
    assert res["resident"]["trainable"] == _base_bytes(base, 4)
    norms = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(base) if "norm" in str(p[-1]))  # float32
    assert res["resident"]["behavior"] == _base_bytes(base) + 2 * norms  # bfloat16 compute, norms float32
    assert "behavior_merged" not in res["sampling"]
    layer_norms = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(base["layers"]) if "norm" in str(p[-1]))
    assert res["sampling"]["behavior_unstacked"] == _base_bytes(base["layers"]) + 2 * layer_norms
    unembed = "embed" if TINY.tie_word_embeddings else "lm_head"
    want = base[unembed].size * 2 + _base_bytes(base["layers"], 2) // TINY.num_layers
    assert res["train"]["weight_casts"] == want
    assert "member_factors" not in res["train"] and "lora_xa" not in res["train"]
    # float32 compute: the masters are used as they are
    res32 = mp.plan(cfg, TINY.replace(dtype="float32"), _mesh(), 16)
    assert "weight_casts" not in res32["train"]


def test_ema_lora_reference_forward_is_its_own_phase():
    n, r = 3, 4
    cfg = _cfg(f"lora_rank={r}", f"ensemble_size={n}", "reference=ema")
    res = mp.plan(cfg, TINY, _mesh(), 16)
    assert res["resident"]["reference"] == res["resident"]["trainable"]  # float32 copy of the factors
    assert res["reference_forward"]["reference_factors"] == res["resident"]["reference"]
    assert res["phases"]["reference_forward"] == sum(res["reference_forward"].values())
    assert "reference_merged" not in res["train"]
    assert mp.plan(_cfg(f"lora_rank={r}"), TINY, _mesh(), 16)["reference_forward"] == {}
    # Merged by peft_linear (lora.attach_merged: one rank-r adapter of sums over the members): 1/N of the bytes.
    linear = mp.plan(_cfg(f"lora_rank={r}", f"ensemble_size={n}", "reference=ema", "ensemble_merge=peft_linear"),
                     TINY, _mesh(), 16)
    assert linear["reference_forward"]["reference_factors"] * n == res["resident"]["reference"]


def test_host_layout_table_names_the_mesh_each_slice_gets():
    """The --hosts table runs distributed.host_aware_devices on stand-in devices: a v5e-32 (8 hosts x 4 chips)
    keeps tensor=4 inside a host and refuses tensor=8."""
    assert mp.host_layout({"data": 1, "fsdp": 8, "tensor": 4}, 32, 8) == (
        "hosts form data 1 x fsdp 8; each host holds data 1 x fsdp 1 x tensor 4: tensor inside a host, "
        "1 batch shard(s) per host")
    assert mp.host_layout({"data": 2, "fsdp": 8, "tensor": 2}, 32, 8).startswith("hosts form data 2 x fsdp 4")
    assert mp.host_layout({"data": 1, "fsdp": 4, "tensor": 8}, 32, 8).startswith("refused: tensor=8")
    assert mp.host_layout({"data": 1, "fsdp": 4, "tensor": 1}, 4, 1) == "one host: every axis inside it"
