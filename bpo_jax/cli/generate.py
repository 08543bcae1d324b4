"""``python -m bpo_jax generate``: answer one prompt with a model, through its chat template."""

from __future__ import annotations

import argparse
import logging

import jax
import numpy as np

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax generate", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="shipped name, HF folder, .gguf file or Hub id org/name[@revision]")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    args = p.parse_args(argv)

    from bpo_jax.models import load_pretrained
    from bpo_jax.runtime import distributed, logs
    from bpo_jax.sample.sampler import Decoding, generate

    logs.setup(primary=distributed.is_primary())  # several processes each answer the same prompt on their own

    model, tok = load_pretrained(args.model)
    if tok is None:
        raise SystemExit(f"{args.model!r} has no tokenizer files; generate needs one")
    if args.no_chat_template or not getattr(tok, "chat_template", None):
        ids = tok(args.prompt).input_ids
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
    eos = model.config.eos_token_id
    eos = tuple(eos) if isinstance(eos, tuple) else ((eos,) if eos is not None else ())
    decoding = Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, eos_token_ids=eos, pad_token_id=model.config.pad_token_id or 0)
    out = generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int32), decoding, rng=jax.random.key(args.seed))
    n = int(np.asarray(out.mask)[0].sum())
    log.info(tok.decode(np.asarray(out.tokens)[0, :n], skip_special_tokens=True).strip())
    return 0
