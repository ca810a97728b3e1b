"""Checksums end to end in apply and make-delta: what is caught, what is said, what is left behind.

Each case is a user story: a bit flipped on disk in the base, a corrupted download of the delta,
the wrong base of the same shapes (LLaMA-2 for LLaMA-1), the same base in another format. Every
case runs with both manifest formats: 2 (BLAKE3, the delta checked by its tensors), as
make-delta writes it, and 1 (sha256, whole files), as deltamerge wrote it before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import (
    assert_states_equal,
    fine_tune,
    flip_bit,
    llama_state,
    load_state,
    run_in_process,
    save_checkpoint,
    with_manifest_format,
)

from deltamerge import VerificationError, apply_delta, make_delta
from deltamerge.cli import main
from deltamerge.formats.safetensors import read_header
from deltamerge.integrity.checks import checksum, verify
from deltamerge.integrity.digest import model_digest
from deltamerge.integrity.manifest import MANIFEST_NAME
from deltamerge.sinks.folder import partial_dir

BIG_VOCAB = 9000  # embed_tokens and lm_head then exceed 1 MiB: delta shards hashed as they stream
TAMPERED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module", params=[2, 1], ids=["format2", "format1"])
def world(tmp_path_factory, request) -> dict:
    """A base, a fine-tune of it, and the delta between them with its manifest (made once)."""
    root = tmp_path_factory.mktemp("integrity")
    base_state = llama_state(0, vocab=BIG_VOCAB)
    base = save_checkpoint(base_state, root / "base")
    target = save_checkpoint(fine_tune(base_state, 7), root / "target")
    delta = root / "delta"
    make_delta(base, target, delta, max_shard_size="600KB")
    algorithm = with_manifest_format(request.param, delta, base, root / "scratch")
    return {"root": root, "base": base, "target": target, "delta": delta, "algorithm": algorithm,
            "format": request.param}


def invoke(*args: object) -> Result:
    """The CLI in this process, click's Result (``run_in_process`` for failures: a process's answer)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_failed_cleanly(proc, out: Path, code: int, *needles: str) -> str:
    """Exit ``code``, one stderr line naming what is wrong, no traceback, nothing at OUT."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not partial_dir(out).exists()
    return lines[0]


def test_delta_shards_fixture_exercises_both_hash_paths(world):
    """The fixture's delta has shards above and below the 1 MiB streamed-hash threshold."""
    sizes = sorted(f.stat().st_size for f in world["delta"].glob("*.safetensors"))
    assert sizes[0] < 1 << 20 < sizes[-1]


def test_flipped_base_bit_stops_apply_naming_the_tensor(world, tmp_path):
    base = copy(world["base"], tmp_path / "base")
    flip_bit(base / "model.safetensors", TAMPERED)
    out = tmp_path / "out"
    proc = run_in_process("apply", "-q", base, world["delta"], out)
    line = assert_failed_cleanly(proc, out, 1, repr(TAMPERED), "does not match the publisher's base")
    assert "tensors had matched" in line


def test_flipped_base_bit_single_threaded_library(world, tmp_path):
    base = copy(world["base"], tmp_path / "base")
    flip_bit(base / "model.safetensors", "model.norm.weight", byte=0, bit=7)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="model.norm.weight"):
        apply_delta(base, world["delta"], out, workers=1)
    assert not out.exists() and not partial_dir(out).exists()


def test_wrong_base_of_the_same_shapes_is_refused(world, tmp_path):
    """LLaMA-2 given for LLaMA-1: every shape fits, nothing but the digests can tell."""
    other = save_checkpoint(llama_state(1, vocab=BIG_VOCAB), tmp_path / "other-base")
    out = tmp_path / "out"
    proc = run_in_process("apply", "-q", other, world["delta"], out)
    assert_failed_cleanly(proc, out, 1, "does not match the publisher's base", "(0 tensors had matched)")


def test_base_with_a_tensor_the_publisher_lacked_is_refused(world, tmp_path):
    state = llama_state(0, vocab=BIG_VOCAB, inv_freq=True)
    base = save_checkpoint(state, tmp_path / "base")
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="rotary_emb.inv_freq.*not in the manifest's base"):
        apply_delta(base, world["delta"], out)
    assert not out.exists()


def corrupt_delta_file(delta: Path, which: str) -> Path:
    """Change one byte of a delta file (as a bad download would) and return the file."""
    if which == "config.json":
        config = delta / "config.json"
        config.write_text(config.read_text().replace('"llama"', '"llamb"'))
        return config
    shards = sorted(delta.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    victim = shards[-1] if which == "large shard" else shards[0]
    flip_bit(victim, next(iter(read_header(victim).tensors)), byte=100)
    return victim


def test_changed_byte_in_a_delta_shard_fails_the_cli(world, tmp_path):
    delta = copy(world["delta"], tmp_path / "delta")
    victim = corrupt_delta_file(delta, "large shard")
    out = tmp_path / "out"
    proc = run_in_process("apply", "-q", world["base"], delta, out)
    line = assert_failed_cleanly(proc, out, 1, victim.name, world["algorithm"],
                                 "does not match deltamerge.json")
    if world["format"] == 2:  # checked by its tensors, named
        assert f"tensor {next(iter(read_header(victim).tensors))!r}" in line


@pytest.mark.parametrize("which", ["large shard", "small shard", "config.json"])
def test_changed_byte_in_a_delta_file_is_caught_by_its_digest(world, tmp_path, which):
    """Format 2: shards by their tensors, from the merge's reads, and config.json whole.
    Format 1: shards above 1 MiB hashed from the merge's reads; the others read whole."""
    delta = copy(world["delta"], tmp_path / "delta")
    victim = corrupt_delta_file(delta, which)
    out = tmp_path / "out"
    pattern = f"{victim.name}: .*{world['algorithm']} .*does not match deltamerge.json"
    with pytest.raises(VerificationError, match=pattern) as err:
        apply_delta(world["base"], delta, out)
    assert err.value.exit_code == 1
    assert not out.exists() and not partial_dir(out).exists()


def test_missing_delta_file_listed_in_the_manifest(world, tmp_path):
    delta = copy(world["delta"], tmp_path / "delta")
    (delta / "special_tokens_map.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="special_tokens_map.json: listed in deltamerge.json"):
        apply_delta(world["base"], delta, out)
    assert not out.exists()


def test_same_base_in_other_layouts_has_one_digest_and_passes(world, tmp_path):
    state = llama_state(0, vocab=BIG_VOCAB)
    as_bin = save_checkpoint(state, tmp_path / "bin", fmt="bin", shard_bytes=400_000)
    resharded = save_checkpoint(state, tmp_path / "st", shard_bytes=150_000)
    assert len(list(as_bin.glob("*.bin"))) > 1 and len(list(resharded.glob("*.safetensors"))) > 2
    algorithm = world["algorithm"]
    digests = {checksum(p, algorithm=algorithm).model_digest
               for p in (world["base"], as_bin, resharded)}
    assert len(digests) == 1
    manifest = world["delta"] / MANIFEST_NAME
    assert json.loads(manifest.read_text())["base"]["model_digest"] in digests
    for folder in (as_bin, resharded):
        assert verify(folder, manifest, "base").ok

    proc = invoke("apply", as_bin, world["delta"], tmp_path / "out-bin")
    assert proc.exit_code == 0, proc.output
    assert "(matches the publisher's result)" in proc.stdout
    result = apply_delta(resharded, world["delta"], tmp_path / "out-st")
    assert result.verified
    assert_states_equal(load_state(tmp_path / "out-bin"), load_state(tmp_path / "out-st"))


def test_make_delta_then_apply_matches_the_publishers_result(world, tmp_path):
    delta, out = world["delta"], tmp_path / "out"  # the fixture ran make_delta
    proc = invoke("apply", world["base"], delta, out)
    assert proc.exit_code == 0, proc.output
    manifest = json.loads((delta / MANIFEST_NAME).read_text())
    algorithm = world["algorithm"]
    expected = manifest["result"]["model_digest"]
    assert f"digest    {algorithm} {expected} (matches the publisher's result)" in proc.stdout
    assert checksum(out, algorithm=algorithm).model_digest == expected
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["algorithm"] == algorithm
    assert record["result"]["model_digest"] == expected
    assert record["publisher_digest"] == expected
    assert manifest["base"]["model_digest"] == checksum(world["base"], algorithm=algorithm).model_digest


def test_manifest_records_every_delta_file(world):
    manifest = json.loads((world["delta"] / MANIFEST_NAME).read_text())
    on_disk = {f.name for f in world["delta"].iterdir() if f.name != MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    for name, info in manifest["files"].items():
        assert info["size"] == (world["delta"] / name).stat().st_size


def test_delta_without_a_manifest_still_applies_and_prints_the_digest(world, tmp_path):
    delta = copy(world["delta"], tmp_path / "delta")
    (delta / MANIFEST_NAME).unlink()
    out = tmp_path / "out"
    proc = invoke("apply", world["base"], delta, out)
    assert proc.exit_code == 0, proc.output
    digest = checksum(out).model_digest
    assert f"digest    blake3 {digest} (no manifest from the publisher" in proc.stdout
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["publisher_digest"] is None
    assert record["result"]["model_digest"] == digest


def test_no_verify_skips_every_check(world, tmp_path):
    base = copy(world["base"], tmp_path / "base")
    flip_bit(base / "model.safetensors", TAMPERED)
    delta = copy(world["delta"], tmp_path / "delta")
    config = delta / "config.json"
    config.write_text(config.read_text().replace('"llama"', '"llamb"'))
    out = tmp_path / "out"
    proc = invoke("apply", "--no-verify", base, delta, out)
    assert proc.exit_code == 0, proc.output
    assert "(not verified (--no-verify))" in proc.stdout
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()


def test_result_that_differs_from_the_publishers_is_refused(world, tmp_path):
    """A manifest whose result role disagrees with what base + delta give: named, nothing kept."""
    delta = copy(world["delta"], tmp_path / "delta")
    path = delta / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    tensors = manifest["result"]["tensors"]
    algorithm = world["algorithm"]
    tensors[TAMPERED][algorithm] = "0" * 64
    from deltamerge.integrity.manifest import parse_manifest

    manifest["result"]["model_digest"] = model_digest(
        {n: _digest(d, algorithm) for n, d in tensors.items()}, algorithm
    )
    path.write_text(json.dumps(manifest))
    parse_manifest(path, manifest)  # still a valid manifest
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match=f"1 tensors differ, first {TAMPERED!r}"):
        apply_delta(world["base"], delta, out)
    assert not out.exists() and not partial_dir(out).exists()


def _digest(obj: dict, algorithm: str):
    from deltamerge.integrity.digest import TensorDigest

    return TensorDigest(obj["dtype"], tuple(obj["shape"]), obj[algorithm], algorithm)


def test_no_verify_still_takes_the_kind_from_the_manifest(world, tmp_path):
    """--no-verify skips the checks, not the manifest's kind: an XOR delta is never added."""
    delta = tmp_path / "xor-delta"
    make_delta(world["base"], world["target"], delta, kind="xor")
    checked = apply_delta(world["base"], delta, tmp_path / "checked")
    unchecked = apply_delta(world["base"], delta, tmp_path / "unchecked", verify=False)
    assert checked.verified and not unchecked.verified
    assert unchecked.kinds == ["xor"] and unchecked.model_digest == checked.model_digest


@pytest.mark.parametrize("old, new", [(b'"F16"', b'"I16"'), (b'"pt"', b'"pu"')],
                         ids=["dtype", "metadata"])
def test_changed_header_that_still_parses_is_caught(world, tmp_path, old, new):
    """A header edited in place, the same length and still valid (another dtype of the same
    size, which changes what the bytes mean; or its metadata): format 2 checks the tensor table
    against the manifest and the header's bytes against their digest."""
    delta = copy(world["delta"], tmp_path / "delta")
    victim = max(delta.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    at = data.index(old)
    data[at : at + len(old)] = new
    victim.write_bytes(bytes(data))
    read_header(victim)  # still a valid safetensors file
    out = tmp_path / "out"
    if world["format"] == 1 or old == b'"pt"':
        pattern = f"{victim.name}: .*{world['algorithm']} .*does not match deltamerge.json"
    else:
        pattern = f"{victim.name}: tensor .* is I16.* but F16.* in deltamerge.json"
    with pytest.raises(VerificationError, match=pattern):
        apply_delta(world["base"], delta, out)
    assert not out.exists() and not partial_dir(out).exists()


def test_format2_round_trip_records_what_other_tools_can_check(world, tmp_path):
    """make-delta's manifest: b3sum of every file, of each shard's header bytes, and the delta's
    own tensors; apply checks them and records its result in BLAKE3."""
    if world["format"] != 2:
        pytest.skip("the manifest make-delta writes is format 2")
    import blake3
    from helpers import documented_digests

    delta = world["delta"]
    manifest = json.loads((delta / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2
    for name, entry in manifest["files"].items():
        data = (delta / name).read_bytes()
        assert entry["blake3"] == blake3.blake3(data).hexdigest() and entry["size"] == len(data)
        if name.endswith(".safetensors"):
            start = read_header(delta / name).data_start
            assert entry["header"] == {"size": start, "blake3": blake3.blake3(data[:start]).hexdigest()}
        else:
            assert "header" not in entry
    expected, tensors = documented_digests(load_state(delta))
    assert manifest["delta"]["model_digest"] == expected
    assert {n: t["blake3"] for n, t in manifest["delta"]["tensors"].items()} == tensors
    assert manifest["base"]["model_digest"] == documented_digests(load_state(world["base"]))[0]

    result = apply_delta(world["base"], delta, tmp_path / "out")
    assert result.verified and result.algorithm == "blake3"
    assert result.model_digest == documented_digests(load_state(tmp_path / "out"))[0]
    assert result.model_digest == manifest["result"]["model_digest"]


def test_a_verified_apply_hashes_each_byte_once(world, tmp_path, monkeypatch):
    """The base's tensors, the delta's content and the result, and nothing twice: with format 2 a
    delta shard is never hashed as a file (only its header); format 1 hashes each file once."""
    import deltamerge.integrity.digest as digest_module

    hashed = []
    real = digest_module.new_hash

    class Counting:
        def __init__(self, algorithm, data=b""):
            self._h = real(algorithm, data)
            hashed.append(len(data))

        def update(self, data):
            hashed.append(len(memoryview(data).cast("B")))
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(digest_module, "new_hash", Counting)
    out = tmp_path / "out"
    result = apply_delta(world["base"], world["delta"], out, workers=2)
    monkeypatch.undo()
    assert result.verified

    def tensor_bytes(folder: Path) -> int:
        return sum(t.numel() * t.element_size() for t in load_state(folder).values())

    files = [f for f in world["delta"].iterdir() if f.name != MANIFEST_NAME]
    if world["format"] == 2:
        shards = [f for f in files if f.suffix == ".safetensors"]
        delta_bytes = tensor_bytes(world["delta"]) + sum(read_header(f).data_start for f in shards)
        delta_bytes += sum(f.stat().st_size for f in files if f not in shards)
    else:
        delta_bytes = sum(f.stat().st_size for f in files)
    expected = tensor_bytes(world["base"]) + delta_bytes + tensor_bytes(out)
    lines = sum(hashed) - expected  # model digests: a short line per tensor, a few times over
    smallest_shard = min(f.stat().st_size for f in files if f.suffix == ".safetensors")
    assert 0 <= lines < 32 * 1024 < smallest_shard
