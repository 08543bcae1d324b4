"""Prompt data in TRL's formats, as parquet files and Hub dataset ids: each format standard and conversational is
read into the examples the tfds builders store, a Hub id resolves offline from an HF cache laid out as
huggingface_hub lays it out, and bad columns, a missing split or an uncached id fail with one line."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.config import load_config
from bpo_jax.data import builders, trl_formats
from bpo_jax.data.prompts import PlainText, example_prompt, example_reference
from bpo_jax.models.hub import parse_dataset_id, resolve_dataset
from bpo_jax.wiring.tasks import local_data, prepare_tfds, tfds_task
from testing import TINY_PAPER_RUN, record_snapshot_download

REV = "89abcdef0123456789abcdef0123456789abcdef"
N = 4  # rows per split file


def _turn(role, text):
    return [{"role": role, "content": text}]


def _rows(kind: str, conversational: bool, n: int = N) -> list[dict]:
    """``n`` rows of TRL format ``kind``, standard (strings) or conversational (message lists)."""
    if conversational:
        prompt = lambda i: [{"role": "system", "content": "Be brief."}, *_turn("user", f"Question {i}?")]  # noqa: E731
        answer = lambda text: _turn("assistant", text)  # noqa: E731
    else:
        prompt, answer = (lambda i: f"Question {i}?"), (lambda text: text)
    rows = [{"prompt": prompt(i), "prompt_id": f"id{i}"} for i in range(n)]  # prompt_id: an ignored extra column
    for i, row in enumerate(rows):
        if kind == "prompt-completion":
            row["completion"] = answer(f"Answer {i}.")
        elif kind == "preference":
            row.update(chosen=answer(f"Answer {i}."), rejected=answer("No."))
    return rows


def _write(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _cache_dataset(cache, repo_id: str, files: dict, rev: str = REV):
    """Put ``files`` (path in the repo -> rows) in ``cache`` as a downloaded snapshot of the dataset ``repo_id``
    (refs/main -> ``rev``); returns the snapshot folder."""
    root = cache / ("datasets--" + repo_id.replace("/", "--"))
    for name, rows in files.items():
        _write(root / "snapshots" / rev / name, rows)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return root / "snapshots" / rev


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline HF cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize("kind", ["prompt-only", "prompt-completion", "preference"])
def test_each_format_reads_into_examples(tmp_path, kind, conversational):
    path = _write(tmp_path / "train.parquet", _rows(kind, conversational))
    assert trl_formats.file_format(path) == kind
    examples = [ex for _, ex in trl_formats.parse_file(path)]
    assert len(examples) == N
    for i, ex in enumerate(examples):
        prompt = example_prompt(ex)
        if conversational:  # message lists go through the chat template, the system turn kept
            assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]
        else:  # a standard prompt is tokenized as it is, as TRL does
            assert isinstance(prompt, PlainText) and prompt == f"Question {i}?"
        assert example_reference(ex) == ("" if kind == "prompt-only" else f"Answer {i}.")


def test_a_chosen_conversation_gives_its_final_answer(tmp_path):
    """As in HuggingFaceH4/ultrafeedback_binarized: a standard prompt, and chosen repeating it as a user turn."""
    rows = [{"prompt": "Hi?", "chosen": _turn("user", "Hi?") + _turn("assistant", "Hello."),
             "rejected": _turn("user", "Hi?") + _turn("assistant", "Go away."), "messages": _turn("user", "Hi?")}]
    ((_, ex),) = trl_formats.parse_file(_write(tmp_path / "train.parquet", rows))
    assert example_prompt(ex) == "Hi?" and example_reference(ex) == "Hello."


@pytest.mark.parametrize("cols", [{"text": "x"}, {"prompt": "x", "chosen": "y"}, {"chosen": "y", "rejected": "z"},
                                  {"prompt": "x", "completion": "y", "label": True}])
def test_columns_of_no_format_name_the_file_and_its_columns(tmp_path, cols):
    path = _write(tmp_path / "data" / "train-00000-of-00001.parquet", [cols])
    _write(tmp_path / "data" / "test-00000-of-00001.parquet", [cols])
    with pytest.raises(ValueError) as err:
        builders.prepare("dataset", str(tmp_path), str(tmp_path / "tfds"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: its columns ({', '.join(cols)}) form none of TRL's formats")


def test_bad_rows_name_file_and_row(tmp_path):
    path = _write(tmp_path / "train.parquet", [{"prompt": "ok", "completion": "c"}, {"prompt": " ", "completion": "c"}])
    with pytest.raises(ValueError, match=rf"^{path}:2: empty 'prompt'$"):
        list(trl_formats.parse_file(path))
    path = _write(tmp_path / "train.parquet", [{"prompt": _turn("assistant", "hi"), "completion": "c"}])
    with pytest.raises(ValueError, match=rf"^{path}:1: a conversational 'prompt' must end with a user turn"):
        list(trl_formats.parse_file(path))


def test_a_prompt_only_test_split_is_refused(tmp_path):
    _write(tmp_path / "train.parquet", _rows("prompt-only", False))
    test = _write(tmp_path / "test.parquet", _rows("prompt-only", False))
    with pytest.raises(ValueError, match=rf"^{test}: a test split needs references .*its columns: prompt, prompt_id$"):
        builders.prepare("dataset", str(tmp_path), str(tmp_path / "tfds"))


def test_split_files_by_name(tmp_path):
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                 "data/train_sft-00000-of-00001.parquet", "data/test.parquet", "other/test/0000.parquet"):
        _write(tmp_path / name, [{"prompt": "p"}])
    found = [os.path.relpath(p, tmp_path) for p in trl_formats.split_files(str(tmp_path), "train")]
    assert found == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert len(trl_formats.split_files(str(tmp_path), "test")) == 2
    assert len(trl_formats.split_files(str(tmp_path), "train_sft")) == 1
    single = str(tmp_path / "data" / "train_sft-00000-of-00001.parquet")  # one file: the train split
    assert trl_formats.split_files(single, "x", train=True) == [single]


def test_a_single_file_is_the_train_split(tmp_path):
    single = _write(tmp_path / "mine.parquet", _rows("prompt-only", True))
    _write(tmp_path / "test.parquet", _rows("prompt-completion", False, n=2))
    _write(tmp_path / "train.parquet", _rows("prompt-completion", False, n=3))  # not used: the file is the split
    sources = builders.prepare("dataset", single, str(tmp_path / "tfds"))
    assert (len(sources["train"]), len(sources["test"])) == (N, 2)


def test_a_missing_split_names_the_folder_and_its_files(tmp_path):
    _write(tmp_path / "data" / "train-00000-of-00001.parquet", _rows("preference", True))
    with pytest.raises(FileNotFoundError) as err:
        builders.prepare("dataset", str(tmp_path), str(tmp_path / "tfds"), splits=("train", "validation"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no 'validation' split in {tmp_path}")
    assert msg.endswith("its parquet files: data/train-00000-of-00001.parquet")


def test_parse_dataset_id():
    assert parse_dataset_id("hf://datasets/org/name") == ("org/name", None, "")
    assert parse_dataset_id("hf://datasets/org/name@v1/sub/dir") == ("org/name", "v1", "sub/dir")
    assert parse_dataset_id("hf://datasets/org/name@refs%2Fconvert%2Fparquet") == (
        "org/name", "refs/convert/parquet", "")
    assert parse_dataset_id("org/na.me@main") == ("org/na.me", "main", "")
    assert parse_dataset_id("hf://models/org/name") is None and parse_dataset_id("/abs/path") is None


def test_hub_dataset_resolves_offline_and_builds_with_named_splits(hub_cache, tmp_path):
    """A preference dataset with ultrafeedback's split names, conversational train and standard test files."""
    snap = _cache_dataset(hub_cache, "tiny-org/prefs", {
        "data/train_prefs-00000-of-00001.parquet": _rows("preference", True),
        "data/test_prefs-00000-of-00001.parquet": _rows("preference", False, n=3)})
    names = ("train_prefs", "test_prefs")
    for name in ("hf://datasets/tiny-org/prefs", f"hf://datasets/tiny-org/prefs@{REV}", "tiny-org/prefs"):
        assert local_data(name, names) == str(snap)
    assert resolve_dataset("hf://datasets/tiny-org/prefs/data") == str(snap / "data")
    sources = prepare_tfds("dataset", "hf://datasets/tiny-org/prefs", str(tmp_path / "tfds"), "auto", names)
    train, test = (builders.split_examples(sources[s]) for s in ("train", "test"))
    assert sorted(example_reference(ex) for ex in train) == [f"Answer {i}." for i in range(N)]
    assert all(example_prompt(ex)[-1]["role"] == "user" for ex in train)
    assert sorted(example_prompt(ex) for ex in test) == [f"Question {i}?" for i in range(3)]
    # A paper task reads the same files (data=hh_helpful data_dir=hf://datasets/...): the same examples.
    same = prepare_tfds("hh_helpful", "hf://datasets/tiny-org/prefs", str(tmp_path / "tfds"), "auto", names)
    assert builders.split_examples(same["test"]) == test


@pytest.mark.parametrize("name", ["hf://datasets/tiny-org/missing", "tiny-org/missing@v2"])
def test_an_id_not_in_the_cache_offline_is_one_line(hub_cache, tmp_path, name):
    with pytest.raises(ValueError) as err:
        prepare_tfds("dataset", name, str(tmp_path / "tfds"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"dataset {name!r} is neither a local path nor in the HF cache")
    assert "HF_HUB_OFFLINE=1" in msg and "--repo-type dataset" in msg


def test_data_or_data_dir_names_the_dataset(tmp_path):
    folder = tmp_path / "prefs"
    _write(folder / "train.parquet", _rows("preference", False))
    assert tfds_task(load_config(overrides=[f"data={folder}"])) == ("dataset", str(folder))
    assert tfds_task(load_config(overrides=["data_dir=hf://datasets/org/name"])) == ("dataset",
                                                                                    "hf://datasets/org/name")
    assert tfds_task(load_config(overrides=["data=tldr", "data_dir=org/name", "reward_model=rm"])) == (
        "tldr", "org/name")
    assert tfds_task(load_config()) is None  # minisum, its shipped files


def test_a_dataset_without_a_reward_model_fails_before_loading(tmp_path, capsys):
    folder = tmp_path / "prefs"
    _write(folder / "train.parquet", _rows("preference", False))
    assert cli(["train", "model=/no/such/model", f"data={folder}", f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: data '{folder}' has no gold summaries: it needs reward_model")


def test_online_download_fetches_the_splits_parquet_only(monkeypatch, tmp_path):
    """Online, the id goes to snapshot_download as a dataset with patterns that select the named splits' parquet
    files and nothing else (checked on a stand-in: no network in tests)."""
    import fnmatch

    seen = record_snapshot_download(monkeypatch, tmp_path)
    assert resolve_dataset("hf://datasets/org/name@v1", ("train_prefs", "test_prefs")) == str(tmp_path)
    assert (seen["repo_id"], seen["revision"], seen["repo_type"], seen["local_files_only"]) == (
        "org/name", "v1", "dataset", False)

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in seen["allow_patterns"])

    for name in ("data/train_prefs-00000-of-00001.parquet", "test_prefs.parquet", "default/test_prefs/0000.parquet"):
        assert fetched(name), name
    for name in ("data/train_sft-00000-of-00001.parquet", "README.md", "data/train_prefs.jsonl"):
        assert not fetched(name), name
    # A file in the repo: that file (the train split) and the test split's files beside it.
    _write(tmp_path / "data" / "mine.parquet", [{"prompt": "p"}])
    assert resolve_dataset("hf://datasets/org/name/data/mine.parquet") == str(tmp_path / "data" / "mine.parquet")
    assert fetched("data/mine.parquet") and fetched("data/test-00000-of-00001.parquet")
    assert not fetched("data/other.parquet") and not fetched("test.parquet")


@pytest.mark.slow
def test_train_reads_a_hub_dataset(hub_cache, tiny_policy_and_rm, tmp_path, capsys):
    """``python -m bpo_jax train ... data_dir=hf://datasets/<org>/<name>`` trains and evaluates on a dataset in the
    cache: prompt-completion, conversational train prompts, standard test prompts."""
    _cache_dataset(hub_cache, "tiny-org/chat", {"data/train-00000-of-00001.parquet": _rows("prompt-completion", True),
                                                "data/test-00000-of-00001.parquet": _rows("prompt-completion", False)})
    policy, rm = tiny_policy_and_rm
    run = tmp_path / "run"
    assert cli(["train", f"model={policy}", f"reward_model={rm}", f"run_dir={run}", f"tfds_dir={tmp_path / 'tfds'}",
                *TINY_PAPER_RUN, "data_dir=hf://datasets/tiny-org/chat"]) == 0
    assert f"task hf://datasets/tiny-org/chat, {N} test prompts" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 2]
    assert all(0.0 <= r["eval/win_rate"] <= 1.0 for r in (records[0], records[-1]))
