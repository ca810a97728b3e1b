"""Fuzzing the readers (issue 8 item 5): whatever the bytes, a DeltaMergeError or a success.

Valid files are mutated (bytes flipped, cut, spliced; header fields replaced by arbitrary JSON;
index and manifest entries rewritten) and handed to the readers, which must either read them or
raise a :class:`DeltaMergeError` subclass; anything else (a ValueError, a KeyError, an overflow)
is a bug hypothesis shrinks and reports. Successful opens are read to the last byte.

The suite runs a bounded number of examples per test; for a long run by hand:
``DELTAMERGE_FUZZ_EXAMPLES=20000 python -m pytest tests/hostile/test_fuzzed_readers.py`` (see docs/errors.md).
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers import join_safetensors, split_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from deltamerge.errors import DeltaMergeError
from deltamerge.integrity.digest import TensorDigest, model_digest
from deltamerge.integrity.manifest import parse_manifest, read_manifest
from deltamerge.sources import open_checkpoint
from deltamerge.sources.torch_bin import load_torch_file

EXAMPLES = int(os.environ.get("DELTAMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def sample_state() -> dict[str, torch.Tensor]:
    """Every dtype and the awkward shapes: 0-d, empty, one row."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(4, generator=g),
        "lm_head.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "small": torch.tensor([1, -2], dtype=torch.int8),
        "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "double": torch.randn(1, 2, generator=g, dtype=torch.float64),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_safetensors(work: Path) -> bytes:
    path = work / "valid.safetensors"
    save_file(sample_state(), path, metadata={"format": "pt"})
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_bin(work: Path) -> bytes:
    path = work / "valid.bin"
    torch.save(sample_state(), path)
    return path.read_bytes()


def read_everything(folder_or_file: Path) -> None:
    """Open and read every row of every tensor; the fuzzed input must survive both or refuse."""
    try:
        with open_checkpoint(folder_or_file) as ckpt:
            for name, spec in ckpt.specs.items():
                buf = torch.empty(max(spec.nbytes, 1), dtype=torch.uint8)
                rows = ckpt.read_rows(name, 0, spec.rows, buf)
                assert rows.numel() == spec.numel
    except DeltaMergeError:
        pass


def fresh_dir(work: Path, name: str) -> Path:
    """One folder per test, emptied for each example (a checkpoint folder holds one model)."""
    folder = work / name
    folder.mkdir(exist_ok=True)
    for child in folder.iterdir():
        child.unlink()
    return folder


# --- byte-level mutations --------------------------------------------------------------------

byte_edits = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8
)


def apply_edits(data: bytes, edits: list[tuple[float, int]], head_bias: bool) -> bytes:
    """Overwrite bytes at relative positions; with ``head_bias`` mostly within the header."""
    out = bytearray(data)
    span = min(len(out), 8 + struct.unpack("<Q", data[:8])[0]) if head_bias else len(out)
    for where, value in edits:
        out[int(where * span)] = value
    return bytes(out)


def splice(data: bytes, start: float, stop: float, insert: bytes) -> bytes:
    a, b = sorted((int(start * len(data)), int(stop * len(data))))
    return data[:a] + insert + data[b:]


mutations = st.one_of(
    st.tuples(st.just("flip"), byte_edits, st.booleans()),
    st.tuples(st.just("cut"), st.integers(0, 4096)),
    st.tuples(st.just("splice"), st.floats(0, 1), st.floats(0, 1), st.binary(max_size=64)),
)


def mutate(data: bytes, how: tuple) -> bytes:
    if how[0] == "flip":
        return apply_edits(data, how[1], how[2])
    if how[0] == "cut":
        return data[: how[1]]
    return splice(data, how[1], how[2], how[3])


@FUZZ
@given(how=mutations)
def test_mutated_safetensors_bytes(work, valid_safetensors, how):
    folder = fresh_dir(work, "st-bytes")
    (folder / "model.safetensors").write_bytes(mutate(valid_safetensors, how))
    read_everything(folder)


@FUZZ
@given(how=mutations)
def test_mutated_bin_bytes(work, valid_bin, how):
    folder = fresh_dir(work, "bin-bytes")
    (folder / "pytorch_model.bin").write_bytes(mutate(valid_bin, how))
    try:
        load_torch_file(folder / "pytorch_model.bin")
    except DeltaMergeError:
        return
    read_everything(folder)


# --- header and JSON field mutations ---------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 4, 8, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["F16", "BF16", "F32", "I64", "BOOL", "F8_E4M3", "Q4", "", "__metadata__"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# A path into a JSON document: keys for objects, indices (taken modulo length) for lists.
json_paths = st.lists(st.one_of(st.integers(0, 16), st.text(max_size=8)), min_size=1, max_size=4)


def set_at(doc: object, path: list, value: object, delete: bool) -> object:
    """``doc`` with the value at ``path`` (followed as far as it leads) replaced or deleted."""
    doc = copy.deepcopy(doc)
    parent, key = None, None
    node = doc
    for step in path:
        if isinstance(node, dict) and node:
            keys = sorted(node)
            key = keys[step % len(keys)] if isinstance(step, int) else step
        elif isinstance(node, list) and node:
            key = step % len(node) if isinstance(step, int) else 0
        else:
            break
        parent = node
        if isinstance(node, dict) and key not in node:
            break
        node = node[key]
    if parent is None:
        return value
    if delete and isinstance(parent, dict):
        parent.pop(key, None)
    else:
        parent[key] = value
    return doc


@FUZZ
@given(
    edits=st.lists(st.tuples(json_paths, json_values, st.booleans()), min_size=1, max_size=3),
    pad=st.booleans(),
    body_cut=st.integers(0, 16),
)
def test_mutated_safetensors_header_fields(work, valid_safetensors, edits, pad, body_cut):
    header, body = split_safetensors(valid_safetensors)
    for path, value, delete in edits:
        header = set_at(header, path, value, delete)
    folder = fresh_dir(work, "st-fields")
    (folder / "model.safetensors").write_bytes(
        join_safetensors(header, body[: len(body) - body_cut], pad)
    )
    read_everything(folder)


@FUZZ
@given(start=st.floats(0, 1), stop=st.floats(0, 1), text=st.text(max_size=24))
def test_mutated_safetensors_header_text(work, valid_safetensors, start, stop, text):
    """Edits to the JSON text itself (not its structure): broken syntax, stray keys, escapes."""
    n = struct.unpack("<Q", valid_safetensors[:8])[0]
    raw = valid_safetensors[8 : 8 + n].decode()
    a, b = sorted((int(start * len(raw)), int(stop * len(raw))))
    new = (raw[:a] + text + raw[b:]).encode("utf-8", "surrogatepass")
    folder = fresh_dir(work, "st-text")
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(new)) + new + valid_safetensors[8 + n :]
    )
    read_everything(folder)


# --- index files -----------------------------------------------------------------------------

shard_names = st.one_of(
    st.sampled_from([
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "../escape",
        "/etc/hostname", "", ".", "sub/../model-00001-of-00002.safetensors", "config.json",
        "model.safetensors.index.json", "a\x00b", "missing.safetensors",
    ]),
    st.text(max_size=20),
)


def write_sharded(folder: Path) -> dict:
    state = sample_state()
    names = list(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: state[n] for n in first}, folder / "model-00001-of-00002.safetensors")
    save_file({n: state[n] for n in second}, folder / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    return {"metadata": {"total_size": 0}, "weight_map": weight_map}


@FUZZ
@given(
    renames=st.lists(st.tuples(st.integers(0, 20), shard_names), max_size=3),
    edits=st.lists(st.tuples(json_paths, json_values, st.booleans()), max_size=2),
    raw_cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_mutated_index(work, renames, edits, raw_cut):
    folder = fresh_dir(work, "index")
    index = write_sharded(folder)
    names = sorted(index["weight_map"])
    for which, shard in renames:
        index["weight_map"][names[which % len(names)]] = shard
    for path, value, delete in edits:
        index = set_at(index, path, value, delete)
    raw = json.dumps(index).encode("utf-8", "surrogatepass")
    (folder / "model.safetensors.index.json").write_bytes(raw if raw_cut is None else raw[:raw_cut])
    read_everything(folder)


# --- manifests -------------------------------------------------------------------------------


def valid_manifest() -> dict:
    """A format 2 manifest with every optional part: a delta role and a header entry."""
    tensors = {
        name: TensorDigest("F16", (i + 1, 4), f"{i:064x}") for i, name in enumerate(["a", "b"])
    }
    role = {"model_digest": model_digest(tensors), "tensors": {n: d.to_json() for n, d in tensors.items()}}
    return {
        "format": "deltamerge-manifest", "format_version": 2, "kind": "add",
        "deltamerge_version": "0.1.0", "options": {"new_rows": "zero"},
        "files": {"model.safetensors": {"blake3": "f" * 64, "size": 100,
                                        "header": {"size": 72, "blake3": "e" * 64}}},
        "base": role, "result": copy.deepcopy(role), "delta": copy.deepcopy(role),
    }


def test_valid_manifest_parses(tmp_path):
    manifest = parse_manifest(tmp_path / "deltamerge.json", valid_manifest())
    assert manifest.kind == "add" and manifest.delta is not None
    assert manifest.files["model.safetensors"].header == (72, "e" * 64)


@FUZZ
@given(edits=st.lists(st.tuples(json_paths, json_values, st.booleans()), min_size=1, max_size=4))
def test_mutated_manifest_fields(work, edits):
    manifest = valid_manifest()
    for path, value, delete in edits:
        manifest = set_at(manifest, path, value, delete)
    try:
        parse_manifest(work / "deltamerge.json", manifest)
    except DeltaMergeError:
        pass


@FUZZ
@given(how=mutations)
def test_mutated_manifest_bytes(work, how):
    path = work / "deltamerge.json"
    data = json.dumps(valid_manifest(), indent=1).encode()
    if how[0] == "flip":
        how = ("flip", how[1], False)
    path.write_bytes(mutate(data, how))
    try:
        read_manifest(path)
    except DeltaMergeError:
        pass
