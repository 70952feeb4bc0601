"""Fault 7, untrusted files: a pickle that runs code when loaded, placed where the platform reads
model weights (a pretrained file, an exported model, a checkpoint, including DeepSpeed's files,
which DeepSpeed itself would load with ``weights_only=False``, and files behind a link in a
checkpoint). Each is refused with a clear error and the payload never runs. And no loader in the
code can unpickle anything else."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from inject import ROOT, SMOKE, armed_pickle

from deepfake_dist.config import load_config
from deepfake_dist.errors import UserError
from deepfake_dist.models import create_model
from deepfake_dist.models.exported import load_exported
from deepfake_dist.train.checkpoint import (
    CHECKSUMS_FILE,
    checkpoint_dir,
    checkpoint_problem,
    checksums,
    write_json_atomic,
)
from deepfake_dist.train.loop import train


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the pickled payload ran"


def test_pretrained_weights_file(tmp_path, marker):
    evil = armed_pickle(tmp_path / "resnet18.pth", marker)
    with pytest.raises(UserError, match=rf"refusing to load {evil}: it holds pickled Python objects \(io.open\)"):
        create_model("resnet18", in_channels=1, pretrained=str(evil))


def test_exported_model(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"model": "cnn", "model_args": {"width": 8},
                                                "build_args": {"in_channels": 1}}))
    armed_pickle(run / "model.safetensors", marker)  # a pickle under the safetensors name
    with pytest.raises(UserError, match="model.safetensors: cannot read the weights"):
        load_exported(run)
    with pytest.raises(UserError, match="safetensors files only"):
        load_exported(armed_pickle(tmp_path / "model.pth", marker))


def test_exported_weights_of_another_model(tmp_path):
    """Weights saved under a wrapper's prefix (torch.compile's ``_orig_mod.``) or for another
    width are named key by key, with the fix."""
    run = tmp_path / "run"
    run.mkdir()
    info = {"model": "cnn", "model_args": {"width": 8}, "build_args": {"in_channels": 1}}
    (run / "model.json").write_text(json.dumps(info))
    state = create_model("cnn", in_channels=1, width=8).state_dict()
    save_file({f"_orig_mod.{k}": v for k, v in state.items()}, str(run / "model.safetensors"))
    with pytest.raises(UserError, match=rf"{len(state)} missing: features\.block1\.0\.0\.weight, .*; "
                                        rf"{len(state)} unexpected: _orig_mod\..*export the run again"):
        load_exported(run)
    save_file(create_model("cnn", in_channels=1, width=4).state_dict(), str(run / "model.safetensors"))
    with pytest.raises(UserError, match=r"\(\d+ wrong shape: features\.block1\.0\.0\.weight \(4, 1, 3, 3\) where \(8, 1, 3, 3\)"):
        load_exported(run)


def test_checkpoint_files(overrides, marker, capsys):
    """The attacker also rewrites checksums.json, so only the unpickling check stands between the
    payload and the loader."""
    args = overrides + ["checkpoint.every_steps=1", "checkpoint.keep_last=3", "train.max_steps=2"]
    cfg = load_config(SMOKE, args)
    train(cfg)
    folder = checkpoint_dir(cfg.run_dir)

    def plant(path: Path) -> None:
        armed_pickle(path, marker)
        write_json_atomic(path.parent / CHECKSUMS_FILE, checksums(path.parent))

    plant(folder / "step-2" / "optimizer.bin")
    capsys.readouterr()
    train(load_config(SMOKE, args + ["train.max_steps=3"]))
    err = "".join(capsys.readouterr().err.split())
    assert f"checkpoint{folder / 'step-2'}isdamaged:optimizer.binholdspickledPythonobjects(io.open)" in err
    assert f"resumingfrom{folder / 'step-1'}" in err

    plant(folder / "step-3" / "random_states_0.pkl")  # accelerate would skip it silently
    with pytest.raises(UserError, match=r"random_states_0.pkl holds pickled Python objects \(io.open\)"):
        train(load_config(SMOKE, args + [f"checkpoint.resume={folder / 'step-3'}"]))

    deepspeed = folder / "step-1" / "pytorch_model"  # DeepSpeed's layout, loaded with weights_only=False
    deepspeed.mkdir()
    plant(deepspeed / "mp_rank_00_model_states.pt")
    problem = checkpoint_problem(folder / "step-1")
    assert "pytorch_model/mp_rank_00_model_states.pt holds pickled Python objects (io.open)" in problem

    linked = folder.parent / "elsewhere"  # the same folder behind a link, which rglob does not enter
    deepspeed.rename(linked)
    deepspeed.symlink_to(linked, target_is_directory=True)
    write_json_atomic(deepspeed.parent / CHECKSUMS_FILE, checksums(deepspeed.parent))
    with pytest.raises(UserError, match="pytorch_model is a symbolic link; a checkpoint holds its own files only"):
        train(load_config(SMOKE, args + [f"checkpoint.resume={folder / 'step-1'}"]))


def test_links_inside_a_checkpoint_are_refused(tmp_path, marker):
    """A link to a folder or a file, wherever it points: what is loaded must be what was vetted."""
    checkpoint, elsewhere = tmp_path / "step-1", tmp_path / "elsewhere"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    elsewhere.mkdir()
    armed_pickle(elsewhere / "optimizer.bin", marker)
    (checkpoint / "pytorch_model" / "optimizer.bin").symlink_to(elsewhere / "optimizer.bin")
    write_json_atomic(checkpoint / CHECKSUMS_FILE, {})
    assert checkpoint_problem(checkpoint) == ("pytorch_model/optimizer.bin is a symbolic link; a checkpoint holds "
                                              "its own files only, refusing to load it")
    (checkpoint / "pytorch_model" / "optimizer.bin").unlink()
    (checkpoint / "zero").symlink_to(elsewhere, target_is_directory=True)
    assert checkpoint_problem(checkpoint).startswith("zero is a symbolic link")


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "Unpickler", "dill.load", "dill.loads", "joblib.load",
                "marshal.loads", "register_for_checkpointing", "load_custom_state"}


def _name(node: ast.AST) -> str:
    return ast.unparse(node.func) if isinstance(node, ast.Call) else ""


def _is(value, constant) -> bool:
    return isinstance(value, ast.Constant) and value.value is constant


def unsafe_loads(source: str, where: str) -> list[str]:
    """Calls in ``source`` that could unpickle more than tensors."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = _name(node)
        keywords = {k.arg: k.value for k in getattr(node, "keywords", [])}
        line = f"{where}:{getattr(node, 'lineno', '?')} {name}"
        if (name.endswith("torch.load") or name == "load" and "weights_only" in keywords) \
                and not _is(keywords.get("weights_only"), True):
            found.append(f"{line} without weights_only=True")
        if name.rsplit(".", 1)[-1] in UNSAFE_CALLS or name in UNSAFE_CALLS:
            found.append(line)
        if "allow_pickle" in keywords and not _is(keywords["allow_pickle"], False):
            found.append(f"{line} with allow_pickle")
    return found


def test_no_loader_in_the_code_can_unpickle_objects():
    """Every ``torch.load`` passes ``weights_only=True``; nothing calls pickle (or accelerate's
    custom-state loading, which uses ``weights_only=False``) or numpy with ``allow_pickle``."""
    bad = "torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n" \
          "accelerator.register_for_checkpointing(x)\ntorch.load(f, weights_only=True)\n"
    assert len(unsafe_loads(bad, "example")) == 5  # the scan catches each kind
    found = [problem for path in sorted((ROOT / "deepfake_dist").rglob("*.py"))
             for problem in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, found
