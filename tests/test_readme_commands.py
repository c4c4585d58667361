"""Every ``nnunet-sud`` command shown in README.md and docs/*.md parses as written.

The commands in ```bash blocks (continuation lines joined) go through the real ``nnunet-sud``
argument parser, with the README's placeholders filled in (XXX -> a dataset id, shell variables
-> a path): a missing required option, a misspelt flag or an invalid choice fails here. Running
them is the job of the end-to-end tests (demo, conversion, SUD, evaluation), which call the same
commands on the synthetic task. The README's Python example is executed as well.
"""
import glob
import os
import re
import shlex

import pytest

from nnunet_sud.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def code_blocks(text: str, language: str):
    return re.findall(r"```" + language + r"\n(.*?)```", text, flags=re.S)


def shell_commands(block: str):
    """Logical lines of a shell block: comments dropped, backslash continuations joined."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def fill_placeholders(command: str) -> str:
    command = re.sub(r"\$\([^)]*\)", "/tmp/x", command)           # $(nnunet-sud trainer-path)
    command = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "/tmp/x", command)  # $nnUNet_results, ${VAR}
    return command.replace("XXX", "991")


def nnunet_sud_commands():
    found = []
    for doc in DOCS:
        with open(doc) as f:
            text = f.read()
        for block in code_blocks(text, "bash"):
            for line in shell_commands(block):
                for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                    if part.startswith("nnunet-sud "):
                        found.append((os.path.relpath(doc, REPO), part))
    return found


COMMANDS = nnunet_sud_commands()


def test_the_readme_shows_its_main_commands():
    readme = [c for d, c in COMMANDS if d == "README.md"]
    assert "nnunet-sud demo" in readme
    assert any(c.startswith("nnunet-sud preprocess-unlabeled") for c in readme)
    assert len(COMMANDS) >= 10, COMMANDS  # the docs' worked examples are found too


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_command_parses_as_written(doc, command):
    argv = shlex.split(fill_placeholders(command))[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's way of rejecting the arguments
        pytest.fail(f"{doc}: `{command}` does not parse (exit {e.code})")
    assert callable(args.func)


def test_readme_python_example_defines_a_working_variant():
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = code_blocks(f.read(), "python")
    assert blocks
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    from nnunet_sud.trainers import nnUNetTrainerSUD
    variants = [v for v in namespace.values() if isinstance(v, type) and issubclass(v, nnUNetTrainerSUD)
                and v is not nnUNetTrainerSUD]
    assert variants, "the README's example defines no SUD variant"
