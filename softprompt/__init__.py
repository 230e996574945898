"""softprompt: train, share and use soft prompts for frozen causal language models.

import softprompt
result = softprompt.train(dataset="my_texts/", output="out", max_steps=200)
print(result.val_loss_before, "->", result.val_loss_after)

Importing the package imports nothing heavy: each name below is imported on first use (PEP
562), so ``softprompt --help`` and ``import softprompt`` do not load torch.

``softprompt.train``, ``softprompt.evaluate`` and ``softprompt.generate`` are the modules
``softprompt/train.py``, ``evaluate.py`` and ``generate.py``, however they were imported
(``import softprompt.train``, ``from softprompt import train``, ``softprompt.train``), and
calling one calls the function of the same name in it: ``softprompt.train(...)`` is
``softprompt.train.train(...)``, and ``softprompt.train.TrainResult`` is reachable too.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name: the module that defines it (imported on first use)
_EXPORTS = {
    "EvalResult": "evaluate",
    "LoadedModel": "model",
    "SoftPrompt": "soft_prompt",
    "SoftPromptError": "errors",
    "TrainConfig": "config",
    "TrainResult": "train",
    "load_model": "model",
}
# modules named like their main function: calling the module calls that function
CALLABLE_MODULES = ("evaluate", "generate", "train")

__all__ = [
    "EvalResult",
    "LoadedModel",
    "SoftPrompt",
    "SoftPromptError",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "evaluate",
    "generate",
    "load_model",
    "train",
]

if TYPE_CHECKING:
    from .config import TrainConfig
    from .errors import SoftPromptError
    from .evaluate import EvalResult
    from .model import LoadedModel, load_model
    from .soft_prompt import SoftPrompt
    from .train import TrainResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in CALLABLE_MODULES:  # importing it sets the attribute (see _Package)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class CallableModule(types.ModuleType):
    """A module that, called, calls its function of the same name (``train.train``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The package module: the import system sets each submodule as an attribute of its
    package once it is loaded, whichever way it was imported; the modules named like their
    function are made callable there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
