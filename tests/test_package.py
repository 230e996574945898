"""The package surface: what importing softprompt costs, what its names are, and the README's
options table kept true to TrainConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
import types

import pytest
from conftest import ROOT, run_cli

# Runs the command in this process as `python -m softprompt ARGS` would, then says on its
# last line whether torch got imported.
MAIN_CHILD = """
import json, runpy, sys
sys.argv = ["softprompt", *json.loads(sys.argv[1])]
try:
    runpy.run_module("softprompt", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_importing_the_package_and_the_registries_imports_no_torch():
    proc = _python(
        "import sys, softprompt, softprompt.cli, softprompt.config, softprompt.formats, "
        "softprompt.options, softprompt.sampling\n"
        "softprompt.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["train", "--help"], 0),
        (["generate", "--help"], 0),
        (["serve", "--help"], 0),
        (["--version"], 0),
        (["train", "--lr", "abc"], 2),
        (["generate", "--top-p", "x", "hi"], 2),
        (["convert", "a.zip", "b", "--to", "nonsense"], 2),
        (["nonsense"], 2),
    ],
)
def test_help_and_argument_errors_import_no_torch(argv, code):
    proc = _python(MAIN_CHILD, json.dumps(argv))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "torch": False}, proc.stderr
    if code == 2:
        assert proc.stderr.startswith("softprompt: error: "), proc.stderr


@pytest.mark.parametrize("first", ["import softprompt.train", "import softprompt"])
def test_modules_named_like_their_function_are_the_modules_and_call_it(first):
    """softprompt.train is softprompt/train.py whichever way it was imported first, and
    calling it calls train.train (as the README's softprompt.train(...) does)."""
    proc = _python(
        f"{first}\n"
        "import sys, types, softprompt\n"
        "from softprompt.cli import main\n"
        "for name in ('train', 'evaluate', 'generate'):\n"
        "    m = getattr(softprompt, name)\n"
        "    assert m is sys.modules['softprompt.' + name], name\n"
        "    assert isinstance(m, types.ModuleType) and callable(m), name\n"
        "    assert callable(getattr(m, name)), name\n"
        "from softprompt import train\n"
        "assert train is sys.modules['softprompt.train']\n"
        "print('ok')"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_calling_a_module_calls_its_function(tiny_llama):
    import softprompt
    import softprompt.generate as generate_module

    assert isinstance(softprompt.generate, types.ModuleType)
    kwargs = dict(max_new_tokens=4, temperature=0)
    assert softprompt.generate(tiny_llama, "Hello", None, **kwargs) == (
        generate_module.generate(tiny_llama, "Hello", None, **kwargs)
    )
    assert softprompt.TrainConfig is softprompt.config.TrainConfig
    assert set(softprompt.__all__) <= set(dir(softprompt))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        softprompt.nonsense  # noqa: B018


def test_the_cli_leaves_the_callers_logging_as_it_was(capsys, tmp_path):
    log = logging.getLogger("softprompt")
    before = (log.handlers[:], log.level, log.propagate)
    code, _, _ = run_cli(capsys, "convert", tmp_path / "missing.zip", tmp_path / "out.zip")
    assert code == 2
    assert (log.handlers[:], log.level, log.propagate) == before


def test_one_kind_helper_agrees_with_the_pages_kinds():
    """config.field_kind is the page's field_kind (ui.py can call it instead)."""
    from softprompt import ui
    from softprompt.config import FIELDS, field_kind

    for name, f in FIELDS.items():
        assert field_kind(f) == ui.field_kind(name), name


# ----------------------------------------------------------------------------- README


def _readme_train_table() -> list[tuple[list[str], str]]:
    """(flags, default cell) of each row of the README's "Options of `softprompt train`"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Options of `softprompt train`", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `--") or len(cells) != 3:
            continue
        rows.append((re.findall(r"--[a-z0-9-]+", cells[0]), cells[1]))
    return rows


def _train_flags() -> set[str]:
    from softprompt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices["train"]._option_string_actions)


def test_readme_options_table_matches_train_config():
    """Every TrainConfig option has a row naming its flag (--no-X for one that is on by
    default), its default in the default column (numbers and words as they are; "off" or
    nothing for a switch that is off; "empty" for empty text), and no row names a flag that
    `softprompt train` does not have."""
    from softprompt.config import FIELDS

    rows = _readme_train_table()
    assert len(rows) > 20
    flags = _train_flags()
    for row_flags, _ in rows:
        for f in row_flags:
            assert f in flags, f"README names {f}, which `softprompt train` does not have"
    by_flag = {f: default for row_flags, default in rows for f in row_flags}
    for name, field in FIELDS.items():
        dashed = name.replace("_", "-")
        wanted = [f"--no-{dashed}"] if field.default is True else [f"--{dashed}"]
        if field.default is None and "bool" in str(field.type):
            wanted.append(f"--no-{dashed}")
        for f in wanted:
            assert f in by_flag, f"README has no row for {f}"
        cell = by_flag[wanted[0]]
        _check_default(name, field, cell)


def _check_default(name: str, field: dataclasses.Field, cell: str) -> None:
    default = field.default
    if default is None or default is True:
        return  # prose (what the run picks), or the --no- row of a switch that is on
    if default is False:
        assert cell in ("", "off"), (name, cell)
    elif default == "":
        assert "empty" in cell, (name, cell)
    else:
        assert str(default) in cell, f"README's default for --{name} is {cell!r}, not {default}"
