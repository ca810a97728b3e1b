"""One grammar for every command: the same flags mean the same thing, output for pipelines.

Issue 16 item 4: checksum takes several folders and --json; a short flag has one meaning; the
dtype spellings the library takes; --debug after the command; --json results of the commands
that make something. (The Hub options are tested against the test Hub in test_hub_push.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from helpers import llama_state, load_state, save_checkpoint

from deltamerge import apply_delta
from deltamerge.cli import main
from deltamerge.cli.common import DTYPE_NAMES
from deltamerge.dtypes import USER_DTYPES
from deltamerge.integrity.checks import checksum
from deltamerge.results import ApplyResult, MakeDeltaResult


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grammar")
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target")
    return {"root": root, "base": base, "target": target}


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_checksum_takes_several_folders_and_prints_json(folders):
    base, target = folders["base"], folders["target"]
    digests = [checksum(base).model_digest, checksum(target).model_digest]

    plain = invoke("checksum", base, target, "-q")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.splitlines() == [f"{digests[0]}  {base}", f"{digests[1]}  {target}"]

    as_json = invoke("checksum", base, target, "--json")
    assert as_json.exit_code == 0, as_json.output
    reports = json.loads(as_json.stdout)
    assert [r["folder"] for r in reports] == [str(base), str(target)]
    assert [r["model_digest"] for r in reports] == digests
    assert set(reports[0]["tensors"]) == set(llama_state(0))

    refused = invoke("checksum", base, target, "--output", folders["root"] / "d.json")
    assert refused.exit_code == 2 and "one DIR" in refused.output


def _short_flags() -> dict[str, set[str]]:
    """Every short flag of every command, with the long names it stands for."""
    seen: dict[str, set[str]] = {}
    for command in [main, *main.commands.values()]:
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            shorts = [o for o in param.opts + param.secondary_opts if not o.startswith("--")]
            longs = [o for o in param.opts if o.startswith("--")]
            for short in shorts:
                seen.setdefault(short, set()).update(longs)
    return seen


def test_a_short_flag_means_one_thing_in_every_command():
    flags = _short_flags()
    for short, longs in flags.items():
        assert len(longs) == 1, f"{short} stands for {sorted(longs)}"
    assert flags["-m"] == {"--manifest"} and flags["-q"] == {"--quiet"}
    push = main.commands["push"]
    message = next(p for p in push.params if p.name == "message")
    assert set(message.opts) == {"--commit-message", "--message"}  # as huggingface-cli upload


def test_the_cli_takes_every_dtype_spelling_the_library_takes(folders):
    assert {n.lower() for n in DTYPE_NAMES} == set(USER_DTYPES)
    for command, args in (("apply", ["a", "b", "c"]), ("convert", ["a", "b"])):
        for spelling in ("fp16", "BF16", "Float32", "bfloat16"):
            ctx = main.commands[command].make_context(command, [*args, "--dtype", spelling])
            assert USER_DTYPES[ctx.params["dtype"].lower()] == USER_DTYPES[spelling.lower()]
    delta = save_checkpoint(llama_state(1), folders["root"] / "d16")
    out = folders["root"] / "bf16"
    result = invoke("apply", folders["base"], delta, out, "--dtype", "BF16", "-q")
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}


def test_debug_is_taken_after_the_command_as_well_as_before(folders):
    missing = folders["root"] / "no-such-manifest.json"
    for args in (["verify", "--debug", folders["base"], "-m", missing],
                 ["--debug", "verify", folders["base"], "-m", missing]):
        result = invoke(*args)
        # the traceback, then the line, and the documented status all the same (issue 12 item 8)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" in result.stderr, result.stderr
    plain = invoke("verify", folders["base"], "-m", missing)
    assert plain.exit_code == 2 and "Traceback" not in plain.stderr  # back to one line


def test_apply_and_make_delta_print_their_result_as_json(folders):
    root = folders["root"]
    made = invoke("make-delta", folders["base"], folders["target"], root / "jdelta", "--json", "-q")
    assert made.exit_code == 0, made.output
    record = json.loads(made.stdout)
    assert set(record) == set(MakeDeltaResult.__dataclass_fields__)
    assert record["out"] == str(root / "jdelta") and record["kind"] == "add"

    applied = invoke("apply", folders["base"], root / "jdelta", root / "jout", "--json")
    assert applied.exit_code == 0, applied.output
    result = json.loads(applied.stdout)  # nothing else on stdout: the summary is replaced
    assert set(result) == set(ApplyResult.__dataclass_fields__)
    assert result["out"] == str(root / "jout") and result["verified"] is True
    assert result["model_digest"] == record["result_digest"] == checksum(root / "jout").model_digest
    again = apply_delta(folders["base"], root / "jdelta", root / "jout2")
    assert result["model_digest"] == again.model_digest
