"""The sampler: greedy parity with HF generate, log-probs = full forward, layout, EOS, determinism, meshes."""

import jax
import numpy as np
import pytest
import torch

from bpo_jax.models import load_pretrained, param_axes, unstack_layers
from bpo_jax.runtime import sharding as shd
from bpo_jax.sample.sampler import Decoding, generate
from testing import full_forward_logprobs
from tiny_models import CORE_FAMILIES, save_hf_model

PROMPTS = np.array([[0, 0, 0, 5, 9, 17, 3], [7, 8, 9, 10, 11, 12, 13], [0, 0, 0, 0, 0, 21, 99]])
PMASK = (PROMPTS != 0).astype(np.int32)


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, path, seed=1)
    model, _ = load_pretrained(str(path))
    return hf_model, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_sampling")
    save_hf_model("llama", path, seed=2)
    return load_pretrained(str(path))[0]


def test_greedy_matches_hf_generate(tiny):
    hf_model, model = tiny
    n = 10
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(PMASK), max_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, PROMPTS.shape[1]:]
    out = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=n, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert np.all(np.asarray(out.mask) == 1)


@pytest.mark.slow
def test_logprobs_equal_full_forward_and_layout(tiny):
    _, model = tiny
    out = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=6, temperature=1.3, top_k=20, num_samples=2),
                   rng=jax.random.key(3))
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == out.sampling_logprobs.shape == (6, 6)
    rows = np.repeat(np.arange(3), 2)  # row i·n + j is prompt i's j-th sample
    ref = full_forward_logprobs(model, PROMPTS[rows], PMASK[rows], out.tokens, out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=2e-5)
    # Tempered, truncated sampling log-probs differ from the model's own, and are ≥ them under top-k.
    assert not np.allclose(out.sampling_logprobs, out.logprobs)
    assert not np.array_equal(out.tokens[0], out.tokens[1])  # two samples of the same prompt differ


def test_determinism_and_rng(llama):
    path_model = llama
    a = generate(path_model, PROMPTS, PMASK, Decoding(max_new_tokens=8), rng=jax.random.key(7))
    b = generate(path_model, PROMPTS, PMASK, Decoding(max_new_tokens=8), rng=jax.random.key(7))
    c = generate(path_model, PROMPTS, PMASK, Decoding(max_new_tokens=8), rng=jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # Params already unstacked (as the online loop passes them) give the very same samples.
    d = generate(unstack_layers(path_model.params), PROMPTS, PMASK, Decoding(max_new_tokens=8),
                 config=path_model.config, rng=jax.random.key(7))
    np.testing.assert_array_equal(a.tokens, d.tokens)


@pytest.mark.slow
def test_eos_masks_and_padding(llama):
    model = llama
    greedy = np.asarray(generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=8, temperature=0.0)).tokens)
    eos = int(greedy[0, 2])  # make the 3rd greedy token of row 0 an EOS
    out = generate(model, PROMPTS, PMASK,
                   Decoding(max_new_tokens=8, temperature=0.0, eos_token_ids=(eos,), pad_token_id=0))
    toks, mask, lp = map(np.asarray, (out.tokens, out.mask, out.logprobs))
    for r in range(3):
        hits = np.flatnonzero(greedy[r] == eos)
        end = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(mask[r], (np.arange(8) < end).astype(np.int32))
        np.testing.assert_array_equal(toks[r, :end], greedy[r, :end])
        assert np.all(toks[r, end:] == 0) and np.all(lp[r, end:] == 0.0)
    assert mask[0].sum() == 3


@pytest.mark.slow
def test_batches_buckets_and_mesh_give_the_same_samples(llama):
    model = llama
    key = jax.random.key(11)
    base = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=5, num_samples=2), rng=key)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = generate(model, PROMPTS, PMASK, Decoding(max_new_tokens=5, num_samples=2), rng=key, mesh=mesh,
                       prompt_bucket=16)
    np.testing.assert_array_equal(base.tokens, sharded.tokens)
    np.testing.assert_allclose(base.logprobs, sharded.logprobs, atol=1e-5)


@pytest.mark.slow
def test_sampling_layout_reshard_and_progress(llama, capsys):
    from bpo_jax.sample.sampler import sampling_shardings

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    train_layout = shd.shard(llama.params, shd.logical_to_sharding(
        param_axes(llama.config), llama.params, mesh))
    assert "fsdp" in train_layout["layers"]["gate"].sharding.spec
    target = sampling_shardings(llama.config, mesh)
    assert "fsdp" not in target["layers"]["gate"].spec and "tensor" in target["layers"]["gate"].spec
    key = jax.random.key(5)
    want = generate(llama, PROMPTS, PMASK, Decoding(max_new_tokens=4), rng=key)
    got = generate(train_layout, PROMPTS, PMASK, Decoding(max_new_tokens=4), config=llama.config, rng=key, mesh=mesh,
                   param_shardings=target, batch_size=2, progress=True)
    np.testing.assert_array_equal(got.tokens[:2], want.tokens[:2])
    assert got.tokens.shape == want.tokens.shape
    assert "sampling" in capsys.readouterr().err  # the tqdm bar over prompt batches


def test_bad_inputs(llama):
    model = llama
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, PROMPTS, PMASK[:, ::-1], Decoding(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, PROMPTS, np.zeros_like(PMASK), Decoding(max_new_tokens=2))
    with pytest.raises(ValueError, match="temperature >= 0"):
        Decoding(max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p <= 1"):
        Decoding(max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="num_samples must be >= 1; got 2, 0"):
        Decoding(max_new_tokens=2, num_samples=0)


def test_equal_decodings_share_one_compilation_and_another_compiles_anew(llama):
    """``Decoding`` is the prefill's and the decode loop's one static argument: two equal values built apart (EOS
    ids as a list or a tuple of NumPy ints) reuse one compilation; another temperature compiles anew."""
    from bpo_jax.sample import sampler

    first = Decoding(max_new_tokens=3, temperature=0.7, eos_token_ids=[np.int64(5)])
    again = Decoding(max_new_tokens=3, temperature=0.7, eos_token_ids=(5,))
    assert first == again and hash(first) == hash(again) and first.eos_token_ids == (5,)
    generate(llama, PROMPTS, PMASK, first)
    sizes = sampler._prefill._cache_size(), sampler._decode._cache_size()
    a = generate(llama, PROMPTS, PMASK, again)
    assert (sampler._prefill._cache_size(), sampler._decode._cache_size()) == sizes
    b = generate(llama, PROMPTS, PMASK, first)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # the same key: the same samples
    generate(llama, PROMPTS, PMASK, Decoding(max_new_tokens=3, temperature=0.9, eos_token_ids=(5,)))
    assert (sampler._prefill._cache_size(), sampler._decode._cache_size()) == (sizes[0] + 1, sizes[1] + 1)


@pytest.mark.slow
def test_response_logps_score_the_samplers_responses_on_a_mesh(llama):
    """``evaluate.response_logps`` (the drift measure's SFT side): the summed log-probs of sampled responses equal
    the sampler's own, also on an 8-device mesh with 3 rows (padded to the batch shards), and differ under
    other weights."""
    from bpo_jax.eval.win_rate import response_logps

    out = generate(llama, PROMPTS, PMASK, Decoding(max_new_tokens=6, temperature=1.0, eos_token_ids=(3,)),
                   rng=jax.random.key(4))
    want = (np.asarray(out.logprobs) * np.asarray(out.mask)).sum(1)
    for mesh in (None, shd.make_mesh(data=8, fsdp=1, tensor=1)):
        got = response_logps(llama.config, llama.params, PROMPTS, PMASK, out.tokens, out.mask, mesh=mesh)
        np.testing.assert_allclose(got, want, atol=1e-4)
    other = jax.tree.map(lambda x: x * 1.5, llama.params)
    assert np.abs(response_logps(llama.config, other, PROMPTS, PMASK, out.tokens, out.mask) - want).min() > 1e-3
