"""Hostile input (issue 8 item 4): refused with a FormatError, never executed, never allowed to
allocate what it claims.

Files here are built byte by byte to say things no honest writer says: header lengths beyond the
file, offsets that overlap or run out, shapes of 2**80 elements, shard names that leave the
folder, pickles that would run code.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import apply_in_process, llama_config, llama_state, run_cli, save_checkpoint
from safetensors.torch import save_file

from deltamerge.cli import main
from deltamerge.errors import DeltaMergeError, FormatError, NotFoundError, UnsupportedError
from deltamerge.formats import safetensors as safetensors_format
from deltamerge.formats.files import read_json_object
from deltamerge.formats.safetensors import read_header
from deltamerge.integrity.manifest import read_manifest
from deltamerge.sinks.aux import fix_config
from deltamerge.sources import open_checkpoint
from deltamerge.sources.safetensors import SafetensorsCheckpoint
from deltamerge.sources.torch_bin import load_torch_file

# --- safetensors headers ---------------------------------------------------------------------


def write_safetensors(path: Path, header: bytes | dict, data: bytes = b"", claim: int | None = None):
    """A safetensors file with exactly these header bytes (or this header object) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if claim is None else claim) + raw + data)
    return path


def entry(dtype="F16", shape=(2,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


NESTED = b"[" * 100_000 + b"]" * 100_000
HOSTILE_HEADERS = {
    "length-beyond-file": (b"{}", b"", 10_000, "header claims 10000 bytes"),
    "length-2**63": (b"{}", b"", 2**63, "exceeds the 100 MB limit"),
    "invalid-json": (b"{nope", b"", None, "does not parse"),
    "invalid-utf8": (b'{"\xff\xfe": 1}', b"", None, "does not parse"),
    "not-an-object-list": (b"[1, 2]", b"", None, "not a JSON object"),
    "not-an-object-string": (b'"weights"', b"", None, "not a JSON object"),
    "not-an-object-null": (b"null", b"", None, "not a JSON object"),
    "duplicate-names": (
        b'{"a": ' + json.dumps(entry()).encode() + b', "a": '
        + json.dumps(entry(offsets=(4, 8))).encode() + b"}",
        bytes(8), None, "duplicate key 'a'",
    ),
    "entry-not-object": ({"a": [0, 4]}, bytes(4), None, "entry is not an object"),
    "negative-offset": ({"a": entry(offsets=(-4, 0))}, b"", None, "negative or reversed"),
    "reversed-offsets": ({"a": entry(shape=(0,), offsets=(4, 0))}, bytes(4), None, "reversed"),
    "offsets-not-pair": ({"a": entry(offsets=(0, 2, 4))}, bytes(4), None, "not a pair of integers"),
    "offsets-strings": ({"a": entry(offsets=("0", "4"))}, bytes(4), None, "not a pair of integers"),
    "offsets-bool": ({"a": entry(shape=(0,), offsets=(False, False))}, b"", None, "not a pair"),
    "overlap": (
        {"a": entry(offsets=(0, 4)), "b": entry(offsets=(2, 6))}, bytes(6), None, "overlaps",
    ),
    "hole": ({"a": entry(offsets=(0, 4)), "b": entry(offsets=(6, 10))}, bytes(10), None, "hole"),
    "out-of-range": ({"a": entry(offsets=(0, 4))}, bytes(2), None, "truncated"),
    "out-of-range-with-hole": (
        {"a": entry(offsets=(0, 4)), "b": entry(offsets=(1000, 1004))}, bytes(8), None,
        "run past the end",
    ),
    "trailing-bytes": ({"a": entry()}, bytes(12), None, "8 bytes after the last tensor"),
    "unknown-dtype": ({"a": entry(dtype="Q4_K")}, bytes(4), None, "unknown dtype 'Q4_K'"),
    "dtype-not-string": ({"a": entry(dtype=16)}, bytes(4), None, "unknown dtype 16"),
    "shape-disagrees": ({"a": entry(shape=(3,))}, bytes(4), None, "needs 6 bytes"),
    "shape-negative": ({"a": entry(shape=(-2,))}, bytes(4), None, "non-negative integers"),
    "shape-float": ({"a": entry(shape=(2.0,))}, bytes(4), None, "non-negative integers"),
    "shape-bool": ({"a": entry(shape=(True, True))}, bytes(4), None, "non-negative integers"),
    "shape-not-list": ({"a": entry(shape="2")}, bytes(4), None, "non-negative integers"),
    "shape-absurd": ({"a": entry(shape=(2**40, 2**40))}, bytes(4), None, "dimension"),
    "shape-absurd-product": ({"a": entry(shape=(2**20,) * 6)}, bytes(4), None, "needs"),
    "shape-absurd-empty": ({"a": entry(shape=(2**62, 0), offsets=(0, 0))}, b"", None, "dimension"),
    "shape-huge-digits": (
        b'{"a": {"dtype": "F16", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
        bytes(4), None, "does not parse",
    ),
    "nested-json": (NESTED, b"", None, "does not parse"),
    "nested-in-entry": (b'{"a": ' + NESTED + b"}", b"", None, "does not parse"),
    "metadata-list": ({"__metadata__": ["format", "pt"]}, b"", None, "__metadata__"),
    "metadata-values": ({"__metadata__": {"format": 1}}, b"", None, "__metadata__"),
    "lone-surrogate-name": (
        b'{"\\ud800": ' + json.dumps(entry()).encode() + b"}", bytes(4), None, "not valid UTF-8",
    ),
    "nan-shape": (
        b'{"a": {"dtype": "F16", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(4), None,
        "non-negative integers",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header_is_refused(tmp_path, case):
    header, data, claim, words = HOSTILE_HEADERS[case]
    path = write_safetensors(tmp_path / "m" / "model.safetensors", header, data, claim)
    with pytest.raises(FormatError) as info:
        open_checkpoint(path.parent)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert words in message


def test_header_over_100mb_is_refused_without_allocating_it(tmp_path):
    """The claimed length fits the (sparse) file, so only the 100 MB limit stops it."""
    path = tmp_path / "model.safetensors"
    claim = 120_000_000
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", claim) + b"{")
        f.truncate(8 + claim + 1024)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="exceeds the 100 MB limit"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize("case", ["shape-absurd", "shape-absurd-product", "shape-absurd-empty"])
def test_absurd_shapes_allocate_nothing(tmp_path, case):
    header, data, claim, _ = HOSTILE_HEADERS[case]
    path = write_safetensors(tmp_path / "model.safetensors", header, data, claim)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_no_byte_is_read_at_an_offset_before_it_is_validated(tmp_path, monkeypatch):
    """Opening reads the header and nothing else; hostile offsets are never used to read."""
    calls: list[tuple[int, int]] = []
    real = os.pread

    def spy(fd: int, n: int, offset: int) -> bytes:
        calls.append((offset, n))
        return real(fd, n, offset)

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data read while opening")

    monkeypatch.setattr(safetensors_format.os, "pread", spy)
    monkeypatch.setattr(os, "preadv", forbidden)
    for case in ("out-of-range-with-hole", "overlap", "shape-absurd", "negative-offset"):
        header, data, claim, _ = HOSTILE_HEADERS[case]
        path = write_safetensors(tmp_path / case / "model.safetensors", header, data, claim)
        calls.clear()
        with pytest.raises(FormatError):
            open_checkpoint(path.parent)
        header_end = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert calls and all(offset + n <= max(64, header_end) for offset, n in calls), case
    good = save_checkpoint(llama_state(0), tmp_path / "good")
    calls.clear()
    with open_checkpoint(good) as ckpt:
        assert isinstance(ckpt, SafetensorsCheckpoint) and ckpt.specs
    header_end = 8 + struct.unpack("<Q", (good / "model.safetensors").read_bytes()[:8])[0]
    assert all(offset + n <= header_end for offset, n in calls)


def test_truncation_after_opening_is_caught_when_reading(tmp_path):
    """The file shrinks between validation and read: a FormatError, not garbage or a hang."""
    folder = save_checkpoint(llama_state(0), tmp_path / "m")
    with open_checkpoint(folder) as ckpt:
        name = max(ckpt.specs, key=lambda n: ckpt.specs[n].nbytes)
        os.truncate(ckpt.file_of(name), 64)
        buf = torch.empty(ckpt.specs[name].nbytes, dtype=torch.uint8)
        with pytest.raises(FormatError, match="truncated while reading"):
            ckpt.read_rows(name, 0, ckpt.specs[name].rows, buf)


# --- index files and shard names -------------------------------------------------------------


def _index_folder(tmp_path: Path, weight_map: object, shard: str = "model-1.safetensors") -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.zeros(2)}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "weight_map, words",
    [
        ({"a": "../outside.safetensors"}, "leaves the folder"),
        ({"a": "sub/../../outside.safetensors"}, "leaves the folder"),
        ({"a": "/etc/passwd"}, "leaves the folder"),
        ({"a": "."}, "names the folder itself"),
        ({"a": ""}, "invalid file name"),
        ({"a": "a\x00b"}, "invalid file name"),
        ({"a": "\ud800.safetensors"}, "surrogates not allowed"),
        ({"a": "x" * 5000}, "is missing"),
        ({"a": "nope.safetensors"}, "is missing"),
        (["a", "model-1.safetensors"], "weight_map must map"),
        ({"a": 1}, "weight_map must map"),
        ({"a": ["model-1.safetensors"]}, "weight_map must map"),
        ("model-1.safetensors", "weight_map must map"),
        (None, "weight_map must map"),
        ({}, "weight_map is empty"),
    ],
)
def test_hostile_index_is_refused(tmp_path, weight_map, words):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    folder = _index_folder(tmp_path, weight_map)
    with pytest.raises(FormatError, match=words.replace(".", r"\.")):
        open_checkpoint(folder)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"x"', b"{", b"\xff\xfe\x00", b"[" * 100_000])
def test_index_that_is_not_a_json_object(tmp_path, content):
    folder = _index_folder(tmp_path, {"a": "model-1.safetensors"})
    (folder / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(FormatError, match="model.safetensors.index.json"):
        open_checkpoint(folder)


def test_index_with_duplicate_keys_or_nan_is_refused(tmp_path):
    folder = _index_folder(tmp_path, {})
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-1.safetensors", "a": "other.safetensors"}}')
    with pytest.raises(FormatError, match="duplicate key 'a'"):
        open_checkpoint(folder)
    index.write_text('{"metadata": {"total_size": NaN}, "weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(FormatError, match="NaN"):
        open_checkpoint(folder)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.safetensors"
    save_file({"a": torch.zeros(2)}, secret)
    folder = _index_folder(tmp_path, {"a": "model-2.safetensors"})
    (folder / "model-2.safetensors").symlink_to(secret)
    with pytest.raises(FormatError, match="leads outside the folder"):
        open_checkpoint(folder)


def test_symlink_loop_is_refused(tmp_path):
    folder = _index_folder(tmp_path, {"a": "loop.safetensors"})
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    with pytest.raises(FormatError, match="loop.safetensors"):
        open_checkpoint(folder)


def test_symlinks_inside_the_folder_and_into_the_hub_cache_are_allowed(tmp_path):
    """A Hub cache snapshot's files are symlinks into the same repository's blobs folder."""
    folder = _index_folder(tmp_path, {"a": "model-2.safetensors"})
    (folder / "model-2.safetensors").symlink_to("model-1.safetensors")
    assert list(open_checkpoint(folder).specs) == ["a"]

    repo = tmp_path / "cache" / "models--someone--model"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, repo / "blobs" / "f00d")
    (snapshot / "model-1.safetensors").symlink_to("../../blobs/f00d")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors"}})
    )
    assert list(open_checkpoint(snapshot).specs) == ["a"]
    other = tmp_path / "cache" / "models--attacker--x" / "blobs"
    other.mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, other / "beef")
    (snapshot / "model-1.safetensors").unlink()
    (snapshot / "model-1.safetensors").symlink_to(other / "beef")
    with pytest.raises(FormatError, match="leads outside the folder"):
        open_checkpoint(snapshot)


def test_json_files_have_a_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("deltamerge.formats.files.MAX_JSON_BYTES", 1000)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(FormatError, match="too large"):
        read_json_object(path)
    with pytest.raises(NotFoundError):
        read_json_object(tmp_path / "missing.json")
    with pytest.raises(FormatError, match="Is a directory"):
        read_json_object(tmp_path)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(FormatError, match="not a regular file"):
        read_json_object(tmp_path / "fifo.json")
    with pytest.raises(FormatError, match="not a regular file"):
        read_header(tmp_path / "fifo.json")
    with pytest.raises(FormatError, match="not a regular file"):
        load_torch_file(tmp_path / "fifo.json")


# --- pickles ---------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious .bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    marker = tmp_path / "MARKER"
    files = {}
    folder = tmp_path / "evil"
    folder.mkdir()
    files["zip"] = folder / "zip.bin"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, files["zip"])
    files["legacy"] = folder / "legacy.bin"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, files["legacy"],
               _use_new_zipfile_serialization=False)
    files["raw-pickle"] = folder / "raw.bin"
    files["raw-pickle"].write_bytes(pickle.dumps({"w": Payload(marker)}))
    return marker, files


def test_pickles_that_would_run_code_are_refused_and_never_run(tmp_path):
    marker, files = _evil_files(tmp_path)
    # The payload is real: plain pickle runs it.
    pickle.loads(files["raw-pickle"].read_bytes())
    assert marker.exists()
    marker.unlink()
    for kind in ("zip", "legacy"):
        with pytest.raises(FormatError, match="refused by weights-only loading") as info:
            load_torch_file(files[kind])
        assert "system" in str(info.value)
    with pytest.raises(FormatError, match="not a PyTorch checkpoint"):
        load_torch_file(files["raw-pickle"])
    assert not marker.exists()


def test_apply_cli_refuses_a_code_running_bin(tmp_path):
    marker, files = _evil_files(tmp_path)
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta", fmt="bin")
    state = torch.load(delta / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, delta / "pytorch_model.bin")
    r = run_cli("apply", base, delta, tmp_path / "out", "-q")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "pytorch_model.bin: refused by weights-only loading" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_bin_with_non_tensor_or_unsupported_content(tmp_path):
    cases = {
        "list.bin": ([torch.zeros(2)], FormatError, "holds a list"),
        "nested.bin": ({"a": {"b": torch.zeros(2)}}, FormatError, "is not a tensor"),
        "intkey.bin": ({1: torch.zeros(2)}, FormatError, "is not a tensor"),
        "string.bin": ({"a": "text"}, FormatError, "is not a tensor"),
        "sparse.bin": ({"a": torch.eye(3).to_sparse()}, UnsupportedError, "sparse"),
        "complex.bin": ({"a": torch.zeros(2, dtype=torch.complex64)}, UnsupportedError, "dtype"),
    }
    for name, (obj, error, words) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(error, match=words):
            load_torch_file(tmp_path / name)


def test_legacy_bin_claiming_a_huge_storage_does_not_take_the_memory(tmp_path):
    """A pre-zip torch file names its storage sizes in the pickle; claiming 8 GB costs nothing."""
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    at = raw.index(b"cpuq") + 5  # the storage's element count follows its location
    assert raw[at : at + 2] == b"K\x02"
    claim = (2**31 - 1).to_bytes(4, "little")
    path.write_bytes(raw[:at] + b"J" + claim + raw[at + 2 :])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError):
        load_torch_file(path)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 512 * 1024


# --- configs and manifests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        (b"[1, 2, 3]", "expected a JSON object, found list"),
        (b'"llama"', "expected a JSON object, found str"),
        (json.dumps(llama_config(vocab_size="32000")).encode(), "vocab_size must be an integer"),
        (json.dumps(llama_config(vocab_size=True)).encode(), "vocab_size must be an integer"),
        (json.dumps(llama_config(vocab_size=[32000])).encode(), "vocab_size must be an integer"),
        (b'{"vocab_size": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "not valid JSON"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "Git LFS pointer"),
        (b"\xff\xfe\xfa", "not valid JSON"),
    ],
)
def test_hostile_config_is_refused_before_any_work(tmp_path, config, words):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta")
    (delta / "config.json").write_bytes(config)
    with pytest.raises(FormatError, match=words):
        open_checkpoint(delta)
    code, stderr = apply_in_process(base, delta, tmp_path / "out")
    assert code == 2 and "config.json" in stderr and words in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config",
    [b"[1]", b'{"vocab_size": "x"}', b"[" * 50_000 + b"]" * 50_000, b"\xff\xfe", b"", b"null"],
)
def test_fix_config_survives_any_config(tmp_path, config):
    (tmp_path / "config.json").write_bytes(config)
    fix_config(tmp_path, 32001, "bfloat16")
    if config == b'{"vocab_size": "x"}':
        assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 32001


def _manifest(version: int = 2, **override) -> dict:
    algorithm = {1: "sha256", 2: "blake3"}[version]
    sha = "0" * 64
    from deltamerge.integrity.digest import TensorDigest, model_digest

    tensors = {"a": TensorDigest("F16", (2,), sha, algorithm)}
    role = {"model_digest": model_digest(tensors, algorithm),
            "tensors": {"a": tensors["a"].to_json()}}
    obj = {
        "format": "deltamerge-manifest", "format_version": version, "kind": "add",
        "deltamerge_version": "0.1.0", "options": {},
        "files": {"model.safetensors": {algorithm: sha, "size": 10}},
        "base": role, "result": role,
    }
    obj.update(override)
    return obj


def _hostile_manifests(version: int) -> list[tuple[dict, str]]:
    algorithm = {1: "sha256", 2: "blake3"}[version]
    zero = {algorithm: "0" * 64}

    def m(**override) -> dict:
        return _manifest(version, **override)

    cases = [
        ([1, 2], "expected a JSON object"),
        (m(format="other"), "unknown format"),
        (m(format_version=str(version)), "unknown format"),
        (m(format_version=True), "unknown format"),
        (m(format_version=3), "unknown format"),
        (m(kind=["add"]), "'kind' must be a string"),
        (m(files=[]), "'files' must be an object"),
        (m(files={"../x": {**zero, "size": 1}}), "relative path"),
        (m(files={"/etc/passwd": {**zero, "size": 1}}), "relative path"),
        (m(files={"a": {**zero, "size": True}}), "integer size"),
        (m(files={"a": {**zero, "size": "1"}}), "integer size"),
        (m(files={"a": {algorithm: "xyz", "size": 1}}), f"64-hex {algorithm}"),
        (m(options=[]), "'options' must be an object"),
        (m(base=[]), "'base' must be an object"),
        (m(base={"tensors": {"a": 1}}), "is not an object"),
        (m(base={"tensors": {"a": {"dtype": "F16", "shape": "2", **zero}}}), "shape must be"),
        (m(result={"tensors": {}, "model_digest": "0" * 64}), "does not match"),
    ]
    other = "sha256" if algorithm == "blake3" else "blake3"
    # Digests in the other format's algorithm: a format 1 file is sha256 throughout, 2 blake3.
    cases.append((m(files={"a": {other: "0" * 64, "size": 1}}), f"64-hex {algorithm}"))
    cases.append((m(base={"model_digest": "0" * 64, "tensors": {
        "a": {"dtype": "F16", "shape": [2], other: "0" * 64}}}), f"64-hex {algorithm}"))
    if version == 2:
        cases += [
            (m(files={"a": {**zero, "size": 100, "header": []}}), "'header' needs"),
            (m(files={"a": {**zero, "size": 100, "header": {**zero, "size": 101}}}), "'header' needs"),
            (m(files={"a": {**zero, "size": 100, "header": {"size": 8}}}), "'header' needs"),
            (m(delta={"tensors": {}, "model_digest": "0" * 64}), "'delta' model_digest"),
            (m(delta=[]), "'delta' must be an object"),
        ]
    return cases


@pytest.mark.parametrize(
    "manifest, words",
    _hostile_manifests(2) + _hostile_manifests(1),
    ids=[f"format{v}-{i}" for v in (2, 1) for i in range(len(_hostile_manifests(v)))],
)
def test_hostile_manifest_is_refused(tmp_path, manifest, words):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta")
    path = delta / "deltamerge.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=words.replace("(", r"\(")):
        read_manifest(path)
    code, stderr = apply_in_process(base, delta, tmp_path / "out")
    assert code == 2 and "deltamerge.json" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [b"[1, 2]", b'{"peft_type": "LORA", "r": "8"}', b"{"])
def test_hostile_adapter_config_is_refused(tmp_path, config):
    pytest.importorskip("deltamerge.kinds.lora")
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{name}.lora_A.weight": torch.zeros(2, 64), f"{name}.lora_B.weight": torch.zeros(64, 2)},
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_bytes(config)
    result = CliRunner().invoke(main, ["apply", str(base), str(adapter), str(tmp_path / "out")])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.stderr
    assert "adapter_config.json" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_refusal_here_is_a_deltamerge_error():
    """The classes the CLI maps to exit 2; a bare ValueError would have been a traceback."""
    for cls in (FormatError, UnsupportedError, NotFoundError):
        assert issubclass(cls, DeltaMergeError) and cls.exit_code == 2
