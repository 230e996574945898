"""The OpenAI-style routes of `softprompt serve` (SillyTavern's Text Completion, OpenAI
clients): ``GET /v1/models`` (the model and the soft prompt files) and ``POST
/v1/completions``, plain or streamed; ``model`` may name a soft prompt file. Errors have
OpenAI's shape (``{"error": {...}}``, 400 for bad fields)."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from ..generate import Progress
from ..http import Request, send_json
from .kobold import KOBOLD_SAMPLING
from .queue import HangUp, collect, stream
from .request import Fields, GenRequest, ban_eos, parse_sampling, read_json_body

if TYPE_CHECKING:
    from .server import Server

DEFAULT_OPENAI_MAX_TOKENS = 16
# KoboldCpp reads the KoboldAI names on its OpenAI route too, next to the OpenAI ones
# (koboldcpp.py, transform_genparams); SillyTavern sends both spellings.
OPENAI_SAMPLING = {
    **KOBOLD_SAMPLING,
    "max_new_tokens": ("max_tokens",),
    "typical": ("typical", "typical_p"),
    "repetition_penalty": ("rep_pen", "repetition_penalty", "repeat_penalty"),
    "seed": ("seed", "sampler_seed"),
}


def parse_openai(body: dict, max_length_limit: int | None = None) -> tuple[GenRequest, str]:
    """An OpenAI ``/v1/completions`` body: (GenRequest, model); 400 with every bad field."""
    f = Fields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        f.bad("prompt", "Missing data for required field.")
    elif not isinstance(prompt, str):
        f.bad("prompt", "Must be a string (or a list of one string).")
    elif not f.text("prompt", prompt):
        prompt = ""
    model = f.string("model", "")
    f.integer("n", 1, 1, 1)  # one completion per request
    req = GenRequest(
        prompt=prompt if isinstance(prompt, str) else "",
        options=parse_sampling(
            f, OPENAI_SAMPLING, max_length_limit, max_new_tokens=DEFAULT_OPENAI_MAX_TOKENS
        ),
        max_context_length=f.integer("max_context_length", None, 1),
        stop=f.strings("stop", allow_single=True),
        ban_eos=ban_eos(f),
        soft_prompt=f.string("soft_prompt", None),
    )
    f.boolean("stream", False)
    f.check(openai=True)
    return req, model


def models(r: Request[Server]) -> None:
    srv = r.app
    now = int(time.time())
    names = [srv.lm.name, *srv.list_soft_prompts()]
    data = [{"id": n, "object": "model", "created": now, "owned_by": "softprompt"} for n in names]
    send_json(r, 200, {"object": "list", "data": data})


class _Completion:
    """The answer's frame: one id, time and model name for every chunk of a completion."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def chunk(self, text: str, finish: str | None) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    def event(self, text: str, finish: str | None) -> str:
        done = "data: [DONE]\n\n" if finish else ""
        return f"data: {json.dumps(self.chunk(text, finish))}\n\n{done}"


def completions(r: Request[Server]) -> None:
    srv = r.app
    body = read_json_body(r, srv.max_body_bytes)
    req, model = parse_openai(body, srv.max_length_limit)
    if req.soft_prompt is None and model and model in srv.list_soft_prompts():
        req.soft_prompt = model
    field_name = "soft_prompt" if "soft_prompt" in body else "model"
    chosen, sp = srv.library.for_request(req.soft_prompt, field_name, 400)
    job = srv.prepare(req, sp, openai=True)
    job.soft_prompt = chosen
    frame = _Completion(model or srv.lm.name)
    progress = Progress()
    with srv.queue.slot() as gen:
        if body.get("stream") is True:
            pieces = srv.pieces(job, req.options.seed, progress, gen.cancel)
            stream(r, collect(pieces, gen, job, progress), gen, progress, frame.event)
            return
        cancel = HangUp(gen.cancel, r.connection)
        pieces = srv.pieces(job, req.options.seed, progress, cancel)
        text = "".join(collect(pieces, gen, job, progress))
    result = frame.chunk(text, progress.finish_reason)
    result["usage"] = {
        "prompt_tokens": len(job.ids),
        "completion_tokens": progress.tokens,
        "total_tokens": len(job.ids) + progress.tokens,
    }
    send_json(r, 200, result)


ROUTES = [
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
]
