"""No crash on any input: every bad argument, size, shape or side file is one InputError line.

The library's entry points get arguments of the wrong type, sizes of hundreds of digits,
zero-size tensors with huge (or absurd) dimensions, remote headers of the wrong shape and GGUF
side files with fields of the wrong type; each is refused by an :class:`InputError` naming the
argument (or the file and field or tensor), and nothing is written.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from gguf_models import specs, tiny_llama
from helpers import (
    assert_states_equal,
    join_safetensors,
    llama_state,
    load_state,
    save_checkpoint,
    split_safetensors,
)

from deltamerge import apply_delta, checksum, convert, diff, inspect, make_delta, push_to_hub, verify
from deltamerge.cli import main
from deltamerge.errors import InputError
from deltamerge.sinks.gguf import plan_gguf
from deltamerge.sinks.meta_pth import meta_params
from deltamerge.sizes import parse_size

pytest_plugins = ["hub_fixtures"]

HUGE = "9" * 400


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """A base, a target and the delta between them (built once)."""
    root = tmp_path_factory.mktemp("models")
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target")
    delta = root / "delta"
    make_delta(base, target, delta)
    return SimpleNamespace(root=root, base=base, target=target, delta=delta)


def refused(call, *words: str) -> str:
    """``call`` raises an InputError whose one-line message holds ``words``; that message."""
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def cli(*args: object) -> tuple[int, str]:
    """A ``deltamerge`` command through click in this process (the CLI's error handling, without
    a new interpreter's start-up): its exit status and stderr."""
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def cli_error(result: tuple[int, str], *words: str) -> str:
    """A command exited 2 with one line of stderr holding ``words``; that line."""
    code, err = result
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [HUGE, HUGE + "GB", "1" + "0" * 30 + "TiB", "1e400"])
def test_parse_size_refuses_sizes_no_file_can_have(text):
    message = refused(lambda: parse_size(text), "invalid size")
    assert len(message) < 200


def test_parse_size_reads_decimals_exactly():
    assert parse_size("1.5KiB") == 1536
    assert parse_size("0.000001GB") == 1000
    assert parse_size(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("option", ["--max-shard-size", "--block-size"])
def test_cli_huge_sizes_are_one_line(models, tmp_path, option):
    out = tmp_path / "out"
    code, err = cli("apply", models.base, models.delta, out, option, HUGE)
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "invalid size" in line]
    assert len(errors) == 1 and len(errors[0]) < 300, err  # --block-size: in click's usage error
    assert not out.exists()


# -- the library's arguments --------------------------------------------------------------------
def test_paths_of_the_wrong_type_are_named(models, tmp_path):
    out = tmp_path / "out"
    refused(lambda: apply_delta(None, models.delta, out), "base")
    refused(lambda: apply_delta(models.base, 5, out), "delta")
    refused(lambda: apply_delta(models.base, [models.delta, None], out), "delta[1]")
    refused(lambda: apply_delta(models.base, models.delta, 7), "out")
    refused(lambda: make_delta(models.base, None, out), "target")
    refused(lambda: make_delta(models.base, models.target, b"out"), "out")
    refused(lambda: convert(3, out), "meta_dir")
    refused(lambda: checksum(None), "path")
    refused(lambda: verify(models.base, 5), "manifest_path")
    refused(lambda: inspect(1.5), "path")
    refused(lambda: diff(models.base, None), "b")
    refused(lambda: push_to_hub(None, "me/model"), "folder")
    refused(lambda: push_to_hub(models.base, None), "repo_id")
    refused(lambda: push_to_hub(models.base, "me/model", private="yes"), "private")
    assert not out.exists()


@pytest.mark.parametrize("kwargs, word", [
    ({"dtype": 5}, "dtype"),
    ({"dtype": torch.int8}, "dtype"),
    ({"dtype": torch.float64}, "dtype"),
    ({"block_size": [1]}, "block_size"),
    ({"block_size": HUGE}, "block_size"),
    ({"max_shard_size": 1.5}, "max_shard_size"),
    ({"hub": {"endpiont": "http://x"}}, "endpiont"),
    ({"hub": ["endpoint"]}, "hub"),
    ({"hub": {"token": 5}}, "token"),
    ({"workers": "2"}, "workers"),
    ({"force": "no"}, "force"),
    ({"progress": 3}, "progress"),
    ({"new_rows": None}, "new-rows"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"extra_files": {"../escape.txt": b"x"}}, "extra_files"),
    ({"extra_files": {"/tmp/abs.txt": b"x"}}, "extra_files"),
    ({"extra_files": {"sub/x.txt": b"x"}}, "extra_files"),
    ({"extra_files": {"x.txt": 5}}, "extra_files"),
])
def test_apply_arguments_are_checked_before_any_work(models, tmp_path, kwargs, word):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    refused(lambda: apply_delta(models.base, models.delta, out, **kwargs), word)
    assert list(out.parent.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_make_delta_and_checks_arguments(models, tmp_path):
    out = tmp_path / "out"
    refused(lambda: make_delta(models.base, models.target, out, block_size=object()), "block_size")
    refused(lambda: make_delta(models.base, models.target, out, hub={"tokn": "x"}), "tokn")
    refused(lambda: make_delta(models.base, models.target, out, kind=1), "kind")
    refused(lambda: checksum(models.base, hub={"api": "http://x"}), "api")
    refused(lambda: checksum(models.base, algorithm=5), "algorithm")
    refused(lambda: inspect(models.base, digest="no"), "digest")
    refused(lambda: verify(models.base, models.delta / "deltamerge.json", role=None), "role")
    refused(lambda: diff(models.base, models.base, block_bytes="lots"), "block_bytes")
    assert not out.exists()


def test_apply_needs_a_delta(models, tmp_path):
    out = tmp_path / "out"
    refused(lambda: apply_delta(models.base, [], out), "at least one delta")
    assert not out.exists()


def test_block_size_as_a_string_is_a_size(models, tmp_path):
    a = apply_delta(models.base, models.delta, tmp_path / "a", block_size="24KB")
    b = apply_delta(models.base, models.delta, tmp_path / "b")
    assert a.model_digest == b.model_digest
    assert_states_equal(load_state(tmp_path / "a"), load_state(tmp_path / "b"))


def test_extra_files_are_written_inside_out(models, tmp_path):
    src = tmp_path / "notes.md"
    src.write_text("# notes\n")
    out = tmp_path / "out"
    apply_delta(models.base, models.delta, out, extra_files={"README.md": b"# hi\n", "notes.md": src})
    assert (out / "README.md").read_bytes() == b"# hi\n"
    assert (out / "notes.md").read_text() == "# notes\n"


def test_a_float_dtype_object_is_accepted(models, tmp_path):
    apply_delta(models.base, models.delta, tmp_path / "out", dtype=torch.bfloat16)
    assert {t.dtype for t in load_state(tmp_path / "out").values()} == {torch.bfloat16}


def test_cli_still_refuses_an_int_dtype_spelling(models, tmp_path):
    out = tmp_path / "out"
    code, err = cli("apply", models.base, models.delta, out, "--dtype", "int8")
    assert code == 2 and "Traceback" not in err and "int8" in err
    assert not out.exists()



# -- zero-size tensors and absurd shapes --------------------------------------------------------
ZEROS = {
    "extra.wide": (0, 2**31),
    "extra.tall": (2**20, 0, 2**30),
    "extra.none": (0,),
}


@contextmanager
def address_space(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space for this process: a run needs far less, a
    buffer sized from a zero-size tensor's row (8 GiB for [0, 2**31] float16 as fp32) does not
    fit, even where the kernel would hand it out untouched."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    used = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:")))
    resource.setrlimit(resource.RLIMIT_AS, (used * 1024 + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def with_zeros(seed: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {**llama_state(seed), **{n: torch.empty(s, dtype=dtype) for n, s in ZEROS.items()}}


def test_zero_size_tensors_stream_as_zero_size_tensors(tmp_path):
    base = save_checkpoint(with_zeros(0), tmp_path / "base")
    target = save_checkpoint(with_zeros(1), tmp_path / "target")
    delta, out = tmp_path / "delta", tmp_path / "out"
    with address_space(4 << 30):
        make_delta(base, target, delta, kind="xor")
        apply_delta(base, delta, out)
    result = load_state(out)  # read by the safetensors library itself
    assert_states_equal(result, load_state(target))
    for name, shape in ZEROS.items():
        assert result[name].shape == shape and result[name].dtype == torch.float16


def add_tensor(folder: Path, name: str, dtype: str, shape: list[int], nbytes: int = 0) -> Path:
    """Add an entry of ``shape`` holding ``nbytes`` bytes to the folder's model.safetensors."""
    file = folder / "model.safetensors"
    header, body = split_safetensors(file.read_bytes())
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + nbytes]}
    file.write_bytes(join_safetensors(header, body + b"\0" * nbytes, pad=True))
    return file


@pytest.mark.parametrize("shape, nbytes, words", [
    ([0, 2**31, 2**31, 2**31], 0, "overflow"),
    ([0, 2**40], 0, "no file of this size"),
    ([2**62, 0], 0, "no file of this size"),
    ([4, 4], 8, "needs 32 bytes"),
])
def test_absurd_safetensors_shapes_are_one_line(models, tmp_path, shape, nbytes, words):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    file = add_tensor(base, "extra.bad", "F16", shape, nbytes)
    out = tmp_path / "out"
    line = cli_error(cli("apply", base, models.delta, out), str(file), "'extra.bad'", words)
    assert len(line) < 400
    assert not out.exists()


def test_absurd_bin_shapes_are_one_line(tmp_path):
    """A .bin tensor of shape [0, 2**37] on both sides: sized from its row, each buffer of the
    run would be 512 GiB."""
    huge = {"extra.bad": torch.empty(0, 2**37, dtype=torch.float16)}
    base = save_checkpoint({**llama_state(0), **huge}, tmp_path / "base", fmt="bin")
    target = save_checkpoint({**llama_state(1), **huge}, tmp_path / "target", fmt="bin")
    out = tmp_path / "out"
    cli_error(cli("make-delta", base, target, out), str(base / "pytorch_model.bin"),
              "'extra.bad'", "no file of this size")
    assert not out.exists()


# -- remote headers -----------------------------------------------------------------------------
def _entry_is_a_list(header: dict) -> object:
    header["model.norm.weight"] = list(header["model.norm.weight"].values())
    return header


def _header_is_a_list(header: dict) -> object:
    return [header]


def _zero_size_absurd(header: dict) -> object:
    header["extra.bad"] = {"dtype": "F16", "shape": [0, 2**31, 2**31, 2**31], "data_offsets": [0, 0]}
    return header


@pytest.mark.usefixtures("all_routes_known")
@pytest.mark.parametrize("edit, words", [
    (_entry_is_a_list, ("'model.norm.weight'", "not an object")),
    (_header_is_a_list, ("not a JSON object",)),
    (_zero_size_absurd, ("'extra.bad'", "overflow")),
])
def test_remote_headers_are_validated_as_local_ones(hub, api, models, tmp_path, edit, words):
    files = {p.name: p.read_bytes() for p in models.base.iterdir()}
    header, body = split_safetensors(files["model.safetensors"])
    files["model.safetensors"] = join_safetensors(edit(header), body, pad=True)
    hub.seed("alice/bad-base", files)
    out = tmp_path / "out"
    message = refused(lambda: apply_delta("alice/bad-base", models.delta, out, hub={"api": api}),
                      "alice/bad-base@", "model.safetensors", *words)
    assert len(message) < 400
    assert [e for e in hub.requests_to("/lfs-objects/", "GET") if e[2] != 206] == []  # headers only
    assert not out.exists()


# -- side files the GGUF writer reads -----------------------------------------------------------
def edit_json(path: Path, **fields: object) -> None:
    obj = json.loads(path.read_text()) if path.is_file() else {}
    obj.update(fields)
    path.write_text(json.dumps(obj))


GGUF_SIDE_FILES = [
    ("config.json", {"num_attention_heads": "4"}, "'num_attention_heads'"),
    ("config.json", {"num_attention_heads": 0}, "'num_attention_heads'"),
    ("config.json", {"num_key_value_heads": 3}, "'num_key_value_heads'"),
    ("config.json", {"hidden_size": 66}, "'hidden_size'"),
    ("config.json", {"rope_scaling": "linear"}, "'rope_scaling'"),
    ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "'factor'"),
    ("config.json", {"rms_norm_eps": "1e-6"}, "'rms_norm_eps'"),
    ("config.json", {"bos_token_id": -1}, "'bos_token_id'"),
    ("config.json", {"max_position_embeddings": [4096]}, "'max_position_embeddings'"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"3": "<x>"}}, "added_tokens_decoder['3']"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "<x>"}}}, "added_tokens_decoder"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"3": {"content": 3}}}, "added_tokens_decoder['3']"),
    ("tokenizer_config.json", {"added_tokens_decoder": []}, "'added_tokens_decoder'"),
    ("tokenizer_config.json", {"add_prefix_space": "yes"}, "'add_prefix_space'"),
    ("tokenizer_config.json", {"add_bos_token": 1}, "'add_bos_token'"),
    ("tokenizer_config.json", {"bos_token": 5}, "'bos_token'"),
    ("tokenizer_config.json", {"chat_template": 5}, "'chat_template'"),
    ("tokenizer.json", {"added_tokens": {"a": 1}}, "'added_tokens'"),
    ("tokenizer.json", {"added_tokens": [{"id": "1", "content": "<s>"}]}, "'id'"),
    ("tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": "1"}}}, "vocab['a']"),
    ("generation_config.json", {"temperature": "hot"}, "'temperature'"),
    ("generation_config.json", {"top_k": 4.5}, "'top_k'"),
]


@pytest.mark.parametrize("name, fields, word", GGUF_SIDE_FILES)
def test_gguf_side_file_fields_are_checked(tmp_path, sp_model, name, fields, word):  # noqa: F811
    folder = tiny_llama(tmp_path / "hf", sp_model)
    edit_json(folder / name, **fields)
    refused(lambda: plan_gguf(folder, specs(load_state(folder))), f"{folder / name}", word)


def test_a_generation_config_that_is_no_object_is_refused(tmp_path, sp_model):  # noqa: F811
    folder = tiny_llama(tmp_path / "hf", sp_model)
    (folder / "generation_config.json").write_text("[1, 2]")
    refused(lambda: plan_gguf(folder, specs(load_state(folder))), "generation_config.json", "object")


def test_meta_and_gguf_name_a_bad_field_alike(tmp_path, sp_model):  # noqa: F811
    folder = tiny_llama(tmp_path / "hf", sp_model)
    edit_json(folder / "config.json", num_attention_heads="4")
    config = json.loads((folder / "config.json").read_text())
    gguf_message = refused(lambda: plan_gguf(folder, specs(load_state(folder))))
    meta_message = refused(lambda: meta_params(config, folder / "config.json"))
    assert gguf_message == meta_message


@pytest.mark.parametrize("fmt, name, fields, words", [
    ("gguf", "tokenizer_config.json", {"added_tokens_decoder": {"0": ["<unk>"]}},
     ("added_tokens_decoder['0']",)),
    ("gguf", "config.json", {"num_attention_heads": 0}, ("'num_attention_heads'",)),
    ("meta", "config.json", {"num_attention_heads": 0}, ("'num_attention_heads'",)),
])
def test_cli_output_side_files_are_one_line(tmp_path, sp_model, fmt, name, fields, words):  # noqa: F811
    base = tiny_llama(tmp_path / "base", sp_model)
    target = tiny_llama(tmp_path / "target", sp_model)
    delta = tmp_path / "delta"
    make_delta(base, target, delta)
    edit_json(delta / name, **fields)
    out = tmp_path / "out"
    cli_error(cli("apply", base, delta, out, "--format", fmt), str(delta / name), *words)
    assert not out.exists()
