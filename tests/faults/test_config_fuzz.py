"""Fuzzing configs: random documents (keys, types, values, YAML's own tricks: tags, anchors,
aliases, dates, damaged text, bytes that are not UTF-8) and random ``key=value`` overrides,
through ``load_config`` and the ``deepfake-dist train`` command line. Each ends in one ``error:``
line (exit 2) or a config whose numbers are all finite, within two seconds, never a traceback; and
short runs with fuzzed optimizer, schedule, augmentation and training settings end in 0 or in
one ``error:`` line."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import uuid

import pytest
import yaml
from accelerate.state import AcceleratorState, GradientState
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from inject import deadline

from deepfake_dist.cli import main
from deepfake_dist.config import Config, build_config, load_config, to_dict
from deepfake_dist.errors import UserError


SHARDS, RUNS = "SHARDS_PATH", "RUNS_PATH"  # placeholders, replaced in the file's text
BASE = {"name": "fuzz", "output_dir": RUNS, "model": {"name": "cnn", "width": 8},
        "data": {"train": [SHARDS], "resolution": 32, "batch_size": 8, "num_workers": 0},
        "train": {"max_steps": 1, "epochs": 1}, "wandb": {"mode": "disabled"}}


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    return [key for name, value in tree.items()
            for key in (_leaves(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [prefix + name])]


def _keys() -> list[str]:
    """Every key of a config, and every section."""
    fields = dataclasses.asdict(Config())
    return _leaves(fields) + list(fields) + ["model.width", "model.dropout"]


# YAML text put in place of a value: tags, anchors and aliases (a recursive list, an alias bomb
# whose expansion would hold 9^8 items), numbers in YAML 1.1's odd spellings, and broken YAML.
SNIPPETS = [
    "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a: null}", "!!timestamp 2001-12-14",
    "!!float .nan", "!!str", "&r [1, *r]", "&d {a: *d}", "*undefined", "{? [a, b] : 1}", "2024-01-01", "12:30:00",
    "0o17", "0x1F", "1_000", "1e3", "~", ".inf", "-.Inf", "0b101", "[", "{a: ", "'unterminated", "- a\n- b",
    "[" + ", ".join([f"&b0 [{', '.join(['x'] * 9)}]"] + [f"&b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, 8)])
    + "]",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=6), st.dates(),
    st.sampled_from(["yes", "no", "off", "auto", "none", "1e-3", "nan", "-1", "0", "cnn", "resnet18", "val/loss", "\n"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3)), inner, max_size=3)),
    max_leaves=6)
ODD_KEYS = st.one_of(
    st.sampled_from(["unknown", "data.unknown", "model.widht", "model.dropout", "model.depth", "", "a b", "x\ny", "é",
                     "train..epochs", "model.name.x"]),
    st.integers(-2, 2), st.text(max_size=6),
    st.tuples(st.sampled_from(["model", "data", "train", "data.augment"]), st.one_of(st.integers(-2, 2), st.text(max_size=4))))


def _set(raw: dict, key, value) -> None:
    """Set a dotted key (or a (section, key) pair, whose key may be a number), making sections on
    the way (a section that is not a mapping is replaced)."""
    if isinstance(key, tuple):
        *sections, leaf = [*key[0].split("."), key[1]]
    else:
        *sections, leaf = key.split(".") if isinstance(key, str) else [key]
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {}
        node = node[section]
    node[leaf] = value


KEYS = _keys()


@st.composite
def documents(draw) -> tuple[bytes, list[str]]:
    """A config file's bytes and a command line's overrides."""
    raw, keys = copy.deepcopy(BASE), KEYS
    snippets = {}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from(keys), ODD_KEYS))
        action = draw(st.sampled_from(["value", "value", "snippet", "delete"]))
        if action == "delete" and isinstance(key, str) and key in raw:
            del raw[key]
        elif action == "snippet":
            marker = f"SNIPPET{len(snippets)}"
            snippets[marker] = draw(st.sampled_from(SNIPPETS))
            _set(raw, key, marker)
        else:
            _set(raw, key, draw(VALUES))
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=True, width=10**6)
    for marker, snippet in snippets.items():
        text = text.replace(marker, snippet.replace("\n", " "), 1)
    data = text.encode()
    if draw(st.integers(0, 9)) == 0:  # damaged text, or bytes that are not UTF-8
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.one_of(st.binary(max_size=4), st.sampled_from([b"\t", b":", b"\xff", b"\0", b"- "]))) \
            + data[at + draw(st.integers(0, 3)):]
    overrides = draw(st.lists(st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(keys), st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=8))),
        st.text(max_size=10)), max_size=2))
    return data, overrides


def _numbers(value):
    if dataclasses.is_dataclass(value):
        yield from (n for f in dataclasses.fields(value) for n in _numbers(getattr(value, f.name)))
    elif isinstance(value, (list, tuple)):
        yield from (n for v in value for n in _numbers(v))
    elif isinstance(value, float):
        yield value


def _one_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message and len(message) < 2000, message[:2000]


@pytest.fixture(scope="module")
def shard_set(face_shards):
    """``face_shards``, with the config's imports (the model registry: torchvision) done before
    the first example's deadline starts."""
    base = json.loads(json.dumps(BASE).replace(SHARDS, str(face_shards)))
    build_config(base, "base")
    return face_shards


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents())
def test_fuzzed_configs_fail_in_one_line_or_load(shard_set, tmp_path, capsys, document):
    path = tmp_path / "fuzz.yaml"
    text, overrides = document
    text = text.replace(SHARDS.encode(), str(shard_set).encode()).replace(RUNS.encode(), str(tmp_path / "runs").encode())
    path.write_bytes(text)
    try:
        with deadline(2):
            cfg = load_config(path, overrides)
    except UserError as err:
        event("refused")
        _one_line(str(err))
        capsys.readouterr()
        with deadline(2):
            assert main(["train", "--config", str(path), "--", *overrides]) == 2  # --: an override may start with -
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), lines
        return
    event("loaded")
    assert all(math.isfinite(n) for n in _numbers(cfg))
    to_dict(cfg)  # what the run folder's config.yaml and wandb get


@pytest.mark.parametrize("text, overrides, expected", [
    (b"\xffname: x\n", [], "cannot read it as UTF-8 text"),
    (b"{}", ["name\n"], "(override 'name\\n'): an override must look like key.sub=value"),
    (b"{}", ["seed=\x14"], "(override 'seed=\\x14'): the value is not valid YAML (unacceptable character #x0014"),
    (b"{}", ["model.width=*undefined"], "the value is not valid YAML (found undefined alias 'undefined'"),
    (b'data: {"unknown\\n": 1}', [], "unknown key 'data.unknown\\n'"),
    (b"model: {name: cnn, 2: 1}", [], "unknown key 'model.2' for model 'cnn'"),
    (b"train: &r {epochs: *r}", [], "'train.epochs' expected an integer, got {'epochs': {'epochs': {'epochs': {...}}}}"),
], ids=["not UTF-8", "a newline in an override", "a control character", "an undefined alias", "a newline in a key",
        "a number as a model key", "a section holding itself"])
def test_what_the_fuzzer_found_is_one_line(text, overrides, expected, shard_set, tmp_path):
    """Each was a traceback (or a line broken in two) before."""
    path = tmp_path / "found.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError) as info:
        load_config(path, [f"data.train=[{shard_set}]", *overrides])
    _one_line(str(info.value))
    assert expected in str(info.value)


NUMBERS = st.one_of(st.integers(-3, 10**6), st.floats(-1e6, 1e6), st.sampled_from([0, -1.0, 1e300]), st.none())
PROBABILITY = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1))
POSITIVE = st.one_of(st.sampled_from([1e-12, 1e6]), st.floats(1e-6, 10))
COUNT = st.one_of(st.sampled_from([1, 10**9]), st.integers(1, 100))


def _pair(values):
    return st.lists(values, min_size=2, max_size=2).map(sorted)


# The keys a short run reaches, each with values mostly of its own domain and its edges (the
# loader refuses the rest; the run should get past it), now and then any number or null; not for
# the sizes, where any number means any amount of memory and time.
SIZES = ("data.batch_size", "data.resolution", "model.width")
RUN_SETTINGS = {key: values if key in SIZES else st.one_of(values, values, NUMBERS) for key, values in {
    "optim.name": st.sampled_from(["adamw", "adam", "sgd"]), "optim.lr": POSITIVE, "optim.weight_decay": st.floats(0, 10),
    "optim.momentum": st.floats(0, 0.999), "optim.betas": _pair(st.floats(0, 0.999)),
    "sched.name": st.sampled_from(["cosine", "step", "onecycle", "constant"]), "sched.gamma": POSITIVE,
    "sched.min_lr_ratio": PROBABILITY, "sched.warmup_steps": st.integers(0, 10**6), "sched.step_size": COUNT,
    "train.grad_clip": st.one_of(st.none(), POSITIVE), "train.grad_accum": st.integers(1, 50),
    "train.log_every": COUNT, "train.max_nonfinite": COUNT, "train.early_stopping": st.one_of(st.none(), COUNT),
    "train.monitor": st.sampled_from(["val/loss", "val/auroc", "val/accuracy", "val/eer"]),
    "train.monitor_mode": st.sampled_from(["min", "max"]), "train.mixed_precision": st.sampled_from(["no", "bf16"]),
    "checkpoint.every_steps": st.one_of(st.none(), COUNT), "checkpoint.every_epochs": COUNT,
    "checkpoint.keep_last": COUNT, "seed": st.integers(0, 2**32 - 1),
    "data.batch_size": st.integers(1, 256), "data.resolution": st.integers(8, 64),
    "data.shuffle_buffer": st.integers(0, 10**6), "data.transfer_mib": st.floats(0, 100),
    "data.normalize": st.sampled_from(["imagenet", "half"]), "data.augment.hflip": PROBABILITY,
    "data.augment.crop": PROBABILITY, "data.augment.crop_scale": _pair(st.floats(1e-6, 1)),
    "data.augment.jitter": PROBABILITY, "data.augment.jitter_strength": PROBABILITY, "data.augment.jpeg": PROBABILITY,
    "data.augment.jpeg_quality": _pair(st.integers(1, 100)), "data.augment.blur": PROBABILITY,
    "data.augment.blur_sigma": _pair(st.floats(1e-3, 50)), "model.width": st.integers(1, 16),
    "model.dropout": PROBABILITY,
}.items()}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.lists(st.sampled_from(sorted(RUN_SETTINGS)), min_size=1, max_size=4, unique=True), data=st.data())
def test_fuzzed_run_settings_train_or_fail_in_one_line(shard_set, tmp_path, capsys, chosen, data):
    path = tmp_path / "fuzz.yaml"
    path.write_text(json.dumps(BASE).replace(SHARDS, str(shard_set)).replace(RUNS, str(tmp_path / "runs")))
    overrides = [f"{key}={json.dumps(data.draw(RUN_SETTINGS[key], label=key))}" for key in chosen]
    capsys.readouterr()
    try:
        code = main(["train", "--config", str(path), "--", *overrides, f"name={uuid.uuid4().hex}"])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (code, len(lines)) in ((0, 0), (2, 1)), (code, lines)
    event("trained" if code == 0 else "refused")
    event(lines[0][:120] if lines else "")
