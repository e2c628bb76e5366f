"""Typed run configuration: defaults in code, a TOML file on top, `--set key=value` on top of that.

Every key is checked: an unknown key, a wrong type or an impossible value is a UserError, so a
typo never silently trains the wrong thing.
"""

import dataclasses
import tomllib
import typing
from pathlib import Path

from scp_jax.errors import UserError
from scp_jax.precision import PRECISIONS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # de_train.parquet; empty = the built-in synthetic world
    id_map: str = ""  # id_map.csv; empty = the one beside `train`
    synth_genes: int = 18211
    synth_seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dropout: float = 0.0  # after each hidden activation
    input_mask: float = 0.0  # fraction of input features zeroed per row and step (1st place: 0.3)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Lists of values to cross with every (seed, fold): members are the product."""

    learning_rate: tuple[float, ...] = ()
    weight_decay: tuple[float, ...] = ()
    clip_norm: tuple[float, ...] = ()
    dropout: tuple[float, ...] = ()
    input_mask: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class TargetEncodingConfig:
    stats: tuple[str, ...] = ("mean", "std", "median", "q25", "q75")
    svd: int = 0  # 0: each statistic is a full gene vector; k: projected on the fold's top-k target components


@dataclasses.dataclass(frozen=True)
class TargetsConfig:
    svd: int = 0  # 0: the model predicts genes; k: it predicts the fold's top-k target components
    loss_space: str = "genes"  # with svd: "genes" (decode, then MSE) or "components"


CV_SCHEMES = ("kfold", "b_myeloid", "leave_cell_type_out", "full")
TE_STATS = ("mean", "std", "median", "q25", "q75")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    ensemble: int = 20
    folds: int = 5
    epochs: int = 30
    epochs_per_chunk: int = 5
    batch_size: int = 64
    patience: int = 0  # epochs without improvement before a member stops; 0 = never
    precision: str = "fp32"  # fp32 | bf16 (compute) | bf16_state (bf16 parameters and optimizer state)
    distributed: bool = False  # jax.distributed.initialize() for multi-host runs
    checkpoint_every: int = 5  # epochs between checkpoints (chunks also end there); one more at the end
    checkpoint_keep: int = 2  # latest checkpoints kept, plus the best one
    features: tuple[str, ...] = ("onehot",)
    cv: str = "kfold"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sweep: SweepConfig = SweepConfig()
    target_encoding: TargetEncodingConfig = TargetEncodingConfig()
    targets: TargetsConfig = TargetsConfig()

    def __post_init__(self):
        positive = {"ensemble": self.ensemble, "folds": self.folds, "epochs": self.epochs,
                    "epochs_per_chunk": self.epochs_per_chunk, "batch_size": self.batch_size,
                    "checkpoint_every": self.checkpoint_every, "checkpoint_keep": self.checkpoint_keep}
        for key, value in positive.items():
            if value < 1:
                raise UserError(f"config: {key} must be >= 1, got {value}")
        if self.folds < 2:
            raise UserError(f"config: folds must be >= 2 for cross-validation, got {self.folds}")
        if self.model.activation not in ("relu", "gelu"):
            raise UserError(f"config: model.activation must be 'relu' or 'gelu', got {self.model.activation!r}")
        if self.patience < 0:
            raise UserError(f"config: patience must be >= 0, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise UserError(f"config: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("learning_rate", "weight_decay", "clip_norm", "dropout", "input_mask"):
            section = "optim" if hasattr(self.optim, key) else "model"
            for value in (getattr(getattr(self, section), key), *getattr(self.sweep, key)):
                _check_hyperparameter(key, value)
        if self.cv not in CV_SCHEMES:
            raise UserError(f"config: cv must be one of {', '.join(CV_SCHEMES)}, got {self.cv!r}")
        unknown = [s for s in self.target_encoding.stats if s not in TE_STATS]
        if unknown or not self.target_encoding.stats:
            raise UserError(f"config: target_encoding.stats must be a non-empty subset of {', '.join(TE_STATS)}")
        for key, value in {"target_encoding.svd": self.target_encoding.svd, "targets.svd": self.targets.svd}.items():
            if value < 0:
                raise UserError(f"config: {key} must be >= 0 (0 = no SVD), got {value}")
        if self.targets.loss_space not in ("genes", "components"):
            raise UserError(f"config: targets.loss_space must be 'genes' or 'components', got {self.targets.loss_space!r}")


def _check_hyperparameter(key, value):
    if key in ("dropout", "input_mask") and not 0 <= value < 1:
        raise UserError(f"config: {key} must be in [0, 1), got {value}")
    if key in ("learning_rate", "clip_norm") and value <= 0:
        raise UserError(f"config: {key} must be > 0, got {value}")
    if key == "weight_decay" and value < 0:
        raise UserError(f"config: weight_decay must be >= 0, got {value}")


def _coerce(key, value, kind):
    """Check a TOML value against a dataclass field type; ints are accepted where floats are."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item_kind, _) = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_kind) for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"config: {key} must be {kind.__name__}, got {value!r}")
    return value


def _build(cls, values, prefix=""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in fields:
            raise UserError(f"config: unknown key {key!r} (known: {', '.join(prefix + f for f in fields)})")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise UserError(f"config: {key} must be a table")
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def _parse_value(text):
    """A `--set` value is TOML (`0.1`, `[512, 512]`, `true`); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path=None, overrides=()):
    """Defaults <- TOML file <- `key=value` overrides (dotted keys for tables)."""
    values = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path}: invalid TOML: {err}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected key=value")
        *tables, leaf = key.strip().split(".")
        node = values
        for table in tables:
            node = node.setdefault(table, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {table!r} is not a table")
        node[leaf] = _parse_value(text.strip())
    return _build(Config, values)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config):
    """The resolved config as TOML text, loadable by `load_config`."""
    scalars, tables = [], []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(value).items())
            tables.append(f"[{field.name}]\n{body}\n")
        else:
            scalars.append(f"{field.name} = {_toml_value(value)}")
    return "\n".join(scalars) + "\n\n" + "\n".join(tables)
