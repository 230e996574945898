"""The `softprompt` command: one function per subcommand, and the single error boundary.

Every SoftPromptError becomes one line on stderr and exit code 2 (130 for an interrupted run);
--debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import FIELDS, PER_INVOCATION, TrainConfig, flag, read_toml
from .errors import ConfigError, SoftPromptError

log = logging.getLogger("softprompt")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit code 2), without usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _field_type(name: str):
    kind = str(FIELDS[name].type)
    if "bool" in kind:
        return bool
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="read options from a TOML file (flags override it)")
    groups: dict[str, Any] = {}
    for name, f in FIELDS.items():
        group_name = f.metadata.get("group", "training")
        group = groups.setdefault(group_name, p.add_argument_group(group_name))
        kind = _field_type(name)
        default = f.default
        help_text = f.metadata["help"]
        if kind is bool:
            if name == "progress":
                group.add_argument("--no-progress", dest="progress", action="store_false",
                                   default=argparse.SUPPRESS, help="do not show a progress bar")
            else:
                group.add_argument(flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if default is not None and name not in ("dataset", "output"):
            help_text += f" (default: {default})"
        group.add_argument(
            flag(name), dest=name, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else name.upper().replace("_", "-").split("-")[-1],
            help=help_text,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="softprompt", description="Train, share and use soft prompts.")
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True

    p = sub.add_parser("train", help="train a soft prompt on a folder of .txt files",
                       description="Train a soft prompt on a .txt file or a folder of them.")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt, with or without a soft prompt")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--model", help="Hugging Face id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--softprompt", metavar="FILE", help="soft prompt file (.zip, .safetensors)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also print the continuation without the soft prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_generate)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    """defaults < saved config of the run being resumed < --config file < flags."""
    explicit = {k: v for k, v in vars(args).items() if k in FIELDS}
    values: dict[str, Any] = {}
    if explicit.get("resume") and explicit.get("output"):
        saved = Path(explicit["output"]).expanduser() / "config.toml"
        if saved.is_file():
            values.update({k: v for k, v in read_toml(saved).items() if k not in PER_INVOCATION})
    if args.config:
        values.update(read_toml(args.config))
    values.update(explicit)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config(args)
    result = train(cfg)
    print(f"soft prompt: {result.files['kobold']}")
    if result.val_loss_before is not None:
        print(
            f"validation loss: {result.val_loss_before:.4f} -> {result.val_loss_after:.4f} "
            f"(perplexity {result.perplexity_before:.2f} -> {result.perplexity_after:.2f})"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .model import load_model
    from .soft_prompt import SoftPrompt

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ConfigError("generate needs a prompt: give it as an argument or on standard input")
    sp = SoftPrompt.load(args.softprompt) if args.softprompt else None
    lm = load_model(args.model, args.device, args.dtype)
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    runs = [("with the soft prompt", sp), ("without", None)] if (args.compare and sp) else [(None, sp)]
    for title, soft in runs:
        text = generate(lm, prompt, soft, **options)
        if title:
            print(f"--- {title}")
        print(prompt + text)
    return 0


def setup_logging(debug: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        setup_logging(args.debug, args.quiet)
        return args.func(args)
    except SoftPromptError as e:
        if debug:
            raise
        print(f"softprompt: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: still one line, with a pointer to --debug
        if debug:
            raise
        print(f"softprompt: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

