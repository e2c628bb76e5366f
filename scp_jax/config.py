"""Typed run configuration: defaults in code, a TOML file on top, `--set key=value` on top of that.

Every key is checked: an unknown key, a wrong type or an impossible value is a UserError, so a
typo never silently trains the wrong thing. Each table checks its own values; `Config` checks the
top-level keys and how the tables fit together.
"""

import dataclasses
import math
import tomllib
import typing
from pathlib import Path

from scp_jax.errors import UserError

CV_SCHEMES = ("kfold", "b_myeloid", "leave_cell_type_out", "full")
TE_STATS = ("mean", "std", "median", "q25", "q75")
MODEL_KINDS = ("mlp", "resmlp", "cnn", "gru", "lstm", "transformer", "factorized")
ACTIVATIONS = ("relu", "gelu")
OPTIMIZERS = ("adamw", "lion")
SCHEDULES = ("constant", "cosine", "onecycle")
CATEGORIES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}  # member tables store them as indices
AGGREGATES = ("mean", "median", "weighted")
TARGET_TRANSFORMS = ("none", "t_statistic")
PRECISIONS = ("fp32", "bf16", "bf16_state")  # scp_jax/precision.py; here so reading a config needs no jax
MAX_EPOCHS = 1_000_000
MAX_MEMBERS = 1_000_000  # the member table is built on the host, a row per member
MAX_SYNTH_GENES = 99_999  # synthetic worlds name their genes G00001..G99999


def _require(ok, message):
    if not ok:
        raise UserError(f"config: {message}")


def _one_of(key, value, choices):
    _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _check_hyperparameter(name, value):
    """`name`: the dotted key the value came from, so the message says which table to fix."""
    key = name.rpartition(".")[2]
    if key in CATEGORIES:
        _one_of(name, value, CATEGORIES[key])
    elif key in ("dropout", "input_mask", "warmup"):
        _require(0 <= value < 1, f"{name} must be in [0, 1), got {value}")
    elif key in ("learning_rate", "clip_norm"):
        _require(value > 0, f"{name} must be > 0, got {value}")
    elif key in ("weight_decay", "l2"):
        _require(value >= 0, f"{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # de_train.parquet; empty = the built-in synthetic world
    id_map: str = ""  # id_map.csv; empty = the one beside `train`
    synth_genes: int = 18211
    synth_seed: int = 0

    def __post_init__(self):
        _require(self.synth_genes >= 1, f"data.synth_genes must be >= 1, got {self.synth_genes}")
        _require(self.synth_genes <= MAX_SYNTH_GENES,
                 f"data.synth_genes must be <= {MAX_SYNTH_GENES}, got {self.synth_genes}")
        _require(self.synth_seed >= 0, f"data.synth_seed must be >= 0, got {self.synth_seed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"  # mlp | resmlp | cnn | gru | lstm | transformer | factorized (scp_jax.models)
    hidden: tuple[int, ...] = (64, 64)  # mlp: layer widths; resmlp: hidden[0] is the width, one block per entry
    activation: str = "relu"
    layer_norm: bool = False  # mlp: LayerNorm before each activation
    dropout: float = 0.0  # after each hidden activation / block
    input_mask: float = 0.0  # fraction of input features zeroed per row and step (1st place: 0.3)
    tokens: int = 16  # cnn/gru/lstm/transformer: the feature vector is cut into this many tokens
    width: int = 64  # cnn/gru/lstm/transformer: channels / state size / model width
    depth: int = 2  # cnn/gru/lstm/transformer: layers
    heads: int = 4  # transformer
    kernel_size: int = 3  # cnn
    rank: int = 16  # factorized: the embedding size of cell types and compounds
    row_scale: bool = False  # factorized, one-hot features: each (cell type, compound) pair its own size;
    # unseen pairs the log-normal mean size of their cell type's trained pairs

    def __post_init__(self):
        _one_of("model.kind", self.kind, MODEL_KINDS)
        for key in ("tokens", "width", "depth", "heads", "kernel_size", "rank"):
            _require(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _require(self.hidden and min(self.hidden) >= 1,
                 f"model.hidden must be a non-empty list of widths >= 1, got {list(self.hidden)}")
        _require(self.activation in ACTIVATIONS, f"model.activation must be 'relu' or 'gelu', got {self.activation!r}")
        _require(self.kind != "transformer" or self.width % self.heads == 0,
                 f"model.width ({self.width}) must be a multiple of model.heads ({self.heads})")
        for key in ("dropout", "input_mask"):
            _check_hyperparameter(f"model.{key}", getattr(self, key))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # adamw | lion
    schedule: str = "constant"  # constant | cosine | onecycle (over all epochs' steps)
    warmup: float = 0.0  # cosine: fraction of steps warming up linearly (onecycle always uses 0.3)
    learning_rate: float = 1e-3  # the peak learning rate
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    l2: float = 0.0  # a Gaussian prior on the dense weights, worth `l2` observations per weight (engine/losses.py)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_hyperparameter(f"optim.{field.name}", getattr(self, field.name))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Lists of values to cross with every (seed, fold): members are the product. An empty list (the
    default) sweeps nothing: the member's single value comes from [optim] or [model]."""

    optimizer: tuple[str, ...] = ()
    schedule: tuple[str, ...] = ()
    warmup: tuple[float, ...] = ()
    learning_rate: tuple[float, ...] = ()
    weight_decay: tuple[float, ...] = ()
    clip_norm: tuple[float, ...] = ()
    l2: tuple[float, ...] = ()
    dropout: tuple[float, ...] = ()
    input_mask: tuple[float, ...] = ()

    def __post_init__(self):
        for field in dataclasses.fields(self):
            for value in getattr(self, field.name):
                _check_hyperparameter(f"sweep.{field.name}", value)


# What a member may set for itself: each a per-member array in the one compiled program
# (engine/members.py); its single value is optim.<name> or model.<name>.
HYPERPARAMETERS = tuple(field.name for field in dataclasses.fields(SweepConfig))


@dataclasses.dataclass(frozen=True)
class TargetEncodingConfig:
    stats: tuple[str, ...] = ("mean", "std", "median", "q25", "q75")
    svd: int = 0  # 0: each statistic is a full gene vector; k: projected on the fold's top-k target components

    def __post_init__(self):
        _require(self.stats and set(self.stats) <= set(TE_STATS),
                 f"target_encoding.stats must be a non-empty subset of {', '.join(TE_STATS)}")
        _require(self.svd >= 0, f"target_encoding.svd must be >= 0 (0 = no SVD), got {self.svd}")


@dataclasses.dataclass(frozen=True)
class TargetsConfig:
    svd: int = 0  # 0: the model predicts genes; k: it predicts the fold's top-k target components
    loss_space: str = "genes"  # with svd: "genes" (decode, then MSE) or "components"
    transform: str = "none"  # "t_statistic": fit the t-statistics behind the targets (scp_jax/data/pvalues.py)

    def __post_init__(self):
        _require(self.svd >= 0, f"targets.svd must be >= 0 (0 = no SVD), got {self.svd}")
        _require(self.loss_space in ("genes", "components"),
                 f"targets.loss_space must be 'genes' or 'components', got {self.loss_space!r}")
        _one_of("targets.transform", self.transform, TARGET_TRANSFORMS)


LOSS_PARAMETERS = ("huber_delta",)  # the [loss] keys that shape a loss; every other key weighs one


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of a loss mix (1st place: mse 0.32, mae 0.24, logcosh 0.24, bce 0.2); see engine/losses.py."""

    mse: float = 1.0
    mae: float = 0.0
    logcosh: float = 0.0
    bce: float = 0.0  # on sigmoid-squashed targets
    huber: float = 0.0
    mrrmse: float = 0.0
    scale_free: float = 0.0  # MSE after the best nonnegative rescaling of each row's prediction
    huber_delta: float = 1.0

    def __post_init__(self):
        weights = {k: v for k, v in dataclasses.asdict(self).items() if k not in LOSS_PARAMETERS}
        _require(min(weights.values()) >= 0 and sum(weights.values()) > 0,
                 f"loss weights must be >= 0 with a positive sum, got {weights}")
        _require(self.huber_delta > 0, f"loss.huber_delta must be > 0, got {self.huber_delta}")


@dataclasses.dataclass(frozen=True)
class PseudoLabelConfig:
    """Two stages (3rd place): stage 1 predicts the id_map rows, stage 2 trains on the training rows
    plus those rows labelled by the stage-1 members of its own fold (so no validation row leaks in)."""

    enabled: bool = False
    weight: float = 1.0  # loss weight of a pseudo-labelled row relative to a real one

    def __post_init__(self):
        _require(self.weight >= 0, f"pseudo_labels.weight must be >= 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class AggregateConfig:
    """How member predictions combine: mean, median, or weighted (by 1 / member CV score^2)."""

    method: str = "mean"
    clip_to_train_range: bool = False  # clip each gene to its min/max over the training rows

    def __post_init__(self):
        _one_of("aggregate.method", self.method, AGGREGATES)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    ensemble: int = 20
    folds: int = 5
    epochs: int = 30
    epochs_per_chunk: int = 5
    batch_size: int = 64
    patience: int = 0  # epochs without improvement before a member stops; 0 = never
    keep: str = "best"  # the epoch a member keeps: "best" on its validation rows, or "last"
    precision: str = "fp32"  # fp32 | bf16 (compute) | bf16_state (bf16 parameters and optimizer state)
    lowrank_grads: bool = False  # MLP kernels' gradients as x^T dy factors, fused into AdamW on a GPU (engine/lowrank.py)
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
    loss: LossConfig = LossConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    aggregate: AggregateConfig = AggregateConfig()

    def hyperparameter_table(self, name):
        """Where hyperparameter `name`'s single value lives: "optim" or "model"."""
        return "optim" if hasattr(self.optim, name) else "model"

    def hyperparameter(self, name):
        """The value of hyperparameter `name` a member has unless the sweep sets it."""
        return getattr(getattr(self, self.hyperparameter_table(name)), name)

    def n_members(self):
        """How many members the run trains: `ensemble` (seed, fold) pairs x the sweep's combinations."""
        return self.ensemble * math.prod(len(values) for values in self.sweep_grid())

    def sweep_grid(self):
        """Per hyperparameter (HYPERPARAMETERS order), the values members take: the sweep's list, else the
        single value. Members are every (seed, fold) crossed with the grid's product."""
        return [getattr(self.sweep, name) or (self.hyperparameter(name),) for name in HYPERPARAMETERS]

    def __post_init__(self):
        """The top-level keys, and what each table's values must agree on with the others."""
        for key in ("ensemble", "epochs", "epochs_per_chunk", "batch_size", "checkpoint_every", "checkpoint_keep"):
            _require(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        _require(self.folds >= 2, f"folds must be >= 2 for cross-validation, got {self.folds}")
        _require(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        for key in ("epochs", "patience"):  # int32 counters on device; and the host walks every epoch
            _require(getattr(self, key) <= MAX_EPOCHS, f"{key} must be <= {MAX_EPOCHS}, got {getattr(self, key)}")
        # batch_size and seed enter the compiled program as int32
        _require(self.batch_size < 2**31, f"batch_size must be < 2**31, got {self.batch_size}")
        _require(0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed}")
        _require(self.n_members() <= MAX_MEMBERS, f"ensemble ({self.ensemble}) x the sweep's combinations gives"
                 f" {self.n_members():,} members; at most {MAX_MEMBERS:,}")
        _one_of("cv", self.cv, CV_SCHEMES)
        _one_of("precision", self.precision, PRECISIONS)
        _require(self.keep in ("best", "last"), f"keep must be 'best' or 'last', got {self.keep!r}")
        _require(self.keep == "best" or not self.patience, "patience stops at the best epoch; it needs keep = 'best'")
        _require(self.keep == "last" or not self.pseudo_labels.enabled,
                 "pseudo_labels.enabled needs keep = 'last': a fold's stage-1 members label the queries its stage 2"
                 " trains on, and a best epoch would be picked on that fold's validation rows")
        repeated = sorted({name for name in self.features if self.features.count(name) > 1})
        _require(not repeated, f"features lists {', '.join(map(repr, repeated))} more than once")
        model = self.model
        _require(not model.row_scale or (model.kind == "factorized" and list(self.features) == ["onehot"]),
                 "model.row_scale needs model.kind = 'factorized' and features = ['onehot'] (a size per (cell type,"
                 f" compound) pair), got {model.kind!r} and {list(self.features)}")
        _require(model.kind != "factorized" or {"onehot", "target_encoding"} & set(self.features),
                 "model.kind = 'factorized' multiplies a cell-type side by a compound side, and features"
                 f" {list(self.features)} give no cell-type side: add 'onehot' or 'target_encoding'")
        if self.lowrank_grads:
            _require(model.kind in ("mlp", "resmlp"),
                     f"lowrank_grads applies to mlp and resmlp models, got model.kind {model.kind!r}")
            _require(not (self.optim.l2 or any(self.sweep.l2)),
                     "lowrank_grads needs optim.l2 = 0 (the L2 prior's gradient is not low-rank)")

    def size_settings(self):
        """The model keys that size a member's parameters, with their values, for hints on what to lower:
        which keys depends on the model kind."""
        model = self.model
        if model.kind in ("mlp", "resmlp"):
            return f"model.hidden ({list(model.hidden)})"
        if model.kind == "factorized":
            return f"model.rank ({model.rank})"
        return f"model.width ({model.width}) or model.depth ({model.depth})"


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
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config: {key} must be a finite number, got {value}")
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
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except OSError as err:  # a folder, no permission
            raise UserError(f"{path}: cannot read config ({err.strerror or err})") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: cannot read config (not UTF-8 text: {err.reason} at byte {err.start})") from None
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
        # A table given inline (`model={kind="mlp"}`) overrides the keys it names, as dotted keys would,
        # not the whole table: the file's other model keys stay.
        node[leaf] = _merged(node.get(leaf), _parse_value(text.strip()))
    try:
        return _build(Config, values)
    except UserError as err:  # a value of the file alone (a run dir's config.toml on --resume): name the file
        if path is None or overrides or not str(err).startswith("config: "):
            raise
        raise UserError(f"{path}: {str(err).removeprefix('config: ')}") from None


def _merged(base, override):
    """`override`; where both are tables, `base` with `override`'s keys merged in alike."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    return {**base, **{key: _merged(base.get(key), value) for key, value in override.items()}}


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


# Keys a resumed run may change: they name where things are or how many checkpoints to keep, never
# what is computed (the data's contents, genes, vocabularies and members are checked separately).
RESUMABLE_KEYS = ("data.train", "data.id_map", "distributed", "checkpoint_keep")


def changed_keys(old, new):
    """{dotted key: (old, new) in TOML spelling} for the values that differ between two configs. A key
    `old` was written without (a package version before it) counts at its default."""
    def flat(config, prefix=""):
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            yield from flat(value, f"{prefix}{field.name}.") if dataclasses.is_dataclass(value) else [
                (prefix + field.name, value)]

    old, new = dict(flat(old)), dict(flat(new))
    return {key: (_toml_value(old[key]), _toml_value(new[key])) for key in old if old[key] != new[key]}


def parse_config(text):
    """A config from `to_toml` text (a checkpoint's), checked like a file."""
    return _build(Config, tomllib.loads(text))


def run_config_path(run_dir):
    """RUN_DIR/config.toml; a UserError when RUN_DIR is no run dir."""
    path = Path(run_dir) / "config.toml"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: {'a file, not a run dir' if Path(run_dir).exists() else 'run dir not found'}")
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run dir (no config.toml)")
    return path


def run_data_config(run_dir):
    """RUN_DIR's [data] table alone, checked like a file's: where its data is, without judging the rest
    of its config, which a run made by an older version may no longer pass."""
    path = run_config_path(run_dir)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8")).get("data", {})
        if not isinstance(data, dict):
            raise UserError("config: data must be a table")
        return _build(DataConfig, data, "data.")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, UserError) as err:
        raise UserError(f"{path}: {str(err).removeprefix('config: ')}") from None


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
