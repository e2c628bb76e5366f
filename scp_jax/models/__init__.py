"""Flax NNX models. Each maps one row's features to its gene vector, independently of other rows."""

from scp_jax.precision import compute_dtype, param_dtype
from scp_jax.models.mlp import MLP


def build_model(config, in_features, out_features, rngs):
    return MLP(
        in_features,
        config.model.hidden,
        out_features,
        activation=config.model.activation,
        dtype=compute_dtype(config.precision),
        param_dtype=param_dtype(config.precision),
        rngs=rngs,
    )
