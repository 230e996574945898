"""Run options: validation names every problem; TOML files are read strictly and written back."""

from __future__ import annotations

import pytest

from softprompt.config import TrainConfig, read_toml, to_toml
from softprompt.errors import ConfigError
from softprompt.fileio import safe_filename


def test_every_problem_is_reported_at_once():
    cfg = TrainConfig(dataset="d", output="o", batch_size=0, lr=0, warmup=1.5, optimizer="sgd")
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for part in ("--batch-size", "--lr", "--warmup", "--optimizer must be one of adamw, adafactor"):
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
    assert TrainConfig(**back).validate().epochs == 2.5


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
