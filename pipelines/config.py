"""Run configuration: typed, validated once at the edge, loaded from YAML presets under ``configs/``.

Every stage receives these objects, never dicts of strings: a ``RunConfig`` is validated once,
here, and crosses into Ray workers and sweep trials as itself (pydantic models pickle). Unknown
keys and bad values are rejected with the dotted key named (``finetune.epochs: must be >= 1``),
so a typo in a sweep does not silently run the defaults; rules that involve several keys (the
image size against the patch size, at least one patch masked and one visible for the chosen
model) are checked here too, before anything starts. ``--set key.path=value`` strings are
parsed (as YAML) at the command line's edge; sweeps pass typed ``{dotted key: value}`` dicts.
The method's defaults are ``msmae.defaults``'s, not repeated here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import msmae
from msmae import defaults
from pipelines.redact import mask_uri

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class _Section(BaseModel):
    # strict: `epochs: true` or `epochs: 2.5` is refused, not read as 1 or 2; no inf/nan anywhere (blr: .inf
    # would only show as a NaN loss inside the workers, minutes later)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DataConfig(_Section):
    img_size: int = Field(64, ge=16, description="training/eval image side in pixels")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


class ModelConfig(_Section):
    preset: Literal["tiny", "small", "base"] = "tiny"
    patch_size: int | None = Field(None, ge=2, description="override the preset's patch size")
    reg_tokens: int = Field(0, ge=0, le=16, description="register tokens beside CLS (0: none, the paper's ViT)")


class MaskingConfig(_Section):
    strategy: msmae.MaskingStrategy = Field(
        "attention",
        description="which weights order the draw: attention (the paper), uniform (the released code: its maps are all ones), "
        "all (fine-tuning only: no token dropped)",
    )
    map_source: msmae.MapSource = Field(
        "cls_attention",
        description="where the attention strategy's maps come from: cls_attention (the paper: last block, CLS row), rollout "
        "(attention rollout over all blocks), grad_attention (attention weighted by the true class's gradient), occlusion "
        "(probability drop per left-out patch: L extra forward passes per image at every refresh)",
    )
    mask_ratio: float = Field(defaults.MASK_RATIO, gt=0, lt=1)
    throw_ratio: float = Field(defaults.THROW_RATIO, ge=0, lt=1)
    sam_start: int = Field(0, ge=0, description="epochs of random masking before SAM (W)")
    refresh_every: int = Field(20, ge=1, description="epochs between attention-map refreshes (K)")
    align_maps: bool = Field(True, description="move each map with its image's crop and flip (False: maps used as stored)")
    all_tokens_from: float | None = Field(
        None, gt=0, le=1, description="fine-tuning only: from this fraction of the epochs on, train on every token",
    )

    @model_validator(mode="after")
    def _leaves_tokens_visible(self) -> "MaskingConfig":
        if self.mask_ratio + self.throw_ratio > 0.97:
            raise ValueError(
                f"mask_ratio + throw_ratio = {self.mask_ratio + self.throw_ratio:.3f} leaves almost no visible "
                "tokens; keep it <= 0.97"
            )
        return self


class OptimConfig(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch (split across workers)")
    blr: float = Field(gt=0, description="base lr; lr = blr * batch_size / 256")
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(defaults.WEIGHT_DECAY, ge=0)
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="cross-entropy weights per class: none, or balanced (n / (classes * n_class) from the training split) "
        "for imbalanced data such as HAM10000; in pre-training it weights the CLS term",
    )


class PretrainConfig(OptimConfig):
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    blr: float = Field(defaults.PRETRAIN_BLR, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    masking: MaskingConfig = MaskingConfig(sam_start=40, refresh_every=40)
    random_mask_ratio: float = Field(defaults.RANDOM_MASK_RATIO, gt=0, lt=1, description="MAE masking before SAM starts")
    cls_weight: float = Field(defaults.CLS_WEIGHT, ge=0, description="lambda: weight of the CLS cross-entropy")
    norm_pix_loss: bool = defaults.NORM_PIX_LOSS
    cls_loss: msmae.ClsLoss = Field(
        "logits", description="the CLS term's cross-entropy: on logits (ours), or softmax_ce (the released code's: softmax first)",
    )


class FinetuneConfig(OptimConfig):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    blr: float = Field(defaults.FINETUNE_BLR, gt=0)
    min_lr: float = Field(defaults.FINETUNE_MIN_LR, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    layer_decay: float = Field(defaults.LAYER_DECAY, gt=0, le=1)
    label_smoothing: float = Field(defaults.LABEL_SMOOTHING, ge=0, lt=1)
    drop_path: float = Field(defaults.DROP_PATH, ge=0, lt=1)
    masking: MaskingConfig = MaskingConfig(sam_start=0, refresh_every=20)


# Validation metrics a segmenter can be chosen on (both higher-is-better, per-image means).
SEGMENT_METRICS: tuple[str, ...] = ("val_dice", "val_iou")


class SegmentConfig(_Section):
    """The segmentation stage (``msmae segment``): the encoder (pre-trained or not) + a SETR-PUP head, Dice + BCE.

    A section of its own rather than ``finetune.*`` under a task switch: its optimiser settings, loss and
    selection metric differ from the classifier's, and one key meaning two things by task would be a trap."""

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (split across workers)")
    blr: float = Field(1e-3, gt=0, description="base lr; lr = blr * batch_size / 256")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(2, ge=0)
    weight_decay: float = Field(defaults.WEIGHT_DECAY, ge=0)
    encoder_lr_scale: float = Field(1.0, gt=0, le=1, description="the encoder's lr as a fraction of the head's (1: same lr)")
    decoder_width: int | None = Field(None, ge=8, description="channels of the SETR-PUP head (null: max(32, embed_dim // 3))")
    dice_weight: float = Field(1.0, ge=0, description="loss = BCE + dice_weight * (1 - soft Dice)")
    threshold: float = Field(0.5, gt=0, lt=1, description="lesion probability above which a pixel is lesion")
    metric: Literal[SEGMENT_METRICS] = Field("val_dice", description="validation metric that chooses the model")  # type: ignore[valid-type]


class ScalingConfig(_Section):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="extra Ray resources per Train worker, e.g. {train_slot: 1} on nodes started with one slot each, "
        "to place one worker per node",
    )
    torch_compile: bool | None = Field(
        None,
        description="torch.compile the training step's model in each Train worker; null: on with GPUs (use_gpu), off on CPU, "
        "where compiling costs more than it saves (benchmarks/gpu_perf.py measures both)",
    )

    @model_validator(mode="after")
    def _custom_resources_only(self) -> "ScalingConfig":
        clash = sorted({"CPU", "GPU"} & set(self.worker_resources))
        if clash:
            raise ValueError(f"worker_resources: {clash} are set by cpus_per_worker / use_gpu, not here")
        bad = {k: v for k, v in self.worker_resources.items() if v <= 0}
        if bad:
            raise ValueError(f"worker_resources: amounts must be > 0 (got {bad})")
        return self


# Validation metrics a model can be chosen on: the method's headline metrics (all higher-is-better).
SELECTION_METRICS: tuple[str, ...] = tuple(f"val_{name}" for name in msmae.HEADLINE_METRICS)
SelectionMetric = Literal[SELECTION_METRICS]  # type: ignore[valid-type]  # built from msmae: one list of metrics


class CheckpointConfig(_Section):
    every: int = Field(1, ge=1, description="checkpoint every N epochs")
    keep: int = Field(2, ge=1, description="checkpoints kept (the best by the validation metric stays)")
    metric: SelectionMetric = Field("val_macro_f1", description="validation metric that chooses the model (and the best checkpoints)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db or $MLFLOW_TRACKING_URI")
    # Both default to one derived from the dataset (msmae-<source folder or manifest name>): a preset's name would put
    # every dataset's model under one registered name, and the last dataset's model would answer for all of them.
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment; default msmae-<dataset name> (--experiment)")
    # MLflow refuses '/' and ':' in a registered model's name, and '..' path segments, but only at registration,
    # after training: refused here instead
    model_name: str | None = Field(None, description="registered model name (default msmae-<dataset name>; --model-name): "
                                                     "no '/', ':', '\\' or '..'")

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or any(c in name for c in "/:\\") or ".." in name):
            raise ValueError("MLflow cannot register a model under this name: use letters, digits, '-', '_', '.' or spaces "
                             "(no '/', ':', '\\' or '..'), e.g. msmae-btmd")
        return name

class RunConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    segment: SegmentConfig = SegmentConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _fits_the_model(self) -> "RunConfig":
        """Rules across sections that a Ray worker would otherwise hit minutes later, after retries."""
        try:
            preset = self.preset()
        except ValueError as e:
            raise ValueError(f"data.img_size / model.patch_size: {e}") from None
        if self.pretrain.masking.strategy not in msmae.STRATEGIES["pretrain"]:
            raise ValueError("pretrain.masking.strategy: 'all' is for fine-tuning; pre-training must hide patches to reconstruct them")
        if self.pretrain.masking.all_tokens_from is not None:
            raise ValueError("pretrain.masking.all_tokens_from: fine-tuning only (pre-training always hides patches)")
        p, f = self.pretrain, self.finetune
        draws = [("pretrain.masking", p.masking.mask_ratio, p.masking.throw_ratio), ("pretrain.random_mask_ratio", p.random_mask_ratio, 0.0)]
        if f.masking.strategy != "all":
            draws.append(("finetune.masking", f.masking.mask_ratio, f.masking.throw_ratio))
        for key, mask_ratio, throw_ratio in draws:
            try:
                msmae.mask_counts(preset.num_patches, mask_ratio, throw_ratio)
            except ValueError as e:
                raise ValueError(f"{key}: {e} (model {self.model.preset} at {preset.img_size} px has {preset.num_patches} patches)") from None
        return self

    def preset(self) -> msmae.ViTPreset:
        """The model's architecture at this run's image and patch size."""
        return msmae.get_preset(self.model.preset, self.data.img_size, self.model.patch_size, self.model.reg_tokens)

    def flat(self) -> dict[str, Any]:
        """``{"pretrain.masking.mask_ratio": 0.45, ...}`` for logging as parameters (credentials masked)."""
        return _flatten(self.public_dump())

    def public_dump(self) -> dict[str, Any]:
        """The configuration as it may be printed, logged or stored beside a model: JSON types, the tracking
        URI's password masked (``--tracking-uri`` and ``tracking.uri`` may carry one)."""
        tree = self.model_dump(mode="json")
        tree["tracking"]["uri"] = mask_uri(tree["tracking"]["uri"])
        return tree

    def with_values(self, values: Mapping[str, Any], source: str = "overrides") -> "RunConfig":
        """A new, validated config with ``{dotted key: value}`` applied (how a sweep trial gets its config)."""
        tree = self.model_dump()
        for key, value in values.items():
            _assign(tree, key, value)
        return validate_config(tree, source)


class ConfigError(ValueError):
    """A configuration value was rejected; the message names the dotted key."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=true"]`` (the command line's ``--set``) → ``{"a.b": 1, "c": True}``, values parsed as YAML."""
    values: dict[str, Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. finetune.epochs=50")
        key, raw = assignment.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return values


def _assign(tree: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` in a nested dict in place."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``demo``) from ``configs/``, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("space-"))
        raise ConfigError(f"unknown config preset {name_or_path!r}; choose one of {known} or pass a .yaml path")
    return candidate


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A YAML file the way every config and sweep space is read: safe, and with no key given twice."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def load_config(preset: str | Path = "demo", sets: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a preset (or YAML file), apply ``--set`` strings, then typed ``values``; validate once."""
    path = preset_path(preset)
    tree = load_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in {**parse_assignments(sets), **(values or {})}.items():
        _assign(tree, key, value)
    return validate_config(tree, source=str(path))


def validate_config(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            if not e["loc"]:  # a rule across sections: its message names the keys
                problems.append(f"  {e['msg'].removeprefix('Value error, ')}")
                continue
            key = ".".join(str(p) for p in e["loc"])
            message = "unknown key (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {key}: {message} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"  {key}: {message}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None
