"""Every option's allowed values are the library's own list, written once: the kinds' in their
registry (``kind_registry``), the formats' and their options' in theirs (``outputs``), the others
in ``deltamerge.names``.

The CLI's ``click.Choice`` of each option must equal the tuple the library checks against (a new
kind or outtype named in one place and not the other would be refused by one of them), the library
must refuse a value outside it, and ``--help`` must still answer without loading torch, which is
why the lists live in modules of their own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch

from deltamerge import kind_registry, names, outputs
from deltamerge.apply import apply_delta
from deltamerge.cli import main
from deltamerge.dtypes import USER_DTYPES, parse_user_dtype
from deltamerge.errors import InputError
from deltamerge.integrity import checks, digest
from deltamerge.integrity.checks import checksum, load_expected
from deltamerge.kinds import detect, lora, marks
from deltamerge.make import make_delta
from deltamerge.outputs import gguf as gguf_format
from deltamerge.outputs import meta as meta_format
from deltamerge.sinks import gguf, gguf_types


def choice(command: str, option: str) -> click.Choice:
    """The ``click.Choice`` of ``--option`` in ``deltamerge command``."""
    for param in main.commands[command].params:
        if f"--{option}" in param.opts:
            assert isinstance(param.type, click.Choice), (command, option)
            return param.type
    raise AssertionError(f"deltamerge {command} has no --{option}")


# (command, option, the tuple the library checks the value against)
OPTIONS = [
    ("apply", "kind", kind_registry.DELTA_KINDS.names),
    ("make-delta", "kind", kind_registry.MAKE_KINDS),
    ("apply", "new-rows", names.NEW_ROWS),
    ("apply", "qlora", tuple(lora.QLORA_MODES)),
    *[(command, "format", outputs.OUTPUT_FORMATS.names) for command in ("apply", "convert")],
    *[(command, "outtype", gguf.OUTTYPES) for command in ("apply", "convert")],
    *[(command, "mp", tuple(map(str, meta_format.MP_SHARDS))) for command in ("apply", "convert")],
    *[(command, "dtype", tuple(USER_DTYPES)) for command in ("apply", "convert")],
    ("apply", "qlora-dtype", tuple(USER_DTYPES)),
    ("apply", "qlora-scope", names.QLORA_SCOPES),
    ("apply", "qlora-kernel", names.QLORA_KERNELS),
    *[(command, "algorithm", digest.ALGORITHMS) for command in ("checksum", "verify", "inspect")],
    ("verify", "role", checks.ROLES),
]


def test_the_cli_offers_what_the_registries_hold():
    """A kind or format registered is offered by the CLI, and --format's help names each one."""
    assert tuple(choice("apply", "kind").choices) == kind_registry.DELTA_KINDS.names
    assert tuple(choice("make-delta", "kind").choices) == tuple(
        e.name for e in kind_registry.DELTA_KINDS if e.made)
    for command in ("apply", "convert"):
        assert tuple(choice(command, "format").choices) == outputs.OUTPUT_FORMATS.names
        param = next(p for p in main.commands[command].params if "--format" in p.opts)
        assert all(f"{f.name}: {f.summary}" in param.help for f in outputs.OUTPUT_FORMATS)


def test_every_choice_of_the_cli_is_checked_here():
    """A new option with a list of values joins OPTIONS, so that its list is the library's too."""
    found = {(name, param.opts[-1].removeprefix("--")) for name, command in main.commands.items()
             for param in command.params if isinstance(param.type, click.Choice)}
    assert found == {(command, option) for command, option, _ in OPTIONS}


@pytest.mark.parametrize(("command", "option", "allowed"), OPTIONS,
                         ids=[f"{c} --{o}" for c, o, _ in OPTIONS])
def test_each_choice_is_the_librarys_list(command, option, allowed):
    assert tuple(choice(command, option).choices) == allowed


def test_the_library_modules_keep_their_names_and_share_one_list():
    assert detect.KINDS is names.KINDS is kind_registry.KINDS
    assert names.MAKE_KINDS is kind_registry.MAKE_KINDS
    assert marks.MARKED_KINDS is names.MARKED_KINDS is kind_registry.MARKED_KINDS
    assert set(names.MAKE_KINDS) < set(names.MARKED_KINDS)  # --compress makes the third
    assert outputs.FORMATS == outputs.OUTPUT_FORMATS.names == ("hf", "gguf", "meta")
    assert gguf.OUTTYPES is gguf_format.OUTTYPES and digest.ALGORITHMS is names.ALGORITHMS
    assert checks.ROLES is names.ROLES
    assert tuple(gguf_types.OUTTYPES) == gguf_format.QUANTIZED_OUTTYPES
    assert lora.QLORA_MODES == {"nf4": False, "nf4-dq": True}
    assert USER_DTYPES == {"float16": torch.float16, "fp16": torch.float16,
                           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                           "float32": torch.float32, "fp32": torch.float32}


def test_every_quantized_outtype_is_a_llama_cpp_file_type():
    """The file type is derived from the name (``MOSTLY_`` and the name in capitals): a new
    outtype whose llama.cpp spelling differs fails here (a KeyError) rather than when written."""
    pytest.importorskip("gguf")
    types = {gguf_types.file_type(outtype) for outtype in gguf_format.QUANTIZED_OUTTYPES}
    assert len(types) == len(gguf_format.QUANTIZED_OUTTYPES)


def test_the_library_refuses_a_value_outside_each_list(tmp_path: Path):
    with pytest.raises(InputError, match="unknown delta kind 'diff'"):
        detect.open_kind("diff", tmp_path)
    with pytest.raises(InputError, match="make-delta --kind must be one of add, xor, xor-zstd, lora"):
        make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "out", kind="sub")
    with pytest.raises(InputError, match="--format must be one of hf, gguf, meta, not 'onnx'"):
        outputs.output_format("onnx")
    with pytest.raises(InputError, match="--mp must be one of 1, 2, 4, 8, not 3"):
        outputs.output_format("meta", mp=3)
    with pytest.raises(InputError, match="unknown dtype 'float64'"):
        parse_user_dtype("float64")
    with pytest.raises(InputError, match="algorithm must be one of blake3, sha256, not 'md5'"):
        checksum(tmp_path, algorithm="md5")
    with pytest.raises(InputError, match="role must be one of result, base, not 'delta'"):
        load_expected(tmp_path / "deltamerge.json", role="delta")
    paths = (tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    with pytest.raises(InputError, match="--new-rows must be 'zero' or 'mean', not 'random'"):
        apply_delta(*paths, new_rows="random")
    with pytest.raises(InputError, match="--qlora must be one of nf4, nf4-dq, not 'fp4'"):
        apply_delta(*paths, qlora="fp4")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_outtype_list_is_refused_outside(tmp_path: Path):
    pytest.importorskip("gguf")
    with pytest.raises(InputError, match="--outtype must be one of f32, f16, bf16, q8_0, q4_k_m"):
        outputs.output_format("gguf", outtype="q2_k")


def test_the_cli_refuses_a_value_outside_each_choice():
    for command, option, _ in OPTIONS:
        ctx = click.Context(main.commands[command])
        with pytest.raises(click.BadParameter):
            choice(command, option).convert("not-a-choice", None, ctx)


def test_help_loads_no_torch():
    """The lists are read at import by the CLI: were they in the modules that use them, every
    ``--help`` would pay torch's import (seconds)."""
    code = ("import sys\n"
            "from deltamerge.cli import main\n"
            "for command in [[], *([name] for name in main.commands)]:\n"
            "    try:\n"
            "        main([*command, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch was loaded'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
