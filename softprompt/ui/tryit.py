"""Try it: one prompt continued with and without a finished run's soft prompt, same seed,
side by side; the model the run trained with stays loaded between tries."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import MAX_SEED, SURROGATE, TrainConfig, read_toml
from ..errors import ConfigError
from ..http import whole_number
from ..runfiles import CONFIG_FILE, OUTPUT_DIR, SOFTPROMPT_FILE

if TYPE_CHECKING:
    from ..model import LoadedModel

# what the page's try-it box sends; the rest of the sampling options keep their defaults
TRY_KEYS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")
TRY_WHOLE = {"max_new_tokens": (1, 1000), "seed": (0, MAX_SEED)}  # and their ranges


def _try_option(key: str, value: Any) -> int | float | None:
    """One try-it option as the page sends it (text, or a number; None when left empty);
    ConfigError naming it.
    The sampling ranges are generate's to check: here, what would fail before them (a seed
    torch refuses, an infinity)."""
    label = key.replace("_", " ")
    if value is None or value == "":
        return None
    if key in TRY_WHOLE:
        low, high = TRY_WHOLE[key]
        number = whole_number(str(value).strip())
        if number is None or not low <= number <= high:
            raise ConfigError(f"{label} must be a whole number from {low} to {high}")
        return number
    try:
        real = float(value)
    except (TypeError, ValueError):
        real = math.nan
    if not math.isfinite(real):
        raise ConfigError(f"{label} must be a finite number")
    return real


class Generator:
    """Continuations with and without a run's soft prompt; the last model loaded is kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._lm: LoadedModel | None = None

    def model(self, cfg: TrainConfig) -> LoadedModel:
        """The model a run trained with (its config.toml), loaded once and kept."""
        from ..model import load_model

        key = (cfg.model, cfg.device, cfg.dtype, cfg.device_map, cfg.quantize)
        if self._key != key or self._lm is None:
            self._lm = None  # free the old one first
            self._lm = load_model(
                cfg.model, cfg.device, cfg.dtype, device_map=cfg.device_map, quantize=cfg.quantize
            )
            self._key = key
        return self._lm

    def compare(self, run_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
        from ..generate import generate
        from ..sampling import SamplingOptions
        from ..soft_prompt import SoftPrompt

        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("type a prompt first")
        if SURROGATE.search(prompt):  # JSON's "\ud800": no tokenizer takes it
            raise ConfigError("the prompt is not valid Unicode text (it holds a lone surrogate)")
        given: dict[str, Any] = {key: _try_option(key, request.get(key)) for key in TRY_KEYS}
        options = SamplingOptions(**{k: v for k, v in given.items() if v is not None}).check()
        out = run_dir / OUTPUT_DIR
        cfg = TrainConfig(**read_toml(out / CONFIG_FILE))
        sp = SoftPrompt.load(out / SOFTPROMPT_FILE)
        with self._lock:
            lm = self.model(cfg)
            t0 = time.perf_counter()
            with_sp = generate(lm, prompt, sp, options)
            without = generate(lm, prompt, None, options)
        return {
            "prompt": prompt,
            "with": with_sp,
            "without": without,
            "seed": options.seed,
            "model": lm.name,
            "seconds": time.perf_counter() - t0,
        }
