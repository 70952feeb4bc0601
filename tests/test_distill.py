"""Knowledge distillation: the loss, and a student trained from a teacher through the normal trainer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from deploy_setup import detector_config, one_thread

from deepfake_dist.errors import UserError
from deepfake_dist.tasks.distill import distillation_loss


def test_soft_loss_is_temperature_scaled_bce_and_vanishes_when_the_student_matches():
    teacher = torch.tensor([3.0, -2.0, 0.5])
    labels = torch.tensor([1, 0, 1])
    student = teacher.clone().requires_grad_(True)
    total, soft, hard = distillation_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    total.backward()
    assert torch.allclose(student.grad, torch.zeros(3), atol=1e-7)  # the teacher's own logits are optimal
    s = torch.tensor([1.0, 1.0, -1.0])
    _, soft, hard = distillation_loss(s, teacher, labels, temperature=4.0, alpha=0.7)
    expected = F.binary_cross_entropy_with_logits(s / 4, torch.sigmoid(teacher / 4)) * 16
    assert torch.isclose(soft, expected)
    assert torch.isclose(hard, F.binary_cross_entropy_with_logits(s, labels.float()))
    total, _, _ = distillation_loss(s, teacher, labels, temperature=4.0, alpha=0.0)
    assert torch.isclose(total, hard)  # alpha = 0: the labels only


def test_a_student_that_is_not_a_detector_is_refused_when_the_config_is_loaded(deploy_run, deploy_shards, tmp_path):
    with pytest.raises(UserError, match="smoke.yaml: .*model.name dcgan is not a detector"):
        detector_config(deploy_shards[0], tmp_path, "student", f"distill.teacher={deploy_run}", "model={name: dcgan}")


@pytest.mark.parametrize("teacher, extra, message", [
    ("gan", [], "holds a generator model, not a detector"),
    ("detector", ["data.normalize=half"], "takes 1-channel images normalized 'imagenet', the student gets 1-channel 'half'"),
])
def test_a_teacher_that_does_not_fit_is_refused_before_the_run_starts(teacher, extra, message, gan_run, deploy_run,
                                                                      deploy_shards, tmp_path):
    from deepfake_dist.train.loop import train

    path = gan_run / "generator.safetensors" if teacher == "gan" else deploy_run
    cfg = detector_config(deploy_shards[0], tmp_path, "student", f"distill.teacher={path}", *extra)
    with pytest.raises(UserError, match=message):
        train(cfg)
    assert not cfg.run_dir.exists()


def _test_auroc(run, shards) -> float:
    from deepfake_dist.data.loader import EvalOptions, eval_loader
    from deepfake_dist.deploy.compress import score
    from deepfake_dist.engine.metrics import binary_metrics
    from deepfake_dist.models.exported import load_exported

    model, _ = load_exported(run)
    cfg = detector_config(shards, run.parent, "eval")
    scores, labels = score(model, eval_loader([str(shards)], "test", EvalOptions.from_data(cfg.data, 1)))
    return binary_metrics(scores, labels)["auroc"]


@pytest.fixture(scope="module")
def students(deploy_run, deploy_shards, tmp_path_factory):
    """The same tiny student (cnn width 2, 5 steps, same seed) trained with and without the teacher;
    a short schedule, where soft targets have the most to add on this easy set."""
    from deepfake_dist.train.loop import train

    runs = tmp_path_factory.mktemp("students")
    student = ("model.width=2", "train.epochs=1", "train.max_steps=5", "optim.lr=0.003")
    with one_thread():
        train(detector_config(deploy_shards[0], runs, "plain", *student))
        train(detector_config(deploy_shards[0], runs, "distilled", *student, f"distill.teacher={deploy_run}",
                              "distill.temperature=4", "distill.alpha=0.7"))
    return runs / "plain", runs / "distilled"


def test_student_learns_through_the_distillation_loss(students, deploy_run):
    plain, distilled = students
    info = json.loads((distilled / "model.json").read_text())
    assert info["distilled_from"]["checkpoint"] == str(deploy_run) and info["distilled_from"]["alpha"] == 0.7
    assert info["kind"] == "detector" and info["model"] == "cnn"  # an ordinary detector: serve/export/compress work
    logs = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    train_logs = [row for row in logs if "train/loss_soft" in row]
    assert train_logs, "the soft-target term was never logged"
    for row in train_logs:  # the logged loss is the alpha-weighted sum of both terms
        assert row["train/loss"] == pytest.approx(0.7 * row["train/loss_soft"] + 0.3 * row["train/loss_hard"],
                                                  rel=1e-4)
    assert train_logs[-1]["train/loss_soft"] < train_logs[0]["train/loss_soft"]  # the student moves to the teacher
    assert not any("train/loss_soft" in row for row in
                   (json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()))


def test_distilled_student_against_the_same_student_without_teacher(students, deploy_shards):
    plain, distilled = (_test_auroc(run, deploy_shards[0]) for run in students)
    assert distilled > 0.7  # the student learned the task
    if distilled < plain:
        warnings.warn(f"distilled student test ROC-AUC {distilled:.4f} < plain {plain:.4f} "
                      f"(by {plain - distilled:.4f}) on this small set", stacklevel=1)
    print(f"test ROC-AUC: distilled {distilled:.4f}, without teacher {plain:.4f}, difference {distilled - plain:+.4f}")
