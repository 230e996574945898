"""Make bench/data/python_docs.txt: the prose of Python 3.11's tutorial, FAQ and HOWTOs.

The source is Debian's python3.11-doc package (`apt-get install python3.11-doc`), whose
/usr/share/doc/python3.11/html/_sources/ holds the documentation's reStructuredText. Code
examples, directives, labels and headings' underlines are dropped; inline markup is reduced
to its text; each paragraph becomes one line. Licensed under the PSF License Version 2 (see
README.md here).

    python bench/data/make_python_docs.py [--sources DIR] [--out bench/data/python_docs.txt]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PARTS = ("tutorial", "faq", "howto")
SKIP = {"index.rst.txt", "clinic.rst.txt", "instrumentation.rst.txt", "logging-cookbook.rst.txt"}
ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)\s*(?:<[^`>]*>)?`")
UNDERLINE = re.compile(r"^([=\-*^~#\"'`+.])\1{2,}\s*$")


def prose(text: str) -> list[str]:
    """The paragraphs of a reStructuredText document that are running prose."""
    paragraphs, current = [], []

    def flush() -> None:
        if current:
            p = " ".join(current)
            p = ROLE.sub(r"\1", p).replace("``", "")
            p = re.sub(r"`([^`<]*?)\s*(?:<[^`>]*>)?`_*", r"\1", p)
            p = re.sub(r"\s*::$", ":", p)
            p = re.sub(r"\s*\[#[^\]]*\]_", "", p)
            p = re.sub(r"\s+", " ", p).strip()
            if len(p) > 40 and not p.startswith(("|", "+-", "..")):
                paragraphs.append(p)
            current.clear()

    lines = text.splitlines()
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip() or line[0] in " \t" or line.startswith(".."):
            flush()  # blank, indented (code, directive bodies) or a directive
        elif UNDERLINE.match(line) or UNDERLINE.match(nxt):
            flush()  # a heading or its over/underline
        else:
            current.append(line.strip())
    flush()
    return paragraphs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, default=SOURCES)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("python_docs.txt"))
    args = ap.parse_args()
    out = []
    for part in PARTS:
        for path in sorted((args.sources / part).glob("*.rst.txt")):
            if path.name not in SKIP:
                out.extend(prose(path.read_text(encoding="utf-8")))
    args.out.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(out)} paragraphs, {sum(map(len, out)):,} characters")


if __name__ == "__main__":
    main()
