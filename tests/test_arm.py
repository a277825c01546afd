"""Our files on llama.cpp's ARM kernels: the aarch64 builds of llama-perplexity, run under qemu,
against the same files run on this x86 machine.

Every device profile is an ARM board, and llama.cpp's ARM kernels are other code than the x86
ones: NEON dot products, dotprod, i8mm, and weights repacked at load (Q4_0, IQ4_NL, Q4_K, Q5_K,
Q6_K, Q8_0 into 4x4, 4x8 or 8x8 interleaved blocks, whichever the ISA has). One file carries every
ggml type we emit, one type per matrix; each ISA's build runs it with repacking (llama.cpp's
default) and without. Under emulation only correctness counts, never speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgequant.assets import EVALUATION_TEXT, read_text
from edgequant.ggml_quants import TYPES, EncodedTensor, get_type
from runtimes.rpc import kld_against, save_logits, tool

# The builds .ci/install makes, and the qemu CPU that has each one's features (and no more):
# phones (i8mm), the Raspberry Pi 5 and Jetson Orin (dotprod), the Raspberry Pi 4 (plain ARMv8).
ISAS = {"armv8.2-a+fp16+dotprod+i8mm": "max,sve=off", "armv8.2-a+fp16+dotprod": "cortex-a76", "armv8-a": "cortex-a72"}
CTX = ["-c", "256", "-b", "256"]
# llama.cpp's kernels accumulate in other orders on ARM (and quantize activations to 8 bits in
# other blocks), so the logits differ by rounding, never by more
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def mixed_file(tiny_model, tmp_path_factory):
    """A tiny llama (3 blocks, widths of 256) whose 22 matrices take every ggml type we emit in
    turn, each rounded by our encoders."""
    from edgequant.models import load_model
    from exporters.gguf import write_gguf

    loaded = load_model(str(tiny_model("llama", num_hidden_layers=3)))
    names = list(TYPES)
    encoded = {}
    for i, (name, w) in enumerate(loaded.matrices()):
        t = names[i % len(names)]
        encoded[name] = EncodedTensor(t, get_type(t).quantize(w.detach().float().numpy()))
    assert set(e.ggml_type for e in encoded.values()) == set(TYPES)
    folder = tmp_path_factory.mktemp("arm")
    path = folder / "mixed.gguf"
    write_gguf(path, loaded, encoded, "rtn")
    text = folder / "text.txt"
    text.write_text(read_text(EVALUATION_TEXT)[:20000])
    base = folder / "x86.kld"
    save_logits(path, text, base, 3, 2, CTX)  # this machine's kernels (repacked where x86 repacks)
    return path, base


RUNS = [(isa, repack) for isa in ISAS for repack in (True, False) if isa != "armv8-a" or repack]  # plain ARMv8 repacks nothing


@pytest.mark.parametrize("isa, repack", RUNS, ids=[f"{isa}-{'default' if r else 'no-repack'}" for isa, r in RUNS])
def test_every_type_we_emit_runs_on_arm_as_on_x86(mixed_file, isa, repack):
    path, base = mixed_file
    qemu = ["qemu-aarch64-static", "-cpu", ISAS[isa], str(tool("llama-perplexity", isa))]
    result = kld_against(base, path, CTX + ([] if repack else ["-nr"]), 2, perplexity=qemu)
    assert result["kld"] < TOLERANCE, result  # measured 7e-6 on every ISA, repacked or not
    assert result["same_top1"] >= 0.9, result  # a random model's near-ties: measured 0.971-0.982


def test_the_comparison_sees_a_wrong_file(mixed_file, tiny_model, tmp_path):
    """The check can fail: the same file with one matrix's rows misplaced is far off (measured
    KLD 0.014, against 7e-6 for the ARM runs)."""
    path, base = mixed_file
    from edgequant.models import load_model
    from exporters.gguf import write_gguf

    loaded = load_model(str(tiny_model("llama", num_hidden_layers=3)))
    names = list(TYPES)
    encoded = {name: EncodedTensor(names[i % len(names)], get_type(names[i % len(names)]).quantize(w.detach().float().numpy()))
               for i, (name, w) in enumerate(loaded.matrices())}
    name = next(n for n in encoded if n.endswith("ffn_down.weight"))
    w = dict(loaded.matrices())[name].detach().float().numpy()
    encoded[name] = EncodedTensor("Q8_0", get_type("Q8_0").quantize(np.roll(w, 1, axis=0)))  # rows misplaced
    wrong = Path(tmp_path) / "wrong.gguf"
    write_gguf(wrong, loaded, encoded, "rtn")
    result = kld_against(base, wrong, CTX, 2)
    assert result["kld"] > 5 * TOLERANCE, result
