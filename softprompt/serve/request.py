"""Reading a generation request: the fields of a JSON body checked with KoboldAI's messages
(every problem at once, per field), the sampling options they carry, and ``GenRequest``, the
request in softprompt's terms. The KoboldAI and OpenAI routes each map their own keys
(``kobold.KOBOLD_SAMPLING``, ``openai.OPENAI_SAMPLING``) through ``parse_sampling``."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..http import HTTPError, Request, error, loads, read_body
from ..sampling import FIELDS as SAMPLING_FIELDS
from ..sampling import SamplingOptions

MAX_BODY_BYTES = 4 * 1024 * 1024  # a 32k-token prompt is well under 1 MB of JSON
MAX_STOP_SEQUENCES = 64
MAX_STOP_CHARS = 1000


def validation_error(problems: dict[str, list[str]]) -> HTTPError:
    """422 ``{"detail": {field: [message, ...]}}``, as KoboldAI answers bad values."""
    return HTTPError(422, problems)


def read_json_body(
    request: Request, limit: int = MAX_BODY_BYTES, allow_empty: bool = False
) -> dict:
    """The request body as a JSON object: 400 ``bad_input`` when it is not JSON (or nested
    too deep), 422 ``{"_schema": ["Invalid input type."]}`` when it is JSON but not an object,
    413 when over ``limit`` bytes. An empty body is ``{}`` when ``allow_empty``."""
    data = read_body(request, limit)
    if not data.strip():
        if allow_empty:
            return {}
        raise error(400, "the request needs a JSON body", "bad_input")
    try:
        obj = loads(data)
    except ValueError as e:
        raise error(400, f"Error parsing input: {e}", "bad_input") from None
    if not isinstance(obj, dict):
        raise validation_error({"_schema": ["Invalid input type."]})
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


class Fields:
    """Reads fields of a request body, collecting every problem (KoboldAI's messages)."""

    def __init__(self, body: dict):
        self.body = body
        self.problems: dict[str, list[str]] = {}

    def bad(self, key: str, msg: str) -> None:
        self.problems.setdefault(key, []).append(msg)

    def _range(self, key, value, lo, hi, lo_open=False) -> bool:
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and value > hi
        if not (low_bad or high_bad):
            return True
        ge = "greater than" if lo_open else "greater than or equal to"
        if lo is not None and hi is not None:
            self.bad(key, f"Must be {ge} {lo} and less than or equal to {hi}.")
        elif lo is not None:
            self.bad(key, f"Must be {ge} {lo}.")
        else:
            self.bad(key, f"Must be less than or equal to {hi}.")
        return False

    def _numeric(self, key, default, lo, hi, lo_open, integral: bool):
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = (int if integral else float)(value.strip())
            except ValueError:
                pass
        if integral and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif not integral and type(value) is int:
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float: not a valid number
                value = math.inf
        kinds = int if integral else (int, float)
        # NaN and the infinities fail the comparison
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not -math.inf < value < math.inf
        ):
            self.bad(key, f"Not a valid {'integer' if integral else 'number'}.")
            return default
        if not self._range(key, value, lo, hi, lo_open):
            return default
        return value if integral else float(value)

    def integer(self, key: str, default, lo=None, hi=None):
        return self._numeric(key, default, lo, hi, False, integral=True)

    def number(self, key: str, default, lo=None, hi=None, lo_open=False):
        return self._numeric(key, default, lo, hi, lo_open, integral=False)

    def text(self, key: str, value: str) -> bool:
        """False (and the problem noted) when ``value`` holds a lone surrogate: JSON can
        carry one (``"\\ud800"``), but it is no text a tokenizer can read."""
        bad = _SURROGATE.search(value)
        if bad:
            self.bad(key, f"Not valid text: a lone surrogate (U+{ord(bad[0]):04X}).")
        return not bad

    def string(self, key: str, default: str | None = "", required: bool = False, max_len=None):
        value = self.body.get(key)
        if value is None:
            if required:
                self.bad(key, "Missing data for required field.")
            return default
        if not isinstance(value, str):
            self.bad(key, "Not a valid string.")
            return default
        if max_len is not None and len(value) > max_len:
            self.bad(key, f"Longer than maximum length {max_len}.")
            return default
        return value if self.text(key, value) else default

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(key, "Not a valid boolean.")
            return default
        return value

    def strings(self, key: str, allow_single: bool = False) -> list[str]:
        value = self.body.get(key)
        if value is None:
            return []
        if allow_single and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            self.bad(key, "Not a valid list of strings.")
            return []
        if len(value) > MAX_STOP_SEQUENCES:
            self.bad(key, f"At most {MAX_STOP_SEQUENCES} entries.")
            return []
        if any(len(s) > MAX_STOP_CHARS for s in value):
            self.bad(key, f"Each entry at most {MAX_STOP_CHARS} characters.")
            return []
        if not all(self.text(key, s) for s in value):
            return []
        return [s for s in value if s]

    def integers(self, key: str, lo: int, hi: int) -> list[int]:
        value = self.body.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value
        ):
            self.bad(key, "Not a valid list of integers.")
            return []
        if len(value) > 32 or any(not lo <= i <= hi for i in value):
            self.bad(key, f"Each entry must be between {lo} and {hi}.")
            return []
        return value

    def check(self, openai: bool = False) -> None:
        if self.problems:
            err = validation_error(self.problems)
            if openai:
                err.status = 400
            raise err


@dataclass
class GenRequest:
    """One generation request, validated, in softprompt's terms."""

    prompt: str
    options: SamplingOptions = field(default_factory=SamplingOptions)
    memory: str = ""
    max_context_length: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    ban_eos: bool = False
    soft_prompt: str | None = None  # None: the server's selection; "": none
    genkey: str = ""


def _sampling_value(f: Fields, name: str, key: str, max_length_limit: int | None):
    """The value of one sampling field in the request's terms; None when absent or bad."""
    if name == "max_new_tokens":
        return f.integer(key, None, 1, max_length_limit)
    if name == "seed":  # -1 (or none): a random seed, as in KoboldAI
        seed = f.integer(key, None, -1, 2**64 - 1)
        return seed if seed is None or seed >= 0 else random.randrange(2**63)
    if name == "sampler_order":
        order = f.integers(key, 0, 6) or None
        # a list of the six samplers before repetition penalty had an id: it goes first, as
        # KoboldAI United does
        if order is not None and sorted(order) == list(range(6)):
            return (6, *order)
        return tuple(order) if order is not None else None
    integral = type(SAMPLING_FIELDS[name].default) is int
    value = (f.integer if integral else f.number)(key, None)
    if name in ("top_p", "typical") and value == 0:
        return 1.0  # KoboldAI clients send 0 for "off", as 1
    return value


def parse_sampling(
    f: Fields, keys: Mapping[str, tuple[str, ...]], max_length_limit: int | None = None, **defaults
) -> SamplingOptions:
    """The SamplingOptions of a request body (``keys``: SamplingOptions field -> the request
    keys that carry it, the first one found wins), with
    ``defaults`` for fields the request leaves out; each bad value is noted under its key."""
    values, key_of = {"seed": random.randrange(2**63), **defaults}, {}
    for name, candidates in keys.items():
        key = next((k for k in candidates if f.body.get(k) is not None), None)
        if key is None:
            continue
        key_of[name] = key
        value = _sampling_value(f, name, key, max_length_limit)
        if value is not None:
            values[name] = value
    opts = SamplingOptions(**values)
    for name, msg in opts.problems().items():
        f.bad(key_of.get(name, name), msg[0].upper() + msg[1:] + ".")
    return opts


def ban_eos(f: Fields) -> bool:
    """KoboldCpp's ``ban_eos_token``, or KoboldAI's ``use_default_badwordsids`` (which bans the
    end-of-text token, so generation runs to the length asked for)."""
    if f.body.get("ban_eos_token") is not None:
        return f.boolean("ban_eos_token", False)
    return f.boolean("use_default_badwordsids", False)
