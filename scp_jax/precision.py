"""Precision modes, and the stochastic rounding that lets parameters and optimizer state live in bf16.

- `fp32`: parameters, optimizer state and compute in float32.
- `bf16`: float32 parameters and state, matmuls in bfloat16.
- `bf16_state`: parameters and AdamW moments *stored* in bfloat16 (half the bytes the
  memory-bound optimizer step moves). Each step upcasts to float32, applies the update there,
  and writes back with stochastic rounding (engine/optim.py), which is unbiased: a small update (lr * 1e-3 of a
  weight) survives in expectation instead of being rounded away as with round-to-nearest. There
  is no float32 master copy, so the memory floor really halves.
"""

import jax
import jax.numpy as jnp


def compute_dtype(precision):
    return jnp.float32 if precision == "fp32" else jnp.bfloat16


def param_dtype(precision):
    return jnp.bfloat16 if precision == "bf16_state" else jnp.float32


def _mix32(x):
    """murmur3's 32-bit finalizer: a cheap elementwise hash that fuses into the update kernel."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def stochastic_round_bf16(x, seed, index=None):
    """Round float32 `x` to bfloat16 up or down with probability given by the dropped bits.

    The noise is a hash of (element index, seed), so it needs no random-number kernel and is
    deterministic for a given seed. `index`: each element's flat (row-major) index in its array,
    for a tile of one (the default: `x` is the whole array).
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) if index is None else index
    noise = _mix32(index * jnp.uint32(0x9E3779B9) + seed) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def store(x, dtype, seed=None, index=None):
    """Float32 `x` as `dtype`; to bfloat16 with stochastic rounding when there is a `seed`."""
    if dtype == jnp.bfloat16 and seed is not None:
        return stochastic_round_bf16(x, seed, index)
    return x.astype(dtype)
