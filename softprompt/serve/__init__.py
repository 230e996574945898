"""`softprompt serve`: the KoboldAI HTTP API (and an OpenAI-style completions API) over a
frozen model, with soft prompts chosen per request or for the whole server.

Clients that speak KoboldAI (KoboldAI Lite, SillyTavern, Agnaistic, scripts) connect to it as
they would to KoboldAI United or KoboldCpp (the routes, fields, error shapes and stream
framing those clients rely on; the README lists them):

    server = Server(lm, softprompts="prompts/", port=0)
    port = server.start()          # serves in a background thread; 0 picks a free port
    ...
    server.close()

Where things are:

- ``server.py``: ``Server``, which puts the rest together: the API key, CORS, KoboldAI's
  error shapes, binding and closing; on the shared HTTP base ``softprompt.http``.
- ``library.py``: the soft prompt library: the files in the soft prompt folder, named by file
  name (``x.zip``, ``y.safetensors``, any format ``softprompt.formats`` reads, PEFT adapter
  folders too; a name is never a path), loaded once and again when the file changes, and
  the one selected for requests that name none.
- ``queue.py``: one generation at a time, up to ``queue_size`` waiting and any beyond that a
  503 (``service_unavailable``) at once; its abort flag (``POST /api/extra/abort`` stops it
  between two tokens, and so does a client that hangs up, streamed or not) and its text so
  far.
- ``kobold.py`` and ``openai.py``: the route tables (``ROUTES``) and what their requests
  carry; ``request.py``: reading a request's fields with KoboldAI's messages.

With ``api_key``, ``Authorization: Bearer KEY`` is needed for everything but what KoboldCpp
leaves open: the CORS preflight (``OPTIONS``), the connection info clients read before they
send a key (``kobold.PUBLIC_ROUTES``; the model's name is withheld), and an abort that names
the running generation's ``genkey``.
"""

from ..http import HTTPError, error, read_body, send_json
from .kobold import KOBOLD_API_VERSION, KOBOLDCPP_VERSION, PUBLIC_ROUTES, parse_kobold
from .library import SoftPromptLibrary, UnknownSoftPrompt, resolve_softprompts, valid_name
from .openai import parse_openai
from .queue import Generation, GenerationQueue, client_gone
from .request import MAX_BODY_BYTES, GenRequest, read_json_body, validation_error
from .server import (
    DEFAULT_PORT,
    DEFAULT_QUEUE,
    Server,
    check_bearer,
    check_listen_options,
    cors_headers,
    normalize_path,
)

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_QUEUE",
    "KOBOLDCPP_VERSION",
    "KOBOLD_API_VERSION",
    "MAX_BODY_BYTES",
    "PUBLIC_ROUTES",
    "GenRequest",
    "Generation",
    "GenerationQueue",
    "HTTPError",
    "Server",
    "SoftPromptLibrary",
    "UnknownSoftPrompt",
    "check_bearer",
    "check_listen_options",
    "client_gone",
    "cors_headers",
    "error",
    "normalize_path",
    "parse_kobold",
    "parse_openai",
    "read_body",
    "read_json_body",
    "resolve_softprompts",
    "send_json",
    "valid_name",
    "validation_error",
]
