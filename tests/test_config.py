"""Run options: validation names every problem; TOML files are read strictly and written back."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt.config import TrainConfig, read_toml, to_toml
from softprompt.errors import ConfigError
from softprompt.fileio import safe_filename


def test_every_problem_is_reported_at_once():
    cfg = TrainConfig(dataset="d", output="o", batch_size=0, lr=0, warmup=1.5, optimizer="sgd")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for part in (
        "--batch-size",
        "--lr",
        "--warmup",
        "--optimizer must be one of schedulefree, adamw, adafactor",
    ):
        assert part in msg
    assert "\n" not in msg


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig(
        dataset="data dir",
        output="out",
        name='A "quoted" name',
        lr=0.5,
        epochs=2.5,
        recursive=True,
        resume=True,
    )
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg.to_dict()), encoding="utf-8")
    back = read_toml(path)
    assert back["name"] == 'A "quoted" name' and back["lr"] == 0.5 and back["recursive"] is True
    assert "resume" not in back  # per-invocation options are not saved
    assert "output" not in back  # nor the output folder: a rerun from the file needs a new one
    assert TrainConfig(**back, output="again").validate().epochs == 2.5


def test_toml_types_are_checked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = "fast"', encoding="utf-8")
    with pytest.raises(ConfigError, match="lr must be a float"):
        read_toml(path)
    path.write_text("[train]\nbatch-size = 8\nepochs = 2\n", encoding="utf-8")
    assert read_toml(path) == {"batch_size": 8, "epochs": 2.0}


@pytest.mark.parametrize(
    "name, want",
    [
        ("Pride & Prejudice", "Pride & Prejudice"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ('a<b>c:d"e/f\\g|h?i*j', "a_b_c_d_e_f_g_h_i_j"),
        ("CON", "CON_"),
        ("...", "softprompt"),
        ("  spaced.  ", "spaced"),
    ],
)
def test_safe_filename(name, want):
    assert safe_filename(name) == want


# Any text a user can type (hypothesis leaves out lone surrogates, which are not text): the
# control characters included, a saved config reads back equal. Names from train's fields.
TEXT_FIELDS = ["dataset", "name", "description", "author", "init_text", "model"]


@settings(max_examples=200, deadline=None)
@given(values=st.fixed_dictionaries({k: st.text() for k in TEXT_FIELDS}))
def test_toml_round_trip_of_any_text(values, tmp_path_factory):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_text(to_toml(values), encoding="utf-8")
    assert read_toml(path) == values


@pytest.mark.parametrize("char", ["\r", "\x00", "\x01", "\x1b", "\x7f", "\t", "\n", "\x0c"])
def test_control_characters_are_escaped_in_toml(char, tmp_path):
    """A control character written raw makes the file invalid TOML (or, for a carriage
    return, changes the line structure): each is written as an escape."""
    text = to_toml({"name": f"a{char}b", "description": char})
    # 2 comment lines, 2 options
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text) and text.count("\n") == 4
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    assert read_toml(path) == {"name": f"a{char}b", "description": char}


@pytest.mark.parametrize(
    "field, value, want",
    [
        ("weight_decay", float("inf"), "--weight-decay must be 0 or more"),
        ("max_grad_norm", float("inf"), "--max-grad-norm must be 0 (off) or more"),
        ("max_grad_norm", float("nan"), "--max-grad-norm must be 0 (off) or more"),
        ("seed", 2**64, "--seed must be"),
        ("seed", -1, "--seed must be"),
        ("dataset", "a\x00b", "--dataset holds a NUL character"),
        ("model", "m\x00", "--model holds a NUL character"),
        ("name", "a\ud800b", "--name is not valid Unicode text"),
        ("description", "\udcff", "--description is not valid Unicode text"),
    ],
)
def test_values_that_would_break_the_run_are_refused(field, value, want):
    """Values a run cannot use (issue 14): an infinite weight decay would train to NaN, a seed
    outside 0..2**64-1 fails in torch, a NUL cannot be in a path, a lone surrogate cannot be
    written to config.toml."""
    cfg = TrainConfig(**{"dataset": "d", "output": "o", field: value})
    with pytest.raises(ConfigError, match=re.escape(want)):
        cfg.validate()
