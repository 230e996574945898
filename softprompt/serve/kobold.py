"""The KoboldAI routes of `softprompt serve`, as KoboldAI United and KoboldCpp answer them (the
README lists each route, who calls it, and the fields): the connection info, the soft prompt
choice, generating (plain and streamed), abort, check, token count. ``ROUTES`` is the table;
each route is a function of the request, whose ``app`` is the ``Server``."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from .. import __version__
from ..generate import Progress
from ..http import HTTPError, Request, send_json
from ..sampling import SamplingOptions
from .queue import HangUp, collect, stream
from .request import (
    Fields,
    GenRequest,
    ban_eos,
    parse_sampling,
    read_json_body,
)

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("softprompt.serve")

KOBOLD_API_VERSION = "1.2.6"  # >= 1.2.2: clients send stop_sequence; >= 1.2.4 badwordsids
KOBOLDCPP_VERSION = "1.49"  # turns on streaming; >= 1.49: Lite sends `memory` on its own
DEFAULT_MAX_LENGTH = SamplingOptions().max_new_tokens
MAX_N = 5
PROTECTED_MODEL = "softprompt/protected-model"  # KoboldCpp's answer without the key
# What KoboldCpp answers without its password, and clients ask before they send a key
# (KoboldAI Lite asks for /sdapi/v1/sd-models without it, SillyTavern's KoboldAI Classic
# mode never sends one).
PUBLIC_ROUTES = frozenset(
    ("GET", r)
    for r in (
        "/api/v1/model",
        "/api/v1/info/version",
        "/api/extra/version",
        "/api/v1/config/max_context_length",
        "/api/v1/config/max_length",
        "/api/extra/true_max_context_length",
        "/api/extra/preloadstory",
        "/sdapi/v1/sd-models",
    )
)
# the abort checks the key itself: without it, only the running generation's genkey stops it
OPEN_ROUTES = PUBLIC_ROUTES | {("POST", "/api/extra/abort")}

# SamplingOptions field: the request keys that carry it, first found wins
KOBOLD_SAMPLING = {
    "max_new_tokens": ("max_length",),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "top_a": ("top_a",),
    "min_p": ("min_p",),
    "tfs": ("tfs",),
    "typical": ("typical",),
    "repetition_penalty": ("rep_pen",),
    "repetition_penalty_range": ("rep_pen_range",),
    "repetition_penalty_slope": ("rep_pen_slope",),
    "sampler_order": ("sampler_order",),
    "seed": ("sampler_seed",),
}


def parse_kobold(body: dict, max_length_limit: int | None = None) -> GenRequest:
    """A KoboldAI ``/api/v1/generate`` body as a GenRequest; 422 with every bad field.
    Unknown keys are ignored (the README lists what clients send and what is applied)."""
    f = Fields(body)
    req = GenRequest(
        prompt=f.string("prompt", "", required=True),
        options=parse_sampling(
            f, KOBOLD_SAMPLING, max_length_limit, max_new_tokens=DEFAULT_MAX_LENGTH
        ),
        memory=f.string("memory", ""),
        max_context_length=f.integer("max_context_length", None, 1),
        n=f.integer("n", 1, 1, MAX_N),
        stop=f.strings("stop_sequence"),
        ban_eos=ban_eos(f),
        soft_prompt=f.string("soft_prompt", None),
        genkey=f.string("genkey", "", max_len=200),
    )
    f.boolean("quiet", False)
    f.check()
    return req


def unauthorized() -> HTTPError:
    return HTTPError(
        401,
        {
            "msg": "a valid API key is needed: send Authorization: Bearer KEY",
            "type": "unauthorized",
        },
        {"WWW-Authenticate": "Bearer"},
    )


def kobold_event(token: str, finish: str | None) -> str:
    """One event of KoboldCpp's stream; ``finish_reason`` is the string "null" until the end.
    ASCII-only JSON: U+2028 and friends would break the client's line regex."""
    data = json.dumps({"token": token, "finish_reason": finish or "null"})
    return f"event: message\ndata: {data}\n\n"


# --------------------------------------------------------------------------- connection info


def model(r: Request[Server]) -> None:
    srv = r.app
    send_json(r, 200, {"result": srv.lm.name if r.authorized else PROTECTED_MODEL})


def api_version(r: Request[Server]) -> None:
    send_json(r, 200, {"result": KOBOLD_API_VERSION})


def extra_version(r: Request[Server]) -> None:
    result = {
        "result": "KoboldCpp",
        "version": KOBOLDCPP_VERSION,
        "protected": r.app.api_key is not None,
        "server": f"softprompt {__version__}",
    }
    send_json(r, 200, result)


def max_context_length(r: Request[Server]) -> None:
    send_json(r, 200, {"value": r.app.context_length})


def max_length(r: Request[Server]) -> None:
    send_json(r, 200, {"value": DEFAULT_MAX_LENGTH})


def no_story(r: Request[Server]) -> None:  # KoboldCpp without --preloadstory
    send_json(r, 200, {})


def no_image_models(r: Request[Server]) -> None:  # KoboldCpp without an image model
    send_json(r, 200, [])


# --------------------------------------------------------------------------- soft prompts


def get_soft_prompt(r: Request[Server]) -> None:
    send_json(r, 200, {"value": r.app.selected})


def put_soft_prompt(r: Request[Server]) -> None:
    srv = r.app
    f = Fields(read_json_body(r, srv.max_body_bytes))
    name = f.string("value", None, required=True)
    f.check()
    srv.library.for_request(name, "value")
    srv.selected = name
    log.info("soft prompt: %s", name or "(none)")
    send_json(r, 200, {})


def soft_prompts_list(r: Request[Server]) -> None:
    send_json(r, 200, {"values": [{"value": n} for n in r.app.list_soft_prompts()]})


# --------------------------------------------------------------------------- generating


def tokencount(r: Request[Server]) -> None:
    srv = r.app
    f = Fields(read_json_body(r, srv.max_body_bytes))
    prompt = f.string("prompt", "", required=True)
    f.check()
    ids = srv.encode(prompt)
    send_json(r, 200, {"value": len(ids), "ids": ids})


def _genkey_of(r: Request[Server]) -> str:
    """The ``genkey`` of an optional body (a bad body counts as none; too large one: 413)."""
    try:
        body = read_json_body(r, r.app.max_body_bytes, allow_empty=True)
    except HTTPError as e:
        if e.status == 413:
            raise
        body = {}
    genkey = body.get("genkey")
    return genkey if isinstance(genkey, str) else ""


def abort(r: Request[Server]) -> None:
    srv = r.app
    genkey = _genkey_of(r)
    gen = srv.queue.current
    # Without the key, only the client that knows the running genkey may stop it (the
    # stop buttons of KoboldAI Lite and SillyTavern; SillyTavern sends no key here).
    if not r.authorized and not (genkey and gen is not None and genkey == gen.genkey):
        raise unauthorized()
    done = srv.abort(genkey)
    send_json(r, 200, {"success": "true" if done else "false", "done": "true"})


def check(r: Request[Server]) -> None:
    genkey = _genkey_of(r) if r.command == "POST" else ""
    send_json(r, 200, {"results": [{"text": r.app.text_so_far(genkey)}]})


def _generate(r: Request[Server], streamed: bool) -> None:
    srv = r.app
    req = parse_kobold(read_json_body(r, srv.max_body_bytes), srv.max_length_limit)
    name, sp = srv.library.for_request(req.soft_prompt, "soft_prompt")
    job = srv.prepare(req, sp)
    job.soft_prompt = name
    with srv.queue.slot(req.genkey) as gen:
        if streamed:
            progress = Progress()
            pieces = srv.pieces(job, req.options.seed, progress, gen.cancel)
            stream(r, collect(pieces, gen, job, progress), gen, progress, kobold_event)
            return
        results = []
        cancel = HangUp(gen.cancel, r.connection)
        for i in range(req.n):
            progress = Progress()
            pieces = srv.pieces(job, req.options.seed + i, progress, cancel)
            text = "".join(collect(pieces, gen, job, progress))
            results.append({"text": text, "finish_reason": progress.finish_reason})
            if progress.cancelled:
                break
    send_json(r, 200, {"results": results})


def generate(r: Request[Server]) -> None:
    _generate(r, streamed=False)


def generate_stream(r: Request[Server]) -> None:
    _generate(r, streamed=True)


ROUTES = [
    ("GET", "/api/v1/model", model),
    ("GET", "/api/v1/info/version", api_version),
    ("GET", "/api/extra/version", extra_version),
    ("GET", "/api/v1/config/max_context_length", max_context_length),
    ("GET", "/api/extra/true_max_context_length", max_context_length),
    ("GET", "/api/v1/config/max_length", max_length),
    ("GET", "/api/v1/config/soft_prompt", get_soft_prompt),
    ("PUT", "/api/v1/config/soft_prompt", put_soft_prompt),
    ("GET", "/api/v1/config/soft_prompts_list", soft_prompts_list),
    ("POST", "/api/v1/generate", generate),
    ("POST", "/api/extra/generate/stream", generate_stream),
    ("GET", "/api/extra/generate/check", check),
    ("POST", "/api/extra/generate/check", check),
    ("POST", "/api/extra/abort", abort),
    ("POST", "/api/extra/tokencount", tokencount),
    ("GET", "/api/extra/preloadstory", no_story),
    ("GET", "/sdapi/v1/sd-models", no_image_models),
]
