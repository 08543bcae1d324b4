"""The identical-sample rate: greedy decoding (temperature 0) gives two identical samples for every prompt; at
temperature 1 the rate is the hand count of the sampler's own two samples per prompt, drawn with the same key."""

import dataclasses

import jax
import numpy as np
import pytest

from bpo_jax.data.minisum import encode_prompts
from bpo_jax.eval.diversity import identical_sample_rate
from bpo_jax.models import load_pretrained
from bpo_jax.sample.sampler import Decoding, generate


@pytest.fixture(scope="module")
def tiny(tiny_policy_and_rm):
    model, tok = load_pretrained(tiny_policy_and_rm[0])
    ids, mask = encode_prompts(tok, [f"Summarize: {i} cats sat on {i + 1} mats." for i in range(5)], 64)
    return model, tok, ids, mask


def test_greedy_samples_are_always_identical(tiny):
    model, tok, ids, mask = tiny
    greedy = Decoding(max_new_tokens=6, temperature=0.0, eos_token_ids=(2,), pad_token_id=2)
    assert identical_sample_rate(model.params, model.config, tok, ids, mask, greedy, rng=jax.random.key(0)) == 1.0


def test_rate_is_the_count_of_the_samplers_own_pairs(tiny):
    model, tok, ids, mask = tiny
    # 1 new token from a random model: some pairs repeat, some do not, so the count is not trivially 0 or n
    d = Decoding(max_new_tokens=1, temperature=3.0, top_k=2, eos_token_ids=(2,), pad_token_id=2, num_samples=5)
    key = jax.random.key(3)
    rate = identical_sample_rate(model.params, model.config, tok, ids, mask, d, rng=key, batch_size=2)
    out = generate(model.params, ids, mask, dataclasses.replace(d, num_samples=2), config=model.config,
                   rng=key, batch_size=2)
    texts = [tok.decode(t[m.astype(bool)], skip_special_tokens=True).strip() for t, m in zip(out.tokens, out.mask)]
    want = np.mean([a == b for a, b in zip(texts[0::2], texts[1::2])])
    assert rate == pytest.approx(want) and 0.0 < want < 1.0


def test_response_shares_and_the_collapse_warning(caplog):
    """The final policy's distinct responses and its most common one (``eval/distinct_rate``,
    ``eval/top_response_share``), and the warning an evaluation gives when one text answers 10% of 20 or more
    test prompts (the mechanics grid's offline run on seed 2 answered 120 of 400 with one text)."""
    from bpo_jax.eval.win_rate import response_shares
    from bpo_jax.wiring.lifecycle import warn_if_collapsed

    texts = ["The text summarizes the text."] * 3 + [f"Town {i} opened a park." for i in range(17)]
    assert response_shares(texts) == (18 / 20, 3 / 20, "The text summarizes the text.")
    assert response_shares(["a", "b"]) == (1.0, 0.5, "a")  # a tie: the first seen
    warn_if_collapsed(32, texts)  # 3 of 20 = 15%
    assert "step 32: 15% of the 20 test prompts get the same greedy response ('The text summarizes the text.'; " \
           "90% of the responses are distinct texts)" in caplog.text
    caplog.clear()
    warn_if_collapsed(32, texts[2:])  # 1 of 18: 18 prompts are too few to tell
    warn_if_collapsed(32, ["The text summarizes the text."] + texts[3:] + ["x", "y"])  # 1 of 20: distinct
    assert caplog.text == ""
