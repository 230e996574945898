"""The end-of-training report: report.md and loss_curve.png, written by a tiny training run."""

from __future__ import annotations

import json

import pytest

from softprompt import SoftPrompt, train
from softprompt.cli import main
from softprompt.report import CURVE_FILE, REPORT_FILE, loss_series, plot_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    import shutil
    from pathlib import Path

    corpus = tmp_path_factory.mktemp("corpus")
    src = Path(__file__).resolve().parent.parent / "examples" / "pride_and_prejudice"
    for p in sorted(src.glob("*.txt"))[:3]:
        shutil.copy(p, corpus / p.name)
    out = tmp_path_factory.mktemp("run") / "out"
    result = train(
        dataset=str(corpus),
        output=str(out),
        model=tiny_llama,
        init="text",
        init_text="Chapter one.",
        tokens=4,
        block_size=32,
        max_steps=6,
        eval_every=2,
        batch_size=2,
        progress=False,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return result


def test_report_files(run):
    out = run.output
    assert run.files["report"] == out / REPORT_FILE
    png = (out / CURVE_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    text = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert f"![loss curve]({CURVE_FILE})" in text
    assert f"| loss | {run.val_loss_before:.4f} | {run.val_loss_after:.4f} |" in text
    assert f"| perplexity | {run.perplexity_before:.2f} | {run.perplexity_after:.2f} |" in text
    assert f"{run.tokens_seen:,} tokens seen" in text and "tokens/s" in text
    assert text.count("### Sample") == 2
    assert text.count("With the soft prompt:") == 2 and text.count("Without:") == 2


def test_init_text_is_kept_in_meta(run):
    assert run.soft_prompt.meta["init"] == "text"
    assert run.soft_prompt.meta["init_text"] == "Chapter one."
    assert SoftPrompt.load(run.files["kobold"]).meta["init_text"] == "Chapter one."


def test_loss_series_reads_metrics(run):
    records = [
        json.loads(line) for line in run.files["metrics"].read_text(encoding="utf-8").splitlines()
    ]
    train_pts, val_pts = loss_series(records)
    assert [s for s, _ in train_pts] == list(range(1, 7))
    assert [s for s, _ in val_pts] == [0, 2, 4, 6]


def test_plot_handles_empty_and_long_runs():
    assert plot_losses([]).startswith(PNG_MAGIC)
    records = [{"step": i, "loss": 3 - i / 100} for i in range(1, 101)] + [
        {"step": 50, "val_loss": 2.5}
    ]
    assert plot_losses(records).startswith(PNG_MAGIC)


def test_report_can_be_turned_off(tiny_llama, corpus, tmp_path):
    out = tmp_path / "out"
    result = train(
        dataset=str(corpus),
        output=str(out),
        model=tiny_llama,
        tokens=2,
        block_size=16,
        max_steps=1,
        batch_size=1,
        progress=False,
        report=False,
    )
    assert "report" not in result.files
    assert not (out / REPORT_FILE).exists() and not (out / CURVE_FILE).exists()


def test_cli_no_report_flag(tiny_models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_models["llama"]),
            "--dataset",
            str(corpus),
            "--output",
            str(out),
            "--tokens",
            "2",
            "--block-size",
            "16",
            "--max-steps",
            "1",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--no-progress",
            "--no-report",
        ]
    )
    assert rc == 0
    assert not (out / REPORT_FILE).exists()
    assert "report = false" in (out / "config.toml").read_text(encoding="utf-8")


def test_report_without_matplotlib(tiny_llama, corpus, tmp_path, monkeypatch):
    import softprompt.report as report

    def no_mpl(*a, **k):
        raise ImportError("no matplotlib")

    monkeypatch.setattr(report, "plot_losses", no_mpl)
    out = tmp_path / "out"
    train(
        dataset=str(corpus),
        output=str(out),
        model=tiny_llama,
        tokens=2,
        block_size=16,
        max_steps=1,
        batch_size=1,
        progress=False,
    )
    assert (out / REPORT_FILE).exists() and not (out / CURVE_FILE).exists()
    assert "loss curve" not in (out / REPORT_FILE).read_text(encoding="utf-8")
