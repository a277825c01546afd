"""``report.html``: the page a person reads about a build, made from the folder's JSON files.

Everything comes from what the build (and ``edgequant bench``) wrote: ``report.json`` (model,
device, plan, quality, bench), ``plan.json`` (the sensitivity table) and, when the ladder
benchmark has been run for the same model, its ``ladder.json`` (llama.cpp's own mixes). The page
is one file: the CSS is inline and the plots are inline SVG made with matplotlib, so it opens
offline and can be mailed around.
"""

from __future__ import annotations

import io
import json
from html import escape
from pathlib import Path

from .assets import cache_dir
from .atomic import write_text
from .errors import EdgequantError
from .fleet import layers_held, ts_option

PAGE = "report.html"
PARTS = {"attn": "attention", "ffn": "MLP", "ssm": "SSM mixer"}  # the bit map's rows, those a model has
BITS_COLOURS, BITS_RANGE = "viridis", (1.5, 9.0)  # IQ1_S to Q8_0: one scale for every build, so pages compare at a glance


def ladder_file(model_name: str) -> Path:
    """Where ``bench/ladder.py`` leaves its results for ``model_name``, for reports to pick up."""
    return cache_dir() / "ladder" / f"{model_name.replace('/', '_')}.json"


def write_report(folder: Path, ladder: Path | None = None, shown_as: Path | None = None) -> Path:
    """(Re)write ``folder/report.html``; ``ladder`` defaults to the ladder results of the build's model.
    ``shown_as`` is the folder's name in the page's commands (the build writes into a staging folder)."""
    folder = Path(folder)
    report = read_json(folder / "report.json", "an edgequant build folder")
    plans = [p for p in (folder / "plan.json", folder / "plan-onnx.json") if p.exists()]  # the first artifact's plan
    plan = read_json(plans[0], "an edgequant build folder") if plans else {}
    ladder_path = Path(ladder) if ladder else ladder_file(report["model"]["name"])
    rungs = read_json(ladder_path, "a ladder.json from bench/ladder.py") if ladder or ladder_path.exists() else None
    if rungs and rungs.get("model") not in (None, report["model"]["name"]):
        rungs = None  # another model's ladder says nothing about this one
    page = folder / PAGE
    write_text(page, render(report, plan, rungs, shown_as or folder))
    return page


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise EdgequantError(f"{path} not found (is it {what}?)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgequantError(f"{path} is not valid JSON ({e})") from None


def render(report: dict, plan: dict, ladder: dict | None, folder: Path) -> str:
    """The whole page as one HTML string."""
    title = f"{report['model']['name']} for {report['device']['name']}"
    sections = [
        _summary(report),
        _section("Bit map", "bitmap", _bitmap_svg(report["blocks"]),
                 "Bits per weight of every block part (attention q/k/v/o, MLP gate/up/down), with its type "
                 f"({'ggml' if report['artifacts'][0]['format'] == 'gguf' else 'ONNX Runtime MatMulNBits'})."),
        *([_section("ONNX bit map", "onnx-bitmap", _bitmap_svg(report["onnx_blocks"]),
                    "The ONNX folder's own plan (plan-onnx.json), in ONNX Runtime's MatMulNBits configurations "
                    "MNB{bits}_B{block}_{SYM|ZP}.")]
          if report.get("onnx_blocks") else []),
        *([_section("Pruning", "pruning", _pruning_table(report["pruning"]),
                    "What each block of the file keeps: FFN channels, query heads, KV heads (pruned ones in bold).")]
          if report.get("pruning") else []),
        _section("Size and quality", "size-quality", _size_quality_svg(report, ladder), _ladder_note(report, ladder)),
        _section("Sensitivity", "sensitivity", _sensitivity_table(report, plan),
                 "KL divergence of the model's output when only that part is quantized to that type "
                 "(nats/token; the chosen type is bold)."),
        *([_section("Split across devices", "split", _split_table(report),
                    "llama.cpp's RPC backend runs each device's layers on it, one device after another for every "
                    "token; the RPC protocol has no authentication, so the workers must stay on a private network.")]
          if "split" in report["predicted"] else []),
        _section("Speed on the device", "bench", _bench_table(report), ""),
        *([_section("Speed on each device of a fleet", "fleet", _fleet_tables(report["bench_fleet"]),
                    "The same files benched on every target at once (edgequant bench --fleet); each runs the whole model.")]
          if report.get("bench_fleet") else []),
        _section("Deploy and bench", "commands", _commands(report, folder), ""),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · edgequant</title>
<style>{CSS}</style></head>
<body><h1>{escape(title)}</h1>
{''.join(sections)}
<footer>edgequant {escape(report.get('edgequant', ''))} · made from report.json and plan.json in this folder;
regenerate with <code>edgequant report {escape(str(folder))}</code></footer>
</body></html>
"""


CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
.card{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:.6em}
.card div{background:#f4f6f8;border-radius:6px;padding:.6em .8em}
.card b{display:block;font-size:.8em;color:#567;text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;font-size:.9em} td,th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left} .chosen{font-weight:bold;background:#eef5ff}
.tables{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start} caption{font-weight:bold;text-align:left}
.note{color:#555;font-size:.9em} pre{background:#f4f6f8;padding:.8em;overflow-x:auto} svg{max-width:100%;height:auto}
footer{margin-top:3em;color:#888;font-size:.85em}
"""


def _section(title: str, anchor: str, body: str, note: str) -> str:
    note_html = f'<p class="note">{escape(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{note_html}{body}</section>\n'


def _summary(report: dict) -> str:
    shipped = report["artifacts"][0]
    quality = report["quality"].get("gguf") or report["quality"].get("onnx")
    predicted = report["predicted"]["decode_tok_s"]
    measured = _measured_decode(report)
    items = {
        "model": f"{report['model']['name']} ({report['model']['architecture']})",
        "device": report["device"].get("title") or report["device"]["name"],
        "method": f"{report['method']['name']} · {report['method']['plan']}",
        "size": f"{shipped['bytes'] / 1e6:.1f} MB · {shipped['bpw']:.2f} bpw ({shipped['format']})",
        "decode speed": f"predicted {predicted:.0f} tok/s" + (f" · measured {measured:.0f}" if measured else ""),
        "quality": (f"ppl {quality['ppl']:.2f} (full precision {report['quality']['fp']['ppl']:.2f}) · "
                    f"KLD {quality['kld']:.4f} · top-1 {quality['top1']:.3f} in {quality['runtime']}"),
        **_twin_item(report),
        "evaluation text": f"{report['text']['evaluation']['source']}, {report['text']['evaluation']['tokens']} tokens",
        "build": f"{report['build']['seconds'] / 60:.1f} min, peak RSS {report['build']['peak_rss_mb']:.0f} MB",
    }
    if report.get("transform"):
        items["transform"] = _transform_line(report["transform"])
    cells = "".join(f"<div><b>{escape(k)}</b>{escape(v)}</div>" for k, v in items.items())
    return f'<section id="summary" class="card">{cells}</section>\n'


def _twin_item(report: dict) -> dict[str, str]:
    """The summary's line on llama.cpp's own mix at this size (none when the build made no twin)."""
    twin, quality = report.get("stock"), report["quality"].get("stock")
    if twin and "error" in twin:
        return {"llama.cpp at this size": f"not made: {twin['error']}"}
    if not twin or not quality:
        return {}
    return {"llama.cpp at this size": f"{twin['label']}, {twin['bytes'] / 1e6:.1f} MB · {twin['bpw']:.2f} bpw · "
                                      f"ppl {quality['ppl']:.2f} · KLD {quality['kld']:.4f} · top-1 {quality['top1']:.3f}"}


def _transform_line(details: dict) -> str:
    """The transform's details (SpecQuant's cut, RUQuant's stage 2...) as ``key value`` pairs."""
    def show(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " · ".join(f"{k.replace('_', ' ')} {show(v)}" for k, v in details.items())


def _measured_decode(report: dict) -> float | None:
    rows = [r for r in (report.get("bench") or {}).get("results", []) if r["runtime"] == "llama.cpp"]
    return rows[0]["decode_tok_s"]["median"] if rows else None


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, searchable, selectable
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside HTML


def _bitmap_svg(blocks: list[dict]) -> str:
    """Heat map: block index across, attention / MLP down, colour = bits per weight."""
    import numpy as np

    layers = sorted({b["index"] for b in blocks if b["index"] >= 0})
    parts = [p for p in PARTS if any(b["part"] == p for b in blocks)]
    bits = np.full((len(parts), len(layers)), np.nan)
    names = {}
    for b in blocks:
        if b["index"] >= 0 and b["part"] in parts:
            bits[parts.index(b["part"]), layers.index(b["index"])] = b["bits"]
            names[b["part"], b["index"]] = b["ggml_type"]
    fig = _figure(11, 2.4)
    ax = fig.add_subplot()
    image = ax.imshow(bits, aspect="auto", cmap=BITS_COLOURS, vmin=BITS_RANGE[0], vmax=BITS_RANGE[1])
    ax.set_yticks(range(len(parts)), [PARTS[p] for p in parts])
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("block")
    for (part, index), name in names.items():
        y, x = parts.index(part), layers.index(index)
        ax.text(x, y, name.replace("/", "\n"), ha="center", va="center", fontsize=5, rotation=90,
                color="white" if bits[y, x] < np.nanmean(bits) else "black")
    fig.colorbar(image, ax=ax, label="bits per weight", pad=0.01)
    embd = [b for b in blocks if b["index"] < 0]
    if embd:
        ax.set_title("token embedding / output: " + ", ".join(f"{b['part']} {b['ggml_type']}" for b in embd), fontsize=9)
    return _svg(fig)


def _size_quality_svg(report: dict, ladder: dict | None) -> str:
    """KL divergence against bits per weight: this build's files, and llama.cpp's ladder if measured."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    if ladder:
        for imatrix, style in ((False, "o-"), (True, "s--")):
            rows = sorted((r for r in ladder["rows"] if r["file"].startswith("llama.cpp")
                           and r["file"].endswith("imatrix") == imatrix), key=lambda r: r["bpw"])
            if rows:
                ax.plot([r["bpw"] for r in rows], [r["kld"] for r in rows], style, color="#999", markersize=4,
                        label="llama.cpp mixes" + (" + imatrix" if imatrix else ""))
                for r in rows:
                    ax.annotate(r["file"].split()[1], (r["bpw"], r["kld"]), fontsize=7, color="#777",
                                xytext=(3, 3), textcoords="offset points")
    for key, label, colour in (("gguf", "this build, GGUF in llama.cpp", "#d62728"),
                               ("onnx", "this build, ONNX in onnxruntime", "#1f77b4")):
        art = next((a for a in report["artifacts"] if a["format"] == key), None)
        if art and key in report["quality"]:
            ax.plot([art["bpw"]], [report["quality"][key]["kld"]], "*", markersize=14, color=colour, label=label)
    if report.get("stock") and "stock" in report["quality"]:
        ax.plot([report["stock"]["bpw"]], [report["quality"]["stock"]["kld"]], "D", markersize=8, color="#555",
                label=f"{report['stock']['label']} (same text, same windows)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor data / parameters)")
    ax.set_ylabel("KL divergence vs full precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _ladder_note(report: dict, ladder: dict | None) -> str:
    text = report["text"]["evaluation"]
    ours = f"This build: {text['source']}, {text['tokens']} tokens, windows of {text['ctx']}."
    if not ladder:
        return (ours + " llama.cpp's own mixes appear here once `python bench/ladder.py` has been run "
                "for this model.")
    return ours + f" llama.cpp mixes: from bench/ladder.py, {ladder['tokens']} tokens of the same text."


def _sensitivity_table(report: dict, plan: dict) -> str:
    """One table per kind of part (embedding, attention, MLP): a row per block, a column per type option."""
    table = plan.get("sensitivity")
    if not table:
        return '<p class="note">Not measured for this build (the method did not need it, or every part fit its largest type).</p>'
    chosen = {(f"{b['index']}.{b['part']}" if b["index"] >= 0 else b["part"]): b["ggml_type"] for b in report["blocks"]}
    kinds = {}
    for e in table["entries"]:
        kinds.setdefault(e["part"].rpartition(".")[2], []).append(e)
    tables = [_kind_table(kind, entries, chosen) for kind, entries in sorted(kinds.items(), key=lambda k: KINDS.index(k[0]))]
    return f'<div class="tables">{"".join(tables)}</div>'


KINDS = ("embd", "attn", "ffn", "ssm")


def _kind_table(kind: str, entries: list[dict], chosen: dict) -> str:
    options = sorted({e["option"] for e in entries}, key=lambda o: min(e["bytes"] for e in entries if e["option"] == o))
    kl = {(e["part"], e["option"]): e["kl"] for e in entries}
    head = "".join(f"<th>{escape(o)}</th>" for o in options)
    rows = []
    for part in sorted({e["part"] for e in entries}, key=_part_order):
        cells = "".join(
            f'<td{" class=chosen" if chosen.get(part) == o else ""}>'
            f'{"" if kl.get((part, o)) is None else f"{kl[part, o]:.1e}"}</td>' for o in options)
        rows.append(f"<tr><td>{escape(part.partition('.')[0] if kind != 'embd' else part)}</td>{cells}</tr>")
    title = {"embd": "embedding", **PARTS}[kind]
    return f"<table><caption>{title}</caption><tr><th>block</th>{head}</tr>{''.join(rows)}</table>"


def _part_order(part: str) -> tuple[int, str]:
    """'embd' first, then '0.attn', '0.ffn', '1.attn'... in block order."""
    index, _, name = part.partition(".")
    return (int(index), name) if index.isdigit() else (-1, part)


def _pruning_table(pruning: dict) -> str:
    """Every block's sizes after pruning (the file's block numbering), the blocks removed, and
    the joint search that chose them."""
    search = pruning.get("search")
    line = (f"<p>Chosen by the joint search in {search['seconds']:.0f} s: {search['measurements']} runs of the "
            f"model's tail, KL measured on {search['probe_tokens']} calibration tokens (refits on "
            f"{search['fit_tokens']}); measured KL of the picks {search['measured_kl']:.4f} nats/token.</p>") if search else ""
    if "blocks" not in pruning:
        return line + "<p>Nothing was pruned: every block keeps all its channels and heads.</p>"
    full = pruning["unpruned"]

    def cell(block, key):
        value = str(block[key])
        return f"<td><b>{value}</b></td>" if block[key] < full[key] else f"<td>{value}</td>"

    head = "".join(f"<th>{h}</th>" for h in ("block", "FFN channels", "heads", "KV heads"))
    rows = "".join(f"<tr><td>{i}</td>{cell(b, 'ffn')}{cell(b, 'heads')}{cell(b, 'kv_heads')}</tr>"
                   for i, b in enumerate(pruning["blocks"]))
    removed = ", ".join(map(str, pruning["removed"])) or "none"
    return f"{line}<p>Blocks removed (original numbering): {removed}.</p><table><tr>{head}</tr>{rows}</table>"


def _bench_table(report: dict) -> str:
    predicted = report["predicted"]
    bench = report.get("bench")
    line = (f'<p>Predicted for {escape(report["device"]["name"])}: decode {predicted["decode_tok_s"]:.1f} tok/s, '
            f'prefill {predicted["prefill_tok_s"]:.0f} tok/s, {predicted["memory_bytes"] / 1e6:.0f} MB of '
            f'{predicted["usable_bytes"] / 1e6:.0f} MB usable.</p>')
    ort = ((report.get("plans") or {}).get("onnx") or {}).get("predicted")
    if ort and ort != predicted:  # the ONNX folder, in ONNX Runtime (beside a GGUF)
        line += (f'<p>The ONNX folder in ONNX Runtime: decode {ort["decode_tok_s"]:.1f} tok/s, prefill '
                 f'{ort["prefill_tok_s"]:.0f} tok/s, {ort["memory_bytes"] / 1e6:.0f} MB.</p>')
    if not bench:
        return line + '<p class="note">Not measured yet: run the bench command below.</p>'
    return line + _runs_table(bench)


def _runs_table(bench: dict) -> str:
    """One target's measurements, a row per runtime."""
    head = "".join(f"<th>{h}</th>" for h in ("runtime", "threads", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB",
                                             "predicted RSS MB"))
    rows = "".join(
        f"<tr><td>{escape(r['runtime'])} {escape(str(r['runtime_version']))}</td><td>{r['threads']}</td>"
        f"<td>{r['ttft_s']['median'] * 1e3:.1f}</td><td>{r['prefill_tok_s']['median']:.1f}</td>"
        f"<td>{r['decode_tok_s']['median']:.1f}</td><td>{r['peak_rss_bytes'] / 1e6:.0f}</td>"
        f"<td>{_predicted_rss(r)}</td></tr>"
        for r in bench["results"])
    where = bench["results"][0]["device"]
    return (f"<p>Measured on {escape(bench['target'])} ({escape(where['cpu'])}, {where['cores']} cores), "
            f"median of {bench['results'][0]['repeats']} runs:</p><table><tr>{head}</tr>{rows}</table>")


def _predicted_rss(run: dict) -> str:
    """The memory predicted for a run (ONNX Runtime's rule, at the run's prompt and context), or ''."""
    return f"{run['predicted']['memory_bytes'] / 1e6:.0f}" if run.get("predicted") else ""


def _fleet_tables(fleet: dict) -> str:
    """Per target of a fleet bench: its table and a plot of its rates, or its one-line failure."""
    parts = []
    for row in fleet["targets"]:
        title = f"<h3>{escape(row['member'])} · {escape(row['device'])} · {escape(row['at'])}</h3>"
        if "error" in row:
            parts.append(f"{title}<p>Not measured: {escape(row['error'])}</p>")
            continue
        calibrated = (f"<p class=\"note\">Calibrated profile: {escape(row['calibrated_profile'])}</p>"
                      if row.get("calibrated_profile") else "")
        parts.append(title + _runs_table(row["result"]) + _rates_svg(row["result"]) + calibrated)
    return "".join(parts)


def _rates_svg(bench: dict) -> str:
    """Prefill and decode tok/s of each runtime, as bars."""
    runs = bench["results"]
    fig = _figure(5.5, 0.5 + 0.45 * len(runs))
    axes = fig.subplots(1, 2)
    labels = [r["runtime"] for r in runs]
    for ax, key, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill tok/s", "decode tok/s")):
        ax.barh(labels, [r[key]["median"] for r in runs], color="#4a7fb5")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    return _svg(fig)


def _split_table(report: dict) -> str:
    """Which layers each device holds, its predicted memory, and (after a bench) what it used."""
    split = report["predicted"]["split"]
    measured = (report.get("bench_split") or {}).get("workers", [])  # in the split's order
    head = "".join(f"<th>{h}</th>" for h in ("device", "rpc", "layers", "weights MB", "KV MB", "memory MB (plan)",
                                             "usable MB", "peak RSS MB (bench)"))
    rows = ""
    for i, r in enumerate(split["members"]):
        peak = measured[i]["peak_rss_bytes"] if i < len(measured) else None
        rows += (f"<tr><td>{escape(r['member'])}</td><td>{escape(r['rpc'] or '')}</td>"
                 f"<td>{escape(layers_held(r))}</td>"
                 f"<td>{r['weights_bytes'] / 1e6:.1f}</td><td>{r['kv_cache_bytes'] / 1e6:.1f}</td>"
                 f"<td>{r['memory_bytes'] / 1e6:.0f}</td><td>{r['usable_bytes'] / 1e6:.0f}</td>"
                 f"<td>{'' if peak is None else f'{peak / 1e6:.0f}'}</td></tr>")
    c = split["client"]
    rows += (f"<tr><td>client</td><td></td><td>input embedding</td><td>{c['input_embedding_bytes'] / 1e6:.1f}</td>"
             f"<td></td><td>{c['memory_bytes'] / 1e6:.0f}</td><td></td><td></td></tr>")
    ts = ts_option(split)
    speed = ""
    if report.get("bench_split"):
        s = report["bench_split"]["speed"]
        speed = (f"<p>Measured across the workers: prefill {s['prefill_tok_s']['mean']:.1f} tok/s, "
                 f"decode {s['decode_tok_s']['mean']:.1f} tok/s.</p>")
    return (f"<p>llama.cpp options: <code>-ngl 999 -ts {escape(ts)}</code> ({escape(split['rule'])}).</p>"
            f"<table><tr>{head}</tr>{rows}</table>{speed}")


def _commands(report: dict, folder: Path) -> str:
    target = {"ssh": "ssh://USER@DEVICE/home/USER/edgequant", "adb": "adb:///data/local/tmp/edgequant"}.get(
        report["device"].get("transport"), "local")
    lines = [f"edgequant verify {folder}"]
    if target != "local":
        lines.append(f"edgequant deploy {folder} --to {target}")
    lines += [f"edgequant bench {folder} --target {target}" + ("" if target == "local" else " --calibrate-profile"),
              f"edgequant report {folder}"]
    return f"<pre>{escape(chr(10).join(lines))}</pre>"
