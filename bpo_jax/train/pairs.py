"""From two sampled responses per prompt to preference pairs: drop identical pairs, order by the annotator.

Ties. Two responses with equal scores carry no preference. ``tied_pairs``: ``drop`` (the default) drops such a
pair as an identical pair is dropped, and the collection samples on until the phase has its pairs; ``second``
labels the second sample chosen, exactly as the official code does (xu1998hz/BPO,
``train/online_dpo_rand_trainer.py`` ``ret_train_data``: ``if first_score > sec_score`` the first is chosen,
else the second). With a reward model ties are rare; with ROUGE-L they are common (0.0 when no word overlaps).

Identical pairs. ``identical_pairs``: ``resample`` (the default) drops them from the phase, which samples more
prompts until it has K·B pairs; ``shrink`` keeps every prompt's row with a per-pair ``weight`` of 0 for a
dropped pair (identical, or tied under ``tied_pairs=drop``) and 1 otherwise, so each step trains on the pairs
kept among its own B prompts with the batch's shapes unchanged, as the official code's step trains on fewer pairs
(``online_dpo_rand_trainer.py``: ``inference`` keeps a prompt only ``if temp_ls[0] != temp_ls[1]``, line 720,
and the step's loss is the sum over the kept pairs divided by their number, lines 954 and 1366).

Response ends. ``response_eos``: ``sampled`` trains on the tokens as sampled (a truncated response has no EOS);
``append`` on responses that all end with an EOS, the sampler forcing one after a truncated response
(``sample.sampler.Decoding.append_eos``), as the official code appends ``eos_token_id`` to every decoded response
(``online_dpo_rand_trainer.py`` lines 699 and 328-332). Two differences, both kept on purpose: the tokens are
the sampled ones, not the decoded text tokenized again (so π_β's log-probs are those of what it sampled), and
the official ``tokenize_row`` cuts a response to max_length − max_prompt_length = max_new_tokens tokens when the
prompt fills max_prompt_length (line 352), dropping the appended EOS again there; here it always stays.

The output is the train step's batch layout (see ``bpo_jax.train.step``) as host NumPy arrays, carrying the
behavior LLM's untempered log-probs along with the pairs.
"""

from __future__ import annotations

import numpy as np

from bpo_jax.sample.sampler import cut_off


def tied(scores) -> np.ndarray:
    """``[B]`` bool: the two responses of prompt i (``scores[2i]``, ``scores[2i+1]``) are scored equal."""
    scores = np.asarray(scores)
    return scores[0::2] == scores[1::2]


def build_pairs(prompt_ids, prompt_mask, tokens, mask, logprobs, scores, keep, eos_token_ids=(), *,
                shrink: bool = False, eos_appended: bool = False) -> dict:
    """Preference pairs for the prompts where ``keep`` is True, or (``shrink``) for every prompt, weighted by
    ``keep``.

    ``tokens``/``mask``/``logprobs`` are the sampler's ``[2B, N]`` outputs (rows 2i, 2i+1 = prompt i), ``scores``
    the annotator's ``[2B]`` scores; the higher-scored response is chosen, and on a tie the second sample (the
    official rule; pass ``keep & ~tied(scores)`` to drop ties instead). ``weight`` is 1 for a kept pair and 0 for
    a row that only holds a place (``shrink``). ``truncated``: the fraction of the pair's two responses that
    reached the sampler's limit without an EOS; ``eos_appended``: the sampler appended one to each of those
    (``Decoding.append_eos``), so a response is truncated when it fills the extra last column.
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    tokens, mask, logprobs, scores = (np.asarray(x) for x in (tokens, mask, logprobs, scores))
    keep = np.asarray(keep, bool)
    idx = np.arange(len(keep)) if shrink else np.flatnonzero(keep)
    first_wins = scores[0::2] > scores[1::2]
    chosen_row = np.where(first_wins, 0, 1)[idx] + 2 * idx
    rejected_row = np.where(first_wins, 1, 0)[idx] + 2 * idx
    seq_logps = (logprobs * mask).sum(axis=1).astype(np.float32)
    truncated = cut_off(tokens, mask, eos_token_ids, eos_appended=eos_appended).astype(np.float32)

    def seq(rows):
        ids = np.concatenate([prompt_ids[idx], tokens[rows]], axis=1).astype(np.int32)
        m = np.concatenate([prompt_mask[idx], mask[rows]], axis=1).astype(np.int32)
        return ids, m

    chosen_ids, chosen_mask = seq(chosen_row)
    rejected_ids, rejected_mask = seq(rejected_row)
    return {
        "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
        "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
        "chosen_behavior_logps": seq_logps[chosen_row], "rejected_behavior_logps": seq_logps[rejected_row],
        "truncated": 0.5 * (truncated[chosen_row] + truncated[rejected_row]),
        "weight": keep[idx].astype(np.float32),
        "chosen_scores": scores[chosen_row].astype(np.float32),
        "rejected_scores": scores[rejected_row].astype(np.float32),
    }
