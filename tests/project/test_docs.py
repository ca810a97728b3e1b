"""The docs say what the code does: docs/cli.md is the CLI's own --help, and the README's links
and commands point at things that exist."""

from __future__ import annotations

import importlib.util
import re

import click
from helpers import ROOT

from deltamerge.cli import main


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    """docs/cli.md is what scripts/gen_cli_docs.py writes now, so it matches the options."""
    expected = _generator().render()
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == expected, "docs/cli.md is stale: run `python scripts/gen_cli_docs.py`"


def test_cli_reference_has_every_command_with_an_example():
    """Each command has a section, and each --help shows at least one example command line."""
    text = (ROOT / "docs" / "cli.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    names = {s.split("\n", 1)[0] for s in sections}
    ctx = click.Context(main, info_name="deltamerge")
    assert names == {"deltamerge"} | {f"deltamerge {c}" for c in main.list_commands(ctx)}
    for section in sections:
        name, body = section.split("\n", 1)
        assert re.search(r"^\s+Examples?:\n\s+deltamerge ", body, flags=re.M), name


def test_readme_starts_with_the_two_scripts_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert first_block.splitlines()[1:3] == [
        "./scripts/demo.sh   # build a small example base and delta, rebuild the model, verify it",
        "./scripts/test.sh   # install with the test extras and run the test suite",
    ]
    for doc in ("README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))):
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (ROOT / doc).parent.joinpath(target).exists(), (doc, target)


def _command_lines(text: str) -> list[list[str]]:
    """Each `deltamerge CMD ...` command line in the text's code (fenced blocks, inline code)."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    lines = []
    for block in code:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("deltamerge "):
                lines.append(line.split())
    return lines


def test_readme_commands_and_library_names_exist():
    """Every command the README and usage.md run exists and takes the options they give it, and
    every `deltamerge.NAME` they mention exists."""
    import deltamerge

    ctx = click.Context(main)
    for doc in ("README.md", "docs/usage.md"):
        text = (ROOT / doc).read_text()
        lines = _command_lines(text)
        assert len(lines) > 5, doc
        for words in lines:
            command = main.get_command(ctx, words[1])
            assert command is not None, (doc, " ".join(words))
            options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            for word in words[2:]:
                if word.startswith("-"):
                    assert word in options, (doc, " ".join(words), word)
        for name in set(re.findall(r"`deltamerge\.([A-Za-z_]+)", text)) - {"json"}:  # the manifest
            # a subpackage is an attribute only once imported, which depends on the set's order
            found = hasattr(deltamerge, name) or importlib.util.find_spec(f"deltamerge.{name}")
            assert found, (doc, name)
