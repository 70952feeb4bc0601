"""Audio-visual detection on FakeAVCeleb-layout sets: per-category accuracy and ROC-AUC of the
``audio`` detector, the frame model alone (``temporal``) and ``av``; and what ``--audio`` adds to
``prepare``'s cost per video.

The sets are written by ``tests/av_data.py``: LFW faces (scikit-image's bundled subset) that
speak with a synthetic voice (a harmonic tone whose loudness moves the mouth); a fake voice is
pitch-shifted and re-timed, a fake face blended with a shifted copy, noised and blurred, in the
four FakeAVCeleb categories. ``replica`` is the tests' replica (4 identities: one in the test
split), a correctness check, not a benchmark; ``faces`` is the same recipe over more identities
(``--identities``). The models are small (a 3-block CNN per frame, an LSTM, the audio trunk at
``--width``) and train for ``--epochs`` on 32-px clips of 4 frames, so that the table shows what
each stream carries, not what a full-size model reaches on FakeAVCeleb.

* Cost of sound: ``prepare`` of the last set (``faces``) in one process, with and without ``audio``,
  interleaved over ``--repeats`` rounds (``benchmarks.common``); wall-clock and CPU seconds per
  video, median of the rounds.
* Detection: each model trained on the set's train split (best checkpoint on val), then
  ``evaluate`` on its test split: per-category accuracy (overall score at 0.5) and ROC-AUC of
  the category against the real clips, and the overall, video and audio ROC-AUC.

    deepfake-dist bench av [--identities 24] [--epochs 8] [--repeats 3] [--sets replica faces]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.common import REPO, console, interleaved, machine, median_of, parser, print_table, write_result
from deepfake_dist.config import load_config
from deepfake_dist.data.prepare import prepare
from deepfake_dist.evaluation import evaluate
from deepfake_dist.options import EvaluateOptions, PrepareOptions
from deepfake_dist.train.loop import train

sys.path.insert(0, str(REPO / "tests"))

from av_data import CATEGORIES, CLIP, build_fakeavceleb  # noqa: E402 - from the tests folder, added above

SPLIT = "0.5,0.25,0.25"
FRAMES = "{backbone: cnn, backbone_args: {width: 8, depth: 3}, hidden: 16}"


def models(width: int) -> dict[str, tuple[str, list[str]]]:
    """Name -> (config, overrides): the three detectors compared, at a size CPUs train quickly."""
    return {"audio": ("audio", [f"model.width={width}"]),
            "frames": ("temporal", ["model.backbone=cnn", "model.backbone_args={width: 8, depth: 3}", "model.hidden=16"]),
            "av": ("av", ["model.frames=temporal", f"model.frames_args={FRAMES}", "model.dim=16",
                          f"model.audio_width={width}"])}


def build(data: Path, name: str, identities: int) -> Path:
    """The set's videos under ``data``, written once (a marker file says they are complete)."""
    root = data / f"fakeavceleb-{name}-{identities}" / "FakeAVCeleb_v1.2"
    if not (root / ".complete").is_file():
        console.print(f"writing {identities} identities under {root} ...")
        build_fakeavceleb(root, identities=identities)
        (root / ".complete").touch()
    return root


def prepare_set(root: Path, out: Path, audio: bool = True) -> dict:
    return prepare(PrepareOptions(source=f"fakeavceleb:{root}", out=str(out), resolution=32, shard_size=4,
                                  overwrite=True, options={**CLIP, "identity_split": SPLIT, "audio": audio}))


def sound_cost(root: Path, out: Path, repeats: int) -> dict:
    """Seconds per video that ``prepare`` takes with and without the sound."""
    def case(audio: bool):
        def run() -> dict:
            wall, cpu = time.perf_counter(), time.process_time()
            manifest = prepare_set(root, out / f"audio-{audio}", audio)
            videos = sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) / CLIP["clips_per_video"]
            return {"seconds_per_video": (time.perf_counter() - wall) / videos,
                    "cpu_seconds_per_video": (time.process_time() - cpu) / videos, "videos": videos}
        return run

    runs = interleaved({"without audio": case(False), "with audio": case(True)}, repeats)
    rows = {name: {k: median_of(run, k) for k in ("seconds_per_video", "cpu_seconds_per_video", "videos")}
            for name, run in runs.items()}
    base = rows["without audio"]
    rows["with audio"]["cost_ratio"] = rows["with audio"]["seconds_per_video"] / base["seconds_per_video"]
    rows["with audio"]["cpu_cost_ratio"] = rows["with audio"]["cpu_seconds_per_video"] / base["cpu_seconds_per_video"]
    return rows


def detection(shards: Path, runs: Path, args) -> dict:
    """Each model trained on ``shards`` and evaluated on its test split (see the module)."""
    checkpoints = {}
    for name, (config, extra) in models(args.width).items():
        cfg = load_config(REPO / "configs" / f"{config}.yaml", [
            f"data.train=[{shards}]", f"output_dir={runs}", f"name={config}", "wandb.mode=disabled",
            "data.resolution=32", "data.batch_size=8", "data.num_workers=0", "sched.warmup_steps=2",
            f"train.epochs={args.epochs}", "train.early_stopping=null", "optim.lr=0.003", "checkpoint.resume=none",
            *([f"train.max_steps={args.max_steps}"] if args.max_steps else []), *extra])
        started = time.perf_counter()
        train(cfg)
        console.print(f"  {name}: trained in {time.perf_counter() - started:.0f} s")
        checkpoints[name] = str(cfg.run_dir)
    result = evaluate(EvaluateOptions(checkpoints=list(checkpoints.values()), data=[str(shards)], out=str(runs / "eval"),
                                      robustness=False, explain=False, report=False, batch_size=16, workers=0))
    table = {}
    for name, model in zip(checkpoints, result["results"]):
        table[name] = {"modalities": {m["label"]: {"auroc": m["auroc"], "accuracy": m["accuracy"],
                                                   "samples": m["samples"]} for m in model["modalities"]},
                       "categories": {c["category"]: {"accuracy": c["accuracy@0.5"], "auroc_vs_real": c.get("auroc_vs_real"),
                                                      "samples": c["samples"]} for c in model["categories"]}}
    return table


def show(title: str, table: dict) -> None:
    """Categories by their FakeAVCeleb letter (A real, B fake sound, C fake face, D both)."""
    letters = sorted((letter, name) for name, (letter, _, _) in CATEGORIES.items())
    rows = [[name, *[row["categories"][c]["accuracy"] for _, c in letters],
             *[row["categories"][c]["auroc_vs_real"] for _, c in letters[1:]],
             *[row["modalities"][m]["auroc"] for m in ("overall", "video", "audio")]] for name, row in table.items()]
    print_table(title, ["model", *[f"acc {x}" for x, _ in letters], *[f"AUC {x}" for x, _ in letters[1:]],
                        "AUC all", "AUC vid", "AUC aud"], rows)


def main() -> None:
    p = parser("av", __doc__.splitlines()[0])
    p.add_argument("--identities", type=int, default=24, help="identities of the faces set (4 videos each)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=16, help="the audio trunk's first block's channels")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop each training after this many steps")
    p.add_argument("--sets", nargs="+", choices=("replica", "faces"), default=["replica", "faces"],
                   help="the sets to run on; prepare's cost is measured on the last")
    args = p.parse_args()
    started = machine()
    results = {}
    for name in args.sets:
        identities = 4 if name == "replica" else args.identities
        root = build(args.data, name, identities)
        shards = args.data / f"av-{name}-{identities}-shards"
        if name == args.sets[-1]:
            results["prepare"] = sound_cost(root, args.data / "av-prepare", args.repeats)
            print_table("prepare, one process, seconds per video",
                        ["", "wall s/video", "CPU s/video", "ratio (wall)", "ratio (CPU)"],
                        [[k, v["seconds_per_video"], v["cpu_seconds_per_video"], v.get("cost_ratio"),
                          v.get("cpu_cost_ratio")] for k, v in results["prepare"].items()])
        prepare_set(root, shards)
        results[name] = detection(shards, args.data / f"av-{name}-runs", args)
        show(f"{name} ({identities} identities): test split", results[name])
    write_result("av", args, results, started)


if __name__ == "__main__":
    main()
