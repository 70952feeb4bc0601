"""Two "nodes" on one machine: two ``accelerate launch`` commands with ``--num_machines 2``,
``--machine_rank 0`` and ``1``, ``--main_process_ip 127.0.0.1`` and one process each, under
DeepSpeed ZeRO-2 with ``deepspeed_multinode_launcher: standard`` (torchrun per node, no SSH). They
train together, end with identical weights, and log throughput per rank and in total."""

import importlib.util
import json

import pytest
from scale_setup import ACCELERATE_CONFIGS, ROOT, smoke, start_nodes

from deepfake_dist.engine.tracking import read_jsonl


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_two_nodes_train_together_and_agree(face_shards, tmp_path):
    launch = ["--config_file", str(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml"), "--mixed_precision", "no"]
    nodes = start_nodes(launch, smoke(face_shards, tmp_path / "runs", "twonodes"), ROOT, tmp_path,
                        env={"DEEPFAKE_DIST_PROGRESS": "1"})
    codes = [node.wait(timeout=400) for node in nodes]
    logs = [(tmp_path / f"node{rank}.log").read_text(errors="replace") for rank in range(2)]
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]

    run = tmp_path / "runs" / "twonodes"
    summary = json.loads((run / "summary.json").read_text())
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["steps"] == 12

    # throughput: per rank and for the job, the step split into data wait and compute
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "train/images_per_s" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert r["train/images_per_s_per_rank"] > 0 and 0 <= r["train/data_wait_frac"] < 1
        assert r["train/images_per_s"] == pytest.approx(2 * r["train/images_per_s_per_rank"])
    assert "images_per_s" in logs[0]  # on the console progress line (main process only)
    assert "images_per_s" not in logs[1]
