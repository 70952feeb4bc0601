"""Run under ``accelerate launch`` (two gloo processes) for tests/test_locations.py:

    locations_launch.py OUT LOCAL_SET HTTP_SET S3_SET

Trains the smoke detector from each of three copies of one shard set (a folder, an HTTP URL, an
S3 prefix), then evaluates the folder-trained model on each copy, all in the same processes (as
a pipeline runs its stages). The main process writes OUT/results.json: each run's summary (its
rank digests are in OUT/NAME/summary.json) and each evaluation's row.
"""

import json
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

from deepfake_dist.config import load_config
from deepfake_dist.engine.distributed import distributed_state, exit_process
from deepfake_dist.envvars import temporary_env
from deepfake_dist.evaluation import evaluate
from deepfake_dist.options import EvaluateOptions
from deepfake_dist.train.loop import train

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


def _fresh():
    AcceleratorState._reset_state()
    GradientState._reset_state()


def main(out: Path, sets: dict[str, str]) -> None:
    results: dict = {"train": {}, "evaluate": {}}
    with temporary_env("FORK_LAUNCHED", "1"):  # one process group for all runs (see pipeline.py)
        for name, location in sets.items():
            _fresh()
            cfg = load_config(SMOKE, [f"data.train=[{location}]", f"output_dir={out}", f"name={name}",
                                      "wandb.mode=disabled", "train.epochs=1", "checkpoint.every_steps=4"])
            results["train"][name] = train(cfg)
        for name, location in sets.items():
            _fresh()
            opts = EvaluateOptions(checkpoints=[str(out / "local")], data=[location], out=str(out / f"eval-{name}"),
                                   robustness=False, explain=False, report=False, batch_size=8, workers=1)
            done = evaluate(opts, command="locations_launch")
            results["evaluate"][name] = done["rows"][0]
    state = distributed_state()
    if state.is_main_process:
        (out / "results.json").write_text(json.dumps(results, default=str))
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), dict(zip(("local", "http", "s3"), sys.argv[2:5])))
    exit_process(0)
