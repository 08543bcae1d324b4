"""Online generation with a KV cache: a jitted prefill, a jitted ``while_loop`` decode, a donated cache.

``generate`` is what BPO's annotation phase calls: the behavior LLM draws ``num_samples`` responses per prompt,
and the *untempered* log-prob of every sampled token comes back with them, so the trainer can use them as the
behavior reference log-probs without a second forward pass. Each prompt is prefilled once; its keys and values
are copied into the cache rows of its ``num_samples`` samples (BPO's two samples per prompt halve the prefill).

Shapes are bucketed (prompt length up to a multiple of ``prompt_bucket``, prompts up to a power of two times
the number of batch-sharding devices), so a run compiles once per bucket rather than once per batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpo_jax.models import decoder, lora
from bpo_jax.runtime import distributed
from bpo_jax.runtime import sharding as shd
from bpo_jax.sample.ops import sample_step

Array = jax.Array
log = logging.getLogger(__name__)


# Sampling layout (as Tunix does): weights replicated over data/fsdp and split only over ``tensor``, so a decode
# step never all-gathers FSDP shards; use when the weights fit per tensor-parallel group.
SAMPLING_RULES = tuple((name, None if axis == "fsdp" else axis) for name, axis in shd.DEFAULT_RULES)


def sampling_shardings(config, mesh, rules=SAMPLING_RULES, params=None):
    """``NamedSharding`` pytree placing a params pytree in the sampling layout; pass it to ``generate`` as
    ``param_shardings`` (the move is device to device, no host round trip). ``params``: the (stacked) params
    to place, when they carry activation-space LoRA factors (``layers["<target>_lora"]``, e.g.
    ``state.behavior_params``): the factors get their own axes (``lora.attached_axes``; shapes from
    ``params``)."""
    axes, shapes = decoder.param_axes(config), decoder.param_shapes(config)
    extra = {} if params is None else lora.attached_axes(axes["layers"], params["layers"])
    if extra:
        axes = {**axes, "layers": {**axes["layers"], **extra}}
        shapes = {**shapes, "layers": {**shapes["layers"], **{k: jax.tree.map(jnp.shape, params["layers"][k])
                                                               for k in extra}}}
    return shd.logical_to_sharding(axes, shapes, mesh, rules)


SAMPLING_LAYOUTS = ("auto", "train", "replicated")
# auto: the sampling copy and, while it is unstacked, its layers again may take up to this share of the device
# memory still free when a phase starts (the rest: the KV cache, the prefill, the annotator's forward)
SAMPLING_MEMORY_FRACTION = 0.8


def device_memory_bytes() -> int:
    """This host's per-device memory: the first local device's ``bytes_limit`` (TPU, GPU); where a device
    reports none (CPU), the host's physical memory split evenly over its local devices (they share it)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def free_device_memory_bytes() -> int:
    """This host's free per-device memory now: the first local device's ``bytes_limit − bytes_in_use`` (TPU,
    GPU); where a device reports none (CPU), ``device_memory_bytes``."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats and "bytes_in_use" in stats:
        return int(stats["bytes_limit"]) - int(stats["bytes_in_use"])
    return device_memory_bytes()


def bytes_per_device(params, shardings) -> int:
    """The bytes one device holds of ``params`` placed by ``shardings`` (its largest shard of each leaf)."""
    def one(x, s):
        return int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize

    return sum(jax.tree.leaves(jax.tree.map(one, params, shardings)))


def choose_layout(layout: str, need: int, free_bytes: int) -> str:
    """``train`` or ``replicated``: ``layout`` itself unless ``auto``, which takes the sampling layout when its
    copy (``need`` bytes per device) and, while the sampler unstacks it, its layers again, 2 × ``need``, fit
    ``SAMPLING_MEMORY_FRACTION`` of the ``free_bytes`` a device has beside the run's state."""
    if layout not in SAMPLING_LAYOUTS:
        raise ValueError(f"sampling_layout={layout!r}; valid: {', '.join(SAMPLING_LAYOUTS)}")
    if layout != "auto":
        return layout
    return "replicated" if 2 * need <= SAMPLING_MEMORY_FRACTION * free_bytes else "train"


def for_sampling(config, params, mesh, layout: str = "auto"):
    """π_β's (stacked) ``params`` placed for ``generate``, once per phase or evaluation: in the sampling layout
    (``sampling_shardings``: replicated over the batch axes, split over ``tensor``; moved device to device), so
    the decode loop runs without collectives, or as they are (the training layout, where XLA moves sharded
    activations at every layer of every token; also params already unstacked, or no mesh). ``layout``:
    ``SAMPLING_LAYOUTS``; ``auto`` decides with ``choose_layout`` from the sampling copy's bytes per device and
    the smallest ``free_device_memory_bytes`` over the hosts (a collective: every host calls it and takes the
    same decision), and logs one line when it keeps the training layout."""
    if layout not in SAMPLING_LAYOUTS:
        raise ValueError(f"sampling_layout={layout!r}; valid: {', '.join(SAMPLING_LAYOUTS)}")
    if mesh is None or layout == "train" or isinstance(params["layers"], (tuple, list)):  # unstacked: as they are
        return params
    shardings = sampling_shardings(config, mesh, params=params)
    if layout == "auto":
        need, free = bytes_per_device(params, shardings), distributed.min_over_hosts(free_device_memory_bytes())
        if choose_layout(layout, need, free) == "train":
            log.info(f"sampling in the training layout: the sampling layout's copy, {need / 2**30:.2f} GiB per "
                     f"device, twice while it is unstacked, is over {SAMPLING_MEMORY_FRACTION:.0%} of the "
                     f"{free / 2**30:.1f} GiB free (sampling_layout=auto)")
            return params
    return shd.shard(params, shardings)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What ``generate`` draws for each prompt, checked when built; hashable, so the jitted prefill and decode
    take it whole as their one static argument (a new value compiles anew, the same value never does).

    ``max_new_tokens``: sampled tokens per response at most. ``temperature``: 0.0 is greedy. ``top_k``: 0 is
    off. ``top_p``: 1.0 is off. ``num_samples``: responses per prompt (BPO draws 2). ``eos_token_ids``: tokens that
    end a response (the EOS itself is kept, with mask 1). ``pad_token_id``: what fills a response after its EOS.

    ``append_eos``: the buffers get one more column (``width`` = max_new_tokens + 1), and a response still
    without an EOS after max_new_tokens sampled tokens (a truncated one) gets ``eos_token_ids[0]`` forced there,
    so every response ends with an EOS (``response_eos=append``). The forced EOS's ``logprobs`` entry is its
    untempered log-prob under the logits one more decode step computes for that column (one token's forward,
    not a second pass over the sequence), as for every sampled token: what a full forward gives it up to the
    cached decode's rounding. Its
    ``sampling_logprobs`` entry is 0 (it was not drawn). A response that ended by itself is left as it is.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    append_eos: bool = False

    @property
    def width(self) -> int:
        """Columns of the response buffers: ``max_new_tokens``, plus one for an appended EOS."""
        return self.max_new_tokens + int(self.append_eos)

    def __post_init__(self):
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.append_eos and not self.eos_token_ids:
            raise ValueError("append_eos needs an EOS token id (eos_token_ids is empty)")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ValueError(f"max_new_tokens and num_samples must be >= 1; got {self.max_new_tokens}, "
                             f"{self.num_samples}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")


class SampleOutput(NamedTuple):
    """Responses ``[B·n, decoding.width]`` as NumPy; row ``i·n + j`` is prompt i's j-th sample (with several
    processes, of this host's prompts).

    ``mask`` is 1 for response tokens up to and including the first EOS and 0 after it (those positions hold
    ``pad_token_id``). ``logprobs`` are the untempered model log-probs ``log softmax(logits)[token]``;
    ``sampling_logprobs`` are under the distribution actually sampled from (temperature, top-k, top-p). Both are
    0 where ``mask`` is 0.
    """

    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray

    def texts(self, tokenizer) -> list[str]:
        """Each row's response as the annotator reads it: its tokens up to the EOS decoded without special
        tokens, stripped (two rows with the same text are the same response)."""
        return [tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True).strip()
                for t, m in zip(self.tokens, self.mask)]


def cut_off(tokens, mask, eos_token_ids=(), *, eos_appended: bool = False) -> np.ndarray:
    """``[B]`` bool: the responses ``tokens``/``mask`` (``SampleOutput``'s) that reached the token limit without
    ending: they fill every column and the last is not an EOS; with ``eos_appended`` (``Decoding.append_eos``,
    which ends such a response with a forced EOS in an extra column) every response that fills that column."""
    filled = np.asarray(mask)[:, -1] == 1
    return filled if eos_appended else filled & ~np.isin(np.asarray(tokens)[:, -1], list(eos_token_ids))


def distinct(texts) -> np.ndarray:
    """``[B]`` bool: the two responses of prompt i (``texts[2i]``, ``texts[2i+1]``: decoded, stripped) differ.
    Compared as text (``SampleOutput.texts``), as the annotator sees them (the official code keeps the set of
    decoded responses, ``train/dpo_lora_trainer.py``): two token sequences that decode to the same text are the
    same response. The online loop drops such pairs; ``eval.diversity`` counts them."""
    return np.asarray([a != b for a, b in zip(texts[0::2], texts[1::2])], bool)


class _DecodeState(NamedTuple):
    step: Array  # index of the last written column
    last: Array  # [R] last sampled token
    positions: Array  # [R] position id of ``last``
    done: Array  # [R] an EOS has been written
    tokens: Array  # [R, N]
    mask: Array  # [R, N]
    logprobs: Array  # [R, N]
    sampling_logprobs: Array  # [R, N]
    cache: Any
    key: Array


def _write(state: _DecodeState, step, logits, d: Decoding) -> _DecodeState:
    """Sample column ``step`` from ``logits [R, V]`` and write it (padding rows that are already done; with
    ``append_eos``, the EOS forced in the last column)."""
    tok, lp, slp = sample_step(jax.random.fold_in(state.key, step), logits, temperature=d.temperature, top_k=d.top_k,
                               top_p=d.top_p)
    if d.append_eos:
        eos, forced = d.eos_token_ids[0], step == d.max_new_tokens
        tok = jnp.where(forced, eos, tok)
        lp = jnp.where(forced, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, eos], lp)
        slp = jnp.where(forced, 0.0, slp)
    alive = ~state.done
    tok = jnp.where(alive, tok, d.pad_token_id)
    col = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None].astype(buf.dtype), step, axis=1)  # noqa: E731
    return state._replace(
        step=step,
        last=tok,
        done=state.done | (alive & jnp.isin(tok, jnp.asarray(d.eos_token_ids, jnp.int32))),
        tokens=col(state.tokens, tok),
        mask=col(state.mask, alive),
        logprobs=col(state.logprobs, jnp.where(alive, lp, 0.0)),
        sampling_logprobs=col(state.sampling_logprobs, jnp.where(alive, slp, 0.0)),
    )


@partial(jax.jit, static_argnames=("config", "decoding"), donate_argnames=("cache",))
def _prefill(config, params, prompt_ids, prompt_mask, cache, key, *, decoding: Decoding) -> _DecodeState:
    """Run each prompt through the model once, copy its keys/values into the rows of its ``num_samples``
    samples in ``cache``, and sample every row's first response token."""
    num_samples, pad_id = decoding.num_samples, decoding.pad_token_id
    rows, plen, width = prompt_ids.shape[0] * num_samples, prompt_ids.shape[1], decoding.width
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, prompt_cache = decoder.forward(
        config, params, prompt_ids, positions=positions, attention_mask=prompt_mask,
        cache=decoder.init_cache(config, prompt_ids.shape[0], plen, cache["k"][0].dtype, per_layer=True),
        cache_index=0, last_only=True,
    )
    per_row = lambda x: jnp.repeat(x, num_samples, axis=0)  # noqa: E731  prompt i -> rows i·n … i·n+n−1
    into = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, per_row(part), 0, axis=1)  # noqa: E731
    cache = {"k": tuple(map(into, cache["k"], prompt_cache["k"])),
             "v": tuple(map(into, cache["v"], prompt_cache["v"])),
             "valid": into(cache["valid"], prompt_cache["valid"])}
    zeros = jnp.zeros((rows, width), jnp.float32)
    state = _DecodeState(
        step=jnp.int32(0), last=jnp.zeros((rows,), jnp.int32), positions=per_row(positions[:, -1]),
        done=jnp.zeros((rows,), bool), tokens=jnp.full((rows, width), pad_id, jnp.int32),
        mask=jnp.zeros((rows, width), jnp.int32), logprobs=zeros, sampling_logprobs=zeros,
        cache=cache, key=key,
    )
    return _write(state, jnp.int32(0), per_row(logits[:, -1]), decoding)


@partial(jax.jit, static_argnames=("config", "prompt_len", "decoding"), donate_argnames=("state",))
def _decode(config, params, state: _DecodeState, *, prompt_len, decoding: Decoding) -> _DecodeState:
    """Decode one token at a time until every row has written an EOS or the buffers are full. The cache holds
    the prompt and max_new_tokens positions: the last column's token (an appended EOS too) is never fed back."""
    width = state.tokens.shape[1]

    def cond(s: _DecodeState):
        return (s.step + 1 < width) & ~jnp.all(s.done)

    def body(s: _DecodeState):
        positions = s.positions + 1
        logits, cache = decoder.forward(
            config, params, s.last[:, None], positions=positions[:, None],
            attention_mask=jnp.ones_like(s.last[:, None]), cache=s.cache, cache_index=prompt_len + s.step,
        )
        s = s._replace(positions=positions, cache=cache)
        return _write(s, s.step + 1, logits[:, 0], decoding)

    return jax.lax.while_loop(cond, body, state)


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rows_bucket(rows: int, min_rows: int) -> int:
    r = max(1, min_rows)
    while r < rows:
        r *= 2
    return r


def generate(
    model_or_params,
    prompt_ids,
    prompt_mask,
    decoding: Decoding,
    *,
    rng: Array | None = None,
    config=None,
    mesh: jax.sharding.Mesh | None = None,
    param_shardings=None,
    batch_size: int | None = None,
    prompt_bucket: int = 32,
    progress: bool = False,
    interrupt=None,
) -> SampleOutput:
    """Sample ``decoding.num_samples`` responses for each left-padded prompt ``prompt_ids [B, P]`` / ``prompt_mask``.

    Args:
      model_or_params: a loaded model (anything with ``.config`` and ``.params``), or a params pytree with
        ``config=`` given — e.g. the train state's behavior params, or a LoRA-merged view of them. Params
        already in the ``decoder.unstack_layers`` layout are used as they are (callers that sample many
        batches with the same weights unstack once).
      decoding: what to draw (``Decoding``: new tokens, temperature, top-k/top-p, samples per prompt, EOS, pad).
      rng: a ``jax.random.key``; the same key gives the same samples, on any mesh.
      mesh: shard rows over its ``data``/``fsdp`` axes (the params keep their own placement unless
        ``param_shardings`` is given, e.g. ``sampling_shardings(config, mesh)``).
      batch_size: prompts per compiled call; several calls (with a tqdm bar if ``progress``) cover B.
      prompt_bucket: prompt lengths are left-padded up to a multiple of it (one compilation per bucket).
      interrupt: called before each call (e.g. ``loop.Preemption.check``: it raises to stop a long run of
        calls; with several processes every host calls it at the same points).

    With several processes (``bpo_jax.runtime.distributed``) every host calls ``generate`` with the same shapes and its
    own prompt rows; the sampling runs on the global mesh and each host gets its own rows' samples back. Each
    host pads its rows to the same bucket, so a prompt's samples stay on the devices of the host that owns it.

    The decode loop runs over ``decoder.unstack_layers(params)``: for stacked params, one extra copy of the
    weights (each keeping its sharding) while ``generate`` runs. ``param_shardings`` applies to stacked params.

    The returned ``logprobs`` are the untempered log-probs of the sampled tokens. They equal the log-probs a
    full forward pass over prompt + response gives, with the same params and dtype, up to float rounding: the
    cached path sums attention in a different order (≈1e-5 in float32; expect ≈1e-2 in bfloat16).
    """
    if config is None:
        config, params = model_or_params.config, model_or_params.params
    else:
        params = model_or_params
    if param_shardings is not None:
        params = shd.shard(params, param_shardings)
    if not isinstance(params["layers"], (tuple, list)):
        params = decoder.unstack_layers(params)  # the decode loop's layout: no per-step slicing of stacked weights
    prompt_ids, prompt_mask = _checked_prompts(prompt_ids, prompt_mask)
    rng = jax.random.key(0) if rng is None else rng
    b = prompt_ids.shape[0]
    batch_size = b if batch_size is None else batch_size
    starts = range(0, b, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    outs = []
    for s in starts:
        if interrupt is not None:
            interrupt()
        outs.append(_generate_batch(config, params, prompt_ids[s : s + batch_size], prompt_mask[s : s + batch_size],
                                    jax.random.fold_in(rng, s), decoding, mesh=mesh, prompt_bucket=prompt_bucket))
    return SampleOutput(*(np.concatenate(parts, axis=0) for parts in zip(*outs)))


def _checked_prompts(prompt_ids, prompt_mask) -> tuple[np.ndarray, np.ndarray]:
    prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P]; got {prompt_ids.shape} and "
                         f"{prompt_mask.shape}")
    if prompt_mask.size and np.any(np.diff(prompt_mask, axis=1) < 0):
        raise ValueError("prompts must be left-padded: prompt_mask must be 0…0 1…1 in every row")
    if np.any(prompt_mask.sum(axis=1) == 0):
        raise ValueError("every prompt needs at least one token (a row of prompt_mask is all 0)")
    return prompt_ids, prompt_mask


def _generate_batch(config, params, prompt_ids, prompt_mask, key, decoding: Decoding, *, mesh, prompt_bucket):
    prompts = prompt_ids.shape[0]
    # Bucket: left-pad the prompt length, add all-padding prompts (a single dummy token keeps them well-defined)
    # up to a power of two times this host's batch shards, so the n·prompts sample rows split evenly over the
    # mesh too (each host pads its own rows, so its prompts' samples stay on its devices).
    plen = _bucket(prompt_ids.shape[1], prompt_bucket)
    bprompts = _rows_bucket(prompts, distributed.local_batch_shards(mesh))
    ids = np.pad(prompt_ids, ((0, bprompts - prompts), (plen - prompt_ids.shape[1], 0)))
    mask = np.pad(prompt_mask, ((0, bprompts - prompts), (plen - prompt_mask.shape[1], 0)))
    mask[prompts:, -1] = 1
    ids_d, mask_d = distributed.global_rows((ids, mask), mesh)
    cache = decoder.init_cache(config, ids_d.shape[0] * decoding.num_samples, plen + decoding.max_new_tokens,
                               mesh=mesh, per_layer=True)
    state = _prefill(config, params, ids_d, mask_d, cache, key, decoding=decoding)
    state = _decode(config, params, state, prompt_len=plen, decoding=decoding)
    rows = prompts * decoding.num_samples
    local = distributed.local_rows((state.tokens, state.mask, state.logprobs, state.sampling_logprobs), mesh)
    return tuple(x[:rows] for x in local)
