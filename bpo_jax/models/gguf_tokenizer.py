"""A ``transformers`` fast tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata, without torch.

transformers' own GGUF path (``AutoTokenizer.from_pretrained(..., gguf_file=...)``) imports torch, which the
runtime does not install. A byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``: SmolLM2, GPT-2-style
vocabularies) is fully described by the metadata, so it is rebuilt here with the ``tokenizers`` library:

- the BPE model from ``tokens`` (the ids) and ``merges``;
- the pre-tokenizer from ``pre``: GPT-2's byte-level split for ``default``/``gpt2``/``smollm``, Llama 3's split
  for ``llama-bpe``/``llama3``; any other pre-tokenizer is refused, since a wrong split silently changes ids;
- tokens of type CONTROL (3) become special tokens, USER_DEFINED (4) plain added tokens, so both stay whole;
- ``bos``/``eos``/``unk``/``pad`` from their ``*_token_id`` fields and the chat template from
  ``tokenizer.chat_template``.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ("default", "gpt2", "smollm")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (the alphabet byte-level BPE tokens are spelled in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str, add_prefix_space: bool):
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space,
                                                                 use_regex=False)])
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(_GPT2_PRE + _LLAMA3_PRE)}); "
                     f"convert the model to an HF folder with its tokenizer.json instead")


def tokenizer_from_gguf(field):
    """The file's tokenizer as a ``PreTrainedTokenizerFast``; ``field(key, default)`` reads a metadata value."""
    from transformers import PreTrainedTokenizerFast

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); convert "
                         f"the model to an HF folder with its tokenizer files instead")
    tokens = list(field("tokenizer.ggml.tokens", []))
    merges = list(field("tokenizer.ggml.merges", []))
    if not tokens or not merges:
        raise ValueError("the GGUF file has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())

    def spell(token: str) -> str:  # tokens outside the byte alphabet are stored as raw text: respell their bytes
        return token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "default"),
                                           bool(field("tokenizer.ggml.add_space_prefix", False)))
    backend.decoder = decoders.ByteLevel()
    types = list(field("tokenizer.ggml.token_type", [])) or [0] * len(tokens)
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= spelled]
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and spell(t) in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key):
        i = field(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=field("tokenizer.chat_template"), clean_up_tokenization_spaces=False,
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(field("tokenizer.ggml.add_eos_token", False)))
