"""report.html: a self-contained page that a real browser (headless Chromium) renders with its plots."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from edgequant.reporting import BITS_COLOURS, BITS_RANGE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/install installs it)")
GGUF_STAR = (214, 39, 40)  # the red of this build's GGUF point in the size-quality plot


def chromium(*args, timeout=120):
    # --no-sandbox: CI runs as root; no network is needed, the page is one file
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def rendered_dom(page) -> str:
    return chromium("--dump-dom", page.as_uri()).stdout


def screenshot(page, png, height=2600):
    chromium(f"--screenshot={png}", f"--window-size=1200,{height}", page.as_uri())
    return (imread(png)[..., :3] * 255).round().astype(int)


def pixels_near(image, rgb, tolerance=12) -> int:
    return int((np.abs(image - np.array(rgb)).max(-1) <= tolerance).sum())


def bits_colour(bits: float):
    lo, hi = BITS_RANGE
    return tuple(round(c * 255) for c in colormaps[BITS_COLOURS]((bits - lo) / (hi - lo))[:3])


@needs_chromium
def test_the_default_builds_page_shows_summary_bit_map_and_size_quality_plot(readme, tmp_path):
    work, _, _ = readme
    page = work / "out" / "report.html"
    report = json.loads((work / "out" / "report.json").read_text())
    dom = rendered_dom(page)
    for section in ("summary", "bitmap", "size-quality", "sensitivity", "bench", "commands"):
        assert f'id="{section}"' in dom
    assert "SmolLM2-135M-Instruct" in dom and report["device"]["title"] in dom
    assert f"{report['artifacts'][0]['bytes'] / 1e6:.1f} MB" in dom
    assert dom.count("<svg") >= 2 and "bits per weight" in dom and "KL divergence vs full precision" in dom
    assert "<script" not in dom and "http://" not in dom.split("<svg")[0]  # nothing to fetch: it opens offline

    image = screenshot(page, tmp_path / "page.png")
    assert image.shape[:2] == (2600, 1200)
    # the bit map: every part of this build is Q8_0 (8.5 bits); the plot: the GGUF's red star
    assert pixels_near(image, bits_colour(8.5)) > 20_000
    assert pixels_near(image, GGUF_STAR) > 50


@needs_chromium
def test_a_mixed_build_shows_its_sensitivity_table_and_llama_cpps_ladder(tiny_build, tiny_model, tmp_path):
    """A QuBLAST mix of a tiny model, and llama.cpp's own Q2_K of the same model (from an F32 copy
    of its Q8_0 build) scored as bench/ladder.py scores the stock mixes."""
    from edgequant.pipeline import evaluate_file, gguf_tensor_stats
    from runtimes.llama_quantize import quantize_stock, write_f32_copy

    out = tmp_path / "mixed"
    shutil.copytree(tiny_build(method="qublast-rtn", scaling_maps=False, bpw=4.0, sensitivity_tokens=256, formats="gguf")[0], out)
    report = json.loads((out / "report.json").read_text())
    write_f32_copy(tiny_build(ggml_type="Q8_0")[0] / "model.gguf", tmp_path / "f32.gguf")
    quantize_stock(tmp_path / "f32.gguf", tmp_path / "Q2_K.gguf", "Q2_K")
    stock = evaluate_file(tmp_path / "Q2_K.gguf", str(tiny_model()), eval_tokens=512)["quality"]
    n_bytes, n_params = gguf_tensor_stats(tmp_path / "Q2_K.gguf")
    ladder = tmp_path / "ladder.json"
    ladder.write_text(json.dumps({"model": report["model"]["name"], "tokens": stock["tokens"],
                                  "rows": [{"file": "llama.cpp Q2_K", "bpw": n_bytes * 8 / n_params, **stock}]}))
    done = subprocess.run([sys.executable, "-m", "edgequant.cli", "report", str(out), "--ladder", str(ladder)],
                          capture_output=True, text=True, check=True)
    page = out / "report.html"
    assert done.stdout.strip() == str(page)
    dom = rendered_dom(page)
    assert "llama.cpp mixes" in dom and "Q2_K" in dom  # the ladder's point, labelled
    assert dom.count('class="chosen"') == len(report["blocks"])  # one chosen type per block part
    image = screenshot(page, tmp_path / "mixed.png", height=3200)
    mixed = {b["bits"] for b in report["blocks"] if b["index"] >= 0}
    assert sum(pixels_near(image, bits_colour(b)) > 500 for b in mixed) >= 2  # several colours: a real mix


def test_report_of_a_folder_that_is_not_a_build_is_one_clean_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgequant.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"edgequant: error: {tmp_path / 'report.json'} not found "
                                                "(is it an edgequant build folder?)"]
