"""The options of a training run: one dataclass, validated in one place.

Each field carries its command-line help in ``metadata`` so the CLI (and anything else that
shows the options) is generated from this single list.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .runfiles import CONFIG_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

INITS = ("passage", "text", "vocab", "random")
OPTIMIZERS = ("schedulefree", "adamw", "adafactor")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "sequential")
LOSS_ON = ("completion", "all")
DEFAULT_TOKENS = 20
# the defaults study's choices (bench/defaults_study.py, README "Choosing the defaults"):
# warmup, then a constant rate, at a rate that scales with the model's token vectors
DEFAULT_DECAY_TO = 1.0
LR_PER_RMS = 0.22  # --lr auto: this x the RMS of the model's token vectors (0.03 on SmolLM2)
DECAY_TO_BEFORE = 0.1  # what runs made before --decay-to existed decayed to
DEFAULT_DISTILL_WEIGHT = 1.0  # the KL alone; not yet measured against a mix (README, "Distilling")
DEFAULT_TEACHER_SAMPLES = 64
CPU_AUTO_BATCH = 4  # --batch-size auto on CPUs: see bench/batch_size.py
MAX_SEED = 2**64 - 1  # torch.manual_seed takes no more; numpy's generator no negative seed
PATHS = ("dataset", "output", "model", "init_from", "cache_dir", "copy_to")  # name a path
SURROGATE = re.compile("[\ud800-\udfff]")


def _opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    group: str = "training",
    metavar: str | None = None,
) -> Any:
    meta = {"help": help, "choices": choices, "group": group, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that decides a training run. Paths are kept as given (strings)."""

    # what to train on and where to put it
    dataset: str | None = _opt(
        None,
        "a .txt or .jsonl file, or a folder of them (.jsonl: one example a line, "
        '{"text"}, {"prompt", "completion"}, {"instruction", "input", "output"} or '
        '{"messages"})',
        group="data",
        metavar="PATH",
    )
    output: str | None = _opt(
        None, "folder for the soft prompt, checkpoints and logs", group="data", metavar="DIR"
    )
    recursive: bool = _opt(False, "also read .txt and .jsonl files in sub-folders", group="data")
    skip_bad_files: bool = _opt(
        False,
        "skip files that are not UTF-8 text, or hold a bad example (with a warning) instead "
        "of stopping",
        group="data",
    )
    loss_on: str = _opt(
        "completion",
        "the tokens of pairs and chats that carry the loss: completion (a pair's completion, "
        "a chat's assistant turns) or all (the prompt too); plain text is all completion, and "
        "validation always scores the completions",
        LOSS_ON,
        "data",
    )
    block_size: int | None = _opt(
        None,
        "tokens per training sequence, soft tokens excluded (default: the model's context "
        "minus the soft tokens, at most 512 on CPU, 2048 on GPU)",
        group="data",
        metavar="N",
    )
    val_fraction: float = _opt(
        0.05, "fraction of blocks (and of examples) held out for validation", group="data"
    )
    val_max_blocks: int = _opt(
        64, "at most this many validation blocks (and examples)", group="data", metavar="N"
    )
    # the model
    model: str | None = _opt(
        None,
        "Hugging Face id, local folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)",
        group="model",
        metavar="M",
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N, mps or auto", group="model")
    dtype: str = _opt(
        "auto", "model dtype (auto: bfloat16 where the hardware does it well)", DTYPES, "model"
    )
    device_map: str | None = _opt(
        None,
        "spread the model over this machine's GPUs: auto, balanced or sequential "
        "(one process, not with torchrun)",
        group="model",
    )
    shard_model: bool = _opt(
        False,
        "split the frozen model across the torchrun processes with FSDP "
        "(for a model bigger than one device)",
        group="model",
    )
    load_in_8bit: bool = _opt(
        False,
        "load the frozen model in 8 bits with bitsandbytes (CUDA; pip install 'softprompt[quantize]')",
        group="model",
    )
    load_in_4bit: bool = _opt(
        False,
        "load the frozen model in 4 bits (NF4) with bitsandbytes (CUDA; pip install 'softprompt[quantize]')",
        group="model",
    )
    # the soft prompt
    name: str | None = _opt(
        None, "soft prompt name (default: the dataset's name)", group="soft prompt"
    )
    description: str = _opt("", "description saved with the soft prompt", group="soft prompt")
    copy_to: str | None = _opt(
        None,
        "also put the finished KoboldAI zip in this folder (KoboldAI's softprompts folder); "
        "a file of the same name there is replaced only with --force",
        group="soft prompt",
        metavar="DIR",
    )
    author: str = _opt("", "author saved with the soft prompt", group="soft prompt")
    tokens: int | None = _opt(
        None,
        f"soft prompt length in tokens (default {DEFAULT_TOKENS}, or the init text's length)",
        group="soft prompt",
        metavar="N",
    )
    init: str | None = _opt(
        None,
        "how to initialise the soft prompt (default: text when --init-text is given, or the "
        "written prompt's first tokens with --teacher-prompt; else passage, the first tokens "
        "of a training block)",
        INITS,
        "soft prompt",
    )
    init_text: str | None = _opt(
        None,
        "text (or a path to a text file) for --init text",
        group="soft prompt",
        metavar="TEXT_OR_FILE",
    )
    init_from: str | None = _opt(
        None,
        "start from this soft prompt file (any format softprompt reads; overrides --init, "
        "its length sets --tokens)",
        group="soft prompt",
        metavar="FILE",
    )
    # distillation
    teacher_prompt: str | None = _opt(
        None,
        "a written prompt (text, or a UTF-8 file) to distil into the soft prompt: the loss "
        "becomes the KL divergence to the model's predictions with this prompt in front "
        "([BOS][written prompt][text]); without --dataset the text is sampled from the model "
        "continuing it",
        group="distillation",
        metavar="TEXT_OR_FILE",
    )
    distill_weight: float = _opt(
        DEFAULT_DISTILL_WEIGHT,
        "with --teacher-prompt: the KL's share of the loss, the rest is cross-entropy on the "
        "text (1: KL alone)",
        group="distillation",
        metavar="W",
    )
    teacher_samples: int = _opt(
        DEFAULT_TEACHER_SAMPLES,
        "with --teacher-prompt and no --dataset: continuations of the written prompt to "
        "sample, one block each (made once, then read from the cache)",
        group="distillation",
        metavar="N",
    )
    teacher_temperature: float = _opt(
        1.0, "temperature of those continuations", group="distillation", metavar="T"
    )
    teacher_top_p: float = _opt(
        1.0,
        "nucleus sampling mass of those continuations, 1 = off",
        group="distillation",
        metavar="P",
    )
    # optimisation
    max_steps: int | None = _opt(None, "optimizer steps to run (overrides --epochs)", metavar="N")
    epochs: float = _opt(1.0, "passes over the training blocks (fractional allowed)", metavar="X")
    batch_size: int | str = _opt(
        4,
        "blocks per micro-batch, per process under torchrun; auto: on a GPU the largest that "
        f"fits its memory (found by trying), on a CPU {CPU_AUTO_BATCH}",
        metavar="N|auto",
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step", metavar="N")
    lr: float | str = _opt(
        "auto",
        f"peak learning rate; auto: {LR_PER_RMS} x the RMS of the model's token vectors, to two "
        "figures (0.03 on SmolLM2, 0.23 on Gemma 3, whose vectors are scaled up)",
        metavar="LR|auto",
    )
    warmup: float = _opt(0.1, "fraction of steps for linear warmup (then --decay-to)")
    decay_to: float = _opt(
        DEFAULT_DECAY_TO,
        "after the warmup, cosine decay of the learning rate to this fraction of --lr as the run "
        "ends (1: constant)",
        metavar="FRACTION",
    )
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 disables)")
    optimizer: str = _opt(
        "schedulefree",
        "schedulefree (AdamW without a schedule, Defazio et al. 2024: its steps are averaged), "
        "adamw or adafactor",
        OPTIMIZERS,
    )
    checkpointing: bool | None = _opt(
        None,
        "recompute each layer's activations in the backward pass instead of keeping them "
        "(less memory, slower steps; default: on when the kept activations would take more "
        "than a quarter of the device's free memory)",
    )
    compile: bool | None = _opt(
        None,
        "compile the decoder layers with torch.compile: 1.4-1.6x faster steps on CPU after "
        "20 s of compiling (4 s once cached); falls back to plain PyTorch if compiling fails "
        "(default: on a CPU, on when the training steps would take more than 2 minutes "
        "uncompiled; on a GPU, off)",
    )
    eval_every: int | None = _opt(
        None,
        "steps between validation runs (default: about 10 a run, so the loss curve has "
        "points; 0: only at the start and the end)",
        metavar="N",
    )
    save_every: int = _opt(50, "steps between checkpoints (0: only at the end)", metavar="N")
    patience: int = _opt(
        0,
        "stop early when N validations in a row do not beat the best validation loss, and "
        "keep the soft prompt of the best one (0: off, train every step)",
        metavar="N",
    )
    seed: int = _opt(1729, "random seed (file order, batches, initialisation)")
    # the run itself
    resume: bool = _opt(
        False,
        "continue the unfinished run in --output; with --init-from FILE.mtjsp (and no "
        "checkpoint in --output), continue that mtj-softtuner run from its step",
        group="run",
    )
    force: bool = _opt(
        False, "overwrite a finished run in --output, or resume despite changes", group="run"
    )
    cache_dir: str | None = _opt(
        None,
        "token cache folder (default: $SOFTPROMPT_CACHE or ~/.cache/softprompt)",
        group="run",
        metavar="DIR",
    )
    progress: bool = _opt(True, "show a progress bar", group="run")
    report: bool = _opt(
        True, "write report.md with the loss curve and sample continuations at the end", group="run"
    )

    def validate(self) -> TrainConfig:
        """Check every value at once; raise one ConfigError listing all problems."""
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        if self.init is None:
            self.init = "text" if self.init_text or self.teacher_prompt else "passage"
        need(
            self.dataset is not None or self.teacher_prompt is not None,
            "--dataset is required: give a .txt or .jsonl file or a folder of them (or "
            "--teacher-prompt to distil a written prompt on text sampled from it)",
        )
        need(
            self.output is not None,
            "--output is required: give a folder for the results (a run's config.toml names "
            "none, so a rerun from it goes to a new folder)",
        )
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                problems.append(
                    f"{flag(f.name)} must be one of {', '.join(choices)} (got {value!r})"
                )
        need(self.tokens is None or self.tokens >= 1, "--tokens must be at least 1")
        need(self.block_size is None or self.block_size >= 2, "--block-size must be at least 2")
        need(0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1), e.g. 0.05")
        need(self.val_max_blocks >= 1, "--val-max-blocks must be at least 1")
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        need(
            math.isfinite(self.epochs) and self.epochs > 0,
            "--epochs must be more than 0, e.g. 1 or 0.5",
        )
        need(
            self.batch_size == "auto"
            or (isinstance(self.batch_size, int) and self.batch_size >= 1),
            f"--batch-size must be a whole number of at least 1, or auto (got {self.batch_size!r})",
        )
        need(
            not (self.batch_size == "auto" and self.shard_model),
            "--batch-size auto is not available with --shard-model: give a number",
        )
        need(self.grad_accum >= 1, "--grad-accum must be at least 1")
        problems += self._optimizer_problems()
        need(0 <= self.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}")
        need(self.eval_every is None or self.eval_every >= 0, "--eval-every must be 0 or more")
        need(self.save_every >= 0, "--save-every must be 0 or more")
        need(self.patience >= 0, "--patience must be 0 (off) or more")
        need(
            not (self.patience and (self.eval_every == 0 or self.val_fraction == 0)),
            "--patience counts validations: it needs --eval-every above 0 and a --val-fraction",
        )
        if self.init == "text":
            need(
                bool(self.init_text or self.teacher_prompt),
                "--init text needs --init-text TEXT_OR_FILE",
            )
        problems += self._text_problems() + self._combination_problems()
        problems += self._distil_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _optimizer_problems(self) -> list[str]:
        """The learning rate, its schedule, weight decay and clipping."""
        checks = [
            (
                self.lr == "auto"
                or (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0),
                "--lr must be more than 0, e.g. 0.03, or auto",
            ),
            (
                0.0 <= self.warmup < 1.0,
                "--warmup is a fraction of the steps, in [0, 1), e.g. 0.1",
            ),
            (
                0.0 <= self.decay_to <= 1.0,
                "--decay-to is a fraction of --lr, in [0, 1] (1: no decay), e.g. 0.1",
            ),
            # an infinite weight decay or clip norm passes ">= 0", then trains to NaN
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                "--weight-decay must be 0 or more (a finite number)",
            ),
            (
                math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
                "--max-grad-norm must be 0 (off) or more (a finite number)",
            ),
        ]
        return [msg for ok, msg in checks if not ok]

    def _text_problems(self) -> list[str]:
        problems = []
        for name, value in self.to_dict().items():
            if not isinstance(value, str):
                continue
            # config.toml is UTF-8: a lone surrogate (from a JSON "\ud800" or undecodable
            # command-line bytes) cannot be written to it
            if SURROGATE.search(value):
                problems.append(
                    f"{flag(name)} is not valid Unicode text (it holds a lone surrogate)"
                )
            if name in PATHS and "\0" in value:
                problems.append(f"{flag(name)} holds a NUL character, which no path can hold")
        return problems

    def _combination_problems(self) -> list[str]:
        checks = [
            (
                self.device_map in (None, *DEVICE_MAPS),
                f"--device-map must be one of {', '.join(DEVICE_MAPS)} (got {self.device_map!r})",
            ),
            (
                not (self.load_in_8bit and self.load_in_4bit),
                "--load-in-8bit and --load-in-4bit exclude each other: pick one",
            ),
            (
                not (self.shard_model and self.device_map),
                "--shard-model (FSDP across processes) and --device-map (one process) exclude each other",
            ),
            (
                not (self.shard_model and self.quantize),
                "--shard-model cannot shard a bitsandbytes-quantized model: use one of them",
            ),
        ]
        return [msg for ok, msg in checks if not ok]

    def _distil_problems(self) -> list[str]:
        checks = [
            (
                math.isfinite(self.distill_weight) and 0.0 <= self.distill_weight <= 1.0,
                "--distill-weight must be in [0, 1], e.g. 1 (KL alone) or 0.5",
            ),
            (
                self.teacher_prompt is None or bool(self.teacher_prompt.strip()),
                "--teacher-prompt is empty: give the written prompt's text or a file holding it",
            ),
            (self.teacher_samples >= 1, "--teacher-samples must be at least 1"),
            (
                math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0,
                "--teacher-temperature must be more than 0, e.g. 1",
            ),
            (0.0 < self.teacher_top_p <= 1.0, "--teacher-top-p must be in (0, 1], e.g. 1"),
            (
                not (self.teacher_prompt and self.shard_model),
                "--teacher-prompt does not work with --shard-model yet: train without "
                "--shard-model (data-parallel torchrun works)",
            ),
        ]
        return [msg for ok, msg in checks if not ok]

    @property
    def quantize(self) -> str | None:
        """How the frozen model is loaded: "8bit", "4bit" or None."""
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None

    @property
    def output_dir(self) -> Path:
        """--output as a path (``validate`` has made sure it is given)."""
        if self.output is None:
            raise ConfigError("--output is required: the folder for the results")
        return Path(self.output).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Options that describe one invocation, not the run: never saved, never read back. A run's
# config.toml names no --output: a rerun from it goes to a new folder.
PER_INVOCATION = {"resume", "force", "progress", "output"}
# The table of config.toml that holds what the run decided itself (a block size, a batch
# size found by trying, --compile...): a resume keeps them, a rerun decides again.
DECIDED = "decided"


def field_kind(f: dataclasses.Field) -> str:
    """What an option (a field of TrainConfig, SamplingOptions or a command's options) holds,
    from its annotation: "bool"; "bool or auto" (a bool left unset, None, lets the run
    decide); "int"; "int or auto" (``int | str``: a number or "auto"); "float"; "float or
    auto" (``float | str``); "ids" (a tuple of whole numbers); "list" (of strings, given once
    each); else "str". ``| None`` only means the option may be left unset."""
    kind = str(f.type)
    if "bool" in kind:
        return "bool or auto" if f.default is None else "bool"
    if kind.startswith("tuple"):
        return "ids"
    if kind.startswith("list"):
        return "list"
    if "int" in kind:
        return "int or auto" if "str" in kind else "int"
    if "float" in kind:
        return "float or auto" if "str" in kind else "float"
    return "str"


def read_value(kind: str, text: str) -> Any:
    """An option's value from its text, by its kind (``field_kind``): a number, or the word
    auto where the kind allows it; on/off/true/false for a bool; else the text. Raises
    ValueError for text the kind does not take."""
    if kind in ("int or auto", "float or auto") and text == "auto":
        return text
    if kind in ("int", "int or auto"):
        return int(text)
    if kind in ("float", "float or auto"):
        return float(text)
    if kind in ("bool", "bool or auto"):
        words = {"true": True, "false": False, "on": True, "off": False}
        if text.lower() not in words:
            raise ValueError(f"not on or off: {text!r}")
        return words[text.lower()]
    return text


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a value read from a TOML file (or the page's form) against the field's type."""
    f = FIELDS[name]
    kind = field_kind(f)
    ok: bool
    if kind in ("bool", "bool or auto"):
        ok = isinstance(value, bool)
    elif kind in ("int or auto", "float or auto") and value == "auto":
        ok = True
    elif kind in ("int", "int or auto"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind in ("float", "float or auto"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        want = str(f.type).replace(" | None", "")
        raise ConfigError(f"{source}: {name} must be a {want}, got {value!r}")
    return value


def read_toml(path: str | Path, decided: bool = False) -> dict[str, Any]:
    """Read run options from a TOML file; keys may use - or _. Unknown keys are errors. The
    ``[decided]`` table of a run's config.toml is read only with ``decided`` (a resume)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a folder; give a .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
    # Allow the options either at the top level or under a [train] table.
    if isinstance(raw.get("train"), dict):
        raw = {**{k: v for k, v in raw.items() if k != "train"}, **raw["train"]}
    made = raw.pop(DECIDED, None)
    if decided and isinstance(made, dict):
        raw = {**raw, **made}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"config file {p}: unknown option {key!r}")
        out[name] = _coerce(name, value, f"config file {p}")
    return out


# TOML's basic strings hold no control character but tab, and no raw quote or backslash
_TOML_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')
_TOML_SHORT = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    escaped = _TOML_ESCAPE.sub(lambda m: _TOML_SHORT.get(m[0], f"\\u{ord(m[0]):04x}"), str(v))
    return f'"{escaped}"'


def to_toml(values: dict[str, Any], decided: dict[str, Any] | None = None) -> str:
    """A TOML document of the set options (None values are left out), and the values the
    run decided itself in a ``[decided]`` table."""
    lines = [
        "# The options of this run as asked for: `softprompt train --config FILE --output NEW`",
        "# runs it again (deciding anew what [decided] holds); `--output DIR --resume` goes on.",
        *_toml_lines(values),
    ]
    if decided:
        lines += [
            "",
            f"[{DECIDED}]  # decided by the run itself; kept by --resume",
            *_toml_lines(decided),
        ]
    return "\n".join(lines) + "\n"


def _toml_lines(values: dict[str, Any]) -> list[str]:
    return [
        f"{key.replace('_', '-')} = {_toml_value(value)}"
        for key, value in values.items()
        if value is not None and key not in PER_INVOCATION
    ]


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every option that names a file or folder on this machine made absolute,
    so a run's config.toml works from any working folder (a hub id stays as it is)."""

    def absolute(value: str | None, must_exist: bool) -> str | None:
        if not value:
            return value
        p = Path(value).expanduser()
        return str(p.resolve()) if p.exists() or not must_exist else value

    changes: dict[str, Any] = {
        name: absolute(getattr(cfg, name), name == "model") for name in PATHS
    }
    for name in ("init_text", "teacher_prompt"):  # text, or a path when a file is there
        value = getattr(cfg, name)
        if value and len(value) < 4096 and "\n" not in value:
            changes[name] = absolute(value, True)
    changes.pop("output")
    return dataclasses.replace(cfg, **changes)


def saved_options(output: str | Path, given: dict[str, Any]) -> dict[str, Any]:
    """What a resume reads back from the run's config.toml: the options asked for (not what
    the run decided, which train applies itself), under the ones ``given`` now. A saved path
    that is gone is a ConfigError saying how to point the run at the new place."""
    path = Path(output).expanduser() / CONFIG_FILE
    if not path.is_file():
        return {}
    saved = {k: v for k, v in read_toml(path).items() if k not in PER_INVOCATION}
    if saved:  # a run from before --decay-to resumes on the schedule it started with
        saved.setdefault("decay_to", DECAY_TO_BEFORE)
    for name, what in (("dataset", "dataset"), ("model", "model")):
        value = saved.get(name)
        if (
            given.get(name) is None
            and value
            and Path(value).is_absolute()
            and not Path(value).exists()
        ):
            raise ConfigError(
                f"--resume: the run's {what} {value} (saved in {path}) does not exist: pass "
                f"--{name} NEW_PATH to point the run at where it is now"
                + (" (the same text: it is checked)" if name == "dataset" else "")
            )
    return saved


def decisions(output: str | Path) -> dict[str, Any]:
    """What a run decided itself (its config.toml's [decided] table), for a resume."""
    path = Path(output).expanduser() / CONFIG_FILE
    if not path.is_file():
        return {}
    everything, asked = read_toml(path, decided=True), read_toml(path)
    return {k: v for k, v in everything.items() if k not in asked or asked[k] != v}
