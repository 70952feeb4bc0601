"""``deepfake-dist compress``: prune, fine-tune, quantize an exported detector, measuring each step.

Every step gets one row: file size (and gzip size, where pruning's zeros pay off), parameters,
non-zero parameters, CPU latency at batch 1 and 32, and accuracy / ROC-AUC on the test split of
the model's own shard sets. The table is printed and saved as ``compress.json`` and
``compress.md`` in the output folder, next to the results:

- ``model.safetensors`` + ``model.json``: the pruned (and fine-tuned) float model, loadable by
  ``models.exported.load_exported`` like any exported model (so it can be exported to ONNX
  or served);
- ``model-int8.pt`` + ``model-int8.json``: the int8 model (see ``deploy.quantize``); its row says
  how many convolutions run in int8, or, for a model torch cannot quantize, why it stays float.

Fine-tuning runs the normal trainer (``train.loop.train``) on the checkpoint's stored config,
starting from the pruned weights; its updates fill the pruned weights back in, so the result is
pruned again by magnitude to the requested sparsity (prune -> fine-tune -> prune).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from deepfake_dist.atomic import write_json_atomic, write_text_atomic
from deepfake_dist.config import apply_override, build_config
from deepfake_dist.data.loader import EvalOptions, eval_loader
from deepfake_dist.deploy.prune import parameter_counts, prune_model, sparsity
from deepfake_dist.deploy.quantize import (
    example_shape,
    quantize_int8,
    quantized_convolutions,
    quantized_layers,
    save_int8,
    weight_counts,
)
from deepfake_dist.engine.metrics import binary_metrics
from deepfake_dist.errors import OUTPUTS_WHOLE, UserError, out_of_space_is_one_line
from deepfake_dist.models.exported import in_channels, load_exported, resolve, write_exported
from deepfake_dist.options import CompressOptions

COLUMNS = {  # JSON key -> table header (narrow enough for an 80-column terminal)
    "step": "step", "file_mb": "MB", "gzip_mb": "gzip MB", "params": "params", "nonzero": "non-zero",
    "latency_b1_ms": "ms b=1", "latency_b32_ms": "ms b=32", "accuracy": "acc", "auroc": "ROC-AUC",
}


def stored_config(info: dict, overrides: list[str] = (), where: str = "model.json"):
    """The training config saved in a model's JSON, with ``key=value`` overrides (e.g. moved shards)."""
    raw = copy.deepcopy(info.get("config") or {})
    if not raw:
        raise UserError(f"{where} has no 'config'; re-export the model with this version of deepfake-dist")
    model = raw.get("model", {})
    raw["model"] = {"name": model.get("name"), **model.get("args", {})}  # to_dict nests the args
    for item in overrides:
        apply_override(raw, item, where=f"{where} (override '{item}')")
    return build_config(raw, where=f"{where} config")


def test_sets(cfg) -> list[str]:
    return sorted(set(cfg.data.train + (cfg.data.val or [])))


@torch.no_grad()
def score(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake probabilities, labels) of every sample of a single-process CPU loader."""
    scores, labels = [], []
    for batch in loader:
        scores.append(torch.sigmoid(model(batch.image).float()))
        labels.append(batch.label)
    return torch.cat(scores), torch.cat(labels)


def cpu_latency_ms(run: Callable[[torch.Tensor], object], shape: tuple[int, ...], threads: int | None = 1,
                   budget_s: float = 1.0, max_runs: int = 50) -> float:
    """Median wall time of ``run(x)`` for a random input of ``shape`` with ``threads`` intra-op
    threads (None: torch's default): 2 warm-up calls, then repeats until ``budget_s`` or
    ``max_runs`` (at least 3). One thread by default: on a shared or small CPU, several threads
    spin against other processes and the figures swing by orders of magnitude."""
    x = torch.randn(shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.no_grad():
            for _ in range(2):
                run(x)
            times, start = [], time.perf_counter()
            while len(times) < 3 or (len(times) < max_runs and time.perf_counter() - start < budget_s):
                t = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def file_sizes(path: Path) -> dict[str, float]:
    data = path.read_bytes()
    return {"file": str(path), "file_mb": len(data) / 1e6, "gzip_mb": len(zlib.compress(data, 6)) / 1e6}


def measure(step: str, model: torch.nn.Module, path: Path, info: dict, loader, counts: tuple[int, int],
            threads: int | None) -> dict:
    scores, labels = score(model, loader)
    metrics = binary_metrics(scores, labels, float(info.get("threshold", 0.5)))
    return {
        "step": step, **file_sizes(path), "params": counts[0], "nonzero": counts[1],
        "latency_b1_ms": cpu_latency_ms(model, example_shape(info, 1), threads),
        "latency_b32_ms": cpu_latency_ms(model, example_shape(info, 32), threads, max_runs=10),
        "accuracy": metrics["accuracy"], "auroc": metrics.get("auroc"), "test_images": len(labels),
    }


def finetune(pruned: Path, info: dict, out: Path, epochs: int, overrides: list[str]) -> torch.nn.Module:
    """Train ``epochs`` from the pruned weights with the checkpoint's own config; returns the
    fine-tuned model (exported by the trainer under ``out/finetune``)."""
    from deepfake_dist.train.loop import train

    extra = ["name=finetune", f"output_dir={out}", f"train.epochs={epochs}", "train.max_steps=null",
             "train.early_stopping=null", "checkpoint.resume=none", f"model.pretrained={pruned}"]
    train(stored_config(info, [*overrides, *extra], where=str(pruned)))
    model, _ = load_exported(out / "finetune")
    return model


def compress(opts: CompressOptions) -> dict:
    """Run the requested steps on ``opts.checkpoint`` and write the results and the table to ``out``."""
    checkpoint, prune, structured, quantize = opts.checkpoint, opts.prune, opts.structured, opts.quantize
    finetune_epochs, overrides, threads = opts.finetune_epochs, opts.overrides, opts.threads
    if not prune and not quantize:
        raise UserError("nothing to do: pass --prune FRACTION and/or --quantize int8")
    if finetune_epochs and not prune:
        raise UserError("--finetune-epochs fine-tunes a pruned model; pass --prune FRACTION too")
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize}: only int8 is supported")
    weights, info_path = resolve(checkpoint)
    model, info = load_exported(checkpoint)
    cfg = stored_config(info, overrides, where=str(info_path))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # the writes come between measurements: any of them may meet a full disk
    with out_of_space_is_one_line(f"the compressed models in {out}", out, OUTPUTS_WHOLE):
        channels = in_channels(info)
        test = eval_loader(test_sets(cfg), "test", EvalOptions.from_data(cfg.data, channels))

        rows = [measure("original", model, weights, info, test, parameter_counts(model), threads)]
        settings = {"checkpoint": str(checkpoint), "prune": prune, "structured": structured,
                    "finetune_epochs": finetune_epochs, "quantize": quantize, "test_sets": test_sets(cfg),
                    "latency_threads": threads or torch.get_num_threads()}
        if prune:
            model = prune_model(copy.deepcopy(model), prune, structured)
            info = {**info, "compression": {"prune": prune, "structured": structured, "sparsity": sparsity(model, structured)}}
            path = write_exported(model.state_dict(), out, info)
            rows.append(measure(f"pruned {prune:g}{' chan' if structured else ''}", model, path, info, test,
                                parameter_counts(model), threads))
            if finetune_epochs:
                model = prune_model(finetune(path, info, out, finetune_epochs, list(overrides)), prune, structured)
                info["compression"].update(finetune_epochs=finetune_epochs, sparsity=sparsity(model, structured))
                path = write_exported(model.state_dict(), out, info)
                rows.append(measure(f"fine-tuned {finetune_epochs} ep", model, path, info, test,
                                    parameter_counts(model), threads))
        if quantize:
            calibration = eval_loader(cfg.data.train, cfg.data.train_split, EvalOptions.from_data(cfg.data, channels))
            batches = [b.image for _, b in zip(range(opts.calibration_batches), calibration)]
            if not batches:
                raise UserError(f"no '{cfg.data.train_split}' images in {cfg.data.train} to calibrate int8 with")
            rows.append(int8_step(model, batches, info, out, test, threads))

        report = {"settings": settings, "rows": rows, "machine": machine_info()}
        write_json_atomic(out / "compress.json", report)
        write_text_atomic(out / "compress.md", markdown_table(rows))
        return report


def int8_step(model: torch.nn.Module, batches: list[torch.Tensor], info: dict, out: Path, test,
              threads: int | None) -> dict:
    """Quantize, save ``model-int8.pt`` and measure it. The step's name says how many convolutions
    run in int8 (the rest of the model stays float); a model torch cannot quantize keeps only
    its float model, and the row says so and why."""
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    try:
        qmodel = quantize_int8(model, batches[0], batches)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.ao fails in many ways on forwards it cannot handle
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        return {"step": "int8 not possible: float kept", "int8_error": reason}
    layers = quantized_layers(qmodel)
    qinfo = {**info, "quantization": {"dtype": "int8", "backend": "x86", "layers": layers,
                                      "calibration_images": sum(len(b) for b in batches)}}
    path = save_int8(qmodel, out / "model-int8.pt")
    write_json_atomic(out / "model-int8.json", qinfo)
    quantized = quantized_convolutions(qmodel)
    row = measure(f"int8 {quantized}/{convolutions} conv", qmodel, path, info, test, weight_counts(qmodel), threads)
    return {**row, "quantized_layers": layers, "quantized_convolutions": quantized}


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("params", "nonzero"):
        return f"{value:,}"
    if key in ("accuracy", "auroc"):
        return f"{100 * value:.1f}%" if key == "accuracy" else f"{value:.4f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _notes(rows: list[dict]) -> list[str]:
    """Why a step has no figures (int8 that torch could not apply)."""
    return [f"{r['step']}: {r['int8_error']}" for r in rows if r.get("int8_error")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    notes = _notes(rows)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def rich_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="compress: test split, CPU latency (ms, median)", caption="\n".join(_notes(rows)) or None)
    for key, header in COLUMNS.items():
        table.add_column(header, justify="left" if key == "step" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(_cell(k, r.get(k)) for k in COLUMNS))
    return table
