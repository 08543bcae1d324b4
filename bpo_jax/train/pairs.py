"""From two sampled responses per prompt to preference pairs: drop identical pairs, order by the annotator.

Ties. Two responses with equal scores carry no preference. ``TIE_RULES``: ``drop`` (the default) drops such a
pair as an identical pair is dropped, and the collection samples on until the phase has its pairs; ``second``
labels the second sample chosen, exactly as the official code does (xu1998hz/BPO,
``train/online_dpo_rand_trainer.py`` ``ret_train_data``: ``if first_score > sec_score`` the first is chosen,
else the second). With a reward model ties are rare; with ROUGE-L they are common (0.0 when no word overlaps).

The output is the train step's batch layout (see ``bpo_jax.train.step``) as host NumPy arrays, carrying the
behavior LLM's untempered log-probs along with the pairs.
"""

from __future__ import annotations

import numpy as np

TIE_RULES = ("drop", "second")


def distinct(texts) -> np.ndarray:
    """``[B]`` bool: the two responses of prompt i (``texts[2i]``, ``texts[2i+1]``: decoded, stripped) differ.
    Compared as text, as the annotator sees them (the official code keeps the set of decoded responses,
    ``train/dpo_lora_trainer.py``): two token sequences that decode to the same text are the same response."""
    return np.asarray([a != b for a, b in zip(texts[0::2], texts[1::2])], bool)


def tied(scores) -> np.ndarray:
    """``[B]`` bool: the two responses of prompt i (``scores[2i]``, ``scores[2i+1]``) are scored equal."""
    scores = np.asarray(scores)
    return scores[0::2] == scores[1::2]


def build_pairs(prompt_ids, prompt_mask, tokens, mask, logprobs, scores, keep, eos_token_ids=()) -> dict:
    """Preference pairs for the prompts where ``keep`` is True.

    ``tokens``/``mask``/``logprobs`` are the sampler's ``[2B, N]`` outputs (rows 2i, 2i+1 = prompt i), ``scores``
    the annotator's ``[2B]`` scores; the higher-scored response is chosen, and on a tie the second sample (the
    official rule; pass ``keep & ~tied(scores)`` to drop ties instead).
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    tokens, mask, logprobs, scores = (np.asarray(x) for x in (tokens, mask, logprobs, scores))
    idx = np.flatnonzero(keep)
    first_wins = scores[0::2] > scores[1::2]
    chosen_row = np.where(first_wins, 0, 1)[idx] + 2 * idx
    rejected_row = np.where(first_wins, 1, 0)[idx] + 2 * idx
    seq_logps = (logprobs * mask).sum(axis=1).astype(np.float32)
    # Truncated: the response fills every column and its last token is not an EOS.
    truncated = ((mask[:, -1] == 1) & ~np.isin(tokens[:, -1], list(eos_token_ids))).astype(np.float32)

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
        "chosen_scores": scores[chosen_row].astype(np.float32),
        "rejected_scores": scores[rejected_row].astype(np.float32),
    }
