"""Quality claims on the real default model, each with a bound a regression trips (the measured
tables, on more tokens, are in docs/benchmarks.md)."""

import json

from tests.helpers import relative_gap


def test_uniform_q8_0_is_near_full_precision_and_beats_llama_cpps_own_q8_0(readme, stock_mix):
    """The README's Python example builds Q8_0 with RTN (measured on 4096 tokens: KLD 0.0037
    against llama.cpp's own Q8_0 file's 0.0044)."""
    work, _, _ = readme
    q = json.loads((work / "q8" / "report.json").read_text())["quality"]
    assert q["gguf"]["runtime"] == "llama.cpp"
    assert relative_gap(q["gguf"]["ppl"], q["fp"]["ppl"]) < 0.01
    _, stock = stock_mix("Q8_0", tokens=q["gguf"]["tokens"])
    assert q["gguf"]["kld"] < stock.kld, (q["gguf"], stock)
