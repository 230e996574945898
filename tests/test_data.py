"""Reading a dataset: files found, text normalised, bad files named, blocks cut and split."""

from __future__ import annotations

import os

import numpy as np
import pytest

from softprompt.data import (
    decode_text,
    find_text_files,
    make_blocks,
    read_dataset,
    split_blocks,
    token_stream,
    tokenize_dataset,
)
from softprompt.errors import DataError


def test_text_is_normalised():
    assert decode_text("\ufeffa\r\nb\rc\n".encode(), "f.txt") == "a\nb\nc\n"


def test_binary_and_invalid_utf8_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"x\.txt looks binary"):
        decode_text(b"abc\x00def", tmp_path / "x.txt")
    with pytest.raises(DataError, match=r"y\.txt is not valid UTF-8 \(byte 3\).*--skip-bad-files"):
        decode_text(b"abc\xff", tmp_path / "y.txt")


def test_bad_files_stop_or_are_skipped(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("Good text here.", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa broken")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="bad.txt"):
        read_dataset(tmp_path)
    ds = read_dataset(tmp_path, skip_bad_files=True)
    assert ds.files == ["good.txt"]
    assert sorted(ds.skipped) == ["bad.txt", "empty.txt"]
    assert "skipping" in caplog.text


def test_folders_single_files_and_recursion(tmp_path):
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    (tmp_path / "B.TXT").write_text("two", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    (sub / "c.txt").write_text("three", encoding="utf-8")
    root, files = find_text_files(tmp_path)
    assert [f.name for f in files] == ["B.TXT", "a.txt"]
    _, files = find_text_files(tmp_path, recursive=True)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "B.TXT",
        "a.txt",
        "sub/deeper/c.txt",
    ]
    root, files = find_text_files(tmp_path / "a.txt")
    assert files == [tmp_path / "a.txt"] and root == tmp_path


def test_symlink_loop_does_not_hang(tmp_path):
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    os.symlink(tmp_path, tmp_path / "loop")
    _, files = find_text_files(tmp_path, recursive=True)
    assert [f.name for f in files] == ["a.txt"]


def test_no_txt_files_suggests_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="no .txt files.*--recursive"):
        find_text_files(tmp_path)


def test_stream_shuffles_files_with_the_seed_and_ends_each_with_eos(tiny_llama, corpus):
    tok = tiny_llama.tokenizer
    c = tokenize_dataset(read_dataset(corpus), tok)
    eos = tiny_llama.eos_token_id
    s1, s2, s3 = (token_stream(c, eos, seed) for seed in (1, 1, 2))
    assert np.array_equal(s1, s2)
    assert len(s1) == c.n_tokens and (s1 == eos).sum() >= len(c.files)
    # each file's ids appear whole, followed by EOS
    order = np.random.default_rng(1).permutation(len(c.ids))
    first = c.ids[order[0]]
    assert np.array_equal(s1[: len(first)], first) and s1[len(first)] == eos
    assert not np.array_equal(s1, s3) or len(c.ids) == 1
    # ids decode back to the text
    assert tok.decode(c.ids[0].tolist()) == (corpus / c.files[0]).read_text(encoding="utf-8")


def test_a_passage_is_a_rows_start_or_an_examples_labelled_start():
    from softprompt.data import Rows

    blocks = Rows(np.arange(40).reshape(4, 10))
    picked = blocks.passage(4, seed=1)
    assert picked.tolist() in [list(range(10 * i, 10 * i + 4)) for i in range(4)]
    assert picked.tolist() == blocks.passage(4, seed=1).tolist()  # the seed picks it
    assert {tuple(blocks.passage(4, seed=s)) for s in range(20)} != {tuple(picked)}
    examples = Rows(
        np.zeros((0, 16), np.int64),
        [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])],
        [np.array([0, 0, 1, 1, 1], bool), np.array([0, 1, 1], bool)],
    )
    for seed in range(5):  # the only one with three labelled tokens
        assert examples.passage(3, seed).tolist() == [3, 4, 5]
    assert examples.passage(5, 0).tolist() == [3, 4, 5, 3, 4]  # none has 5: repeated


def test_blocks_and_split():
    stream = np.arange(105)
    blocks = make_blocks(stream, 10)
    assert blocks.shape == (10, 10) and blocks[-1, -1] == 99  # tail of 5 dropped
    train, val = split_blocks(blocks, 0.2, 64)
    assert len(train) == 8 and len(val) == 2 and np.array_equal(val, blocks[-2:])
    train, val = split_blocks(blocks, 0.01, 64)
    assert len(val) == 1  # at least one block
    train, val = split_blocks(blocks, 0.5, 3)
    assert len(val) == 3  # capped
    train, val = split_blocks(blocks, 0.0, 3)
    assert len(val) == 0 and len(train) == 10
