"""The end-of-training report: ``report.md`` and ``loss_curve.png`` in the output folder.

The report holds the loss curve (train and validation against steps), validation loss and
perplexity before and after, tokens seen, time, speed, and a few short continuations with and
without the soft prompt, from prompts taken at the start of validation blocks.

matplotlib, which draws the curve, is optional (``pip install 'softprompt[plot]'``): without
it the report is written without the picture, with a note.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fileio import atomic_write, write_text
from .generate import stream
from .runfiles import CURVE_FILE, REPORT_FILE
from .sampling import SamplingOptions

if TYPE_CHECKING:
    from .model import LoadedModel
    from .train import TrainResult

log = logging.getLogger(__name__)

SAMPLE_PROMPT_TOKENS = 32
SAMPLE_NEW_TOKENS = 40
SAMPLE_OPTIONS = SamplingOptions(temperature=0.0, repetition_penalty=1.1)  # greedy: reproducible


def loss_series(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) points of metrics.jsonl records."""
    train = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r]
    val = [(int(r["step"]), float(r["val_loss"])) for r in records if r.get("val_loss") is not None]
    return train, val


def smoothing_window(n: int) -> int:
    """Steps averaged for the smoothed training curve: a tenth of the run, at least 3 (1, no
    smoothing, below 5 points)."""
    return 1 if n < 5 else max(3, n // 10)


def trailing_mean(values, k: int) -> np.ndarray:
    """Mean of each value and the k - 1 before it (fewer at the start)."""
    x = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - k)
    return (c[i] - c[lo]) / (i - lo)


def plot_losses(records: list[dict], title: str = "") -> bytes:
    """The loss curve as PNG bytes. Uses matplotlib's object API with the Agg canvas: no
    pyplot, no global backend switch, nothing shown on screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = loss_series(records)
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train, strict=True)
        k = smoothing_window(len(losses))
        faint = "train loss (per step)" if k > 1 else "train loss"
        ax.plot(steps, losses, color="#9ab8d8", linewidth=1, label=faint)
        if k > 1:  # the per-step loss is noisy: a trailing mean shows the trend
            ax.plot(
                steps,
                trailing_mean(losses, k),
                color="#1f5fa8",
                linewidth=2.2,
                label=f"train loss (mean of {k} steps)",
            )
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(
            steps, losses, "o-", color="#d2561e", linewidth=2, markersize=5, label="validation loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "soft prompt training")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def sample_prompts(
    lm: LoadedModel, blocks: np.ndarray, n: int = 2, tokens: int = SAMPLE_PROMPT_TOKENS
) -> list[str]:
    """The text of the first ``tokens`` tokens of the first ``n`` blocks."""
    out = []
    tokenizer: Any = lm.tokenizer
    for block in blocks[:n]:
        text = tokenizer.decode([int(t) for t in block[:tokens]], skip_special_tokens=True)
        if text.strip():
            out.append(text)
    return out


def samples(
    lm: LoadedModel, soft_prompt, prompts: list[str], new_tokens: int = SAMPLE_NEW_TOKENS
) -> list[dict]:
    """Each prompt's continuation with and without the soft prompt (greedy)."""
    n_soft = soft_prompt.n_tokens if soft_prompt is not None else 0
    new_tokens = min(new_tokens, lm.context_length - n_soft - len(lm.bos_ids) - 1)
    out = []
    for prompt in prompts if new_tokens > 0 else []:
        with_sp = "".join(
            stream(lm, prompt, soft_prompt, SAMPLE_OPTIONS, max_new_tokens=new_tokens)
        )
        without = "".join(stream(lm, prompt, None, SAMPLE_OPTIONS, max_new_tokens=new_tokens))
        out.append({"prompt": prompt, "with": with_sp, "without": without})
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s" if m else f"{sec} s"


def _fence(text: str) -> str:
    fence = "~~~~" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def render(
    result: TrainResult, lm: LoadedModel, examples: list[dict], curve: str | None, n_val_blocks: int
) -> str:
    """The report as Markdown."""
    cfg, sp = result.config, result.soft_prompt
    # over every segment of a resumed run, validations included
    speed = result.tokens_seen / result.seconds if result.seconds > 0 else None
    lines = [
        f"# Soft prompt report: {sp.name}",
        "",
        f"- model: {lm.name} ({lm.device.type}, {str(lm.dtype).removeprefix('torch.')})",
        f"- soft prompt: {sp.n_tokens} tokens, init {sp.meta.get('init', cfg.init)}",
        f"- dataset: {cfg.dataset}; blocks of {cfg.block_size} tokens, {n_val_blocks} held out for validation",
        f"- training: {result.steps} steps, {result.tokens_seen:,} tokens seen in {_duration(result.seconds)} "
        f"({_fmt(speed, ',.0f')} tokens/s)",
        "",
        "| validation | before | after |",
        "| --- | ---: | ---: |",
        f"| loss | {_fmt(result.val_loss_before, '.4f')} | {_fmt(result.val_loss_after, '.4f')} |",
        f"| perplexity | {_fmt(result.perplexity_before, '.2f')} | {_fmt(result.perplexity_after, '.2f')} |",
        "",
    ]
    if curve:
        lines += [f"![loss curve]({curve})", ""]
    if examples:
        lines += [
            "## Samples",
            "",
            f"Greedy continuations ({SAMPLE_NEW_TOKENS} new tokens, repetition penalty "
            f"{SAMPLE_OPTIONS.repetition_penalty}) of the start of validation blocks.",
            "",
        ]
        for i, ex in enumerate(examples, 1):
            lines += [
                f"### Sample {i}",
                "",
                "Prompt:",
                "",
                _fence(ex["prompt"]),
                "",
                "With the soft prompt:",
                "",
                _fence(ex["with"]),
                "",
                "Without:",
                "",
                _fence(ex["without"]),
                "",
            ]
    lines += [
        f"Files: `{result.files['kobold'].name}` (KoboldAI), `{result.files['safetensors'].name}`, "
        f"`{result.files['metrics'].name}` (per-step metrics), `{result.files['config'].name}` "
        "(options to reproduce the run).",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out: str | Path, result: TrainResult, lm: LoadedModel, val_blocks: np.ndarray
) -> Path:
    """Write ``loss_curve.png`` and ``report.md`` into ``out``; returns the report's path.
    A missing or failing matplotlib only leaves the picture out."""
    out = Path(out)
    curve: str | None = None
    try:
        png = plot_losses(result.metrics, f"{result.soft_prompt.name}: loss")
    except ImportError:
        log.warning(
            "note: matplotlib is not installed, so report.md has no loss curve "
            "(pip install 'softprompt[plot]')"
        )
    except Exception as e:  # a plotting problem must not cost the finished run
        log.warning("note: could not draw the loss curve: %s", e)
    else:
        with atomic_write(out / CURVE_FILE) as fh:
            fh.write(png)
        curve = CURVE_FILE
    examples = (
        samples(lm, result.soft_prompt, sample_prompts(lm, val_blocks)) if len(val_blocks) else []
    )
    path = out / REPORT_FILE
    write_text(path, render(result, lm, examples, curve, len(val_blocks)))
    return path
