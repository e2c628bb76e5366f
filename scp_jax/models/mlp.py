"""The MLP that maps a row's features to its 18,211-gene differential-expression vector."""

import jax
from flax import nnx

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}


class MLP(nnx.Module):
    """Dense layers with an activation between them; the last layer is linear (targets are signed)."""

    def __init__(self, in_features, hidden, out_features, *, activation="relu", rngs):
        sizes = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x):
        for layer in self.layers:
            x = self.activation(layer(x))
        return self.head(x)
