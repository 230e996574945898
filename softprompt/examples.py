"""Examples to train on: JSON Lines files (``.jsonl``, one example a line) and ``.json``
files holding an array of them. Each file holds one shape, found from its first example:

- ``{"text": ...}``: plain text, trained on as a ``.txt`` file is;
- ``{"prompt": ..., "completion": ...}``, ``{"input": ..., "output": ...}`` and Alpaca's
  ``{"instruction": ..., "input": ..., "output": ...}``: a prompt and the completion wanted;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the model's
  own chat template.

Reading checks every line and names the first bad one (file and line). ``segments`` turns an
example into pieces of text, each marked as a label (the completion, the assistant turns)
or not; ``data.tokenize_examples`` tokenizes the pieces. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError

EXAMPLE_SUFFIXES = (".jsonl", ".json")
TEXT, PAIR, INPUT_OUTPUT, ALPACA, CHAT = (
    "text",
    "prompt/completion",
    "input/output",
    "instruction/input/output",
    "messages",
)
PAIR_SHAPES = (PAIR, INPUT_OUTPUT, ALPACA)
# what a file of each shape holds, as the summary and the errors say it
KINDS = {TEXT: '{"text"} texts', CHAT: '{"messages"} chats'} | {
    s: f"{s} pairs" for s in (PAIR, INPUT_OUTPUT, ALPACA)
}
SHAPES_HELP = (
    '{"text"}, {"prompt", "completion"}, {"input", "output"}, {"instruction", "input", '
    '"output"} or {"messages"}'
)
# Alpaca's own prompt (github.com/tatsu-lab/stanford_alpaca), which models tuned on it expect
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SKIP_HINT = "fix it, or pass --skip-bad-files to leave the file out"


@dataclass
class ExampleFile:
    """The examples of one file, checked: ``items`` are texts (str) for the text shape,
    (prompt, completion) pairs, or chats (lists of messages); ``lines`` their line numbers
    (item numbers in a .json array)."""

    name: str
    shape: str
    items: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    unit: str = "line"  # "item" for a .json array

    @property
    def chars(self) -> int:
        if self.shape == TEXT:
            return sum(len(t) for t in self.items)
        if self.shape == CHAT:
            return sum(len(m["content"]) for chat in self.items for m in chat)
        return sum(len(p) + len(c) for p, c in self.items)

    def describe(self, loss_on: str = "completion") -> str:
        """e.g. ``train.jsonl: 1,200 prompt/completion pairs, loss on the completions``."""
        what = f"{self.name}: {len(self.items):,} {KINDS[self.shape]}"
        if self.shape == TEXT:
            return f"{what}, trained on as text"
        if self.shape == CHAT:
            what += " rendered with the model's chat template"
        if loss_on == "all":
            return f"{what}, loss on every token (--loss-on all)"
        turns = "the assistant turns" if self.shape == CHAT else "the completions"
        return f"{what}, loss on {turns}"


def is_example_file(name: str) -> bool:
    return name.lower().endswith(EXAMPLE_SUFFIXES) and not name.startswith(".")


def parse_examples(text: str, name: str) -> ExampleFile:
    """The examples of a file's text (.jsonl: one JSON object a line, blank lines skipped;
    .json: one array of objects); DataError naming the file and line of the first problem."""
    if name.lower().endswith(".json"):
        records, unit = _json_array(text, name), "item"
    else:
        records, unit = _json_lines(text, name), "line"
    if not records:
        raise DataError(f"dataset file {name} holds no examples: {SKIP_HINT}")
    first_line, first = records[0]
    shape = shape_of(first)
    if shape is None:
        keys = ", ".join(sorted(first)) or "none"
        raise DataError(
            f"dataset file {name} {unit} {first_line}: not an example (its keys: {keys}): "
            f"give one of {SHAPES_HELP}, or pass --skip-bad-files to leave the file out"
        )
    out = ExampleFile(name, shape, unit=unit)
    for number, record in records:
        where = f"dataset file {name} {unit} {number}"
        found = shape_of(record)
        if found != shape:
            what = f"a {found} example" if found else "not an example"
            raise DataError(
                f"{where} is {what}, but {unit} {first_line} made it a file of "
                f"{KINDS[shape]}: one shape per file ({SKIP_HINT})"
            )
        out.items.append(_checked(record, shape, where))
        out.lines.append(number)
    return out


def _json_lines(text: str, name: str) -> list[tuple[int, dict]]:
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise DataError(
                f"dataset file {name} line {number} is not JSON ({why}): {SKIP_HINT}"
            ) from None
        records.append((number, _object(record, f"dataset file {name} line {number}")))
    return records


def _json_array(text: str, name: str) -> list[tuple[int, dict]]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(
            f"dataset file {name} is not JSON{where}: a .json file holds one array of examples "
            f"(or save them one a line as .jsonl); {SKIP_HINT}"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"dataset file {name} holds {_a(value)}, not an array of examples: {SKIP_HINT}"
        )
    return [(i, _object(v, f"dataset file {name} item {i}")) for i, v in enumerate(value, 1)]


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where} is {_a(value)}, not an object: {SKIP_HINT}")
    return value


def shape_of(record: dict) -> str | None:
    """The shape a record's keys make, or None."""
    if "messages" in record:
        return CHAT
    if "prompt" in record or "completion" in record:
        return PAIR
    if "instruction" in record:
        return ALPACA
    if "output" in record or "input" in record:
        return INPUT_OUTPUT
    if "text" in record:
        return TEXT
    return None


def _checked(record: dict, shape: str, where: str) -> Any:
    """A record's example in the form ``ExampleFile.items`` keeps."""
    if shape == TEXT:
        return _string(record, "text", where, empty_ok=False)
    if shape == PAIR:
        return _string(record, "prompt", where), _string(record, "completion", where, False)
    if shape == INPUT_OUTPUT:
        return _string(record, "input", where), _string(record, "output", where, False)
    if shape == ALPACA:
        instruction = _string(record, "instruction", where, empty_ok=False)
        extra = "" if record.get("input") is None else _string(record, "input", where)
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=instruction, input=extra)
        return prompt, _string(record, "output", where, empty_ok=False)
    return _messages(record, where)


def _string(record: dict, key: str, where: str, empty_ok: bool = True) -> str:
    if key not in record:
        raise DataError(f'{where} has no "{key}": {SKIP_HINT}')
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, not {_a(value)}: {SKIP_HINT}')
    if not empty_ok and not value.strip():
        raise DataError(f'{where}: "{key}" is empty: {SKIP_HINT}')
    return value


def _messages(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        got = "an empty one" if isinstance(messages, list) else _a(messages)
        raise DataError(f'{where}: "messages" must be a list of messages, not {got}: {SKIP_HINT}')
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is {_a(m)}, not an object: {SKIP_HINT}")
        role = _string(m, "role", f"{where}, message {i},", empty_ok=False)
        content = _string(m, "content", f"{where}, message {i},")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {i}, the assistant's, is empty: {SKIP_HINT}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f'{where}: no message has the role "assistant", so nothing is there to learn: '
            f"{SKIP_HINT}"
        )
    return messages


def _a(value: Any) -> str:
    """What a JSON value is, with its article: "a string", "an array", "null"..."""
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return names.get(type(value), "a number")


# ----------------------------------------------------------------------------- rendering


def segments(example: Any, shape: str, tokenizer) -> list[tuple[str, bool]]:
    """The pieces of text an example is made of, each with whether it is a label: a pair is
    its prompt then its completion; a chat is rendered with the tokenizer's chat template
    and its assistant turns (each to the end of its turn, the end-of-turn token included)
    are the labels. Raises ChatTemplateError when the template cannot be split so."""
    if shape == TEXT:
        return [(example, True)]
    if shape != CHAT:
        prompt, completion = example
        return [(prompt, False), (completion, True)]
    return chat_segments(example, tokenizer)


class ChatTemplateError(Exception):
    """The chat template failed on a chat, or does not render it turn by turn."""


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """A chat rendered with the template, cut where assistant turns begin and end. An
    assistant turn's text is what rendering the chat up to it adds to rendering it up to
    just before it (with the generation prompt, so the "assistant" header is the prompt's):
    the template must render earlier turns the same whatever follows them."""

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja's errors, and the template's own raise_exception
            raise ChatTemplateError(f"the chat template failed: {e}") from None

    full = render(len(messages), False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of ``full`` already in pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = full if i == len(messages) - 1 else render(i + 1, False)
        before = render(i, True)
        if not (through.startswith(before) and len(before) >= done):
            before = render(i, False)  # a template without a generation prompt
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ChatTemplateError(
                "the chat template renders earlier turns differently once later ones follow, "
                "so the assistant turns cannot be told apart"
            )
        pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, label) for text, label in pieces if text]
