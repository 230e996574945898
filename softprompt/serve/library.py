"""The soft prompt library of `softprompt serve`: the soft prompt files of one folder, named by
file name (never a path), loaded once and kept until the file changes, and the one selected
for requests that name none."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..errors import ConfigError, SoftPromptError
from ..formats import listed
from ..http import HTTPError
from ..soft_prompt import SoftPrompt

log = logging.getLogger(__name__)

SOFT_PROMPT_NAME_ERROR = "Must be a valid soft prompt name."


class UnknownSoftPrompt(ConfigError):
    """A soft prompt name that is not a file in the soft prompt folder."""


def valid_name(name: str) -> bool:
    """A file name only: no path separators, no `..`, no hidden files, nothing odd."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
        and name.isprintable()
    )


def resolve_softprompts(folder: str | Path | None, name: str | None) -> tuple[Path | None, str]:
    """(soft prompt folder, name to select) from ``--softprompts DIR`` and ``--softprompt
    NAME``; without DIR, NAME may be a path to a soft prompt file (its folder becomes DIR).
    ConfigError for a missing folder or a name that is a path inside DIR."""
    name = name or ""
    if folder is None and name and ("/" in name or "\\" in name or Path(name).exists()):
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(f"--softprompt {name}: no such file")
        return path.resolve().parent, path.name
    if folder is None:
        if name:
            raise ConfigError(
                f"--softprompt {name}: give --softprompts DIR, the folder it is in (or a path to the file)"
            )
        return None, ""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--softprompts {folder}: no such folder")
    if name and not valid_name(name):
        raise ConfigError(
            f"--softprompt {name}: give a file name in --softprompts {folder}, not a path"
        )
    return path.resolve(), name


class SoftPromptLibrary:
    """The soft prompts of ``folder`` (None: none) for ``model`` (each is checked to fit it),
    and ``selected``, the file name used when a request names none ("" for none)."""

    def __init__(self, folder: Path | None, model):
        self.folder = folder
        self.model = model
        self.selected = ""
        self._cache: dict[str, tuple[tuple, SoftPrompt]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """File names of the soft prompts in the folder (and PEFT adapter folders), sorted."""
        if self.folder is None:
            return []
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return []
        names = [p.name for p in entries if valid_name(p.name) and listed(p)]
        return sorted(names, key=lambda n: (n.lower(), n))

    def load(self, name: str) -> SoftPrompt | None:
        """The soft prompt file ``name`` of the folder ("" or None: no soft prompt), cached.
        UnknownSoftPrompt when it is not one; other SoftPromptErrors when it cannot be used
        (damaged, or made for a model of another width)."""
        if not name:
            return None
        if not valid_name(name) or self.folder is None or name not in self.names():
            raise UnknownSoftPrompt(f"no soft prompt named {name!r}")
        path = self.folder / name
        try:
            st = path.stat()
        except OSError:
            raise UnknownSoftPrompt(f"no soft prompt named {name!r}") from None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        from ..formats import load_any

        sp = load_any(path)
        sp.check_fits(self.model, where=f"soft prompt {name}")
        with self._lock:
            self._cache[name] = (key, sp)
        return sp

    def select(self, name: str) -> None:
        """Make ``name`` the soft prompt of requests that name none ("" for none)."""
        self.load(name)
        self.selected = name or ""

    def for_request(
        self, name: str | None, field_name: str, status: int = 422
    ) -> tuple[str, SoftPrompt | None]:
        """(name, soft prompt) a request asks for (None: the selected one); HTTPError
        ``status`` with ``{field_name: [message]}`` when it cannot have it."""
        chosen = self.selected if name is None else name
        try:
            return chosen, self.load(chosen)
        except UnknownSoftPrompt:
            raise HTTPError(status, {field_name: [SOFT_PROMPT_NAME_ERROR]}) from None
        except SoftPromptError as e:
            msg = " ".join(str(e).split())
            if self.folder is not None:  # name the file, not where the server keeps it
                msg = msg.replace(f"{self.folder}{os.sep}", "")
            raise HTTPError(status, {field_name: [msg]}) from None
