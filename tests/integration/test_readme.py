"""The README's examples stay true: every `vitscope` command in it parses with the real CLI, every spec kind
it names exists, and the names its Python example imports are there."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from vitscope.cli import build_parser
from vitscope.models import KINDS

README = Path(__file__).parents[2] / "README.md"


def bash_commands() -> list[list[str]]:
    """Every `vitscope ...` command of the README's bash blocks (continuations joined, torchrun stripped)."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "..." in line or not line:
                continue  # an elided example
            words = shlex.split(line)
            if words[:1] == ["torchrun"]:
                words = words[words.index("vitscope") :] if "vitscope" in words else []
                words = words[1:]
            elif words[:1] == ["vitscope"]:
                words = words[1:]
            else:
                continue
            commands.append(words)
    return commands


def test_the_readme_has_commands_for_every_command_it_documents():
    names = {words[0] for words in bash_commands()}
    assert {"analyze", "claims", "report", "pretrain", "finetune"} <= names


@pytest.mark.parametrize("words", bash_commands(), ids=lambda words: " ".join(words)[:60])
def test_every_readme_command_parses(words):
    parser, _ = build_parser()
    args = parser.parse_args(words)
    if words[0] not in ("analyze", "finetune"):
        return  # pretrain's --model is a timm architecture name
    items = args.model if isinstance(args.model, list) else [args.model]
    for item in items:
        spec = item.split("=", 1)[1] if "=" in item.split(":", 1)[0] else item
        assert spec.split(":", 1)[0] in KINDS, spec


def test_the_python_example_imports_what_exists():
    text = README.read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import vitscope" in b]
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "vitscope":
            assert hasattr(importlib.import_module("vitscope"), node.attr), node.attr
