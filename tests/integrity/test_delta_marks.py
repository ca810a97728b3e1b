"""No silent wrong model: a delta says what it is without its manifest, and a folder is read as
transformers loads it.

make-delta marks every weight file's header with the delta's kind and id, so a XOR delta
downloaded without its ``deltamerge.json`` is still applied as XOR; marks that are partial,
disagree between shards or with the manifest, or contradict ``--kind`` are refused in one line.
A folder holding two layouts (``model.safetensors`` beside an index and its shards) is read as
the one ``from_pretrained`` loads, by every command.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_states_equal,
    join_safetensors,
    llama_state,
    save_checkpoint,
    split_safetensors,
)
from hub_fixtures import api, hub  # noqa: F401
from safetensors.torch import load_file, save_file

from deltamerge import apply_delta
from deltamerge.formats.safetensors import read_header
from deltamerge.integrity.checks import checksum, verify
from deltamerge.make import make_delta

SHARD = 30_000  # several shards for the tiny model
MARKS = ("deltamerge.kind", "deltamerge.delta_id")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base, two targets, and make-delta's XOR and additive deltas of the first target (and a
    XOR delta of the second), in shards laid out alike."""
    root = tmp_path_factory.mktemp("marks")
    made = {
        "base": save_checkpoint(llama_state(0), root / "base"),
        "target": save_checkpoint(llama_state(1), root / "target"),
        "other": save_checkpoint(llama_state(2), root / "other"),
    }
    for name, target, kind in (("xor", "target", "xor"), ("add", "target", "add"),
                               ("xor2", "other", "xor")):
        make_delta(made["base"], made[target], root / name, kind=kind, max_shard_size=SHARD)
        made[name] = root / name
    return made


def _copy(src: Path, dst: Path, manifest: bool = False) -> Path:
    shutil.copytree(src, dst)
    if not manifest:
        (dst / "deltamerge.json").unlink()
    return dst


def _apply(*args: object) -> tuple[int, str]:
    """``deltamerge apply`` through click in this process: its exit status and stderr."""
    from click.testing import CliRunner

    from deltamerge.cli import main

    result = CliRunner().invoke(main, ["apply", *map(str, args), "-q"])
    return result.exit_code, result.stderr


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def _set_metadata(path: Path, changes: dict[str, str | None]) -> None:
    """Rewrite ``path``'s header metadata (None removes a key); the file stays a valid one."""
    header, body = split_safetensors(path.read_bytes())
    meta = header.setdefault("__metadata__", {})
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_bytes(join_safetensors(header, body, pad=True))


def _strip(path: Path) -> None:
    _set_metadata(path, dict.fromkeys(MARKS))


def load_file_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A folder's tensors as transformers chooses its files: model.safetensors before an index."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


# -- 1. every delta says what it is --------------------------------------------------------------
def test_every_shard_and_the_manifest_carry_one_delta_id(models):
    ids = set()
    for name in ("xor", "add", "xor2"):
        manifest = json.loads((models[name] / "deltamerge.json").read_text())
        marks = {tuple(read_header(p).metadata.get(k) for k in MARKS) for p in _shards(models[name])}
        assert len(_shards(models[name])) > 3
        assert marks == {(manifest["kind"], manifest["delta_id"])}, name
        ids.add(manifest["delta_id"])
    assert len(ids) == 3  # each run its own id


def test_a_xor_delta_without_its_manifest_rebuilds_the_target(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    code, err = _apply(models["base"], delta, tmp_path / "out")
    assert code == 0, err
    assert_states_equal(load_file_folder(tmp_path / "out"), load_file_folder(models["target"]))


def test_a_delta_with_no_marks_at_all_stays_additive(models, tmp_path):
    """FastChat's deltas carry no marks: they are read as additive, as before (a XOR delta whose
    marks were all stripped is indistinguishable from one, and is added too)."""
    delta = _copy(models["xor"], tmp_path / "delta")
    for shard in _shards(delta):
        _strip(shard)
    result = apply_delta(models["base"], delta, tmp_path / "out")
    base, stored = load_file_folder(models["base"]), load_file_folder(delta)
    out = load_file_folder(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[name], (base[name].float() + stored[name].float()).half())
    assert result.model_digest != checksum(models["target"]).model_digest


def test_shards_marked_and_unmarked_are_refused(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    stripped = _shards(delta)[1]
    _strip(stripped)
    code, err = _apply(models["base"], delta, tmp_path / "out")
    assert code == 2, err
    assert stripped.name in err and "not of one delta" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_shards_of_two_deltas_are_refused(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    swapped = _shards(delta)[2]
    shutil.copyfile(models["add"] / swapped.name, swapped)
    code, err = _apply(models["base"], delta, tmp_path / "out")
    assert code == 2 and swapped.name in err and "different deltas" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_marks_that_contradict_the_manifest_are_refused(models, tmp_path):
    kind = _copy(models["xor"], tmp_path / "kind", manifest=True)
    for shard in _shards(kind):
        shutil.copyfile(models["add"] / shard.name, shard)  # additive weights, XOR manifest
    code, err = _apply(models["base"], kind, tmp_path / "out", "--no-verify")
    assert code == 2 and "marks its delta as add, but deltamerge.json says xor" in err, err

    run = _copy(models["xor"], tmp_path / "run", manifest=True)
    for shard in _shards(run):
        shutil.copyfile(models["xor2"] / shard.name, shard)  # another run's XOR weights
    code, err = _apply(models["base"], run, tmp_path / "out", "--no-verify")
    assert code == 2 and "different make-delta runs" in err, err

    bare = _copy(models["xor"], tmp_path / "bare", manifest=True)
    for shard in _shards(bare):
        _strip(shard)
    code, err = _apply(models["base"], bare, tmp_path / "out", "--no-verify")
    assert code == 2 and "carry no deltamerge marks" in err, err
    assert not (tmp_path / "out").exists()


def test_kind_contradicting_the_marks_is_refused(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    code, err = _apply(models["base"], delta, tmp_path / "out", "--kind", "add")
    assert code == 2, err
    assert "--kind add contradicts its weight files' marks" in err and "which says xor" in err
    code, err = _apply(models["base"], delta, tmp_path / "out", "--kind", "xor")
    assert code == 0, err  # the kind the marks say is fine


def test_a_base_with_delta_marks_is_taken_for_swapped_arguments(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    code, err = _apply(delta, models["base"], tmp_path / "out")
    assert code == 2 and "weight files marked as a delta" in err and "did you swap" in err, err


def test_damaged_marks_are_refused(models, tmp_path):
    delta = _copy(models["xor"], tmp_path / "delta")
    damaged = _shards(delta)[0]
    _set_metadata(damaged, {"deltamerge.delta_id": None})  # the kind without the id
    code, err = _apply(models["base"], delta, tmp_path / "out")
    assert code == 2 and damaged.name in err and "marks are damaged" in err, err
    _set_metadata(damaged, {"deltamerge.kind": "vera", "deltamerge.delta_id": "0" * 64})
    code, err = _apply(models["base"], delta, tmp_path / "out")
    assert code == 2 and "marks are damaged" in err, err


def test_a_hub_delta_s_marks_are_checked_before_the_download(hub, api, models, tmp_path):  # noqa: F811
    hub.seed("alice/base", {p.name: p.read_bytes() for p in models["base"].iterdir()})
    hub.seed("alice/xor", {p.name: p.read_bytes() for p in models["xor"].iterdir()
                           if p.name != "deltamerge.json"})
    hub.log.clear()
    code, err = _apply("alice/base", "alice/xor", tmp_path / "out", "--kind", "add")
    assert code == 2 and "alice/xor@" in err and "--kind add contradicts" in err, err
    assert "which says xor" in err and len(err.strip().splitlines()) == 1
    assert [e for e in hub.requests_to("/lfs-objects/", "GET") if e[2] != 206] == []
    code, err = _apply("alice/base", "alice/xor", tmp_path / "out")
    assert code == 0, err
    assert_states_equal(load_file_folder(tmp_path / "out"), load_file_folder(models["target"]))


# -- 2. one reading of a folder ------------------------------------------------------------------
@pytest.fixture
def both(models, tmp_path) -> Path:
    """The target's weights in model.safetensors, beside an index and shards of other weights
    (a folder saved twice: sharded, then whole)."""
    folder = save_checkpoint(llama_state(5), tmp_path / "both", shard_bytes=SHARD)
    shutil.copyfile(models["target"] / "model.safetensors", folder / "model.safetensors")
    return folder


def test_transformers_loads_the_single_file(both, models):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(both, dtype=torch.float16)
    loaded = model.state_dict()
    target = load_file(models["target"] / "model.safetensors")
    for name, tensor in target.items():
        assert torch.equal(loaded[name], tensor), name


def test_checksum_verify_and_apply_read_what_transformers_loads(both, models, tmp_path):
    assert checksum(both) == checksum(models["target"])
    digests = tmp_path / "target.digests.json"
    checksum(models["target"]).write(digests)
    assert verify(both, digests).ok
    # as a base: the delta was made against the single file's weights
    delta = tmp_path / "delta"
    make_delta(both, models["other"], delta, kind="xor")
    result = apply_delta(both, delta, tmp_path / "out")
    assert result.verified
    assert_states_equal(load_file_folder(tmp_path / "out"), load_file_folder(models["other"]))


def test_bin_pairs_are_read_as_transformers_reads_them(models, tmp_path):
    """pytorch_model.bin before its index; any safetensors before any .bin."""
    folder = save_checkpoint(llama_state(5), tmp_path / "bins", fmt="bin", shard_bytes=SHARD)
    torch.save(load_file(models["target"] / "model.safetensors"), folder / "pytorch_model.bin")
    assert checksum(folder) == checksum(models["target"])
    save_file(load_file(models["base"] / "model.safetensors"), folder / "model.safetensors",
              metadata={"format": "pt"})
    assert checksum(folder) == checksum(models["base"])


def test_the_hub_fetches_what_transformers_loads(hub, api, both, models):  # noqa: F811
    from deltamerge.sources.hub import download_input

    hub.seed("alice/both", {p.name: p.read_bytes() for p in both.iterdir()})
    got = download_input("alice/both", api=api)
    assert (got.path / "model.safetensors").is_file()
    assert not (got.path / "model.safetensors.index.json").exists()
    assert not list(got.path.glob("model-*.safetensors"))
    assert checksum("alice/both", hub={"api": api}) == checksum(models["target"])
