"""Typed experiment configs: YAML files -> dataclasses, with ``key.sub=value`` overrides.

Every problem (missing file, unknown key, wrong type, impossible value) raises a ``UserError``
whose one line names the file, the key, what was expected and, for a typo, the closest key.
The ``model`` section is open: its keys are checked against the chosen model's constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import reprlib
import types
import typing
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from deepfake_dist.errors import UserError
from deepfake_dist.registry import closest


@dataclass
class AugmentConfig:
    """Training-time augmentation; each transform fires with its probability."""

    hflip: float = 0.5
    crop: float = 0.5  # probability of a random resized crop
    crop_scale: tuple[float, float] = (0.7, 1.0)
    jitter: float = 0.3  # probability of brightness/contrast jitter
    jitter_strength: float = 0.2
    jpeg: float = 0.1  # JPEG recompression, Wang et al. 2020
    jpeg_quality: tuple[int, int] = (30, 100)
    blur: float = 0.1  # Gaussian blur, Wang et al. 2020
    blur_sigma: tuple[float, float] = (0.1, 3.0)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard sets with a manifest.json: folders, http(s):// or s3:// URLs
    val: Optional[list[str]] = None  # defaults to the train sets
    train_split: str = "train"
    val_split: str = "val"
    resolution: int = 64
    channels: Union[int, Literal["auto"]] = "auto"  # "auto": taken from the manifests
    batch_size: int = 32  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    pin_memory: bool = True
    persistent_workers: bool = True
    # loader workers run this much nicer (lower priority) than the training process, so that on
    # a busy CPU the process launching the GPU's work is not starved by them (BENCHMARKS.md, gpu)
    worker_nice: int = 10
    # workers hand batches to the training process in groups of about this many MiB (at least
    # one batch): each hand-off has a fixed cost, which larger groups spread (BENCHMARKS.md, loader)
    transfer_mib: float = 8.0
    normalize: Literal["imagenet", "half"] = "imagenet"  # "half": [-1, 1] as generators want
    # training on an unreadable sample or shard: skip it (warned once, counted in the metrics) or
    # stop with an error; evaluation always stops (its numbers would silently change)
    on_error: Literal["skip", "raise"] = "skip"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedConfig:
    name: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_steps: int = 0
    step_size: int = 1000  # for "step": decay every N optimizer steps
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps
    grad_accum: int = 1
    grad_clip: Optional[float] = 1.0
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None  # None: the launcher's
    channels_last: bool = True  # on a GPU (not DeepSpeed): NHWC weights and activations, faster convolutions
    monitor: str = "val/auroc"  # metric that picks the best checkpoint (validation only)
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping: Optional[int] = None  # epochs without improvement before stopping
    log_every: int = 10
    timeout_s: int = 1800  # a rank that dies or stalls ends the job after this many seconds
    max_nonfinite: int = 5  # batches in a row with a NaN/inf loss (each skipped) before the run stops


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    every_epochs: int = 1
    keep_last: int = 2
    resume: str = "auto"  # "auto" | "none" | path to a checkpoints/step-N folder


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "deepfake_dist"
    entity: Optional[str] = None


@dataclass
class GanConfig:
    """GAN training (models dcgan, cdcgan); real faces only, data.normalize must be "half"."""

    loss: Literal["bce", "hinge"] = "bce"  # bce: non-saturating BCE; hinge: hinge loss (SN-GAN)
    d_steps: int = 1  # discriminator updates per generator update
    d_lr: Optional[float] = None  # discriminator learning rate; null: optim.lr (TTUR when different)
    ema_decay: float = 0.999  # EMA of G used for samples, FID, synthesis and export; ramps up early on
    condition: Optional[str] = None  # cdcgan: dotted key of an integer in each sample's json, e.g. attributes.Male


@dataclass
class StyleGAN2Config:
    """StyleGAN2 training (model stylegan2), beside the gan section's loss, d_steps, d_lr and ema_decay."""

    r1_gamma: float = 1.0  # R1: gamma/2 * |grad of D on real images|^2; 0: off
    r1_every: int = 16  # lazy R1: every this many batches, weighted by it
    pl_weight: float = 0.0  # path-length regularisation of G; 0: off (StyleGAN2 uses 2)
    pl_every: int = 4  # lazy: every this many batches, weighted by it
    style_mixing: float = 0.9  # probability that a training batch mixes two latents' styles
    # differentiable augmentation of real and fake images before D (DiffAugment; for small sets):
    # any of translation, cutout, color
    augment: list[Literal["translation", "cutout", "color"]] = field(default_factory=list)


@dataclass
class DiffusionConfig:
    """Diffusion training (model ddpm): noise prediction (epsilon) with DDPM's schedule, MSE."""

    ema_decay: float = 0.999  # EMA of the network used for samples, FID, synthesis and export
    sampler: Literal["ddim", "dpm"] = "ddim"  # fast sampler: DDIM (eta 0) or DPM-Solver++ (2nd order)
    sample_steps: int = 50  # denoising steps for grids and FID, and generate's default (--steps)


@dataclass
class VaeConfig:
    """Autoencoder / VAE training (models ae, vae)."""

    kl_weight: float = 0.001  # weight of KL(q(z|x) || N(0, I)) against the per-pixel recon loss
    kl_warmup_steps: int = 500  # the KL weight ramps linearly from 0 over these optimizer steps
    recon: Literal["mse", "l1"] = "mse"


@dataclass
class SamplesConfig:
    """What generator runs (GAN, VAE) show and measure while training."""

    every: int = 500  # optimizer steps between fixed-noise sample grids (runs/NAME/samples/); 0: never
    grid: int = 64  # images per grid
    fid_every: int = 1  # epochs between FID/KID against the held-out real split; 0: never
    fid_samples: int = 2000  # generated (and at most real) images per FID/KID evaluation, all ranks together
    inception_weights: Optional[str] = None  # null: torch hub cache checkpoints/weights-inception-2015-12-05-6726825d.pth


@dataclass
class DistillConfig:
    """Knowledge distillation: with ``teacher`` set, the detector ``model`` (the student) learns
    from the teacher's softened outputs as well as the labels (task "distill")."""

    teacher: Optional[str] = None  # run folder or model.safetensors of an exported detector
    temperature: float = 4.0  # T: both logits are divided by T; the soft loss is scaled by T^2
    alpha: float = 0.7  # weight of the soft-target loss; (1 - alpha) weighs the hard-label loss


@dataclass
class ModelConfig:
    name: str = "cnn"
    args: dict = field(default_factory=dict)  # constructor arguments, checked against it

    @cached_property
    def _entry(self) -> tuple[Callable, dict[str, Any]]:
        """The registry's constructor and metadata for ``name``: looked up once, then carried by
        this config (an unknown name is a ``UserError`` naming the closest one)."""
        from deepfake_dist.models import MODELS

        return MODELS.get(self.name), MODELS.meta(self.name)

    @property
    def constructor(self) -> Callable:
        return self._entry[0]

    @property
    def meta(self) -> dict[str, Any]:
        return self._entry[1]

    @property
    def kind(self) -> str:
        """``detector``, ``gan``, ``autoencoder`` or ``diffusion``."""
        return self.meta["kind"]

    @property
    def task(self) -> str:
        """The training task's name: the model's ``task`` where it names one, else its kind."""
        return self.meta.get("task", self.kind)

    def build(self, **inputs):
        """The model, from ``inputs`` (what the data decides: channels, resolution) and ``args``."""
        return self.constructor(**inputs, **self.args)

    def arg(self, name: str, default: Any = None) -> Any:
        """The value ``name`` will have: from ``args``, else the constructor's default."""
        if name in self.args:
            return self.args[name]
        param = inspect.signature(self.constructor).parameters.get(name)
        return default if param is None or param.default is param.empty else param.default


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    stylegan2: StyleGAN2Config = field(default_factory=StyleGAN2Config)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file (a config or a pipeline); an empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass an existing YAML file, e.g. configs/smoke.yaml")
    try:
        raw = _parse_yaml(path.read_bytes().decode("utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides, and check everything."""
    return parse_config(read_yaml(path), path, overrides)


def parse_config(raw: dict, path: str | Path, overrides: list[str] = ()) -> Config:
    """The checked config from ``raw`` (read from ``path``) with ``key.sub=value`` overrides applied."""
    for item in overrides:
        apply_override(raw, item, where=f"{path} (override {_shown(item)})")
    return build_config(raw, where=str(path))


def apply_override(raw: dict, item: str, where: str) -> None:
    """Set ``a.b.c=value`` in the raw dict; the value is parsed as YAML (so 3, 1e-3, [a, b] work)."""
    if "=" not in item:
        raise UserError(f"{where}: an override must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: '{part}' is not a section, cannot set '{key}'")
    try:
        node[parts[-1]] = _parse_yaml(value)
    except UserError as e:
        raise UserError(f"{where}: the value is {e}; quote it to mean the text: {repr(key)[1:-1]}='\"...\"'") from None


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load``; its errors (a tag that is not plain data, an undefined alias, broken
    syntax) a UserError saying what and where, in one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"not valid YAML ({' '.join(str(e).split())[:200]})") from None


def build_config(raw: dict, where: str) -> Config:
    """The checked config: types and values here, then the task's own sections (``Task.check_config``)."""
    cfg = _build(Config, raw, where, prefix="")
    _check_model_args(cfg, where)
    _check_values(cfg, where)
    from deepfake_dist.tasks import task_class  # tasks sit above the config: the one import upwards

    task_class(cfg).check_config(cfg, where)
    return cfg


def to_dict(cfg) -> dict:
    """Plain, YAML-safe dict of a config (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, raw: Any, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {_shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig:  # model.<arg> keys other than name go to args
        raw = {"name": raw.get("name", ModelConfig.name), "args": {k: v for k, v in raw.items() if k != "name"}}
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(
                f"{where}: unknown key {_shown(prefix + str(key))}{closest(str(key), names)}; "
                f"valid keys here: {', '.join(names)}"
            )
        values[key] = _coerce(hints[key], value, where, prefix + key)
    return cls(**values)


_YAML_BOOLEAN_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(tp, value, where: str, key: str):
    """Check ``value`` against the annotation ``tp``; convert lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, where, key)
            except UserError as e:
                errors.append(e)
        raise UserError(f"{where}: '{key}' expected {_describe(tp)}, got {_shown(value)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off / yes / on as a boolean
            value = next((word for word in _YAML_BOOLEAN_WORDS[value] if word in args), value)
        if value in args:
            return value
        hint = closest(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise UserError(f"{where}: '{key}' expected one of {list(args)}, got {_shown(value)}{hint}")
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and len(value) != len(args):
                raise UserError(f"{where}: '{key}' expected a list of {len(args)} values, got {_shown(value)}")
            inner = args if origin is tuple else [args[0]] * len(value)
            items = [_coerce(t, v, where, f"{key}[{i}]") for i, (t, v) in enumerate(zip(inner, value))]
            return tuple(items) if origin is tuple else items
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):  # nan and inf are never a setting
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):  # YAML read the text as a number (or a boolean)
            raise UserError(f"{where}: '{key}' expected a string, got {_shown(value)}; for the text, quote it: "
                            f"{key.rsplit('.', 1)[-1]}: \"...\" in YAML, {key}='\"...\"' on the command line")
    elif tp is Any:
        return value
    raise UserError(f"{where}: '{key}' expected {_describe(tp)}, got {_shown(value)}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 200, 200
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def _shown(value) -> str:
    """``repr`` cut short: a value YAML built from aliases can hold billions of items (or itself)."""
    return _SHORT.repr(value)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_model_args(cfg: Config, where: str) -> None:
    """Model keys are whatever the registered constructor accepts."""
    try:
        ctor = cfg.model.constructor
    except UserError as e:
        raise UserError(f"{where}: 'model.name': {e}") from None
    params = inspect.signature(ctor).parameters
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in cfg.model.args:
        if key not in valid:
            raise UserError(
                f"{where}: unknown key {_shown(f'model.{key}')} for model '{cfg.model.name}'{closest(str(key), valid)}; "
                f"valid keys: name, {', '.join(valid)}"
            )
    try:
        hints = typing.get_type_hints(ctor)
    except (NameError, TypeError):  # an annotation that cannot be resolved: leave the values to the model
        hints = {}
    for key, value in cfg.model.args.items():  # the annotated type, where it is one we can check
        if key in hints and _checkable(hints[key]):
            cfg.model.args[key] = _coerce(hints[key], value, where, f"model.{key}")


def _checkable(tp) -> bool:
    """Whether ``_coerce`` understands this annotation (plain values, not e.g. ``os.PathLike``)."""
    if tp in (int, float, bool, str, type(None)) or typing.get_origin(tp) is Literal:
        return True
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (list, tuple, Union, types.UnionType) and bool(args) \
        and Ellipsis not in args and all(_checkable(a) for a in args)


# Numbers that mean nothing in any run below these bounds; what a task needs of them is the
# task's to say (``Task.check_config``).
POSITIVE = ("data.resolution", "data.batch_size", "train.epochs", "train.grad_accum", "train.log_every",
            "train.timeout_s", "train.max_nonfinite", "checkpoint.every_epochs", "checkpoint.keep_last", "optim.lr",
            "sched.step_size", "sched.gamma", "gan.d_steps", "samples.grid", "distill.temperature")
NON_NEGATIVE = ("data.num_workers", "data.shuffle_buffer", "data.transfer_mib", "sched.warmup_steps",
                "optim.weight_decay", "samples.every", "samples.fid_every", "samples.fid_samples",
                "vae.kl_warmup_steps", "vae.kl_weight")
POSITIVE_OR_NULL = ("train.max_steps", "checkpoint.every_steps", "train.early_stopping", "train.grad_clip")


def _check_bounds(cfg: Config, where: str) -> None:
    for key in (*POSITIVE, *NON_NEGATIVE, *POSITIVE_OR_NULL):
        value = attrgetter(key)(cfg)
        if value is None:
            continue
        if key in NON_NEGATIVE and value < 0:
            raise UserError(f"{where}: '{key}' must be >= 0, got {value}")
        if key not in NON_NEGATIVE and value <= 0:
            raise UserError(f"{where}: '{key}' must be positive{' or null' if key in POSITIVE_OR_NULL else ''}, "
                            f"got {value}")


def _within(where: str, key: str, value, low, high, what: str, ordered: bool = True) -> None:
    """``value`` (a number, or each of a pair) in [low, high]; a pair also in order, if ``ordered``."""
    values = list(value) if isinstance(value, tuple) else [value]
    if not all(low <= v <= high for v in values) or (ordered and values != sorted(values)):
        raise UserError(f"{where}: '{key}' is {what}, got {_shown(value)}")


def _check_ranges(cfg: Config, where: str) -> None:
    """Values a library would refuse mid-run (torch's optimizers, numpy's seed, the augmentations,
    in a loader worker) or quietly turn into nonsense (a negative learning rate)."""
    aug, eps = cfg.data.augment, 1e-12
    for name in ("hflip", "crop", "jitter", "jpeg", "blur"):
        _within(where, f"data.augment.{name}", getattr(aug, name), 0.0, 1.0, "a probability in [0, 1]")
    # the narrowest crop (aspect ratio 3/4) must keep a pixel's width: sqrt(scale * side^2 * 3/4) >= 1
    smallest = 4 / (3 * cfg.data.resolution**2)
    _within(where, "data.augment.crop_scale", aug.crop_scale, smallest, 1.0,
            f"the [smallest, largest] fraction of the image a crop keeps, in [{smallest:.2g}, 1] at data.resolution "
            f"{cfg.data.resolution} (a smaller one crops nothing)")
    _within(where, "data.augment.jitter_strength", aug.jitter_strength, 0.0, 1.0, "a strength in [0, 1]")
    _within(where, "data.augment.jpeg_quality", aug.jpeg_quality, 1, 100, "a [low, high] JPEG quality in 1..100")
    _within(where, "data.augment.blur_sigma", aug.blur_sigma, eps, math.inf, "a [low, high] blur sigma above 0 pixels")
    _within(where, "optim.betas", cfg.optim.betas, 0.0, 1.0 - eps, "a pair of decay rates, each in [0, 1)", ordered=False)
    _within(where, "optim.momentum", cfg.optim.momentum, 0.0, 1.0 - eps, "a momentum in [0, 1)")
    _within(where, "sched.min_lr_ratio", cfg.sched.min_lr_ratio, 0.0, 1.0, "a fraction of optim.lr in [0, 1]")
    _within(where, "seed", cfg.seed, 0, 2**32 - 1, "a seed in 0..4294967295 (numpy's range)")


def _check_values(cfg: Config, where: str) -> None:
    """Values that mean nothing in any run; what a task needs of them is the task's to say
    (``Task.check_config``)."""
    _check_bounds(cfg, where)
    if not 0 <= cfg.data.worker_nice <= 19:
        raise UserError(f"{where}: 'data.worker_nice' is a niceness increment in 0..19, got {cfg.data.worker_nice}")
    if not 0.0 <= cfg.gan.ema_decay < 1.0:
        raise UserError(f"{where}: 'gan.ema_decay' must be in [0, 1), got {cfg.gan.ema_decay}")
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        raise UserError(f"{where}: 'distill.alpha' is a weight in [0, 1], got {cfg.distill.alpha}")
    if cfg.data.channels not in ("auto", 1, 3):
        raise UserError(f"{where}: 'data.channels' must be 1, 3 or auto, got {cfg.data.channels}")
    if not cfg.data.train:
        raise UserError(f"{where}: 'data.train' is empty; list at least one shard set folder, e.g. [shards/lfw]")
    _check_ranges(cfg, where)
    for folder in [*cfg.data.train, *(cfg.data.val or [])]:  # a remote set (a URL) is checked when it is read
        if "://" not in str(folder) and not (Path(folder) / "manifest.json").is_file():
            raise UserError(
                f"{where}: shard set '{folder}' has no manifest.json; "
                f"create it with: deepfake-dist prepare --source ... --out {folder}"
            )
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).is_dir():
        raise UserError(
            f"{where}: 'checkpoint.resume' is '{cfg.checkpoint.resume}', which is neither auto, none nor a checkpoint folder"
        )
