"""Docs, docstrings, comments and tests describe the product, not the way it was made.

Every tracked text file (``git ls-files``: ``*.py``, ``*.md``, ``*.sh``, ``*.toml``, ``*.cfg`` and
everything under ``.ci``) is read line by line; the test fails, naming ``file:line`` and the rule,
when one of these appears:

* **numbered period**: the word "session" or "sessions" followed by a number, or the phrase for a
  period of work (see ``WORD_RULES``); pytest's ``scope="session"`` and a "session fixture" are not
  numbered and pass;
* **work item**: "issue" or "issues" followed by a number, a number written with a leading hash
  sign (a colour such as ``#1f77b4`` is not a number), or the usual tracker word for a work item
  (see ``WORD_RULES``); a link to another project's tracker (``.../nnUNet/issues/2338``) passes;
* **machine path**: an absolute path under ``/work``, ``/root``, ``/home`` or ``/Users`` (a relative
  ``../work`` passes, and so do generic example folders such as ``/data`` or ``/scratch``);
* **temporary path in prose**: a path under ``/tmp`` in Markdown, shell and configuration files, or
  in a Python comment or docstring. Python code may name one (a placeholder substituted into a
  command under test, say); code that needs a temporary folder gets it from ``tempfile`` or
  ``mktemp``, and examples in prose name a generic folder.

The patterns are written so that they do not match their own source, and the examples below carry
a marker (``§``) that keeps them from matching here; it is removed before they are checked.
"""
import ast
import io
import os
import re
import subprocess
import tokenize
from typing import Iterable, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIXES = (".py", ".md", ".sh", ".toml", ".cfg")

# (rule, pattern) applied to every line of every file
WORD_RULES: List[Tuple[str, re.Pattern]] = [
    ("numbered period", re.compile(r"\bsessions?\s+\d", re.I)),
    ("numbered period", re.compile(r"\bwork\s+periods?\b", re.I)),
    ("work item", re.compile(r"\bissues?\s+#?\d", re.I)),
    ("work item", re.compile(r"(?<![\w&/#])#\d+(?![\w])")),
    ("work item", re.compile(r"\btickets?\b", re.I)),
    ("machine path", re.compile(r"(?<![\w.$~-])/(?:work|root|home|Users)/")),
]
# applied to prose only: Markdown, shell and configuration files; Python comments and docstrings
TMP_RULE = ("temporary path in prose", re.compile(r"(?<![\w.$~-])/tmp/"))


def tracked_text_files(repo: str = REPO) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    names = [n for n in out.decode().split("\0") if n]
    return sorted(n for n in names if n.endswith(SUFFIXES) or n.startswith(".ci/"))


def python_prose(text: str) -> Tuple[Set[int], dict]:
    """Line numbers of docstrings (every string statement) and ``{line: comment text}`` of a Python
    source; a file that does not parse counts as prose throughout."""
    lines = text.count("\n") + 1
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set(range(1, lines + 1)), {}
    docstrings: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    return docstrings, comments


def findings(path: str, text: str) -> Iterable[str]:
    """``path:line: rule: the matched text`` for every rule a line breaks."""
    lines = text.splitlines()
    if path.endswith(".py"):
        docstrings, comments = python_prose(text)
    else:
        docstrings, comments = set(range(1, len(lines) + 1)), {}
    for number, line in enumerate(lines, 1):
        for rule, pattern in WORD_RULES:
            m = pattern.search(line)
            if m:
                yield f"{path}:{number}: {rule}: {line.strip()[:120]}"
        prose = line if number in docstrings else comments.get(number, "")
        m = TMP_RULE[1].search(prose)
        if m:
            yield f"{path}:{number}: {TMP_RULE[0]}: {line.strip()[:120]}"


# ------------------------------------------------------------------------------------ the rule itself
def unmask(example: str) -> str:
    return example.replace("§", "")


@pytest.mark.parametrize("line", [
    "Measured in session§ 14.", "Sessions§ 5-7 ran it.", "the goals of Issue§ 17", "see issues§ 12 and 14",
    "fixes #§14", "a tick§et", "--work /§work/sslq", "cd /§root/x", "in /§home/me/data",
    "the next work§ period",
])
def test_flags(line):
    assert list(findings("doc.md", unmask(line) + "\n")), unmask(line)


@pytest.mark.parametrize("line", [
    '@pytest.fixture(scope="session")', "the session fixture `synthetic3d`", "a tissue 3 mm thick",
    "color='#1f77b4'", "https://github.com/MIC-DKFZ/nnUNet/iss§ues/2338", "--work ../wo§rk/x",
    "--acdc /data/ACDC_lite --work /scratch/sslq", "folder = tempfile.mkdtemp()", 'venv="$(mktemp -d)/venv"',
    "## 2. Heading", "[link](#section-2)",
])
def test_passes(line):
    assert not list(findings("doc.md", unmask(line) + "\n")), unmask(line)


def test_tmp_only_in_prose_of_python():
    code = unmask('"""Writes into /§tmp/x."""\n'
                  'PLACEHOLDER = "/t§mp/x"  # the path that replaces a shell variable\n'
                  'OTHER = 1  # see /§tmp/cache\n')
    assert [f.split(":")[1] for f in findings("m.py", code)] == ["1", "3"]
    assert list(findings("doc.md", unmask("set CACHE=/§tmp/x\n")))


# ------------------------------------------------------------------------------------ the repository
def test_no_process_words_or_machine_paths():
    found = []
    for path in tracked_text_files():
        full = os.path.join(REPO, path)
        if not os.path.isfile(full):  # deleted in the working tree
            continue
        with open(full, encoding="utf-8", errors="replace") as f:
            found += findings(path, f.read())
    assert not found, ("process words or machine paths (docs/*.md, docstrings, comments and tests describe "
                       "the product; examples use generic folders such as /data or /scratch):\n"
                       + "\n".join(found))
