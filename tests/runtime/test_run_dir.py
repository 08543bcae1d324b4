"""JSON-lines files of a run directory (``bpo_jax.runtime.run_dir``) whose last line was cut short, as a writer
killed mid-write or a full disk leaves them: readers leave the cut text out, the next writer moves it aside
(never lost) before it appends, and a bad line elsewhere names the file and line. (Remote files: test_gcs.py.)"""

import json
import logging

import pytest

from bpo_jax.runtime import run_dir as rd

ROWS = [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.61}]
WHOLE = "".join(json.dumps(r) + "\n" for r in ROWS)


def test_readers_leave_out_a_cut_last_line_and_name_a_bad_one(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(WHOLE + '{"step": 3, "lo')
    assert rd.read_jsonl(f) == ROWS
    f.write_text(WHOLE + '{"step": 3}')  # a whole record that lacks only its newline
    assert rd.read_jsonl(f) == [*ROWS, {"step": 3}]
    f.write_text(WHOLE.replace("}\n", "\n", 1))
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not valid JSON"):
        rd.read_jsonl(f)


def test_a_writer_moves_a_cut_line_aside_before_it_appends(tmp_path, caplog):
    f = tmp_path / "metrics.jsonl"
    f.write_text(WHOLE + '{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="bpo_jax"):
        log = rd.JsonlLog(f)
    assert "ended with a line cut short (15 bytes" in caplog.text
    assert f.read_text() == WHOLE and (tmp_path / "metrics.jsonl.cut").read_text() == '{"step": 3, "lo\n'
    log.append({"step": 3, "loss": 0.5})
    assert rd.read_jsonl(f) == [*ROWS, {"step": 3, "loss": 0.5}]
    # A second cut is kept beside the first; a whole last record without its newline only gets one.
    f.write_text(f.read_text() + '{"st')
    rd.JsonlLog(f)
    assert (tmp_path / "metrics.jsonl.cut").read_text() == '{"step": 3, "lo\n{"st\n'
    f.write_text(WHOLE + '{"step": 3}')
    rd.JsonlLog(f)
    assert f.read_text() == WHOLE + '{"step": 3}\n'
