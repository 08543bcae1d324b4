"""The paper's tasks as data: raw formats, tfds builders on the shipped samples, and the grain prompt stream."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from bpo_jax.data import builders
from bpo_jax.data.formats import hh_example, read_jsonl, tldr_example
from bpo_jax.data.prompts import GrainPrompts, encode, example_conversation, example_reference

COUNTS = {"tldr": (24, 12), "hh_helpful": (24, 12), "hh_harmless": (24, 12)}


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    return root, {task: builders.prepare(task, data_dir=root) for task in builders.BUILDERS}


def test_tldr_row_becomes_one_user_turn():
    row = {"id": "t3_x", "subreddit": "cooking", "title": "Burnt rice", "post": " I burnt it.\n", "summary": " Oops."}
    ex = tldr_example(row, "f:1")
    assert ex == {"id": "t3_x", "roles": ["user"], "reference": "Oops.",
                  "contents": ["SUBREDDIT: r/cooking\nTITLE: Burnt rice\nPOST: I burnt it.\nTL;DR:"]}


def test_hh_row_splits_at_the_last_assistant_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Best tea?\n\nAssistant: Green tea, brewed at 80 C."
    ex = hh_example({"chosen": chosen, "rejected": chosen[:-10]}, "test.jsonl:7")
    assert ex["roles"] == ["user", "assistant", "user"]
    assert ex["contents"] == ["Hi", "Hello!", "Best tea?"] and ex["reference"] == "Green tea, brewed at 80 C."


@pytest.mark.parametrize("line, message", [
    ('{"chosen": "\\n\\nHuman: hi"', "bad.jsonl:2: not valid JSON"),
    ('{"rejected": "x"}', "bad.jsonl:2: missing or empty field 'chosen'"),
    ('{"chosen": "Human: hi Assistant: yo"}', "bad.jsonl:2: a dialogue must start with"),
    ('{"chosen": "\\n\\nHuman: hi\\n\\nHuman: again\\n\\nAssistant: yo"}', "bad.jsonl:2: turn 2 should be Assistant"),
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo\\n\\nHuman: ok"}', "must end with a non-empty Assistant"),
])
def test_malformed_hh_rows_name_file_line_and_field(tmp_path, line, message):
    good = json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"})
    (tmp_path / "train.jsonl").write_text(good + "\n" + line + "\n")
    (tmp_path / "test.jsonl").write_text(good + "\n")
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        for n, row in read_jsonl(str(tmp_path / "bad.jsonl")):
            hh_example(row, f"bad.jsonl:{n}")
    with pytest.raises(ValueError, match="train.jsonl:2"):  # prepare validates before building anything
        # (harmless: it keeps whole dialogues; helpful reads only the first exchange, see test_official_formats)
        builders.prepare("hh_harmless", str(tmp_path), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


def test_a_byte_order_mark_is_read_past_and_other_bytes_are_named(tmp_path):
    rows = [{"a": 1}, {"b": 2}]
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())  # as Notepad saves it
    assert [row for _, row in read_jsonl(str(f))] == rows
    f.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bom.jsonl:2: not UTF-8 text"):
        list(read_jsonl(str(f)))


def test_missing_tldr_field_and_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="x.jsonl:3: missing or empty field 'post'"):
        tldr_example({"subreddit": "a", "title": "b", "summary": "c"}, "x.jsonl:3")
    with pytest.raises(FileNotFoundError, match="no train.jsonl or train.jsonl.gz"):
        builders.prepare("tldr", str(tmp_path), str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="unknown task 'cnn'"):
        builders.prepare("cnn")


def test_builders_on_shipped_samples_counts_and_fields(prepared):
    _, sources = prepared
    for task, (n_train, n_test) in COUNTS.items():
        assert (len(sources[task]["train"]), len(sources[task]["test"])) == (n_train, n_test), task
        for split in ("train", "test"):
            for ex in builders.split_examples(sources[task][split]):
                conv = example_conversation(ex)
                assert conv[-1]["role"] == "user" and all(m["content"] for m in conv)
                assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) + ["user"]
                assert example_reference(ex)
    tldr_test = [example_conversation(ex)[0]["content"] for ex in builders.split_examples(sources["tldr"]["test"])]
    assert all(t.startswith("SUBREDDIT: r/") and t.endswith("\nTL;DR:") for t in tldr_test)


def test_builder_order_is_deterministic_and_stale_copies_are_not_reused(prepared, tmp_path):
    root, sources = prepared
    ids = [ex["id"] for ex in builders.split_examples(sources["tldr"]["test"])]
    again = builders.prepare("tldr", data_dir=str(tmp_path / "other"))
    assert [ex["id"] for ex in builders.split_examples(again["test"])] == ids
    # Other raw files in another manual_dir (here: gzipped, fewer rows) are prepared afresh.
    manual = tmp_path / "manual"
    manual.mkdir()
    src = os.path.join(builders.SAMPLES_DIR, "tldr")
    shutil.copy(os.path.join(src, "test.jsonl"), manual / "test.jsonl")
    with open(os.path.join(src, "train.jsonl"), "rb") as f, gzip.open(manual / "train.jsonl.gz", "wb") as g:
        g.write(b"".join(f.readlines()[:5]))
    assert len(builders.prepare("tldr", str(manual), root)["train"]) == 5


def _fits(tok, source, max_len):
    return {i for i in range(len(source)) if len(encode(tok, example_conversation(source[i]))) <= max_len}


def test_grain_stream_filters_by_length_over_epochs(prepared, tok):
    _, sources = prepared
    source = sources["tldr"]["train"]
    lengths = sorted(len(encode(tok, example_conversation(source[i]))) for i in range(len(source)))
    max_len = lengths[len(lengths) // 2]  # about half the prompts fit
    fit = _fits(tok, source, max_len)
    assert 0 < len(fit) < len(source)
    stream = GrainPrompts(source, tok, batch_size=4, max_prompt_length=max_len, seed=0)
    seen = []
    for _ in range(-(-2 * len(fit) // 4)):
        b = stream.next_batch()
        assert b.ids.shape == (4, max_len) and b.mask.shape == (4, max_len) and len(b.prompts) == 4
        assert np.all(np.diff(b.mask, axis=1) >= 0)  # left-padded
        for p, ids, m in zip(b.prompts, b.ids, b.mask):
            assert list(ids[m == 1]) == encode(tok, p)
        seen += [p[0]["content"] for p in b.prompts]
    fitting = sorted(example_conversation(source[i])[0]["content"] for i in fit)
    assert sorted(seen[: len(fit)]) == fitting and sorted(seen[len(fit): 2 * len(fit)]) == fitting  # 2 epochs
    assert seen[: len(fit)] != seen[len(fit): 2 * len(fit)]  # a fresh shuffle per epoch


def test_grain_stream_is_seeded_and_resumes_from_its_state(prepared, tok):
    _, sources = prepared
    source = sources["hh_helpful"]["train"]

    def stream(seed=0):
        return GrainPrompts(source, tok, batch_size=3, max_prompt_length=256, seed=seed)

    a = stream()
    first = [a.next_batch().prompts for _ in range(3)]
    state = json.loads(json.dumps(a.get_state()))  # JSON-able: it goes into the checkpoint's metadata
    rest = [a.next_batch().prompts for _ in range(4)]
    assert [stream().next_batch().prompts for _ in range(1)] == first[:1]
    assert stream(seed=1).next_batch().prompts != first[0]
    resumed = stream()
    resumed.set_state(state)
    assert [resumed.next_batch().prompts for _ in range(4)] == rest


def test_grain_stream_host_shards_are_disjoint_and_cover(prepared, tok):
    _, sources = prepared
    source = sources["hh_harmless"]["train"]
    per_host = []
    for host in range(2):
        s = GrainPrompts(source, tok, batch_size=6, max_prompt_length=512, seed=0, shard_index=host, shard_count=2)
        assert s.local_batch_size == 3  # each host yields its share of every global batch of 6
        per_host.append({json.dumps(p) for _ in range(4) for p in s.next_batch().prompts})
    assert not per_host[0] & per_host[1]
    everything = {json.dumps(example_conversation(source[i])) for i in range(len(source))}
    assert per_host[0] | per_host[1] == everything


def test_stream_refuses_a_max_length_nothing_fits(prepared, tok):
    _, sources = prepared
    with pytest.raises(ValueError, match="fits max_prompt_length=4"):
        GrainPrompts(sources["tldr"]["train"], tok, batch_size=2, max_prompt_length=4, seed=0)
