"""The evaluation report: ``DIR/report.md`` (pictures beside it) and ``DIR/index.html``, which
embeds every picture so the one file can be mailed or attached as it is.

Both are rendered from one list of blocks (heading, paragraph, table, image, code), so the two
always hold the same sections.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from deepfake_dist.atomic import write_text_atomic
from deepfake_dist.evaluation.compare import cells, title

SECTIONS = ("Command", "Data", "Comparison", "Metrics", "Per source", "Calibration", "Robustness",
            "Training curves", "Grad-CAM", "Feature maps", "Model card", "How to read this report")


def _f(value, fmt: str = "{:.4f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _metrics_table(metrics: dict, val_split: str) -> tuple[list[str], list[list[str]]]:
    headers = ["metric", "threshold 0.5"]
    if "val" in metrics:
        headers.append(f"threshold {metrics['val']['threshold']:.4f} (chosen on {val_split})")
    names = [("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall (fakes caught)"),
             ("f1", "F1"), ("auroc", "ROC-AUC"), ("ap", "average precision"), ("eer", "equal error rate")]
    rows = [[label, *(_f(m.get(key)) for m in (metrics["0.5"], metrics.get("val")) if m is not None)]
            for key, label in names]
    for i, label in enumerate(("real called real / fake", "fake called real / fake")):
        rows.append([label, *(f"{m['confusion'][i][0]} / {m['confusion'][i][1]}"
                              for m in (metrics["0.5"], metrics.get("val")) if m is not None)])
    return headers, rows


def _sources_table(sources: list[dict]) -> tuple[list[str], list[list[str]]]:
    at_val = any("accuracy@val" in s for s in sources)
    headers = ["source", "samples", "mean p(fake)", "accuracy@0.5", *(["accuracy@val"] if at_val else []),
               "ROC-AUC vs other class"]
    rows = [[s["source"], str(s["samples"]), _f(s["mean_score"]), _f(s["accuracy@0.5"]),
             *([_f(s.get("accuracy@val"))] if at_val else []), _f(s.get("auroc_vs_other"))] for s in sources]
    rows.append(["all", str(sum(s["samples"] for s in sources)), "", "", *([""] if at_val else []), ""])
    return headers, rows


def _modalities_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    return (["label", "scored by", "samples", "fakes", "accuracy", "ROC-AUC", "AP"],
            [[r["label"], r["head"], str(r["samples"]), str(r["fakes"]), _f(r["accuracy"]), _f(r["auroc"]), _f(r["ap"])]
             for r in rows])


def _categories_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    at_val = any("accuracy@val" in r for r in rows)
    headers = ["category", "label", "samples", "mean p(fake)", "accuracy@0.5", *(["accuracy@val"] if at_val else []),
               "ROC-AUC vs real"]
    return headers, [[r["category"], r["label"], str(r["samples"]), _f(r["mean_score"]), _f(r["accuracy@0.5"]),
                      *([_f(r.get("accuracy@val"))] if at_val else []), _f(r.get("auroc_vs_real"))] for r in rows]


def _robustness_table(run: dict) -> tuple[list[str], list[list[str]]]:
    clean = run["metrics"]
    headers = ["perturbation", "accuracy@0.5", "F1@0.5", "ROC-AUC", "ΔROC-AUC", "AP", "EER", "accuracy@val"]
    rows = []
    for r in [{"perturbation": "none (clean)", **clean}, *run["robustness"]]:
        m = r["0.5"]
        delta = None if m.get("auroc") is None or clean["0.5"].get("auroc") is None else m["auroc"] - clean["0.5"]["auroc"]
        rows.append([r["perturbation"], _f(m["accuracy"]), _f(m["f1"]), _f(m.get("auroc")), _f(delta, "{:+.4f}"),
                     _f(m.get("ap")), _f(m.get("eer")), _f(r.get("val", {}).get("accuracy"))])
    return headers, rows


def _card_blocks(card: dict) -> list:
    facts = [["model", card["model"]], ["constructor arguments", str(card["model_args"] or "{}")],
             ["input", (f"{card['build_args'].get('in_channels', '?')} channel(s), {card['resolution']} px, "
                        f"normalize {card['normalize']}")],
             ["parameters", f"{card['parameters']:,}"], ["Grad-CAM layer", str(card["gradcam_layer"])],
             ["exported at step", str(card["step"])],
             ["validation metrics at export",
              ", ".join(f"{k} {v:.4g}" for k, v in card["val_metrics"].items() if isinstance(v, (int, float)))],
             ["deepfake_dist version", str(card["package_version"])]]
    modules = [[m["name"], m["type"], f"{m['parameters']:,}"] for m in card["modules"]]
    manifests = [[m["path"], m["id"], str(m.get("source", "")),
                  m.get("note") or ("matches" if m.get("matches") else "differs from the set on disk now")]
                 for m in card["manifests"]]
    return [("table", ["", ""], facts), ("p", "Architecture:"), ("table", ["module", "type", "parameters"], modules),
            ("p", "Training data (shard set manifests):"), ("table", ["set", "manifest id", "source", "on disk"], manifests),
            ("p", "Training config:"), ("code", card["config_yaml"])]


def blocks(summary: dict) -> list:
    split, val_split = summary["split"], summary["val_split"]
    runs = summary["runs"]
    rows = [r["row"] for r in runs]
    out: list = [("h1", f"Detector evaluation on the {split} split"),
                 ("h2", "Command"), ("p", f"Created {summary['created']} on {summary['world_size']} process(es) by:"),
                 ("code", summary["command"]),
                 ("h2", "Data"),
                 ("table", ["set", "manifest id", "source", f"{split} images", f"{val_split} images"],
                  [[d["path"], d["id"], str(d["source"]), str(d[split]), str(d[val_split])] for d in summary["data"]]),
                 ("h2", "Comparison"), ("p", title(rows)), ("table", *cells(rows))]
    figures = summary["figures"]
    out += [("img", figures[k], alt) for k, alt in (("roc", "ROC curves"), ("pr", "precision-recall curves")) if k in figures]
    for run in runs:
        row, figs, cal = run["row"], run.get("figures", {}), run["calibration"]
        out += [("h2", f"{run['run']} ({row['model']})"), ("p", f"Checkpoint: {run['checkpoint']}"),
                ("h3", "Metrics"), ("table", *_metrics_table(run["metrics"], val_split))]
        if "val" not in run["metrics"]:
            out.append(("p", (f"No threshold was chosen: the sets have no {val_split} split with both classes "
                              f"(a threshold is never tuned on {split}).")))
        out.append(("img", figs.get("confusion"), "confusion matrices"))
        if "video" in run:
            video = run["video"]
            out += [("h3", "Video level"),
                    ("p", (f"{video['videos']} videos; a video's probability of fake is the {video['aggregate']} of "
                           f"its samples' (clips or frames); its threshold is chosen on the {val_split} videos.")),
                    ("table", *_metrics_table(video["metrics"], val_split))]
        out += [("h3", "Per source"), ("table", *_sources_table(run["sources"]))]
        if "modalities" in run:
            out += [("h3", "Per modality"),
                    ("p", "Each label of a clip (overall: any fake; video: fake frames; audio: fake sound) scored with "
                          "the model's head of that name, or its only logit; clips without sound do not count for "
                          "audio. Accuracy at 0.5."),
                    ("table", *_modalities_table(run["modalities"])),
                    ("h3", "Per category"), ("table", *_categories_table(run["categories"]))]
        cal_rows = [["expected calibration error (test, as trained)", _f(cal["ece"])]]
        if "temperature" in cal:
            cal_rows += [[f"temperature fitted on {val_split}", _f(cal["temperature"])],
                         ["expected calibration error (test, after temperature scaling)", _f(cal["ece_scaled"])]]
        out += [("h3", "Calibration"), ("table", ["", ""], cal_rows), ("img", figs.get("reliability"), "reliability diagram")]
        out.append(("h3", "Robustness"))
        if run["robustness"]:
            out += [("p", "The test images perturbed before the model's preprocessing."), ("table", *_robustness_table(run))]
        else:
            out.append(("p", "Not measured (--no-robustness)."))
        out.append(("h3", "Training curves"))
        out.append(("img", figs["curves"], "training curves") if "curves" in figs else
                   ("p", "No metrics.jsonl next to this checkpoint."))
        for section, key in (("Grad-CAM", "gradcam"), ("Grad-CAM over the spectrogram", "spectrogram"),
                             ("Feature maps", "features")):
            if key == "spectrogram" and key not in figs:  # only a model that hears and sees draws both
                continue
            out.append(("h3", section))
            out.append(("img", figs[key], section) if key in figs else ("p", "Not drawn (--no-explain)."))
        out += [("h3", "Model card"), *_card_blocks(run["card"])]
    out += [("h2", "How to read this report"),
            ("p", ("Fake is the positive class: precision is the share of images called fake that are fake, recall "
                   "the share of fakes caught. An image is called fake when its probability is above the threshold. "
                   f"Metrics are given at 0.5 and at the threshold that maximises balanced accuracy on the {val_split} "
                   f"split; nothing is tuned on the {split} split. ROC-AUC, average precision and the equal error rate "
                   "do not depend on a threshold. Expected calibration error uses 15 equal-width bins of the "
                   "probability of fake; the temperature is stored in the model's JSON and used by predict."))]
    return out


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [headers, *rows]]
    return "\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(r) + " |" for r in esc[1:])])


def render_markdown(items: list) -> str:
    parts = []
    for kind, *args in items:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            parts.append(args[0])
        elif kind == "table":
            parts.append(_md_table(*args))
        elif kind == "img":
            parts.append(f"![{args[1]}]({args[0]})")
        elif kind == "code":
            parts.append("```\n" + args[0].rstrip("\n") + "\n```")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
pre{background:#f5f5f5;padding:.6em;overflow-x:auto}h2{border-bottom:1px solid #ddd;margin-top:2em}"""


def render_html(items: list, folder: Path) -> str:
    e = html.escape
    parts = []
    for kind, *args in items:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(args[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(args[0])}</p>")
        elif kind == "table":
            headers, rows = args
            head = "".join(f"<th>{e(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / args[0]).read_bytes()).decode()
            parts.append(f'<img alt="{e(args[1])}" src="data:image/png;base64,{data}">')
        elif kind == "code":
            parts.append(f"<pre><code>{e(args[0])}</code></pre>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Detector evaluation</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(out: Path, summary: dict) -> tuple[Path, Path]:
    """Write ``out/report.md`` and the self-contained ``out/index.html``; returns both paths."""
    items = blocks(summary)
    written = []
    for name, text in (("report.md", render_markdown(items)), ("index.html", render_html(items, out))):
        write_text_atomic(out / name, text)
        written.append(out / name)
    return written[0], written[1]
