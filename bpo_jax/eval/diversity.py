"""The identical-sample rate of a model: the fraction of prompts whose two responses, sampled as an online run's
behavior LLM samples them, are the same text.

An online DAP run's pairs are two such samples per prompt, and a pair of identical responses carries no
preference: it is dropped (``identical_pairs=resample`` samples more prompts) or weighted 0
(``identical_pairs=shrink``, the official code's rule). So this rate, measured on the model a run starts from,
is the share of its first phase's prompts that give no pair. A model fine-tuned until it copies its references
(a held-out loss near 0 on a task whose references are a function of the prompt) samples the same response
nearly every time, and an online run from it trains on almost nothing. ``sft`` reports the rate for each seed.

Responses are compared as the online loop compares them (``sampler.distinct``). With several
processes the prompts are split across hosts (each samples its slice, padded to one size by repeating its last
prompt, the padding not counted) and the counts are summed, so every host gets the same rate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bpo_jax.models.decoder import unstack_layers
from bpo_jax.runtime import distributed
from bpo_jax.sample.sampler import Decoding, distinct, for_sampling, generate


def identical_sample_rate(params, config, tokenizer, prompt_ids, prompt_mask, decoding: Decoding, *, rng,
                          mesh=None, batch_size: int = 16, sampling_layout: str = "auto") -> float:
    """The fraction of the left-padded prompts ``prompt_ids [n, P]`` whose two responses sampled with
    ``decoding`` (its ``num_samples`` is taken as 2) and the key ``rng`` decode to the same text; the same value
    on every host. ``sampling_layout``: where ``params`` sit while they decode (``sampler.for_sampling``)."""
    n, hosts, me = len(prompt_ids), distributed.process_count(), distributed.process_index()
    if n == 0:
        raise ValueError("identical_sample_rate needs at least one prompt")
    two = dataclasses.replace(decoding, num_samples=2)
    per_host = -(-n // hosts)
    idx = np.minimum(np.arange(me * per_host, (me + 1) * per_host), n - 1)
    real = np.arange(me * per_host, (me + 1) * per_host) < n
    sampling = unstack_layers(for_sampling(config, params, mesh, sampling_layout))
    out = generate(sampling, np.asarray(prompt_ids)[idx], np.asarray(prompt_mask)[idx], two,
                   config=config, rng=rng, mesh=mesh, batch_size=batch_size)
    same = ~distinct(out.texts(tokenizer)) & real
    return float(distributed.all_gather(np.int64(same.sum())).sum() / n)

