"""`softprompt ui`: a local web page to train soft prompts and try them.

Where things are:

- ``server.py``: the page's server: the static page (``softprompt/web/``) and the JSON API as
  a route table, on the shared HTTP base (``softprompt.http``); the Host and POST-header
  checks; ``make_server``.
- ``workspace.py``: the workspace folder (datasets, runs) and the training processes started
  from it: start, stop, resume, upload, delete.
- ``state.py``: how a run stands, read from the ``status.json`` that train keeps
  (``softprompt.runfiles``), or from the process and the files for runs started before.
- ``datacheck.py``: the dataset field's check, with softprompt.data's own reading.
- ``options.py``: ``TrainConfig``'s fields as the form shows them (plain names, the flag in
  the help), and the form read back.
- ``tryit.py``: a prompt continued with and without a finished soft prompt.
"""

from ..runfiles import JOB_FILE, LOG_FILE, OUTPUT_DIR, RUN_CONFIG, STATUS_FILE
from .datacheck import check_dataset
from .options import BASIC, GROUPS, HIDDEN, LABELS, field_kind, option_list, parse_options
from .server import DEFAULT_PORT, MAX_JSON, MAX_UPLOAD, UIServer, make_server
from .state import MetricsReader, log_since_start, progress, run_state
from .tryit import Generator
from .workspace import Workspace, default_workdir, pid_alive

__all__ = [
    "BASIC",
    "DEFAULT_PORT",
    "GROUPS",
    "HIDDEN",
    "LABELS",
    "JOB_FILE",
    "LOG_FILE",
    "MAX_JSON",
    "MAX_UPLOAD",
    "OUTPUT_DIR",
    "RUN_CONFIG",
    "STATUS_FILE",
    "Generator",
    "MetricsReader",
    "UIServer",
    "Workspace",
    "check_dataset",
    "default_workdir",
    "field_kind",
    "log_since_start",
    "make_server",
    "option_list",
    "parse_options",
    "pid_alive",
    "progress",
    "run_state",
]
