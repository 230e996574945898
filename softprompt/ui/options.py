"""The page's training options: ``TrainConfig``'s fields as the form shows them (kind, flag,
default, help, group), and the form's values read back as ``TrainConfig`` values, with the
command line's messages."""

from __future__ import annotations

from typing import Any

from ..config import FIELDS, TrainConfig, _coerce, flag, read_value
from ..config import field_kind as config_field_kind
from ..errors import ConfigError

# TrainConfig fields the page does not offer: the page picks the output folder, shows
# progress itself, and has its own Resume button; it starts one process, never torchrun.
HIDDEN = {"output", "progress", "resume", "force", "shard_model"}
# shown open, in this order (as on the Colab notebooks' forms: the data, the soft prompt's
# name, description, author and starter text, the model and the numbers); the rest sit under
# "more options"
BASIC = [
    "dataset",
    "name",
    "author",
    "description",
    "init_text",
    "model",
    "tokens",
    "max_steps",
    "epochs",
    "lr",
    "batch_size",
    "block_size",
]
GROUPS = ("data", "distillation", "model", "soft prompt", "training", "run")
# options whose text is kept as typed, spaces and line breaks included
VERBATIM = {"description", "teacher_prompt"}
# each option's name on the page; the flag is kept in its help. An option not named here
# (one added to TrainConfig later) shows its field name in words.
LABELS = {
    "dataset": "Dataset",
    "recursive": "Include sub-folders",
    "skip_bad_files": "Skip files that are not text",
    "block_size": "Block size",
    "val_fraction": "Validation fraction",
    "val_max_blocks": "Validation blocks (at most)",
    "model": "Model",
    "device": "Device",
    "dtype": "Precision",
    "device_map": "Spread over GPUs",
    "load_in_8bit": "Load in 8 bits",
    "load_in_4bit": "Load in 4 bits",
    "name": "Name",
    "description": "Description",
    "copy_to": "Also copy the zip to",
    "author": "Author",
    "tokens": "Soft prompt tokens",
    "init": "Initialise from",
    "init_text": "Starter text",
    "init_from": "Start from a soft prompt file",
    "teacher_prompt": "Written prompt to distil",
    "distill_weight": "KL's share of the loss",
    "teacher_samples": "Sampled continuations",
    "teacher_temperature": "Sampling temperature",
    "teacher_top_p": "Sampling top-p",
    "max_steps": "Steps",
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "grad_accum": "Gradient accumulation",
    "lr": "Learning rate",
    "warmup": "Warmup",
    "decay_to": "Decay the rate to (x learning rate)",
    "weight_decay": "Weight decay",
    "max_grad_norm": "Gradient clipping",
    "optimizer": "Optimizer",
    "checkpointing": "Gradient checkpointing",
    "compile": "Compile",
    "eval_every": "Validate every (steps)",
    "save_every": "Checkpoint every (steps)",
    "seed": "Seed",
    "cache_dir": "Token cache folder",
    "report": "Write report.md",
}


def label(name: str) -> str:
    """The option's name on the page: "Learning rate" for lr."""
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def field_kind(name: str) -> str:
    """What the page's field for option ``name`` holds (config.field_kind's kinds)."""
    return config_field_kind(FIELDS[name])


def option_list() -> list[dict[str, Any]]:
    """TrainConfig's fields as the page shows them: name, flag, kind, default, help, choices."""
    out = []
    for name, f in FIELDS.items():
        if name in HIDDEN:
            continue
        choices = f.metadata.get("choices") or (
            ("on", "off") if field_kind(name) == "bool or auto" else None
        )
        # an option that is on by default is turned off by its --no- flag, as on the command
        # line: the page shows a box ticked by default
        invert = field_kind(name) == "bool" and f.default is True
        out.append(
            {
                "name": name,
                "label": label(name),
                "flag": f"--no-{name.replace('_', '-')}" if invert else flag(name),
                "kind": field_kind(name),
                "default": f.default,
                "invert": invert,
                "help": f.metadata["help"],
                "choices": list(choices) if choices else None,
                "group": f.metadata.get("group", "training"),
                "basic": BASIC.index(name) if name in BASIC else None,
                "required": name == "dataset",
            }
        )
    return out


def parse_options(raw: Any) -> dict[str, Any]:
    """The page's form values (strings, numbers, booleans) as TrainConfig values; empty
    strings mean the default. Raises ConfigError naming the option."""
    if not isinstance(raw, dict):
        raise ConfigError("options must be a JSON object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name in HIDDEN:
            raise ConfigError(f"unknown option {key!r}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        kind = field_kind(name)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = value if name in VERBATIM else read_value(kind, text)
            except ValueError:
                kind_text = {
                    "int or auto": "a number or auto",
                    "float or auto": "a number or auto",
                    "bool or auto": "on or off",
                }.get(kind, f"a {kind}")
                raise ConfigError(f"{flag(name)} must be {kind_text}, got {text!r}") from None
        values[name] = _coerce(name, value, flag(name))
    cfg = TrainConfig(**values, output="-")
    cfg.validate()
    # the defaults are left to train; only what was set is written
    return {k: v for k, v in values.items() if v != FIELDS[k].default}
