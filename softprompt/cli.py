"""The `softprompt` command: for each subcommand an ``add_<command>`` that declares it and a
``cmd_<command>`` that runs it, and the single error boundary.

The options come from dataclasses whose fields carry their help (``TrainConfig``,
``SamplingOptions``, and ``softprompt.options`` for generate, eval and serve), through one
``add_options``. Every SoftPromptError becomes one line on stderr and exit code 2 (130 for an
interrupted run); --debug shows the traceback instead. Building the parser and reporting a
bad command line import no torch: the commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import (
    DEVICE_MAPS,
    DTYPES,
    FIELDS,
    TrainConfig,
    field_kind,
    flag,
    read_toml,
    read_value,
    saved_options,
)
from .errors import ConfigError, SoftPromptError
from .fileio import check_copy_target, copy_file
from .formats import writable
from .options import EvalOptions, GenerateOptions, ServeOptions, from_args
from .runfiles import StatusFile
from .sampling import SamplingOptions

if TYPE_CHECKING:
    from .model import LoadedModel

log = logging.getLogger("softprompt")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (exit code 2), without usage,
    and takes options only as spelled in full (`generate --prompt X` is not --prompt-file)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Unknown arguments are reported by the command they were given to, with the
        nearest option it has (`generate --prompt`: did you mean --prompt-file?)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            where: argparse.ArgumentParser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    where = action.choices.get(str(getattr(ns, action.dest, "")), self)
            known = [o for a in where._actions for o in a.option_strings]
            given = extras[0].split("=")[0]
            longer = [o for o in known if o.startswith(given) and o.startswith("--")]
            near = longer or difflib.get_close_matches(given, known, n=1, cutoff=0.6)
            hint = f"; did you mean {' or '.join(near)}?" if given.startswith("-") and near else ""
            where.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _or_auto(kind: str) -> Callable[[str], Any]:
    """A command-line reader of an option of ``kind`` "int or auto" or "float or auto"."""

    def read(text: str) -> Any:
        try:
            return read_value(kind, text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: give a number or auto"
            ) from None

    return read


def _sampler_order(text: str) -> tuple[int, ...]:
    from .sampling import parse_order

    try:
        return parse_order(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: give sampler ids, e.g. 6,0,1,3,4,2,5"
        ) from None


# how a value of each kind of option (config.field_kind) is read from the command line
PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "int or auto": _or_auto("int or auto"),
    "float or auto": _or_auto("float or auto"),
    "ids": _sampler_order,
    "list": str,
}


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    suppress: bool = False,
    notes: dict[str, str] | None = None,
) -> None:
    """One option per field of the dataclass ``cls`` (TrainConfig, SamplingOptions, the
    commands' options in softprompt.options), from its annotation (``config.field_kind``) and
    metadata: help, metavar, choices, flags, required, positional, group (an argument group).
    ``suppress``: options not given stay out of the namespace (so that train tells them from
    the config file's). ``notes``: text to add to a field's help here."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        target: Any = parser
        group = f.metadata.get("group")
        if group:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            target = groups[group]
        help_text = f.metadata["help"].replace("%", "%%") + (notes or {}).get(f.name, "")
        if field_kind(f) in ("bool", "bool or auto"):
            _add_switch(target, f, help_text, suppress)
        else:
            _add_value(target, f, help_text, suppress)


def _add_switch(target: Any, f: dataclasses.Field, help_text: str, suppress: bool) -> None:
    """A bool option: --x (off by default), --no-x (on by default), or both (unset: None)."""
    dashed = f.name.replace("_", "-")
    default = argparse.SUPPRESS if suppress else f.default
    if f.default is None:  # unset: the run decides; either flag overrides it
        for value, prefix, text in (
            (True, "", help_text),
            (False, "no-", f"the opposite of --{dashed}"),
        ):
            target.add_argument(
                f"--{prefix}{dashed}",
                dest=f.name,
                action="store_const",
                const=value,
                default=default,
                help=text,
            )
    elif f.default is True:
        target.add_argument(
            f"--no-{dashed}",
            dest=f.name,
            action="store_false",
            default=default,
            help=f"do not {help_text}",
        )
    else:
        flags = f.metadata.get("flags") or (flag(f.name),)
        target.add_argument(
            *flags, dest=f.name, action="store_true", default=default, help=help_text
        )


def _add_value(target: Any, f: dataclasses.Field, help_text: str, suppress: bool) -> None:
    """An option that takes a value (or, positional, an optional argument)."""
    kind, meta = field_kind(f), f.metadata
    factory = f.default_factory
    default: Any = factory() if callable(factory) else f.default
    if meta.get("positional"):
        target.add_argument(f.name, nargs="?", default=default, help=help_text)
        return
    if default is not None and kind != "list":
        shown = ",".join(map(str, default)) if kind == "ids" else default
        help_text += f" (default: {shown})"
    choices = meta.get("choices")
    target.add_argument(
        *(meta.get("flags") or (flag(f.name),)),
        dest=f.name,
        action="append" if kind == "list" else "store",
        type=PARSERS[kind],
        default=argparse.SUPPRESS if suppress else default,
        choices=choices,
        required=bool(meta.get("required")),
        metavar=None if choices else meta.get("metavar") or f.name.upper().split("_")[-1],
        help=help_text,
    )


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="model dtype (default: auto)",
    )
    p.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="spread the model over this machine's GPUs (accelerate)",
    )
    quant = p.add_mutually_exclusive_group()
    for bits in ("8bit", "4bit"):
        quant.add_argument(
            f"--load-in-{bits}",
            dest="quantize",
            action="store_const",
            const=bits,
            help=f"load the model in {bits[0]} bits with bitsandbytes (CUDA)",
        )


def sampling_from_args(args: argparse.Namespace) -> SamplingOptions:
    """The checked SamplingOptions of the flags (one line naming every bad one)."""
    return from_args(SamplingOptions, args).check()


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model with the options of ``add_device_options``."""
    from .model import load_model

    return load_model(
        args.model,
        args.device,
        args.dtype,
        device_map=args.device_map,
        quantize=args.quantize,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="softprompt", description="Train, share and use soft prompts.")
    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for add in (add_train, add_generate, add_eval, add_convert, add_inspect, add_ui, add_serve):
        add(sub)
    return parser


# ----------------------------------------------------------------------------- train


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a soft prompt on a folder of .txt files or .jsonl examples",
        description="Train a soft prompt on a .txt file or a folder of them, or on examples: "
        ".jsonl files of prompt/completion pairs or chats.",
    )
    p.add_argument(
        "--config", metavar="FILE", help="read options from a TOML file (flags override it)"
    )
    p.add_argument(
        "--status-file",
        metavar="FILE",
        help="keep FILE up to date with the run's phase, step and last error, as JSON (for "
        "programs that watch the run, such as `softprompt ui`)",
    )
    add_options(p, TrainConfig, suppress=True)
    p.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """defaults < saved config of the run being resumed < --config file < flags."""
    explicit = {k: v for k, v in vars(args).items() if k in FIELDS}
    values: dict[str, Any] = {}
    if explicit.get("resume") and explicit.get("output"):
        values.update(saved_options(explicit["output"], explicit))
    if args.config:
        values.update(read_toml(args.config))
    values.update(explicit)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import from_env
    from .train import Interrupted, train

    main_rank = from_env().main  # under torchrun only rank 0 reports: the others say nothing
    try:
        cfg = train_config(args)
    except SoftPromptError as e:  # the options themselves are wrong: say so there too
        StatusFile(args.status_file if main_rank else None).update(
            phase="failed", message=str(e), force=True
        )
        raise
    try:
        result = train(cfg, status_file=args.status_file)
    except Interrupted:
        if main_rank:
            raise
        return 130
    if not main_rank:
        return 0
    print(f"soft prompt: {result.files['kobold']}")
    if result.val_loss_before is not None:
        print(
            f"validation loss: {result.val_loss_before:.4f} -> {result.val_loss_after:.4f} "
            f"(perplexity {result.perplexity_before:.2f} -> {result.perplexity_after:.2f})"
        )
    return 0


def read_prompt(opts: GenerateOptions) -> str:
    """The prompt from the argument, --prompt-file or standard input (in that order)."""
    if opts.prompt is not None and opts.prompt_file:
        raise ConfigError("give the prompt either as an argument or with --prompt-file, not both")
    if opts.prompt is not None:
        return opts.prompt
    if opts.prompt_file:
        from .data import read_text

        try:
            return read_text(Path(opts.prompt_file).expanduser(), what="--prompt-file")
        except SoftPromptError as e:
            raise ConfigError(str(e)) from None
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError(
            "generate needs a prompt: give it as an argument, with --prompt-file, or on standard input"
        )
    return sys.stdin.read()


# ----------------------------------------------------------------------------- generate


def add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt, with or without a soft prompt",
        description="Continue a prompt with the model and a soft prompt in front of it; "
        "the text streams as it is generated.",
    )
    add_options(p, GenerateOptions)
    add_options(p, SamplingOptions, notes={"seed": "; sample i of -n uses SEED + i"})
    add_device_options(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import Progress, stream
    from .soft_prompt import SoftPrompt

    opts = from_args(GenerateOptions, args)
    options = sampling_from_args(args)
    if opts.num_samples < 1:
        raise ConfigError("-n must be at least 1")
    if opts.compare and not opts.softprompt:
        raise ConfigError(
            "--compare needs --softprompt FILE: it prints the text with and without it"
        )
    prompt = read_prompt(opts)
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in opts.stop]
    sp = SoftPrompt.load(opts.softprompt) if opts.softprompt else None
    runs = _generate_runs(opts, sp)
    lm = load_model_from_args(args)
    if sp is not None:  # before anything is printed
        sp.check_fits(lm.model, f"--softprompt {opts.softprompt}", lm.name)
    n = opts.num_samples
    for i in range(n):
        sample = dataclasses.replace(options, seed=(options.seed + i) % 2**64)
        for title, soft, written in runs:
            header = ", ".join(x for x in (f"sample {i + 1}" if n > 1 else "", title) if x)
            if header:
                print(f"--- {header}", flush=True)
            if opts.echo:
                sys.stdout.write(prompt)
            t0, made = time.perf_counter(), Progress()
            try:
                for piece in stream(lm, written + prompt, soft, sample, stop=stops, progress=made):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            finally:  # an error's line, or the next sample, starts on a line of its own
                sys.stdout.write("\n")
                sys.stdout.flush()
            if len(runs) > 1:
                seconds = time.perf_counter() - t0
                print(f"({made.tokens} tokens in {seconds:.2f} s)", file=sys.stderr, flush=True)
    return 0


def _generate_runs(opts: GenerateOptions, sp) -> list[tuple[str, Any, str]]:
    """(title, soft prompt, written prompt put before the prompt) of each continuation:
    one, or with --compare the soft prompt's, its written prompt's (a distilled one, or
    --teacher-prompt) and none's."""
    from .evaluate import written_prompt_of

    if not (opts.compare and sp is not None):
        if opts.teacher_prompt:
            raise ConfigError("--teacher-prompt goes with --compare: add --compare")
        return [("", sp, "")]
    runs = [(f"with the soft prompt ({sp.name})", sp, "")]
    written = written_prompt_of(sp, opts.teacher_prompt)
    if written is not None:
        runs.append(("with the written prompt in front", None, written))
    return runs + [("without", None, "")]


# ----------------------------------------------------------------------------- eval


def add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out loss and perplexity with and without a soft prompt",
        description="Score a dataset with the soft prompt, without any prompt, and with the "
        "soft prompt's init text as an ordinary prompt (when it was made from text). Each "
        "row puts the model's BOS token (when its tokenizer adds one) after its prompt, as "
        "training and generation do, and every row scores the same tokens: all of each block "
        "after a BOS token, else all but the first.",
    )
    add_options(p, EvalOptions)
    add_device_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import check_options, evaluate
    from .soft_prompt import SoftPrompt

    opts = from_args(EvalOptions, args)
    check_options(opts.block_size, opts.max_blocks, opts.val_fraction, opts.batch_size)
    sp = SoftPrompt.load(opts.softprompt)
    lm = load_model_from_args(args)
    result = evaluate(lm, sp, opts.dataset, **opts.evaluate_kwargs())
    print(json.dumps(result.to_dict(), indent=2) if opts.json else result.table())
    return 0


# ----------------------------------------------------------------------------- convert, inspect


def add_convert(sub: Any) -> None:
    """`convert`: soft prompt files between formats (see softprompt.formats)."""
    p = sub.add_parser(
        "convert",
        help="convert a soft prompt between formats",
        description="Read any soft prompt file softprompt knows (KoboldAI .zip, PEFT adapter folder, "
        ".safetensors, .mtjsp, mkultra .json) and write it as a KoboldAI zip, a PEFT adapter folder "
        "or a .safetensors file. Nothing in the input is ever executed.",
    )
    p.add_argument("input", metavar="IN", help="soft prompt file or PEFT adapter folder")
    p.add_argument(
        "output",
        metavar="OUT",
        help="file or folder to write (.zip: kobold, .safetensors, no extension: PEFT folder)",
    )
    p.add_argument("--to", choices=writable(), help="output format (default: from OUT's extension)")
    p.add_argument("--name", help="set the soft prompt's name")
    p.add_argument("--description", help="set the soft prompt's description")
    p.add_argument("--author", help="set the soft prompt's author")
    p.add_argument(
        "--fp16", action="store_true", help="kobold: store the tensor as float16 (half the size)"
    )
    p.add_argument(
        "--base-model",
        metavar="ID",
        help="peft: base_model_name_or_path to record (default: from the soft prompt's metadata)",
    )
    p.add_argument(
        "--copy-to",
        metavar="DIR",
        help="also put the written file in DIR (e.g. KoboldAI's softprompts folder)",
    )
    p.add_argument(
        "--force", action="store_true", help="with --copy-to: replace a file of the same name there"
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import format_for_path, load_any, save
    from .formats.common import printable

    sp = load_any(args.input)
    for key in ("name", "description", "author"):
        if getattr(args, key) is not None:
            sp.meta[key] = getattr(args, key)
    fmt = args.to or format_for_path(args.output)
    options: dict[str, Any] = {}
    if args.fp16:
        if fmt != "kobold":
            raise ConfigError("--fp16 applies to --to kobold only")
        options["dtype"] = "float16"
    if args.base_model:
        if fmt != "peft":
            raise ConfigError("--base-model applies to --to peft only")
        options["base_model"] = args.base_model
    target = None
    if args.copy_to:  # checked before anything is written
        if fmt == "peft":
            raise ConfigError("--copy-to copies one file: use it with --to kobold or safetensors")
        try:
            target = check_copy_target(
                args.copy_to, Path(args.output).name, args.force, "--copy-to"
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    out = save(sp, args.output, fmt, **options)
    print(
        f"{fmt}: {printable(out, None)} ({sp.n_tokens} tokens x {sp.dim}, "
        f"from {sp.meta.get('format')} {printable(args.input, None)})"
    )
    if target is not None:
        print(f"copied to {printable(copy_file(out, target), None)}")
    return 0


def add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a soft prompt file holds",
        description="Show a soft prompt's format, metadata, shape, dtype and per-token norms. With --model, "
        "also whether it fits the model and the vocabulary tokens nearest (cosine) to each soft token.",
    )
    p.add_argument("file", metavar="FILE", help="soft prompt file or PEFT adapter folder")
    p.add_argument(
        "--model",
        nargs="?",
        const="default",
        metavar="M",
        help="compare with this model: Hugging Face id, local folder or .gguf file "
        "(`--model` alone: the default SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        metavar="K",
        help="nearest tokens per soft token (default: 5)",
    )
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--device", default="cpu", help="device for --model (default: cpu)")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .describe import describe, format_text

    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    lm = None
    if args.model is not None:
        from .model import load_model

        lm = load_model(None if args.model == "default" else args.model, args.device, "float32")
    info = describe(args.file, lm, args.top_k)
    # ensure_ascii: JSON escapes only U+0000-U+001F by itself, and a terminal also obeys
    # DEL, C1 controls (U+009B starts an escape sequence) and direction overrides
    print(json.dumps(info, indent=2, ensure_ascii=True) if args.json else format_text(info))
    return 0


# ----------------------------------------------------------------------------- ui


def add_ui(sub: Any) -> None:
    """`ui`: a local web page to train and try soft prompts (softprompt.ui)."""
    p = sub.add_parser(
        "ui",
        help="open a local web page to train soft prompts and try them",
        description="Serve a page on this machine to pick a dataset and model, set the training "
        "options, start and stop runs, watch the loss, and try and download the result. Runs are "
        "separate processes: they keep going when the page or this command is closed.",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="workspace for uploads and runs (default: $SOFTPROMPT_UI_DIR, else "
        "~/.local/share/softprompt/ui)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8765, help="port, 0 for any free one (default: 8765)"
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import make_server

    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    server = make_server(args.workdir, args.host, args.port)
    print(f"softprompt ui: {server.url} (workspace {server.workspace.root})", flush=True)
    print("Ctrl-C stops the page; training runs keep going.", flush=True)
    if not args.no_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    _SKIP_TEARDOWN.append(True)
    return 0


# ----------------------------------------------------------------------------- serve


def add_serve(sub: Any) -> None:
    """`serve`: the KoboldAI API for KoboldAI clients (softprompt.serve)."""
    p = sub.add_parser(
        "serve",
        help="serve the model and soft prompts to KoboldAI clients (KoboldAI Lite, SillyTavern)",
        description="Serve the KoboldAI HTTP API (as KoboldAI United and KoboldCpp do, streaming "
        "included) and an OpenAI-style /v1/completions, with the soft prompts of a folder chosen "
        "per request or for the server. One generation runs at a time.",
    )
    add_options(p, ServeOptions)
    p.set_defaults(api_key=os.environ.get("SOFTPROMPT_API_KEY") or None)
    add_device_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import Server, check_listen_options, resolve_softprompts

    opts = from_args(ServeOptions, args)
    # before the model loads
    check_listen_options(opts.port, opts.queue, opts.api_key, opts.max_length_limit)
    resolve_softprompts(opts.softprompts, opts.softprompt)
    lm = load_model_from_args(args)
    if opts.compile:
        warm_up_compiled(lm)
    server = Server(
        lm,
        opts.softprompts,
        opts.softprompt,
        host=opts.host,
        port=opts.port,
        api_key=opts.api_key,
        queue_size=opts.queue,
        max_length_limit=opts.max_length_limit,
    )
    server.bind()
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        log.warning(
            "note: serving on %s without --api-key: anyone who can reach it may use it", opts.host
        )
    found = len(server.list_soft_prompts())
    print(
        f"softprompt serve: {server.url} ({lm.name}, {found} soft prompt{'' if found == 1 else 's'}, "
        f"selected: {server.selected or 'none'}); KoboldAI API at {server.url}/api, "
        f"OpenAI at {server.url}/v1",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("softprompt serve: stopped", file=sys.stderr, flush=True)
    finally:
        server.close()
    _SKIP_TEARDOWN.append(True)
    return 0


def warm_up_compiled(lm) -> None:
    """`serve --compile`: compile the one-token step now, before clients come."""
    from .engine import engine_of

    engine = engine_of(lm)
    engine.compile = True
    print("softprompt serve: compiling the decode step (once; a minute or more)...", flush=True)
    t0 = time.perf_counter()
    engine.warm_up(lm)
    if engine.compile:  # still on: it compiled
        print(f"softprompt serve: compiled in {time.perf_counter() - t0:.0f} s", flush=True)


def setup_logging(debug: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """The "softprompt" logger's handlers, level and propagation as they were before, once
    the command is done: ``main`` called from Python (a test, a notebook) leaves the
    caller's logging as it found it."""
    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    try:
        yield
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


# set by the servers (`serve`, `ui`) once they have stopped cleanly: see `entry`
_SKIP_TEARDOWN: list[bool] = []


def entry() -> None:
    """The `softprompt` command. After a server stopped by Ctrl-C, the process ends without
    the interpreter's teardown, which sometimes aborted in PyTorch's C++ destructors
    ("terminate called without an active exception", exit code -6, about 1 stop in 10):
    nothing is left to write by then, so the exit code stays the command's."""
    code = main()
    if _SKIP_TEARDOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with logging_restored():
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
    except BrokenPipeError:  # `softprompt inspect X | head -1`: the reader has gone
        # Python would complain again when it flushes stdout at exit: point it at nothing
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except Exception as e:  # the last resort: still one line, with a pointer to --debug
        if debug:
            raise
        print(
            f"softprompt: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    """The message on one line, with control characters (say, in a file name) escaped."""
    from .formats.common import printable

    return printable(" ".join(str(e).split()), None) or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
