"""Flax NNX models. Each maps one row's features to its gene vector (or SVD components),
independently of the other rows in its batch.

A model kind is a module here, a branch in `build_model`, its name in `config.MODEL_KINDS` (with any
new `ModelConfig` keys and their checks, and its size keys in `Config.size_settings`). What the engine
asks of it: `__call__(x, *, dropout_rate=0.0, key=None)` maps [..., features] to float32 [..., outputs]
and mixes no rows (tests/test_models.py checks every kind); dense layers are `nnx.Linear` (or
`models.linear.Linear`, which `lowrank_grads` needs), and the `optim.l2` prior covers the kernel and
bias of every module of a `DENSE_LAYERS` type (engine/losses.py), whatever its name.
"""

from flax import nnx

from scp_jax.models.factorized import Factorized
from scp_jax.models.mlp import MLP, ResMLP
from scp_jax.models.sequence import CNN, Recurrent, Transformer
from scp_jax.precision import compute_dtype, param_dtype

DENSE_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)  # models.linear.Linear is an nnx.Linear


def build_model(config, layout, out_features, rngs):
    """The configured model over rows whose features have `layout` (FeatureTables.layout: the widths
    of the cell, compound, fold_cell and fold_compound parts)."""
    m = config.model
    in_features = sum(layout)
    common = dict(dtype=compute_dtype(config.precision), param_dtype=param_dtype(config.precision), rngs=rngs)
    if m.kind == "mlp":
        return MLP(in_features, m.hidden, out_features, activation=m.activation, layer_norm=m.layer_norm, **common)
    if m.kind == "resmlp":
        return ResMLP(in_features, m.hidden, out_features, activation=m.activation, **common)
    if m.kind == "factorized":
        return Factorized(layout, out_features, rank=m.rank, saturate=not config.targets.svd, row_scale=m.row_scale,
                          **common)
    tokens = dict(tokens=m.tokens, width=m.width, depth=m.depth)
    if m.kind == "cnn":
        return CNN(in_features, out_features, kernel_size=m.kernel_size, activation=m.activation, **tokens, **common)
    if m.kind in ("gru", "lstm"):
        return Recurrent(in_features, out_features, cell=m.kind, **tokens, **common)
    if m.kind == "transformer":
        return Transformer(in_features, out_features, heads=m.heads, activation=m.activation, **tokens, **common)
    raise ValueError(f"build_model has no branch for model.kind {m.kind!r}")
