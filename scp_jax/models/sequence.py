"""Models over one row's feature vector cut into a sequence of tokens (the 1st place's trick).

A row's features [F] are zero-padded to tokens * ceil(F / tokens) and reshaped to [tokens, token
width]; a CNN, GRU, LSTM or transformer runs along that token axis, never along the batch axis,
so each row's prediction depends on that row alone (tests permute the batch to check it). The
token states are flattened into a linear head.
"""

import math
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from scp_jax.models.mlp import ACTIVATIONS, maybe_dropout


def tokenize(x, tokens):
    """[..., F] -> [..., tokens, ceil(F / tokens)], zero-padded."""
    size = math.ceil(x.shape[-1] / tokens)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, tokens * size - x.shape[-1])])
    return x.reshape(*x.shape[:-1], tokens, size)


class _TokenModel(nnx.Module):
    """Shared frame: tokenize, embed each token, run `self.mix` layers, flatten into the head.
    `mix(i, h, drop)` is layer i; `drop(y, salt)` is dropout in training, identity at inference."""

    def __init__(self, in_features, out_features, *, tokens, width, dense, rngs):
        self.tokens = tokens
        self.embed = nnx.Linear(math.ceil(in_features / tokens), width, **dense, rngs=rngs)
        self.head = nnx.Linear(tokens * width, out_features, **dense, rngs=rngs)

    def embed_tokens(self, x):
        return self.embed(tokenize(x, self.tokens))

    def __call__(self, x, *, dropout_rate=0.0, key=None):
        h = self.embed_tokens(x)
        for i in range(self.depth):
            h = self.mix(i, h, lambda y, salt: maybe_dropout(y, dropout_rate, key, salt))
        return self.head(h.reshape(*h.shape[:-2], -1)).astype(jnp.float32)


class CNN(_TokenModel):
    """1D convolutions along the tokens (same padding), activation after each."""

    def __init__(self, in_features, out_features, *, tokens=16, width=64, depth=2, kernel_size=3,
                 activation="relu", dtype=None, param_dtype=jnp.float32, rngs):
        dense = dict(dtype=dtype, param_dtype=param_dtype)
        super().__init__(in_features, out_features, tokens=tokens, width=width, dense=dense, rngs=rngs)
        self.depth = depth
        self.convs = nnx.List([nnx.Conv(width, width, kernel_size, **dense, rngs=rngs) for _ in range(depth)])
        self.activation = ACTIVATIONS[activation]

    def mix(self, i, h, drop):
        return drop(self.activation(self.convs[i](h)), i)


class Recurrent(_TokenModel):
    """Stacked GRU or LSTM layers run along the tokens; every token's state goes to the head."""

    CELLS: typing.ClassVar = {"gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}

    def __init__(self, in_features, out_features, *, cell="gru", tokens=16, width=64, depth=2, dtype=None,
                 param_dtype=jnp.float32, rngs):
        dense = dict(dtype=dtype, param_dtype=param_dtype)
        super().__init__(in_features, out_features, tokens=tokens, width=width, dense=dense, rngs=rngs)
        self.depth, self.cell = depth, cell
        self.cells = nnx.List([self.CELLS[cell](width, width, **dense, rngs=rngs) for _ in range(depth)])

    def mix(self, i, h, drop):
        cell = self.cells[i]
        zeros = jnp.zeros(h[..., 0, :].shape, h.dtype)
        carry = (zeros, zeros) if self.cell == "lstm" else zeros  # LSTM carries (c, h)
        _, states = jax.lax.scan(lambda c, x_t: cell(c, x_t), carry, jnp.moveaxis(h, -2, 0))
        return drop(jnp.moveaxis(states, 0, -2), i)


class Transformer(_TokenModel):
    """Pre-norm encoder blocks; attention runs over the tokens of one row (axis -2), with a learned
    position embedding, and never across rows."""

    def __init__(self, in_features, out_features, *, tokens=16, width=64, depth=2, heads=4, activation="gelu",
                 dtype=None, param_dtype=jnp.float32, rngs):
        dense = dict(dtype=dtype, param_dtype=param_dtype)
        super().__init__(in_features, out_features, tokens=tokens, width=width, dense=dense, rngs=rngs)
        self.depth = depth
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, width), param_dtype))
        self.attention_norms = nnx.List([nnx.LayerNorm(width, **dense, rngs=rngs) for _ in range(depth)])
        self.attentions = nnx.List([
            nnx.MultiHeadAttention(heads, width, **dense, decode=False, keep_rngs=False, rngs=rngs)
            for _ in range(depth)
        ])
        self.mlp_norms = nnx.List([nnx.LayerNorm(width, **dense, rngs=rngs) for _ in range(depth)])
        self.expand = nnx.List([nnx.Linear(width, 2 * width, **dense, rngs=rngs) for _ in range(depth)])
        self.project = nnx.List([nnx.Linear(2 * width, width, **dense, rngs=rngs) for _ in range(depth)])
        self.activation = ACTIVATIONS[activation]

    def embed_tokens(self, x):
        h = super().embed_tokens(x)
        return h + self.position[...].astype(h.dtype)

    def mix(self, i, h, drop):
        """Dropout on each branch, not on the residual stream that carries the tokens through."""
        h = h + drop(self.attentions[i](self.attention_norms[i](h), deterministic=True), 2 * i)
        return h + drop(self.project[i](self.activation(self.expand[i](self.mlp_norms[i](h)))), 2 * i + 1)
