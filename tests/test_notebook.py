"""notebooks/softprompt.ipynb, executed in a fresh kernel of this interpreter with tiny
settings put after its `parameters` cell (as papermill does), with nothing downloaded:
top to bottom outside Colab on a tiny model folder and three chapters of the example text,
and its Colab-only steps (upload, Drive, download) against a stand-in `google.colab`."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import zipfile

import pytest
from conftest import EXAMPLES, ROOT

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient)")
pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (ipykernel)")

NOTEBOOK = ROOT / "notebooks" / "softprompt.ipynb"
COLAB_DRIVE = "/content/drive"  # where the notebook mounts Google Drive on Colab

# google.colab as the notebook uses it: upload() hands over the files of $FAKE_UPLOAD,
# mount() and download() say what they were asked to do
FAKE_COLAB = """
import os
from pathlib import Path
from types import SimpleNamespace


def mount(path):
    (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)
    print(f"Mounted at {path}")


def upload():
    return {p.name: p.read_bytes() for p in sorted(Path(os.environ["FAKE_UPLOAD"]).iterdir())}


def download(path):
    print(f"files.download: {path}")


drive = SimpleNamespace(mount=mount)
files = SimpleNamespace(upload=upload, download=download)
"""


def with_parameters(nb, **values):
    """The notebook with a cell setting ``values`` right after its `parameters` cell, and a
    first cell that prints which Python the kernel runs."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    lines = [f"{key} = {value!r}" for key, value in values.items()]
    injected = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected"]})
    nb.cells.insert(index + 1, injected)
    probe = nbformat.v4.new_code_cell("import sys\nprint('kernel prefix:', sys.prefix)")
    nb.cells.insert(0, probe)
    return nb


def title(cell) -> str:
    """A code cell's Colab title ("4. Train"), else its first line."""
    first = cell.source.splitlines()[0]
    return first.removeprefix("#@title ").split(" {")[0]


def cell_text(cell) -> str:
    """What a cell printed (stdout and stderr)."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def run_notebook(nb, cwd, tmp_path, monkeypatch, pythonpath=(), **env) -> dict[str, str]:
    """Execute ``nb`` in a fresh python3 kernel started in ``cwd``; raises CellExecutionError
    on the first failing cell. Returns what each code cell printed, by title."""
    # Jupyter's own files (kernel specs looked up, connection files) stay in tmp_path, so the
    # python3 kernel is this venv's; the kernel imports this checkout's package, and can
    # neither download a model nor pip-install anything
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    path = [*map(str, pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
        **env,
    }
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    printed = {title(c): cell_text(c) for c in nb.cells if c.cell_type == "code"}
    assert printed["import sys"].strip() == f"kernel prefix: {sys.prefix}"  # this venv's
    return printed


def test_saved_clean():
    """The notebook is saved without outputs, and opens as a Colab form on a GPU runtime."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert all(c.source.startswith("#@title") for c in code)
    assert "#@param" in code[0].source and "parameters" in code[0].metadata["tags"]
    assert nb.metadata["accelerator"] == "GPU"


def test_runs_outside_colab(tiny_models, corpus, tmp_path, monkeypatch):
    nb = with_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        dataset_source="upload",  # the default: outside Colab it reads the folder instead
        dataset_folder=str(corpus),
        model=str(tiny_models["gpt2"]),
        name="Notebook test",
        description="made by tests/test_notebook.py",
        soft_tokens=4,
        max_steps=2,
        batch_size="2",
        block_size=32,
        sample_prompt="It is a truth",
        sample_tokens=8,
        save_to_drive=True,  # skipped with a note outside Colab
        output_root=str(tmp_path / "runs"),
    )
    printed = run_notebook(nb, NOTEBOOK.parent, tmp_path, monkeypatch)

    assert f"using this copy of the repository ({ROOT})" in printed["2. Install softprompt"]
    assert "note: not on Colab: Google Drive is not mounted" in printed["3. Your texts"]
    assert "note: not on Colab: no upload; reading dataset_folder" in printed["3. Your texts"]

    train = printed["4. Train"]
    assert "dataset: 3 files" in train and "soft prompt: 4 tokens" in train  # its messages
    curve = next(c for c in nb.cells if title(c) == "4. Train").outputs
    assert any("image/png" in o.get("data", {}) for o in curve)  # the loss curve is shown

    table = printed["5. Evaluate"]
    assert "soft prompt (4 tokens)" in table and "no prompt" in table and "perplexity" in table
    samples = printed["6. Try it"]
    assert "--- without the soft prompt:\nIt is a truth" in samples
    assert "--- with the soft prompt:\nIt is a truth" in samples

    out = tmp_path / "runs" / "Notebook-test"
    zip_path = out / "Notebook test.zip"
    assert zip_path.is_file() and (out / "softprompt.safetensors").is_file()
    download = printed["7. Download"]
    assert f"soft prompt: {zip_path}" in download
    assert "note: not on Colab: nothing saved to Google Drive" in download
    assert "note: not on Colab: no download" in download


def test_colab_steps(tmp_path, monkeypatch):
    """On Colab: the uploaded files (a .zip of them unpacked) become the dataset, Drive is
    mounted, and the finished zip is saved to Drive and downloaded. Training is left to the
    test above: a stand-in result takes its place."""
    fake = tmp_path / "fake" / "google" / "colab"  # google/ stays a namespace package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_COLAB, encoding="utf-8")
    upload = tmp_path / "upload"
    upload.mkdir()
    chapters = sorted(EXAMPLES.glob("*.txt"))[:3]
    shutil.copy(chapters[0], upload / chapters[0].name)
    with zipfile.ZipFile(upload / "more.zip", "w") as archive:
        for p in chapters[1:]:
            archive.write(p, f"more/{p.name}")
    drive = tmp_path / "drive"

    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), model="not loaded here")
    steps = {"import sys", "1. Settings", "2. Install softprompt", "3. Your texts"}
    cells = nb.cells
    nb.cells = [c for c in cells if title(c) in steps or "injected" in c.metadata.get("tags", [])]
    stand_in = textwrap.dedent(
        """
        from types import SimpleNamespace
        Path("run").mkdir()
        Path("run/Notebook test.zip").write_bytes(b"zip")
        result = SimpleNamespace(files={"kobold": Path("run/Notebook test.zip").resolve()})
        """
    )
    nb.cells.append(nbformat.v4.new_code_cell(stand_in))
    nb.cells.append(next(c for c in cells if title(c) == "7. Download"))
    for cell in nb.cells:
        cell.source = cell.source.replace(COLAB_DRIVE, str(drive))
    work = tmp_path / "content"
    work.mkdir()
    printed = run_notebook(
        nb, work, tmp_path, monkeypatch, pythonpath=[tmp_path / "fake"], FAKE_UPLOAD=str(upload)
    )

    assert "softprompt: already installed" in printed["2. Install softprompt"]
    texts = printed["3. Your texts"]
    assert f"Mounted at {drive}" in texts
    assert f"dataset: {work / 'uploaded_texts'} (3 .txt files" in texts
    assert (work / "uploaded_texts" / "more" / chapters[1].name).is_file()
    assert not (work / "uploaded_texts" / "more.zip").exists()
    saved = drive / "MyDrive" / "softprompt" / "Notebook test.zip"
    assert saved.read_bytes() == b"zip"
    download = printed["7. Download"]
    assert f"saved to Google Drive: {saved}" in download
    assert f"files.download: {work / 'run' / 'Notebook test.zip'}" in download
