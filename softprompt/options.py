"""The options of `softprompt generate`, `eval` and `serve`: one small dataclass per command,
each field with its command-line help in ``metadata``, as ``TrainConfig`` (config.py) and
``SamplingOptions`` (sampling.py) carry theirs. ``cli.add_options`` makes the flags from them
and ``from_args`` reads them back, so an option is named, typed, defaulted and explained once.

Metadata keys: ``help`` (always); ``metavar``; ``flags`` (the option strings, default
``--name-with-dashes``); ``required``; ``positional`` (an optional positional argument).
The model's device options (``--device``, ``--dtype``, ``--device-map``, ``--load-in-*``)
are shared by the commands that load a model: ``cli.add_device_options``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

MODEL_HELP = "Hugging Face id, local folder or .gguf file (default: SmolLM2-135M-Instruct)"
SOFTPROMPT_HELP = "soft prompt file (.zip, .safetensors)"


def option(default: Any, help: str, metavar: str | None = None, **more: Any) -> Any:
    """A dataclass field for a command-line option: its default and help (see the module)."""
    return field(default=default, metadata={"help": help, "metavar": metavar, **more})


@dataclass(frozen=True)
class GenerateOptions:
    """`softprompt generate`, besides the sampling options and the device options."""

    prompt: str | None = option(
        None, "the prompt (default: --prompt-file, else standard input)", positional=True
    )
    prompt_file: str | None = option(None, "read the prompt from a UTF-8 text file", "FILE")
    model: str | None = option(None, MODEL_HELP)
    softprompt: str | None = option(None, SOFTPROMPT_HELP, "FILE")
    stop: list[str] = field(
        default_factory=list,
        metadata={
            "help": "stop before this text; repeatable; \\n and \\t are read as newline and tab",
            "metavar": "TEXT",
        },
    )
    num_samples: int = option(1, "samples to generate", "N", flags=("-n", "--num-samples"))
    compare: bool = option(
        False,
        "print the continuation with and then without the soft prompt, same seed (a "
        "distilled soft prompt: also with its written prompt in front, and the time each took)",
    )
    teacher_prompt: str | None = option(
        None,
        "with --compare: the written prompt to compare with (text or a file; default: the "
        "one a distilled soft prompt records)",
        "TEXT_OR_FILE",
    )
    echo: bool = option(True, "print the prompt before the new text")


@dataclass(frozen=True)
class EvalOptions:
    """`softprompt eval`, besides the device options."""

    model: str | None = option(None, MODEL_HELP)
    softprompt: str = option(None, SOFTPROMPT_HELP, "FILE", required=True)
    dataset: str | None = option(
        None,
        "a .txt or .jsonl file or a folder of them (examples: only their completions are "
        "scored; a soft prompt distilled on text sampled from its written prompt: default, "
        "the part of that text its training held out)",
        "PATH",
    )
    recursive: bool = option(False, "also read .txt and .jsonl files in sub-folders")
    block_size: int | None = option(
        None, "tokens per block (default: as training picks it for this soft prompt)", "N"
    )
    max_blocks: int = option(64, "score at most N blocks", "N")
    val_fraction: float = option(
        0.0,
        "score only the blocks a training run with this --val-fraction held out (with the "
        "same --seed, --block-size and --max-blocks as its --val-max-blocks); 0: the last "
        "blocks of the whole dataset",
        "F",
    )
    seed: int = option(1729, "file order, as in training")
    batch_size: int = option(4, "blocks per forward pass", "N")
    json: bool = option(False, "print the results as JSON")
    teacher_prompt: str | None = option(
        None,
        "score against this written prompt (text or a file): rows with it, cut to the soft "
        "prompt's length and whole, and the KL to it (default: the one a distilled soft "
        "prompt records)",
        "TEXT_OR_FILE",
    )

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keywords of ``softprompt.evaluate.evaluate`` these options set."""
        keys = (
            "block_size",
            "max_blocks",
            "val_fraction",
            "seed",
            "batch_size",
            "recursive",
            "teacher_prompt",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class ServeOptions:
    """`softprompt serve`, besides the device options."""

    model: str | None = option(None, MODEL_HELP)
    softprompts: str | None = option(
        None, "folder of soft prompt files (.zip, .safetensors, ...), offered by file name", "DIR"
    )
    softprompt: str | None = option(
        None,
        "file name in DIR to use when a request names none (without --softprompts: a path)",
        "NAME",
    )
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(5001, "port, 0 for any free one")
    api_key: str | None = option(
        None,
        "require `Authorization: Bearer KEY` (printable ASCII) for generating and everything "
        "but the connection info clients read first (default: $SOFTPROMPT_API_KEY; none)",
        "KEY",
    )
    queue: int = option(4, "requests that may wait for the running generation; more get 503", "N")
    max_length_limit: int | None = option(
        None,
        "new tokens a request may ask for at most (default: what the context leaves after "
        "the soft prompt and one prompt token)",
        "N",
    )
    compile: bool = option(
        False,
        "compile the model's one-token step with torch.compile before serving: decoding about "
        "1.2x as fast on a CPU, after a minute or more of compiling at start (needs a C++ "
        "compiler; without one it warns and runs uncompiled)",
    )


T = TypeVar("T")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The options ``cls`` (a dataclass) of parsed command-line arguments."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return cls(**{f.name: getattr(args, f.name) for f in fields})
