"""PEFT adapters in and out: a fresh adapter is initialised as PEFT's; members and their merge written by bpo_jax
load in ``peft`` onto the HF base to bpo_jax's logits; adapters PEFT wrote start an ensemble (``lora_init_from``),
with the SFT reference their merge; bad adapter folders are refused with the reason."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bpo_jax.config import TrainConfig
from bpo_jax.models import forward, load_pretrained, lora
from bpo_jax.models import peft_adapters as pa
from bpo_jax.train import state as st
from tiny_models import save_hf_model

peft = pytest.importorskip("peft")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.random.default_rng(0).integers(3, 128, (2, 7))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", folder)
    model, _ = load_pretrained(str(folder))
    return str(folder), model


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _peft_logits(base_folder, adapter_folder):
    model = peft.PeftModel.from_pretrained(_hf(base_folder), adapter_folder).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _ours(model, params):
    return np.asarray(forward(model.config, params, jnp.asarray(IDS, jnp.int32))[0])


def _shapes(model):
    return {t: model.params["layers"][t].shape for t in lora.TARGETS}


def test_fresh_adapter_is_initialised_as_peft_does(base):
    folder, model = base
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=16, lora_alpha=32, target_modules=HF_TARGETS))
    ours = lora.init_lora(jax.random.key(0), model.params["layers"], targets=lora.TARGETS, rank=16, num_adapters=4)
    for name, module in wrapped.named_modules():
        if not name.endswith("lora_A.default"):
            continue
        target = lora._HF_NAMES[name.split(".")[-3]]
        theirs = module.weight.detach().numpy().ravel()
        mine = np.asarray(ours[target]["a"]).ravel()
        bound = 1 / np.sqrt(model.params["layers"][target].shape[1])
        for x in (theirs, mine):  # U(-1/sqrt(in), 1/sqrt(in)): its bound, mean 0, variance bound^2 / 3
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
            assert abs(x.mean()) < 0.1 * bound and np.var(x) == pytest.approx(bound ** 2 / 3, rel=0.15)
    assert all(not np.any(np.asarray(f["b"])) for f in ours.values())


@pytest.mark.slow
def test_members_and_merge_load_in_peft_to_the_same_logits(base, tmp_path):
    folder, model = base
    key = jax.random.key(1)
    factors = lora.init_lora(key, model.params["layers"], targets=("q", "v", "down"), rank=4, num_adapters=3)
    factors = {t: {"a": f["a"], "b": 0.3 * jax.random.normal(jax.random.fold_in(key, i), f["b"].shape)}
               for i, (t, f) in enumerate(factors.items())}
    scale = 8 / 4
    folders = pa.write_ensemble(str(tmp_path / "adapters"), factors, rank=4, alpha=8, base_model=folder)
    assert [f.rsplit("/", 1)[1] for f in folders] == ["member_0", "member_1", "member_2", "merged"]
    for i in range(3):
        member = jax.tree.map(lambda x: x[i], factors)
        want = _ours(model, lora.attach(model.params, member, scale))
        np.testing.assert_allclose(_peft_logits(folder, folders[i]), want, atol=1e-4, rtol=1e-4)
        back = pa.read_adapter(folders[i], _shapes(model))
        assert (back.rank, back.alpha, back.scale) == (4, 8.0, 2.0)
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), back.factors, member)
    merged = _ours(model, lora.merge(model.params, factors, scale))
    assert np.abs(merged - _ours(model, model.params)).max() > 1e-2  # the adapters change the logits
    np.testing.assert_allclose(_peft_logits(folder, folders[3]), merged, atol=1e-4, rtol=1e-4)
    cfg = json.loads((tmp_path / "adapters" / "merged" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (12, 8.0, ["down_proj", "q_proj", "v_proj"])


def _peft_adapters(folder, tmp_path, n, **lora_kw):
    """N PEFT adapters with random B (as N different-seed SFT adapters would be), saved by peft itself."""
    out = []
    for i in range(n):
        torch.manual_seed(10 + i)
        wrapped = peft.get_peft_model(_hf(folder), peft.LoraConfig(**{"r": 4, "lora_alpha": 8,
                                                                       "target_modules": HF_TARGETS, **lora_kw}))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        wrapped.save_pretrained(tmp_path / f"sft_{i}")
        out.append(str(tmp_path / f"sft_{i}"))
    return out


def test_ensemble_starts_from_peft_folders_with_the_sft_reference_their_merge(base, tmp_path):
    folder, model = base
    dirs = _peft_adapters(folder, tmp_path, 2)
    cfg = TrainConfig(lora_rank=4, lora_alpha=8, ensemble_size=2, lora_init_from=tuple(dirs), reference="sft",
                      total_steps=2, num_phases=2, batch_size=2)
    init = pa.read_ensemble(cfg.lora_init_from, _shapes(model), rank=4, scale=cfg.lora_scale,
                            targets=cfg.lora_targets)
    state = st.create_state(cfg, model.params, jax.random.key(0), lora_init=init)
    for i, d in enumerate(dirs):  # each member is its PEFT adapter
        member = st.adapter_params(cfg, state.base, jax.tree.map(lambda x: x[i], state.trainable))
        np.testing.assert_allclose(_ours(model, member), _peft_logits(folder, d), atol=1e-4, rtol=1e-4)
    ref = _ours(model, st.reference_params(cfg, state))  # the SFT model: base + the adapters' merge
    np.testing.assert_allclose(ref, _ours(model, st.policy_params(cfg, state)), atol=1e-5)
    assert np.abs(ref - _ours(model, model.params)).max() > 1e-2
    with pytest.raises(ValueError, match="r=4, lora_alpha=8 .* the run has lora_rank=8"):
        pa.read_ensemble(dirs, _shapes(model), rank=8, scale=1.0, targets=cfg.lora_targets)
    with pytest.raises(ValueError, match="adapts .* the run's lora_targets are"):
        pa.read_ensemble(dirs, _shapes(model), rank=4, scale=2.0, targets=("q", "v"))


def test_bad_adapter_folders_are_refused_with_the_reason(base, tmp_path):
    folder, model = base
    shapes = _shapes(model)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        pa.read_adapter(str(tmp_path), shapes)
    (dora,) = _peft_adapters(folder, tmp_path / "d", 1, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        pa.read_adapter(dora, shapes)
    (good,) = _peft_adapters(folder, tmp_path / "g", 1)
    other = {t: (s[0], s[1] + 1, s[2]) for t, s in shapes.items()}  # a base of another size
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 64\), expected \(4, 65\)"):
        pa.read_adapter(good, other)
    (head,) = _peft_adapters(folder, tmp_path / "h", 1, target_modules=HF_TARGETS + ["lm_head"])
    with pytest.raises(ValueError, match="tensors for modules bpo_jax does not adapt, e.g. .*lm_head"):
        pa.read_adapter(head, shapes)
    (cfg_file,) = [p for p in (tmp_path / "g").rglob("adapter_config.json")]
    cfg_file.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        pa.read_adapter(good, shapes)


@pytest.mark.slow
def test_train_starts_from_adapter_folders_and_exports_peft_folders(tiny_policy_and_rm, tmp_path, capsys):
    """``train lora_init_from=...`` on a tiny policy: the exported merged adapter, loaded by peft on the HF base,
    gives the exported policy's logits; bad folders are a config error before any compute."""
    from bpo_jax.__main__ import main as cli
    from testing import write_minisum_folder

    policy, _ = tiny_policy_and_rm
    dirs = _peft_adapters(policy, tmp_path, 2)
    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data", rows=6)
    run = tmp_path / "run"
    args = ["train", f"model={policy}", f"data={data}", f"run_dir={run}", "total_steps=2", "num_phases=2",
            "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2", "lora_rank=4",
            "lora_alpha=8", "ensemble_size=2", "learning_rate=0.01", "tied_pairs=second"]
    assert cli([*args[:3], f"run_dir={tmp_path / 'bad'}", *args[4:], f"lora_init_from={dirs[0]},{tmp_path}"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert cli([*args, f"lora_init_from={dirs[0]},{dirs[1]}"]) == 0
    assert "LoRA adapters exported as PEFT folders" in capsys.readouterr().out
    ids = torch.tensor(np.random.default_rng(1).integers(3, 1000, (2, 6)))
    with torch.no_grad():
        want = _hf(str(run / "policy"))(ids).logits.numpy()
        got = peft.PeftModel.from_pretrained(_hf(policy), str(run / "adapters" / "merged"))(ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_peft_linear_merge_is_peft_add_weighted_adapter_and_exports_to_its_logits(base, tmp_path):
    """``ensemble_merge=peft_linear`` is PEFT's own ``add_weighted_adapter(weights=[1/N]*N,
    combination_type="linear")`` (as the paper's code merges): the same A and B factors and the same logits; the
    exported ``merged`` folder loads in PEFT to bpo_jax's π_θ; and it differs from ``mean_delta``."""
    folder, model = base
    dirs = _peft_adapters(folder, tmp_path, 2)
    cfg = TrainConfig(lora_rank=4, lora_alpha=8, ensemble_size=2, lora_init_from=tuple(dirs),
                      ensemble_merge="peft_linear", total_steps=2, num_phases=2, batch_size=2)
    init = pa.read_ensemble(cfg.lora_init_from, _shapes(model), rank=4, scale=cfg.lora_scale,
                            targets=cfg.lora_targets)
    state = st.create_state(cfg, model.params, jax.random.key(0), lora_init=init)
    theirs = peft.PeftModel.from_pretrained(_hf(folder), dirs[0], adapter_name="m0").eval()
    theirs.load_adapter(dirs[1], adapter_name="m1")
    theirs.add_weighted_adapter(["m0", "m1"], [0.5, 0.5], "merged", combination_type="linear")
    theirs.set_adapter("merged")
    assert theirs.peft_config["merged"].r == 4 and theirs.peft_config["merged"].lora_alpha == 4  # scale 1
    ours, scale = lora.merged_adapter(state.trainable, cfg.lora_scale, "peft_linear")
    assert scale == 1.0
    layer = theirs.base_model.model.model.layers[1].self_attn.q_proj
    np.testing.assert_allclose(np.asarray(ours["q"]["a"][1]).T, layer.lora_A["merged"].weight.detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ours["q"]["b"][1]).T, layer.lora_B["merged"].weight.detach().numpy(),
                               rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        want = theirs(torch.tensor(IDS)).logits.numpy()
    got = _ours(model, st.policy_params(cfg, state))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    mean_delta = _ours(model, st.policy_params(cfg.replace(ensemble_merge="mean_delta"), state))
    assert np.abs(mean_delta - got).max() > 1e-3  # the cross terms A_i B_j
    out = pa.write_ensemble(str(tmp_path / "export"), state.trainable, rank=4, alpha=8, merge="peft_linear")
    np.testing.assert_allclose(_peft_logits(folder, out[-1]), got, atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "export" / "merged" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 4.0)
    with pytest.raises(Exception, match="ensemble_merge"):
        TrainConfig(lora_rank=4, ensemble_merge="svd")
