"""Mixed precision by sensitivity: the delta's energy as the dense delta gives it, the ranking and its
budget, and the mix file against llama.cpp's own per-tensor overrides."""

import json
import shutil

import gguf as gguf_py
import pytest
import torch

from fasttune import calibrate, convert, mix, quantize
from fasttune.lora_gguf import gguf_names, read_adapter
from fasttune import gguf_file


def test_promoted_takes_the_most_energy_per_weight_within_the_share():
    energy = {"a": (5.0, 100), "b": (9.0, 300), "c": (1.0, 100), "d": (5.0, 100), "e": (0.5, 400)}  # 1,000 weights
    assert mix.promoted(energy, 0.0) == []
    assert mix.promoted(energy, 0.3) == ["b"]
    # b (300 of the 1,000 weights) goes first; a and d tie on energy: the name orders them, and only one fits
    assert mix.promoted(energy, 0.45) == ["b", "a"]
    assert mix.promoted(energy, 0.25) == ["a", "d"]  # b does not fit: the next that do are taken
    assert mix.promoted(energy, 1.0) == ["b", "a", "d", "c", "e"]


@pytest.fixture(scope="module")
def run_with_matrix(trained_run):
    """The shared run (read, not changed) and the importance matrix its export computed."""
    run = trained_run[0]
    return run, calibrate.ImportanceMatrix.load(run / "gguf" / "imatrix.gguf").values()


def test_energy_is_the_importance_weighted_dense_delta(run_with_matrix, tmp_path):
    run, imatrix = run_with_matrix
    adapter = tmp_path / "adapter"  # the run's adapter with alpha / r = 3 (the run's own scale is 1)
    shutil.copytree(run / "adapter", adapter)
    peft = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(peft, lora_alpha=3 * peft["r"])))
    energy = mix.delta_energy(adapter, run / "merged", imatrix)
    pairs, scale = read_adapter(adapter)
    assert scale == 3
    from transformers import AutoConfig

    names = gguf_names(AutoConfig.from_pretrained(run / "merged"))
    assert len(energy) == len(pairs) == 14  # 2 layers x 7 projections, under their GGUF names
    for hf_name, ab in pairs.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        delta = scale * (ab["b"].double() @ ab["a"].double())  # out x in, formed here only to check
        want = float((delta**2 * torch.from_numpy(imatrix[name]).double()).sum()) / delta.numel()
        assert energy[name] == (pytest.approx(want, rel=1e-9), delta.numel())
    assert len({e for e, _ in energy.values()}) > 1  # the tensors differ: there is something to rank


def test_a_mix_is_the_file_llama_cpp_writes_with_the_overrides_pinned(run_with_matrix, tmp_path):
    """mix.write takes the promoted tensors' bytes from the q8_0 file (written as export writes it) into
    llama.cpp's plain q4_k_m file: byte for byte the file llama.cpp's quantizer writes from the bf16 file
    with those tensors overridden to q8_0 and every other one pinned to its plain type. llama.cpp gives
    attn_v and ffn_down more bits in some layers (here layer 1 of 2) by counting layers as it goes, and
    the mix keeps that protection where it was."""
    run, imatrix = run_with_matrix
    bf16 = run / "gguf" / "memorize-bf16.gguf"
    q8 = convert.convert(run / "merged", tmp_path / "q8_0.gguf", "q8_0")
    plain = quantize.quantize(bf16, tmp_path / "plain.gguf", "q4_k_m", imatrix=imatrix)
    energy = {name: (0.0, 1) for name in mix.delta_energy(run / "adapter", run / "merged", imatrix)}
    energy["blk.0.attn_v.weight"] = (1.0, 1)  # 10 % of 14 unit tensors: this one alone is promoted
    mixed = mix.write("q4_k_m-mix10", energy, {"q4_k_m": plain, "q8_0": q8}, tmp_path / "mixed.gguf")

    plain_types = {n: t.tensor_type for n, t in gguf_file.read(plain).tensors.items()}
    pinned = {n: t.name.lower() for n, t in plain_types.items() if t.name not in ("F32", "F16", "BF16")}
    by_llama_cpp = quantize.quantize(bf16, tmp_path / "by_llama_cpp.gguf", "q4_k_m", imatrix=imatrix,
                                     overrides=pinned | {"blk.0.attn_v.weight": "q8_0"})
    assert mixed.read_bytes() == by_llama_cpp.read_bytes()
    mixed_types = {n: t.tensor_type for n, t in gguf_file.read(mixed).tensors.items()}
    q8_0 = gguf_py.GGMLQuantizationType.Q8_0
    assert mixed_types["blk.0.attn_v.weight"] == q8_0 and plain_types["blk.0.attn_v.weight"] != q8_0
    assert {n: t for n, t in mixed_types.items() if n != "blk.0.attn_v.weight"} == {
        n: t for n, t in plain_types.items() if n != "blk.0.attn_v.weight"}
    assert plain_types["blk.1.attn_v.weight"] != plain_types["blk.0.attn_v.weight"]  # the layer llama.cpp protects
    assert mixed.stat().st_size > plain.stat().st_size
    with pytest.raises(ValueError, match=r"tensors missing: \['blk.9.attn_v.weight'\]"):  # not a layer of this model
        gguf_file.write_swapped(plain, q8, {"blk.9.attn_v.weight"}, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("bad.gguf*"))


def test_the_real_ranking_promotes_within_its_share(run_with_matrix):
    run, imatrix = run_with_matrix
    energy = mix.delta_energy(run / "adapter", run / "merged", imatrix)
    chosen = mix.promoted(energy, 0.25)
    share = sum(energy[n][1] for n in chosen) / sum(n for _, n in energy.values())
    assert chosen and 0 < share <= 0.25 and max(energy, key=lambda n: energy[n][0]) in chosen
