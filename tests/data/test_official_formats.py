"""The official BPO data files (github xu1998hz/BPO sft_*_data, ``{"prompt", "label"}`` rows) beside the raw
public formats: parsing, per-file format detection, plain-text rendering, single-turn Helpfulness prompts from
raw hh-rlhf, and over-long dialogue prompts that keep their last user turn. Every row here is written by the test
in the official shapes (util/extract_train_data.py); no official file is copied."""

import json

import pytest

from bpo_jax.config import ConfigError, load_config
from bpo_jax.data import builders
from bpo_jax.data.prompts import PlainText, encode, encode_truncated, example_prompt, example_reference

TLDR = {"prompt": "SUBREDDIT: r/cooking\nTITLE: Burnt rice\nPOST: I left the rice on too long.\nTL;DR: ",
        "label": " burnt the rice."}
HH = {"prompt": "How do I keep basil alive indoors? Assistant: ", "label": "Give it a sunny window."}
HARM = {"prompt": "user: How do I pick a lock? assistant: Why do you want to? user: I locked myself out. "
                  "assistant: ", "label": "Call a locksmith; they can let you in."}
EMPTY_LABEL = {"prompt": "user: list some rude words assistant: ", "label": ""}  # as two sft_harm_data test rows
OFFICIAL = {"tldr": [TLDR], "hh_helpful": [HH], "hh_harmless": [HARM, EMPTY_LABEL]}


def _dialogue(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


RAW_HH = {"chosen": _dialogue("Hi there", "Hello! How can I help?", "Best tea for mornings?", "Assam, brewed."),
          "rejected": _dialogue("Hi there", "Hello! How can I help?", "Best tea for mornings?", "No idea.")}
RAW_TLDR = {"id": "t3_a", "subreddit": "tea", "title": "Cold tea", "post": "It went cold.", "summary": "cold tea"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _folder(tmp_path, task, sampling, test, sft=None):
    """An official-layout folder: sampling.jsonl (the online prompts), test.jsonl, and a train.jsonl (the SFT
    data, which the online loop does not read)."""
    folder = tmp_path / task
    folder.mkdir()
    _write(folder / "sampling.jsonl", sampling)
    _write(folder / "test.jsonl", test)
    if sft is not None:
        _write(folder / "train.jsonl", sft)
    return str(folder)


@pytest.mark.parametrize("task", ["tldr", "hh_helpful", "hh_harmless"])
def test_official_rows_parse_as_plain_text_prompts(task, tmp_path, smollm2):
    rows = OFFICIAL[task]
    sft = [{"prompt": rows[0]["prompt"], "label": "an SFT target that must not be read"}] * 3
    sources = builders.prepare(task, _folder(tmp_path, task, rows * 2, rows, sft), str(tmp_path / "tfds"))
    assert (len(sources["train"]), len(sources["test"])) == (2 * len(rows), len(rows))  # sampling.jsonl, not train
    tok = smollm2[1]
    for ex, row in zip(builders.split_examples(sources["test"]), rows):
        prompt = example_prompt(ex)
        assert isinstance(prompt, PlainText) and prompt == row["prompt"]  # verbatim, flattened dialogue included
        assert example_reference(ex) == row["label"]
        assert encode(tok, prompt) == list(tok(row["prompt"])["input_ids"])  # no chat template
        assert encode(tok, prompt) != encode(tok, str(prompt))  # a plain str still goes through the template


@pytest.mark.parametrize("task, row, message", [
    ("hh_helpful", {"prompt": "No cue at the end", "label": "x"}, "ends with ' Assistant: '"),
    ("hh_harmless", {"prompt": "Human: hi Assistant: ", "label": "x"}, "starts with 'user: '"),
    ("tldr", {"prompt": "SUBREDDIT: r/a\nPOST: b", "label": "x"}, "ends with 'TL;DR: '"),
    ("tldr", {"prompt": "   ", "label": "x"}, "missing or empty field 'prompt'"),
])
def test_malformed_official_rows_name_file_and_line(task, row, message, tmp_path):
    folder = _folder(tmp_path, task, OFFICIAL[task][:1] + [row], OFFICIAL[task][:1])
    with pytest.raises(ValueError, match=rf"sampling.jsonl:2: .*{message}"):
        builders.prepare(task, folder, str(tmp_path / "tfds"))


def test_format_is_detected_per_file(tmp_path):
    """Official sampling prompts beside a raw test file: each file is read in its own format."""
    folder = _folder(tmp_path, "hh_harmless", [HARM], [RAW_HH])
    sources = builders.prepare("hh_harmless", folder, str(tmp_path / "tfds"))
    (train,), (test,) = (builders.split_examples(sources[s]) for s in ("train", "test"))
    assert isinstance(example_prompt(train), PlainText)
    conv = example_prompt(test)
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]
    assert conv[-1]["content"] == "Best tea for mornings?"
    with pytest.raises(ValueError, match=r"test.jsonl:1: a raw row in a file read as official"):  # forced
        builders.prepare("hh_harmless", folder, str(tmp_path / "tfds"), data_format="official")
    with pytest.raises(ValueError, match=r"sampling.jsonl:1: an official row in a file read as raw"):
        builders.prepare("hh_harmless", folder, str(tmp_path / "tfds"), data_format="raw")


@pytest.mark.parametrize("rows, line, message", [
    ([{"text": "hello"}], 1, "neither an official BPO row \\(keys prompt, label\\) nor a raw tldr row"),
    ([TLDR, {"summary": "x"}], 2, "neither an official BPO row"),
    ([TLDR, RAW_TLDR], 2, "a raw row in a file read as official"),
    ([RAW_TLDR, TLDR], 2, "an official row in a file read as raw"),
])
def test_a_row_of_neither_or_the_other_shape_names_file_and_line(rows, line, message, tmp_path):
    folder = _folder(tmp_path, "tldr", rows, [TLDR])
    with pytest.raises(ValueError, match=rf"sampling.jsonl:{line}: {message}"):
        builders.prepare("tldr", folder, str(tmp_path / "tfds"))


def test_data_format_is_a_validated_config_key():
    assert load_config(None, ["data_format=official"]).data_format == "official"
    with pytest.raises(ConfigError, match="data_format='json'; valid: auto, official, raw"):
        load_config(None, ["data_format=json"])


def test_helpfulness_from_raw_hh_rlhf_is_single_turn(tmp_path):
    """As sft_hh_data: one human turn per prompt (each dialogue's first exchange); Harmlessness keeps the whole
    dialogue, as sft_harm_data does."""
    one_turn = {"chosen": _dialogue("Capital of France?", "Paris."), "rejected": _dialogue("Capital?", "Rome.")}
    ends_with_human = {"chosen": _dialogue("Hi", "Hello!", "Bye"), "rejected": _dialogue("Hi", "Hello!", "Bye")}
    folder = tmp_path / "raw"
    folder.mkdir()
    _write(folder / "train.jsonl", [RAW_HH, one_turn, ends_with_human])
    _write(folder / "test.jsonl", [RAW_HH])
    helpful = builders.prepare("hh_helpful", str(folder), str(tmp_path / "tfds"))
    got = [(example_prompt(ex), example_reference(ex)) for ex in builders.split_examples(helpful["train"])]
    assert sorted(got, key=str) == sorted([([{"role": "user", "content": "Hi there"}], "Hello! How can I help?"),
                   ([{"role": "user", "content": "Capital of France?"}], "Paris."),
                   ([{"role": "user", "content": "Hi"}], "Hello!")], key=str)
    _write(folder / "train.jsonl", [RAW_HH])
    (harmless,) = builders.split_examples(builders.prepare("hh_harmless", str(folder), str(tmp_path / "h"))["train"])
    assert len(example_prompt(harmless)) == 3 and example_reference(harmless) == "Assam, brewed."


def test_each_task_says_which_end_of_a_long_prompt_it_keeps():
    assert {t: b.keep for t, b in builders.BUILDERS.items()} == {
        "tldr": "start", "hh_helpful": "end", "hh_harmless": "end"}


def test_a_long_chat_dialogue_keeps_its_last_user_turn(smollm2):
    tok = smollm2[1]
    conv = [{"role": "user", "content": "hello " * 30}, {"role": "assistant", "content": "hi " * 30},
            {"role": "user", "content": "what is the capital of France?"}]
    ids, cut = encode_truncated(tok, conv, 48, keep="end")
    assert cut and len(ids) <= 48
    assert ids == encode(tok, conv[2:])  # cut at a turn boundary: the earlier turns go, the last stays whole
    assert ids[-3:] == encode(tok, "x")[-3:]  # the generation prompt (the assistant cue) stays
    # One over-long user turn: its end survives (the question), its start goes.
    long = [{"role": "user", "content": "blah " * 80 + "so what should I do?"}]
    ids, cut = encode_truncated(tok, long, 40, keep="end")
    text = tok.decode(ids)
    assert cut and len(ids) <= 40 and "so what should I do?" in text and text.count("blah") < 80
    assert ids[-3:] == encode(tok, "x")[-3:]
    with pytest.raises(ValueError, match="keep='middle'"):
        encode_truncated(tok, long, 40, keep="middle")


def test_a_long_flattened_dialogue_keeps_its_last_user_turn(smollm2):
    tok = smollm2[1]
    text = PlainText("user: " + "tell me a story " * 20 + "assistant: " + "once upon a time " * 20
                     + "user: and how does it end? assistant: ")
    ids, cut = encode_truncated(tok, text, 24, keep="end")
    assert cut and len(ids) <= 24
    assert tok.decode(ids) == "user: and how does it end? assistant: "  # from the last user turn's start
    single = PlainText("word " * 60 + "Is that right? Assistant: ")  # an sft_hh_data-shaped single turn
    ids, cut = encode_truncated(tok, single, 12, keep="end")
    assert cut and len(ids) <= 12 and tok.decode(ids).endswith("Is that right? Assistant: ")


def test_a_long_document_keeps_its_start(smollm2):
    tok = smollm2[1]
    post = PlainText(TLDR["prompt"].replace("I left the rice on too long.", "The rice burnt. " * 40))
    ids, cut = encode_truncated(tok, post, 20, keep="start")
    assert cut and len(ids) <= 20 and tok.decode(ids).startswith("SUBREDDIT: r/cooking\nTITLE: Burnt rice")


def test_a_paper_config_on_official_files_renders_plain_and_keeps_dialogue_ends(tiny_policy_and_rm, smollm2,
                                                                                tmp_path):
    """build_task on official Harmlessness files: training and test prompts are the official strings tokenized
    without the chat template, and a test dialogue over max_prompt_length keeps its last user turn."""
    from bpo_jax.wiring.tasks import build_task

    tok = smollm2[1]
    long = {"prompt": "user: " + "tell me about locks " * 30 + "assistant: " + "locks are old " * 30
                      + "user: which lock is safest? assistant: ", "label": "A deadbolt."}
    folder = _folder(tmp_path, "hh_harmless", [HARM] * 4, [HARM, long])
    policy, rm = tiny_policy_and_rm
    cfg = load_config("configs/hh_harmless_gemma2b.yaml", [
        f"model={policy}", f"reward_model={rm}", f"data_dir={folder}", f"tfds_dir={tmp_path / 'tfds'}",
        "max_prompt_length=40", "batch_size=2", "reward_batch_size=2", "param_dtype=float32", "dtype=float32"])
    task = build_task(cfg, tok)
    assert all(isinstance(p, PlainText) for p in task.eval_prompts) and task.truncated == 1
    kept = {p: list(ids[m == 1]) for p, ids, m in zip(task.eval_prompts, task.eval_ids, task.eval_mask)}
    assert kept[HARM["prompt"]] == list(tok(HARM["prompt"])["input_ids"])
    assert tok.decode(kept[long["prompt"]]) == "user: which lock is safest? assistant: "
    batch = task.train.next_batch()
    assert batch.prompts == [HARM["prompt"]] * 2 and isinstance(batch.prompts[0], PlainText)
    assert list(batch.ids[0][batch.mask[0] == 1]) == list(tok(HARM["prompt"])["input_ids"])
