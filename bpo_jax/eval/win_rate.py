"""Win rate against references: greedy responses scored by the annotator against the references' scores.

As the paper counts it, a prompt is won only when the annotator scores the policy's greedy response strictly
above the human reference: a tie is a loss (official code, ``eval/benchmark_llm_reward.py``:
``if summ_score[0] > ref_score[0]: count += 1``). The tie rate and the ties-as-half win rate are reported beside
it (ties are rare with a reward model, common with ROUGE). The 95% interval is a percentile bootstrap over
prompts; when the test rows carry a ``group`` (minisum's templates), a second interval resamples whole groups
(``stats.paired_bootstrap``'s cluster bootstrap): where a policy wins or loses a group together, the prompt
interval is far too narrow and the group one is the one to read.

With several processes the test set is split across hosts (each decodes and scores its slice, padded to one
size by repeating the last prompt) and the scores and responses are gathered, so every host computes the same
win rate.

Drift from the SFT model (``reference_params``): the mean over test prompts of the policy's greedy response's
log-ratio ``Σ_t log π_θ(y_t | x, y_<t) − log π_SFT(y_t | x, y_<t)``. π_θ's log-probs are the sampler's own
(untempered), π_SFT's come from one forward over ``[prompt | response]``. It is 0 for the SFT model itself and
grows as the policy moves away; with responses sampled from π_θ its mean would estimate KL(π_θ‖π_SFT); on the
greedy (modal) response it is a drift measure of the same kind, not an unbiased KL estimate.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import partial
from typing import NamedTuple

import jax
import numpy as np

from bpo_jax.eval.stats import paired_bootstrap
from bpo_jax.logprobs import chunked_token_logprobs, reduce_masked
from bpo_jax.models.decoder import hidden_states, logits_from_hidden, unstack_layers
from bpo_jax.runtime import distributed
from bpo_jax.sample.sampler import Decoding, cut_off, for_sampling, generate


class WinRate(NamedTuple):
    win_rate: float  # strict wins (the paper's rule)
    ci_low: float
    ci_high: float
    mean_score: float
    mean_reference_score: float
    n: int
    tie_rate: float
    win_rate_ties_half: float
    ci_groups_low: float | None = None  # the 95% CI resampling whole groups of prompts, when the test set has them
    ci_groups_high: float | None = None
    n_groups: int | None = None

    def metrics(self) -> dict:
        """The ``eval/...`` record of ``metrics.jsonl`` (the group fields only when the test set has groups)."""
        return {f"eval/{k}": v for k, v in self._asdict().items() if v is not None}

    def describe(self) -> str:
        groups = ("" if self.n_groups is None else
                  f"; resampling its {self.n_groups} groups whole: {100 * self.ci_groups_low:.1f}–"
                  f"{100 * self.ci_groups_high:.1f}")
        return (f"win rate vs human references {100 * self.win_rate:.1f}% (95% CI {100 * self.ci_low:.1f}–"
                f"{100 * self.ci_high:.1f}, n={self.n}{groups}; ties {100 * self.tie_rate:.1f}% count as losses, "
                f"as in the paper; ties as half: {100 * self.win_rate_ties_half:.1f}%)")


def win_rate_from_scores(scores, reference_scores, *, groups=None, num_bootstrap: int = 1000,
                         seed: int = 0) -> WinRate:
    """Strict win rate (ties lose) with a percentile-bootstrap 95% CI over prompts, plus the tie rate.
    ``groups`` (one label per prompt): also the 95% CI that draws whole groups with replacement."""
    s, r = np.asarray(scores, np.float64), np.asarray(reference_scores, np.float64)
    if s.shape != r.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(f"need two equal-length 1-D score arrays, got {s.shape} and {r.shape}")
    wins, ties = (s > r).astype(np.float64), (s == r).astype(np.float64)
    boot = np.random.default_rng(seed).choice(wins, size=(num_bootstrap, wins.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    wr = WinRate(float(wins.mean()), float(lo), float(hi), float(s.mean()), float(r.mean()), int(s.size),
                 float(ties.mean()), float(wins.mean() + 0.5 * ties.mean()))
    if groups is None:
        return wr
    g = paired_bootstrap(wins, np.zeros_like(wins), groups=groups, num_bootstrap=num_bootstrap, seed=seed)
    return wr._replace(ci_groups_low=g.ci_low, ci_groups_high=g.ci_high, n_groups=g.n_groups)


def score_against_references(annotator, prompts, responses, references) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, reference_scores)``: the annotator's own comparison when it has one (a pairwise judge's
    ``win_scores``), else its scores of the responses and of the references."""
    if hasattr(annotator, "win_scores"):
        return annotator.win_scores(prompts, responses, references)
    return annotator(prompts, responses), annotator(prompts, references)


def greedy_responses(params, config, tokenizer, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_token_ids,
                     batch_size: int = 16, mesh=None, samples: bool = False):
    """Greedy-decoded response texts, one per prompt (and the sampler's output, when ``samples``)."""
    greedy = Decoding(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos_token_ids,
                      pad_token_id=config.pad_token_id or 0)
    out = generate(params, prompt_ids, prompt_mask, greedy, config=config, batch_size=batch_size, mesh=mesh)
    texts = out.texts(tokenizer)
    return (texts, out) if samples else texts


@partial(jax.jit, static_argnames=("config", "prompt_len"))
def _response_logps(config, params, ids, mask, *, prompt_len: int):
    """``[B]`` summed log-probs of the response part of rows ``[prompt | response]`` (position P − 1 + j predicts
    response token j), unembedded 16 positions at a time."""
    h, _ = hidden_states(config, params, ids, attention_mask=mask)
    lp = chunked_token_logprobs(partial(logits_from_hidden, config), params, h[:, prompt_len - 1 : -1],
                                ids[:, prompt_len:], 16)
    return reduce_masked(lp, mask[:, prompt_len:]).sum


def response_logps(config, params, prompt_ids, prompt_mask, tokens, mask, *, mesh=None) -> np.ndarray:
    """This host's ``[B]`` summed log-probs of ``tokens``/``mask`` (responses) after the left-padded prompts, under
    ``params``. With several processes every host calls it with the same row count (its own rows)."""
    ids = np.concatenate([prompt_ids, tokens], axis=1).astype(np.int32)
    m = np.concatenate([prompt_mask, mask], axis=1).astype(np.int32)
    rows = ids.shape[0]
    shards = distributed.local_batch_shards(mesh)
    pad = -rows % shards  # rows split evenly over this host's batch shards
    ids, m = np.pad(ids, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
    m[rows:, 0] = 1  # padding rows: one dummy token keeps them well-defined
    ids_d, m_d = distributed.global_rows((ids, m), mesh)
    out = _response_logps(config, params, ids_d, m_d, prompt_len=prompt_ids.shape[1])
    return np.asarray(distributed.local_rows(out, mesh))[:rows]


class TestSetScores(NamedTuple):
    responses: list  # the policy's greedy response per test prompt
    scores: np.ndarray  # [n] the annotator's score of each response ...
    reference_scores: np.ndarray  # ... and of each human reference (or a pairwise judge's equivalent)
    logratio_sft: np.ndarray | None = None  # [n] log π_θ − log π_SFT of each response (``reference_params``)
    truncated: np.ndarray | None = None  # [n] 1.0 where the response reached max_new_tokens without an EOS

    def response_metrics(self) -> dict:
        """``eval/truncation_rate`` (the share of responses cut off at max_new_tokens: a policy that learned to
        write longer than the limit), ``eval/distinct_rate`` and ``eval/top_response_share``
        (``response_shares``: a policy collapsing onto a few texts) and, when measured, ``eval/sft_logratio``
        (its mean)."""
        out = {} if self.truncated is None else {"eval/truncation_rate": float(np.mean(self.truncated))}
        distinct, top, _ = response_shares(self.responses)
        out.update({"eval/distinct_rate": distinct, "eval/top_response_share": top})
        if self.logratio_sft is not None:
            out["eval/sft_logratio"] = float(self.logratio_sft.mean())
        return out


def response_shares(texts) -> tuple[float, float, str]:
    """``(distinct, top, most common)``: distinct texts per response (1: no two prompts get the same text), the
    share of responses that are the most common text, and that text. A policy that answers many different
    prompts with one text (e.g. one describing the instruction) has collapsed, whatever its score."""
    counts = Counter(texts)
    text, n = counts.most_common(1)[0]
    return len(counts) / len(texts), n / len(texts), text


def score_test_set(params, config, tokenizer, annotator, prompts, prompt_ids, prompt_mask, references, *,
                   max_new_tokens: int, eos_token_ids, mesh=None, batch_size: int = 16,
                   interrupt=None, reference_params=None, sampling_layout: str = "auto") -> TestSetScores:
    """Greedy responses to every test prompt, scored with the references; the same result on every host.
    ``interrupt()`` runs before each batch of ``batch_size`` prompts (decoded, then scored; a preemption check).
    ``reference_params`` (the SFT model): also each response's log-ratio to it (the module's drift measure).
    ``sampling_layout``: where the (stacked) ``params`` sit while they decode (``sampler.for_sampling``: moved
    and unstacked once for the whole test set)."""
    n, hosts, me = len(prompts), distributed.process_count(), distributed.process_index()
    sampling = unstack_layers(for_sampling(config, params, mesh, sampling_layout))
    per_host = -(-n // hosts)
    mine = np.minimum(np.arange(me * per_host, (me + 1) * per_host), n - 1)  # pad: repeat the last prompt
    responses, s, r, drift, cut = [], [], [], [], []
    for start in range(0, per_host, batch_size):  # decode and score a batch at a time: a preemption stops between
        if interrupt is not None:
            interrupt()
        idx = mine[start:start + batch_size]
        ids, pmask = np.asarray(prompt_ids)[idx], np.asarray(prompt_mask)[idx]
        texts, out = greedy_responses(sampling, config, tokenizer, ids, pmask, max_new_tokens=max_new_tokens,
                                      eos_token_ids=eos_token_ids, mesh=mesh, batch_size=batch_size, samples=True)
        scores, refs = score_against_references(annotator, [prompts[j] for j in idx], texts,
                                                [references[j] for j in idx])
        if reference_params is not None:
            sft = response_logps(config, reference_params, ids, pmask, out.tokens, out.mask, mesh=mesh)
            drift.append((out.logprobs * out.mask).sum(axis=1) - sft)
        responses += texts
        cut.append(cut_off(out.tokens, out.mask, eos_token_ids))
        s.append(np.asarray(scores, np.float64))
        r.append(np.asarray(refs, np.float64))
    gather = lambda parts: distributed.all_gather(np.concatenate(parts).astype(np.float64)).reshape(-1)[:n]  # noqa: E731
    if hosts > 1:
        responses = [t for host in distributed.gather_json(responses) for t in host]
    return TestSetScores(responses[:n], gather(s), gather(r), gather(drift) if drift else None, gather(cut))


def scores_file(run_dir: str, step: int, data: str):
    """``<run_dir>/eval_step<N>_<data>.jsonl``: one test prompt per line, with the response, the reference and both
    scores (written by ``train`` at its final evaluation and by ``evaluate``)."""
    from bpo_jax.runtime import run_dir as rd

    return rd.path(run_dir, f"eval_step{step}_{os.path.basename(os.path.normpath(data))}.jsonl")


def write_scores(path, prompts, references, result: TestSetScores) -> None:
    """Write ``scores_file`` (primary host only)."""
    if distributed.is_primary():
        drift = result.logratio_sft if result.logratio_sft is not None else [None] * len(prompts)
        cut = result.truncated if result.truncated is not None else [None] * len(prompts)
        path.write_text("".join(
            json.dumps({"prompt": p, "response": resp, "reference": ref, "score": float(s),
                        "reference_score": float(r), **({} if d is None else {"sft_logratio": float(d)}),
                        **({} if c is None else {"truncated": bool(c)})}) + "\n"
            for p, resp, ref, s, r, d, c in zip(prompts, result.responses, references, result.scores,
                                                result.reference_scores, drift, cut)))


def score_task(cfg, run, params, *, interrupt=None, reference_params=None) -> tuple[TestSetScores, WinRate]:
    """``score_test_set`` on a run's test set (``bpo_jax.wiring.tasks.Run``) with the config's evaluation settings,
    and its win rate: what ``train`` and ``evaluate`` both report."""
    task = run.task
    result = score_test_set(params, run.model.config, run.tokenizer, task.eval_annotator, task.eval_prompts,
                            task.eval_ids, task.eval_mask, task.references, max_new_tokens=cfg.eval_max_new_tokens,
                            eos_token_ids=run.eos_token_ids, mesh=run.mesh, batch_size=cfg.eval_batch_size,
                            interrupt=interrupt, reference_params=reference_params,
                            sampling_layout=cfg.sampling_layout)
    return result, win_rate_from_scores(result.scores, result.reference_scores, groups=task.eval_groups)
