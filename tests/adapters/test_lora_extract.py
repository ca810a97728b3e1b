"""make-delta --kind lora: a peft adapter of target - base, extracted by a streamed randomized SVD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import llama_state, load_state, save_checkpoint
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from deltamerge import apply_delta, make_delta
from deltamerge.cli import main
from deltamerge.kinds import lora_extract
from deltamerge.sources import open_checkpoint

SMALL_BLOCK = 3000  # bytes: a few rows a block, so every pass sums many blocks
RANK = 6
PREFIX = "base_model.model."


def low_rank_target(base: dict[str, torch.Tensor], rank: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """Every layer matrix moved by an exact rank-``rank`` product, the final norm and the
    embedding changed, one layer's k_proj left alone."""
    g = torch.Generator().manual_seed(seed)
    target = {}
    for name, t in base.items():
        if t.ndim == 2 and "embed" not in name and "lm_head" not in name and \
                name != "model.layers.1.self_attn.k_proj.weight":
            a = torch.randn(t.shape[0], rank, generator=g) * 0.05
            b = torch.randn(rank, t.shape[1], generator=g) * 0.05
            target[name] = (t.float() + a @ b).to(t.dtype)
        else:
            target[name] = t.clone()
    target["model.norm.weight"] = target["model.norm.weight"] + 0.125
    target["model.embed_tokens.weight"][3] += 0.25
    return target


def noisy_target(base: dict[str, torch.Tensor], seed: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=g) * 0.01).to(t.dtype)
            for n, t in base.items()}


def pair(tmp: Path, dtype: torch.dtype, make_target) -> tuple[Path, Path, dict, dict]:
    base = llama_state(0, dtype)
    target = make_target(base)
    return (save_checkpoint(base, tmp / "base"), save_checkpoint(target, tmp / "target"),
            base, target)


def matrices(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, t in state.items() if t.ndim == 2 and "embed" not in n and "lm_head" not in n]


def test_adapter_loads_in_peft_and_apply_is_peft_merge(tmp_path: Path) -> None:
    base_dir, target_dir, base, target = pair(tmp_path, torch.float16, lambda b: low_rank_target(b, 3))
    result = make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK,
                        block_size=SMALL_BLOCK)
    assert result.kind == "lora"
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, RANK)
    assert config["modules_to_save"] == ["model.embed_tokens", "model.norm"]
    # a kind of matrix by its name where every one is factored; else the ones that are
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "model.layers.0.self_attn.k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj"])
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    factored = [n for n in matrices(base) if n != "model.layers.1.self_attn.k_proj.weight"]
    expected = {f"{PREFIX}{n.removesuffix('.weight')}.{w}.weight" for n in factored
                for w in ("lora_A", "lora_B")}
    expected |= {PREFIX + "model.embed_tokens.weight", PREFIX + "model.norm.weight"}
    assert set(adapter) == expected  # unchanged tensors (k_proj of layer 1, the other norms) left out
    assert adapter[PREFIX + "model.layers.0.mlp.up_proj.lora_A.weight"].shape == (RANK, 64)
    assert adapter[PREFIX + "model.layers.0.mlp.up_proj.lora_B.weight"].dtype == torch.float16
    assert torch.equal(adapter[PREFIX + "model.norm.weight"], target["model.norm.weight"])

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    reference = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    applied = apply_delta(base_dir, tmp_path / "lora", tmp_path / "out", block_size=SMALL_BLOCK)
    assert applied.verified  # the manifest's result digest is what apply rebuilt
    assert applied.model_digest == result.result_digest
    got = load_state(tmp_path / "out")
    assert set(got) == set(base)
    for name, tensor in got.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"],
                       base["model.layers.1.self_attn.k_proj.weight"])


def test_exact_low_rank_difference_is_recovered(tmp_path: Path) -> None:
    base_dir, target_dir, base, target = pair(tmp_path, torch.float32,
                                              lambda b: low_rank_target(b, RANK))
    make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK,
               block_size=SMALL_BLOCK)
    apply_delta(base_dir, tmp_path / "lora", tmp_path / "out")
    got = load_state(tmp_path / "out")
    for name in matrices(base):
        diff = target[name] - base[name]
        if diff.any():
            error = float((got[name] - target[name]).norm() / diff.norm())
            assert error < 1e-3, (name, error)


def test_random_target_within_one_percent_of_full_svd(tmp_path: Path) -> None:
    """A difference of full rank: the streamed range finder's error against the optimum, a full
    fp32 SVD truncated at the same rank (what mergekit-extract-lora computes)."""
    base_dir, target_dir, base, target = pair(tmp_path, torch.float32, noisy_target)
    make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK,
               block_size=SMALL_BLOCK)
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for name in matrices(base):
        diff = target[name] - base[name]
        module = PREFIX + name.removesuffix(".weight")
        approx = adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        best = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]
        ours = float((diff - approx).norm() / diff.norm())
        optimum = float((diff - best).norm() / diff.norm())
        assert ours <= optimum * 1.01, (name, ours, optimum)


def test_same_command_writes_the_same_bytes(tmp_path: Path) -> None:
    base_dir, target_dir, _, _ = pair(tmp_path, torch.bfloat16, noisy_target)
    for out in ("one", "two"):
        make_delta(base_dir, target_dir, tmp_path / out, kind="lora", rank=RANK,
                   block_size=SMALL_BLOCK)
    for name in ("adapter_model.safetensors", "adapter_config.json", "deltamerge.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_matrices_are_read_a_block_of_rows_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """The working set: no read of more rows than a block, and the range finder's matrices
    (rows + cols) x (rank + oversampling), never rows x cols."""
    base_dir, target_dir, _, _ = pair(tmp_path, torch.float32, noisy_target)
    reads: list[int] = []
    made: list[tuple[int, ...]] = []
    real_empty = torch.empty

    def empty(*shape, **kw):
        made.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        return real_empty(*shape, **kw)

    monkeypatch.setattr(lora_extract.torch, "empty", empty)
    name = "model.layers.0.mlp.gate_proj.weight"  # 172 x 64
    with open_checkpoint(base_dir) as base, open_checkpoint(target_dir) as target:
        read = base.read_rows

        def counted(n, r0, r1, buf):
            reads.append(r1 - r0)
            return read(n, r0, r1, buf)

        monkeypatch.setattr(base, "read_rows", counted)
        found = lora_extract.factorize(base, target, name, RANK, block_bytes=64 * 8 * 10)
    assert found is not None and max(reads) == 10
    assert len(reads) == 18 * (2 + 2 * lora_extract.POWER_ITERATIONS)  # ceil(172 / 10) blocks a pass
    k = RANK + lora_extract.oversampling(RANK)
    assert (172, k) in made and not any(172 * 64 <= int(torch.tensor(s).prod()) for s in made)


def make_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["make-delta", *map(str, args), "-q"])
    assert isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def test_refusals(tmp_path: Path) -> None:
    base_dir, target_dir, base, _ = pair(tmp_path, torch.float16, noisy_target)
    out = tmp_path / "lora"
    code, err = make_cli(base_dir, target_dir, out, "--kind", "lora")
    assert code == 2 and "needs --rank" in err
    code, err = make_cli(base_dir, target_dir, out, "--kind", "add", "--rank", "4")
    assert code == 2 and "--rank applies to --kind lora only" in err
    code, err = make_cli(base_dir, base_dir, out, "--kind", "lora", "--rank", "4")
    assert code == 2 and "every weight is the base's" in err
    grown = dict(base)
    grown["lm_head.weight"] = torch.cat([base["lm_head.weight"], base["lm_head.weight"][:2]])
    grown["model.embed_tokens.weight"] = torch.cat(
        [base["model.embed_tokens.weight"], base["model.embed_tokens.weight"][:2]])
    save_checkpoint(grown, tmp_path / "grown")
    code, err = make_cli(base_dir, tmp_path / "grown", out, "--kind", "lora", "--rank", "4")
    assert code == 2 and "cannot add rows" in err and "'lm_head.weight' has 98 rows" in err
    assert not out.exists() and not any(p.name.startswith(".lora") for p in tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_norm_only_change_is_an_adapter_of_saved_modules(tmp_path: Path, dtype) -> None:
    def norm_only(base):
        target = {n: t.clone() for n, t in base.items()}
        target["model.layers.0.input_layernorm.weight"] += 0.5
        return target

    base_dir, target_dir, _, target = pair(tmp_path, dtype, norm_only)
    make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == "dummy-target-modules"
    assert config["modules_to_save"] == ["model.layers.0.input_layernorm"]
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
    reference = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    assert apply_delta(base_dir, tmp_path / "lora", tmp_path / "out").verified
    got = load_state(tmp_path / "out")
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
        assert torch.equal(tensor, target[name]), name


def test_an_interrupted_extraction_resumes_from_scratch(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C keeps the partial folder; --resume (the same command) starts the extraction over
    in it and writes what an uninterrupted run writes."""
    from deltamerge.engine import lifecycle
    from deltamerge.engine.journal import JOURNAL_NAME
    from deltamerge.errors import InputError, InterruptedRun

    base_dir, target_dir, _, _ = pair(tmp_path, torch.float16, noisy_target)
    make_delta(base_dir, target_dir, tmp_path / "clean", kind="lora", rank=RANK)
    publish = lifecycle.publish

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "publish", interrupted)
    with pytest.raises(InterruptedRun, match="--resume"):
        make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK)
    assert not (tmp_path / "lora").exists()
    assert (tmp_path / ".lora.deltamerge-partial" / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(lifecycle, "publish", publish)
    with pytest.raises(InputError, match="--resume"):  # without it the leftover is refused
        make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK)
    make_delta(base_dir, target_dir, tmp_path / "lora", kind="lora", rank=RANK, resume=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "deltamerge.json"):
        assert (tmp_path / "lora" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not (tmp_path / ".lora.deltamerge-partial").exists()
    assert not (tmp_path / "lora" / JOURNAL_NAME).exists()


def test_matrices_narrower_than_the_rank_get_their_own(tmp_path: Path) -> None:
    """Grouped-query attention: k_proj and v_proj have 16 rows, fewer than rank 32; their rank is
    16 in rank_pattern and alpha_pattern (scale 1 still), and peft loads and merges them so."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=96)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = load_state(tmp_path / "base")
    save_checkpoint(noisy_target(base), tmp_path / "target", config=config.to_dict())
    make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "lora", kind="lora", rank=32)
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    narrow = {"model.layers.0.self_attn.k_proj": 16, "model.layers.0.self_attn.v_proj": 16}
    assert adapter_config["r"] == adapter_config["lora_alpha"] == 32
    assert adapter_config["rank_pattern"] == adapter_config["alpha_pattern"] == narrow
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    assert apply_delta(tmp_path / "base", tmp_path / "lora", tmp_path / "out").verified
    for name, tensor in load_state(tmp_path / "out").items():
        assert torch.equal(tensor, reference[name]), name
