"""Hostile input: random and damaged files given to every loader end in a SoftPromptError
with a one-line message, never another exception, never a hang."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import pickle
import signal
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt import SoftPrompt, load_model
from softprompt.checkpoint import load_checkpoint
from softprompt.cli import main
from softprompt.config import read_toml
from softprompt.data import read_dataset
from softprompt.errors import (
    ConfigError,
    DataError,
    FormatError,
    ModelError,
    RunError,
    SoftPromptError,
)
from softprompt.formats import kobold, load_any, native
from softprompt.formats import peft as peft_format

# SOFTPROMPT_FUZZ_EXAMPLES=2000 searches harder (the default keeps the suite fast)
EXAMPLES = int(os.environ.get("SOFTPROMPT_FUZZ_EXAMPLES", "40"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS = 20  # any single load taking longer than this counts as a hang


@contextlib.contextmanager
def no_hang(seconds: int = SECONDS):
    """Fail (instead of waiting forever) when the block runs longer than ``seconds``."""

    def alarm(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fails_cleanly(call, *kinds: type[SoftPromptError], must_fail: bool = True):
    """Run ``call``; it must raise one of ``kinds`` with a one-line message (or, with
    ``must_fail=False``, may also succeed: a flipped bit in a tensor value is still a file)."""
    try:
        with no_hang():
            result = call()
    except SoftPromptError as e:
        assert isinstance(e, kinds or (SoftPromptError,)), repr(e)
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        return e
    assert not must_fail, f"expected a {kinds} error, got {result!r}"
    return result


# ----------------------------------------------------------------------------- valid files


def _valid_files(folder: Path) -> dict[str, bytes]:
    """{name: bytes} of one valid file of each soft prompt format (and variant)."""
    sp = SoftPrompt(
        torch.randn(4, 8, generator=torch.Generator().manual_seed(0)),
        {"name": "x", "description": "d", "supported": ["m"]},
    )
    kobold.save(sp, folder / "p.zip")
    native.save(sp, folder / "p.safetensors")
    files = {
        "p.zip": (folder / "p.zip").read_bytes(),
        "p.safetensors": (folder / "p.safetensors").read_bytes(),
    }
    raw = pickle.dumps(sp.tensor.clone(), protocol=4)
    files["p.json"] = json.dumps(
        {"metadata": {"name": "mk"}, "tensor": base64.b64encode(raw).decode("ascii")}
    ).encode()
    buf = io.BytesIO()
    np.savez_compressed(buf, tensor=sp.tensor.numpy(), step=np.uint32(7), loss=np.float32(2.5))
    files["npz.mtjsp"] = buf.getvalue()
    for name, new_zip in (("torchzip.mtjsp", True), ("legacy.mtjsp", False)):
        buf = io.BytesIO()
        torch.save(
            {"tensor": sp.tensor.clone(), "step": 3, "loss": 1.5},
            buf,
            _use_new_zipfile_serialization=new_zip,
        )
        files[name] = buf.getvalue()
    return files


def _valid_peft(folder: Path) -> dict[str, bytes]:
    sp = SoftPrompt(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), {"name": "x"})
    peft_format.save(sp, folder / "adapter")
    return {p.name: p.read_bytes() for p in (folder / "adapter").iterdir()}


VALID = _valid_files(Path(tempfile.mkdtemp(prefix="softprompt-hostile-")))
PEFT = _valid_peft(Path(tempfile.mkdtemp(prefix="softprompt-hostile-")))
MKULTRA_PICKLE = pickle.dumps(torch.randn(3, 8), protocol=4)


def test_the_valid_files_load(tmp_path):
    for name, data in VALID.items():
        (tmp_path / name).write_bytes(data)
        assert load_any(tmp_path / name).tensor.shape[1] == 8, name


# ----------------------------------------------------------------------------- soft prompt files


@FAST
@given(
    data=st.binary(max_size=4096),
    suffix=st.sampled_from([".zip", ".json", ".mtjsp", ".safetensors", ".npz", ".pt", ""]),
)
def test_random_bytes_under_any_soft_prompt_name(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    fails_cleanly(lambda: load_any(path), FormatError)


# prefixes that get random bytes past each format's first check
@FAST
@given(
    head=st.sampled_from(
        [b"PK\x03\x04", b"\x80\x02", b'{"tensor": "', b"\x10\x00" + b"\0" * 6 + b"{"]
    ),
    data=st.binary(max_size=2048),
    suffix=st.sampled_from([".zip", ".json", ".mtjsp", ".safetensors"]),
)
def test_random_bytes_behind_a_plausible_header(tmp_path, head, data, suffix):
    path = tmp_path / f"plausible{suffix}"
    body = head + data
    if head.startswith(b"{"):
        body += b'", "metadata": {}}'
    path.write_bytes(body)
    fails_cleanly(lambda: load_any(path), FormatError)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        out[pos % len(out)] ^= byte or 0xFF
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)
CUT = st.none() | st.integers(0, 1 << 20)


@FAST
@given(name=st.sampled_from(sorted(VALID)), edits=EDITS, cut=CUT)
def test_damaged_soft_prompt_files(tmp_path, name, edits, cut):
    path = tmp_path / name
    path.write_bytes(_mutate(VALID[name], edits, cut))
    result = fails_cleanly(lambda: load_any(path), FormatError, must_fail=False)
    if isinstance(result, SoftPrompt):  # what loads is a sane soft prompt
        assert result.tensor.dim() == 2 and torch.isfinite(result.tensor).all()


@FAST
@given(edits=EDITS, cut=CUT)
def test_mkultra_with_a_damaged_pickle(tmp_path, edits, cut):
    raw = _mutate(MKULTRA_PICKLE, edits, cut)
    path = tmp_path / "mk.json"
    path.write_text(json.dumps({"metadata": {}, "tensor": base64.b64encode(raw).decode()}))
    fails_cleanly(lambda: load_any(path), FormatError, must_fail=False)


@FAST
@given(edits=EDITS, cut=CUT, member=st.sampled_from(["tensor.npy", "meta.json"]))
def test_kobold_zip_with_a_damaged_member(tmp_path, edits, cut, member):
    # a well-formed zip around damaged content: the member parsers see the bad bytes
    with zipfile.ZipFile(io.BytesIO(VALID["p.zip"])) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = _mutate(members[member], edits, cut)
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    fails_cleanly(lambda: load_any(path), FormatError, must_fail=False)


def test_npy_header_whose_shape_overflows(tmp_path):
    # shape product wraps around int64: must not pass the size check and allocate
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**62, 2**3)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(b"\0" * 64)
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("tensor.npy", buf.getvalue())
    fails_cleanly(lambda: load_any(path), FormatError)


@FAST
@given(
    member=st.sampled_from(sorted(PEFT)),
    edits=EDITS,
    cut=CUT,
    config=st.none()
    | st.dictionaries(
        st.sampled_from(
            ["peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules"]
        ),
        st.none()
        | st.integers(-3, 10)
        | st.text(max_size=5)
        | st.just("PROMPT_TUNING")
        | st.just("a\nb\x1b[2J"),
    ),
)
def test_damaged_peft_adapter_folder(tmp_path, member, edits, cut, config):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    for name, data in PEFT.items():
        (folder / name).write_bytes(_mutate(data, edits, cut) if name == member else data)
    if config is not None:
        (folder / peft_format.CONFIG).write_text(json.dumps(config))
    fails_cleanly(lambda: load_any(folder), FormatError, must_fail=False)


@pytest.mark.parametrize("head", [b"\x80\xfd", b"\x80\x02\x8a"])
def test_torch_files_fail_quietly_and_never_advise_weights_only_false(tmp_path, head):
    # torch warns about odd pickle protocols and advises retrying with weights_only=False:
    # neither may reach the user
    path = tmp_path / "t.mtjsp"
    path.write_bytes(head + b"garbage" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = fails_cleanly(lambda: load_any(path), FormatError)
    assert not caught, [str(w.message) for w in caught]
    assert "weights_only` set to `False" not in str(e) and "weights_only=True" in str(e)


@FAST
@given(data=st.binary(max_size=2048), head=st.sampled_from([b"", b"\x80\x02", b"PK\x03\x04"]))
def test_damaged_training_checkpoint(tmp_path, data, head):
    (tmp_path / "checkpoint.pt").write_bytes(head + data)
    e = fails_cleanly(lambda: load_checkpoint(tmp_path), RunError)
    assert "checkpoint" in str(e) and "--force" in str(e) or "not a softprompt checkpoint" in str(e)


# ----------------------------------------------------------------------------- config files


@FAST
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_random_config_files(tmp_path, text):
    path = tmp_path / "c.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    result = fails_cleanly(lambda: read_toml(path), ConfigError, must_fail=False)
    if isinstance(result, dict):  # only empty or comment-only documents get through
        assert result == {}


@FAST
@given(
    key=st.sampled_from(["lr", "max-steps", "dataset", "recursive", "train", "tokens"]),
    value=st.sampled_from(
        ['"x"', "1", "1.5", "true", "[1, 2]", "{a = 1}", "1979-05-27", "nan", "inf", "-0"]
    ),
)
def test_config_values_of_the_wrong_type(tmp_path, key, value):
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = {value}\n", encoding="utf-8")
    fails_cleanly(lambda: read_toml(path), ConfigError, must_fail=False)


# ----------------------------------------------------------------------------- datasets


def test_dataset_with_invalid_utf8_and_nul_bytes(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8")
    e = fails_cleanly(lambda: read_dataset(tmp_path), DataError)
    assert "UTF-8" in str(e) and "bad.txt" in str(e)
    (tmp_path / "bad.txt").write_bytes(b"text\x00with a NUL")
    e = fails_cleanly(lambda: read_dataset(tmp_path), DataError)
    assert "NUL" in str(e)
    (tmp_path / "good.txt").write_text("Good text.", encoding="utf-8")
    ds = read_dataset(tmp_path, skip_bad_files=True)
    assert ds.files == ["good.txt"] and ds.skipped == ["bad.txt"]


@FAST
@given(data=st.binary(min_size=1, max_size=512))
def test_dataset_of_random_bytes(tmp_path, data):
    folder = tmp_path / "random_ds"
    folder.mkdir(exist_ok=True)
    (folder / "r.txt").write_bytes(data)
    result = fails_cleanly(lambda: read_dataset(folder), DataError, must_fail=False)
    if not isinstance(result, SoftPromptError):
        assert result.files == ["r.txt"]


def test_dataset_one_50_mb_line(tmp_path):
    (tmp_path / "long.txt").write_bytes(b"a" * (50 * 1024 * 1024))
    with no_hang():
        ds = read_dataset(tmp_path)
    assert ds.chars == 50 * 1024 * 1024


def test_dataset_deeply_nested(tmp_path):
    folder = tmp_path / "deep"
    deep = folder.joinpath(*[f"d{i}" for i in range(60)])
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("At the bottom.", encoding="utf-8")
    fails_cleanly(lambda: read_dataset(folder), DataError)  # not recursive: nothing found
    with no_hang():
        ds = read_dataset(folder, recursive=True)
    assert len(ds.files) == 1 and ds.files[0].endswith("d59/bottom.txt")


def test_dataset_symlink_loop(tmp_path):
    folder = tmp_path / "loop"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("Some text.", encoding="utf-8")
    os.symlink(folder, folder / "sub" / "back")  # a folder link to its own ancestor
    os.symlink("self.txt", folder / "self.txt")  # a file link to itself
    with no_hang():
        ds = read_dataset(folder, recursive=True)
    assert ds.files == ["sub/a.txt"]
    fails_cleanly(lambda: read_dataset(folder / "self.txt"), DataError)


def test_dataset_unreadable_or_not_a_file(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "good.txt").write_text("Readable.", encoding="utf-8")
    (folder / "dir.txt").mkdir()  # a folder named like a text file
    os.symlink(tmp_path / "missing", folder / "dangling.txt")
    ds = read_dataset(folder)
    assert ds.files == ["good.txt"]  # neither is a file: both are passed over
    locked = folder / "locked.txt"
    locked.write_text("Secret.", encoding="utf-8")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anyway: nothing more to check here
            return
        e = fails_cleanly(lambda: read_dataset(folder), DataError)
        assert "locked.txt" in str(e)
        assert read_dataset(folder, skip_bad_files=True).skipped == ["locked.txt"]
    finally:
        locked.chmod(0o644)


def test_dataset_only_non_files(tmp_path):
    (tmp_path / "x.txt").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "y.txt")
    e = fails_cleanly(lambda: read_dataset(tmp_path), DataError)
    assert "no .txt files" in str(e)


# ----------------------------------------------------------------------------- models


@FAST
@given(data=st.binary(max_size=1024), magic=st.sampled_from([b"", b"GGUF", b"GGUF\x03\0\0\0"]))
def test_random_gguf(tmp_path, data, magic):
    path = tmp_path / "m.gguf"
    path.write_bytes(magic + data)
    fails_cleanly(lambda: load_model(str(path), device="cpu", dtype="float32"), ModelError)


@FAST
@given(data=st.binary(max_size=512) | st.text(max_size=200).map(str.encode))
def test_model_folder_with_a_garbage_config(tmp_path, data):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    fails_cleanly(lambda: load_model(str(folder), device="cpu", dtype="float32"), ModelError)


# ----------------------------------------------------------------------------- the CLI


def _one_error_line(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("softprompt: error: "), err


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=512))
def test_cli_random_config_and_soft_prompt(tmp_path, capsys, data):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff" + data)  # never valid UTF-8, so never valid TOML
    capsys.readouterr()
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "out")])
    _one_error_line(code, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    for suffix in (".zip", ".safetensors", ".json", ".mtjsp"):
        sp = tmp_path / f"sp{suffix}"
        sp.write_bytes(data)
        code = main(["inspect", str(sp)])
        _one_error_line(code, capsys.readouterr().err)


# ----------------------------------------------------------------------------- memory bombs


def _stride0(n: int, d: int) -> torch.Tensor:
    """One value seen as (n, d): torch saves and pickles it as a storage of one number."""
    return torch.zeros(1).expand(n, d)


def _npy_bomb(fh, shape) -> None:
    """Write a float32 .npy of zeros with ``shape`` to ``fh`` without holding it in memory."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    fh.write(header.getvalue())
    zeros, left = bytes(1 << 24), int(np.prod(shape, dtype=np.int64)) * 4
    while left:
        fh.write(zeros[:left])
        left -= min(left, len(zeros))


def _sparse_safetensors(path: Path, key: str, shape) -> None:
    """A .safetensors file whose data is a hole: hundreds of MB on paper, nothing on disk."""
    n = int(np.prod(shape, dtype=np.int64)) * 4
    header = json.dumps({key: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, n]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header.encode())
        fh.truncate(8 + len(header) + n)


def _bomb_files(folder: Path) -> list[Path]:
    """Small files (or sparse ones) that claim soft prompts of hundreds of MB to GBs."""
    rows = _stride0(20_000, 16_384)  # more rows than any soft prompt: 1.3 GB as float32
    cells = _stride0(8_192, 16_384)  # rows and width plausible, 512 MB as float32
    raw = pickle.dumps(rows, protocol=4)
    (folder / "bomb.json").write_text(
        json.dumps({"metadata": {}, "tensor": base64.b64encode(raw).decode()})
    )
    torch.save({"tensor": cells}, folder / "zip.mtjsp")
    torch.save({"tensor": rows}, folder / "legacy.mtjsp", _use_new_zipfile_serialization=False)
    for name, weights in (("bin_adapter", "adapter_model.bin"), ("st_adapter", None)):
        (folder / name).mkdir()
        (folder / name / peft_format.CONFIG).write_text('{"peft_type": "PROMPT_TUNING"}')
        if weights:
            torch.save({"prompt_embeddings": cells}, folder / name / weights)
        else:
            _sparse_safetensors(
                folder / name / peft_format.WEIGHTS, "prompt_embeddings", (8192, 16384)
            )
    _sparse_safetensors(folder / "sparse.safetensors", "soft_prompt", (8192, 16384))
    # a few hundred KB that deflate to a tensor.npy of 256 MB claiming 20,000 rows, and of
    # 512 MB (inside the old limit) claiming a plausible shape
    for name, shape in (("deflate.zip", (20_000, 3_200)), ("deflate.mtjsp", (8192, 16368))):
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            with z.open("tensor.npy", "w", force_zip64=True) as fh:
                _npy_bomb(fh, shape)
            if name.endswith(".mtjsp"):  # mtj-softtuner's NPZ
                step = io.BytesIO()
                np.save(step, np.uint32(1))
                z.writestr("step.npy", step.getvalue())
    return sorted(p for p in folder.iterdir() if p.name != "warm")


# Loads each file named on the command line in this one process and reports, as JSON, what
# happened and how far the peak RSS rose above what loading a small valid file needed.
RSS_CHILD = """
import json, resource, sys
from softprompt.formats import load_any
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
for warm in sys.argv[1].split(","):
    load_any(warm)  # imports and first-use allocations are not the bomb's
base, out = peak_mb(), []
for path in sys.argv[2:]:
    try:
        result = "loaded %s" % (tuple(load_any(path).tensor.shape),)
    except Exception as e:
        result = "%s: %s" % (type(e).__name__, e)
    out.append([path, result, round(peak_mb() - base)])
print(json.dumps(out))
"""


def test_memory_bombs_are_refused_before_anything_is_allocated(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    warm = tmp_path / "warm"
    warm.mkdir()
    for name, data in VALID.items():
        (warm / name).write_bytes(data)
    (warm / "adapter").mkdir()
    for name, data in PEFT.items():
        (warm / "adapter" / name).write_bytes(data)
    bombs = _bomb_files(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS_CHILD,
            ",".join(str(p) for p in warm.iterdir()),
            *map(str, bombs),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == len(bombs) == 8
    for path, result, grew_mb in results:
        assert result.startswith("FormatError: "), (path, result)
        assert "\n" not in result and Path(path).name in result, result
        assert "at most" in result or "allowed" in result, result  # says what the limit is
        assert grew_mb < 48, (path, grew_mb, result)


def test_the_largest_soft_prompt_loads_and_one_larger_is_refused(tmp_path):
    from softprompt.formats.common import (
        MAX_LOAD_NUMBERS,
        MAX_LOAD_TOKENS,
        MAX_LOAD_WIDTH,
        check_shape,
    )

    for shape in ((MAX_LOAD_TOKENS, 1), (1, MAX_LOAD_WIDTH), (1024, MAX_LOAD_WIDTH)):
        check_shape(shape, "x")
    for shape in ((MAX_LOAD_TOKENS + 1, 1), (1, MAX_LOAD_WIDTH + 1), (1025, MAX_LOAD_WIDTH)):
        e = fails_cleanly(lambda shape=shape: check_shape(shape, "x"), FormatError)
        assert f"{MAX_LOAD_NUMBERS:,}" in str(e)
    # KoboldAI's longest prompt for a model 32,768 wide: one value in the file, 256 MB loaded
    torch.save({"tensor": torch.ones(1).expand(2047, 32768)}, tmp_path / "big.mtjsp")
    sp = load_any(tmp_path / "big.mtjsp")
    assert sp.tensor.shape == (2047, 32768) and sp.tensor.is_contiguous()
    assert float(sp.tensor[-1, -1]) == 1.0


def test_a_zip_tensor_with_a_bad_crc_or_trailing_data_is_refused(tmp_path):
    with zipfile.ZipFile(io.BytesIO(VALID["p.zip"])) as z:
        npy, meta = z.read("tensor.npy"), z.read("meta.json")
    damaged = npy[:-1] + bytes([npy[-1] ^ 1])
    for name, data, crc in (
        ("crc.zip", damaged, zipfile.crc32(npy)),
        ("long.zip", npy + b"!", None),
    ):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("tensor.npy", data)
            z.writestr("meta.json", meta)
        if crc is not None:  # keep the original CRC in both headers: the data no longer matches
            raw = (tmp_path / name).read_bytes()
            bad = zipfile.crc32(data).to_bytes(4, "little")
            (tmp_path / name).write_bytes(raw.replace(bad, crc.to_bytes(4, "little")))
        fails_cleanly(lambda name=name: load_any(tmp_path / name), FormatError)


def test_sparse_and_data_less_tensors_are_refused(tmp_path):
    # torch.load(weights_only=True) rebuilds these; none has numbers to use as a soft prompt
    for name, tensor in (
        ("coo", torch.eye(4, 8).to_sparse()),
        ("meta", torch.empty(4, 8, device="meta")),
    ):
        torch.save({"tensor": tensor}, tmp_path / f"{name}.mtjsp")
        (tmp_path / name).mkdir()
        (tmp_path / name / peft_format.CONFIG).write_text('{"peft_type": "PROMPT_TUNING"}')
        torch.save({"prompt_embeddings": tensor}, tmp_path / name / "adapter_model.bin")
        for path in (tmp_path / f"{name}.mtjsp", tmp_path / name):
            e = fails_cleanly(lambda path=path: load_any(path), FormatError)
            assert "dense" in str(e), str(e)


# ----------------------------------------------------------------------------- code in pickles


class _RunsCode:
    """Unpickling this calls os.system, which would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _pickles_with_code(folder: Path, marker: Path) -> list[Path]:
    """Every place a torch pickle is read, each holding a call of os.system."""
    code = _RunsCode(marker)
    torch.save({"tensor": code}, folder / "zip.mtjsp")
    torch.save({"tensor": code}, folder / "legacy.mtjsp", _use_new_zipfile_serialization=False)
    (folder / "adapter").mkdir()
    (folder / "adapter" / peft_format.CONFIG).write_text('{"peft_type": "PROMPT_TUNING"}')
    torch.save({"prompt_embeddings": code}, folder / "adapter" / "adapter_model.bin")
    blob = io.BytesIO()
    torch.save(code, blob, _use_new_zipfile_serialization=False)

    class InTheStorage:  # mkultra's tensor pickle, its storage bytes a torch.save stream
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob.getvalue(),))

    for name, obj in (("direct.json", code), ("storage.json", InTheStorage())):
        raw = pickle.dumps(obj, protocol=4)
        (folder / name).write_text(
            json.dumps({"metadata": {}, "tensor": base64.b64encode(raw).decode()})
        )
    return [
        folder / n for n in ("zip.mtjsp", "legacy.mtjsp", "adapter", "direct.json", "storage.json")
    ]


def test_pickled_code_is_refused_saying_what_and_why(tmp_path, capsys):
    marker = tmp_path / "ran"
    for path in _pickles_with_code(tmp_path, marker):
        e = fails_cleanly(lambda path=path: load_any(path), FormatError)
        msg = str(e)
        assert path.name in msg and "holds code (posix.system), which softprompt never runs" in msg
        for advice in ("weights_only` set to `False", "weights_only=False", "Re-running"):
            assert advice not in msg, msg
        code = main(["inspect", str(path)])
        err = capsys.readouterr().err
        _one_error_line(code, err)
        assert "posix.system" in err and "weights_only` set" not in err
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the control: a plain unpickler runs it
    assert marker.exists()


# ----------------------------------------------------------------------------- deep JSON

DEEP = "[" * 100_000 + "]" * 100_000


def _kobold_zip(path: Path, meta_json: str, tensor: np.ndarray | None = None) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 8), np.float32) if tensor is None else tensor)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tensor.npy", buf.getvalue())
        z.writestr("meta.json", meta_json)
    return path


def _deep_json_files(folder: Path) -> list[Path]:
    """A 100,000-deep JSON array in every place a soft prompt file holds JSON."""
    from safetensors.torch import save_file

    tensor = torch.ones(2, 8)
    files = [_kobold_zip(folder / "meta.zip", '{"name": "x", "extra": ' + DEEP + "}")]
    files.append(folder / "mkultra.json")
    files[-1].write_text(
        '{"metadata": '
        + DEEP
        + ', "tensor": "'
        + base64.b64encode(pickle.dumps(tensor, protocol=4)).decode()
        + '"}'
    )
    save_file({"soft_prompt": tensor}, folder / "meta.safetensors", metadata={"meta": DEEP})
    files.append(folder / "meta.safetensors")
    header = b'{"__metadata__": %s}' % DEEP.encode()
    (folder / "header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    files.append(folder / "header.safetensors")
    for name, config, metadata in (
        ("config_adapter", '{"peft_type": "PROMPT_TUNING", "x": ' + DEEP + "}", {}),
        ("meta_adapter", '{"peft_type": "PROMPT_TUNING"}', {"softprompt_meta": DEEP}),
    ):
        (folder / name).mkdir()
        (folder / name / peft_format.CONFIG).write_text(config)
        save_file(
            {"prompt_embeddings": tensor}, folder / name / peft_format.WEIGHTS, metadata=metadata
        )
        files.append(folder / name)
    return files


def test_deeply_nested_json_is_a_one_line_error(tmp_path, capsys):
    for path in _deep_json_files(tmp_path):
        e = fails_cleanly(lambda path=path: load_any(path), FormatError)
        assert path.name in str(e), str(e)
        code = main(["inspect", str(path)])
        _one_error_line(code, capsys.readouterr().err)
        code = main(["convert", str(path), str(tmp_path / "out.zip")])
        _one_error_line(code, capsys.readouterr().err)
        assert not (tmp_path / "out.zip").exists()


def test_serve_answers_4xx_for_a_soft_prompt_with_deep_json(tiny_llama, tmp_path):
    import http.client

    from softprompt.serve import Server

    dim = tiny_llama.embed_dim
    _kobold_zip(tmp_path / "deep.zip", DEEP, np.ones((2, dim), np.float32))
    srv = Server(tiny_llama, tmp_path, port=0)
    srv.start()
    try:
        for method, route, body in (
            ("PUT", "/api/v1/config/soft_prompt", {"value": "deep.zip"}),
            (
                "POST",
                "/api/v1/generate",
                {"prompt": "x", "max_length": 2, "soft_prompt": "deep.zip"},
            ),
        ):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            conn.request(method, route, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read().decode()
            conn.close()
            assert 400 <= resp.status < 500, (route, resp.status, answer)
            assert "deep.zip" in answer and "internal" not in answer, answer
    finally:
        srv.close()


# ----------------------------------------------------------------------------- what is printed

# a shared file's metadata trying to retitle the terminal, clear it, and overwrite a line
SHOWN = {
    "name": "\x1b]0;owned\x07name",
    "description": "\x1b[2J\rfits: yes\x9b31m",
    "author": "me\u202eevil",
    "supported": ["\x1b[1mmodel"],
    "extra": {"k\x1b": "v\r"},
}
RAW = ("\x1b", "\r", "\x07", "\x9b", "\u202e")


def test_inspect_and_convert_show_control_characters_escaped(tmp_path, capsys):
    sp = SoftPrompt(torch.ones(2, 8), dict(SHOWN))
    path = tmp_path / "x\x1b[2J.zip"
    kobold.save(sp, path)
    code, out = main(["inspect", str(path)]), capsys.readouterr().out
    assert code == 0 and not any(c in out for c in RAW), repr(out)
    assert "\\x1b]0;owned\\x07name" in out and "\\x1b[2J\\rfits: yes" in out and "\\u202e" in out
    code, out = main(["inspect", str(path), "--json"]), capsys.readouterr().out
    assert code == 0 and not any(c in out for c in RAW), repr(out)
    info = json.loads(out)  # escaped, yet the same text
    assert info["name"] == SHOWN["name"] and info["meta"]["description"] == SHOWN["description"]
    code, out = main(["convert", str(path), str(tmp_path / "y\r.safetensors")]), capsys.readouterr()
    assert code == 0 and not any(c in out.out + out.err for c in RAW), repr(out)
    assert load_any(tmp_path / "y\r.safetensors").meta["author"] == SHOWN["author"]
    (tmp_path / "z\x1b.zip").write_bytes(b"not a zip")  # and in an error
    code, err = main(["inspect", str(tmp_path / "z\x1b.zip")]), capsys.readouterr().err
    _one_error_line(code, err)
    assert "\x1b" not in err and "z\\x1b.zip" in err


def test_serve_lists_no_names_with_control_characters(tiny_llama, tmp_path):
    from softprompt.serve import Server

    sp = SoftPrompt(torch.ones(2, tiny_llama.embed_dim), dict(SHOWN))
    for name in ("ok.zip", "bad\x1b[2J.zip", "bad\r.zip", "bad\x9b.zip", "bad\u202e.zip"):
        kobold.save(sp, tmp_path / name)
    srv = Server(tiny_llama, tmp_path, port=0)
    assert srv.list_soft_prompts() == ["ok.zip"]


# ----------------------------------------------------------------------------- zip entries


@pytest.mark.parametrize("name, member", [("p.zip", "meta.json"), ("npz.mtjsp", "tensor.npy")])
def test_zip_with_a_duplicate_entry_name_is_refused(tmp_path, name, member):
    path = tmp_path / name
    with zipfile.ZipFile(io.BytesIO(VALID[name])) as src, zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
            z.writestr(member, src.read(member))
    e = fails_cleanly(lambda: load_any(path), FormatError)
    assert name in str(e) and f"{member!r} twice" in str(e), str(e)


def test_zip_with_an_encrypted_entry_is_refused(tmp_path):
    raw = bytearray(VALID["p.zip"])
    entry = raw.index(b"PK\x01\x02")  # the directory's first entry: tensor.npy
    raw[entry + 8] |= 0x1  # its "encrypted" flag bit
    (tmp_path / "p.zip").write_bytes(bytes(raw))
    e = fails_cleanly(lambda: load_any(tmp_path / "p.zip"), FormatError)
    assert "'tensor.npy' is encrypted" in str(e), str(e)
