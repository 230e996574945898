"""softprompt: train, share and use soft prompts for frozen causal language models.

import softprompt
result = softprompt.train(dataset="my_texts/", output="out", max_steps=200)
print(result.val_loss_before, "->", result.val_loss_after)
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import SoftPromptError  # noqa: E402
from .evaluate import EvalResult, evaluate  # noqa: E402
from .generate import generate  # noqa: E402  (generate.stream streams)
from .model import LoadedModel, load_model  # noqa: E402
from .soft_prompt import SoftPrompt  # noqa: E402
from .train import TrainResult, train  # noqa: E402

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
