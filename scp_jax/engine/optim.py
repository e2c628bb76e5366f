"""AdamW after global-norm clipping, fused into one elementwise pass per parameter leaf.

Training this model at batch 32 is bound by memory traffic in the optimizer, not by FLOPs. The
same maths as `optax.chain(optax.clip_by_global_norm(c), optax.adamw(lr, weight_decay=wd))`
(tests check it against optax), written so each leaf is read once (p, g, mu, nu) and written once
(p, mu, nu), with the stochastic rounding of bf16_state and the `active` flag (which freezes a
stopped member) inside that same pass. The hyperparameters are per-member arrays in the state, so
a sweep stays one program. On the H200 it ran as fast as the optax chain with a `where` in fp32
(XLA fused that too) and 3% faster in bf16_state (benchmarks/results/throughput-gpu*.json).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scp_jax.precision import stochastic_round_bf16

B1, B2, EPS = 0.9, 0.999, 1e-8


class AdamWState(NamedTuple):
    count: jnp.ndarray  # updates applied so far (bias correction)
    mu: object  # first moments, like the params
    nu: object  # second moments, like the params
    hyperparams: dict  # learning_rate, weight_decay, clip_norm: this member's values


def init(params, learning_rate, weight_decay, clip_norm):
    zeros = jax.tree.map(jnp.zeros_like, params)
    hyperparams = {"learning_rate": learning_rate, "weight_decay": weight_decay, "clip_norm": clip_norm}
    return AdamWState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params),
                      {k: jnp.asarray(v, jnp.float32) for k, v in hyperparams.items()})


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def step(params, grads, state, active=True, rounding_seed=None):
    """One clipped AdamW step; returns (params, state). `active=False` returns them unchanged.

    `rounding_seed` (uint32) switches on stochastic rounding for bfloat16 leaves.
    """
    hp = state.hyperparams
    norm = _global_norm(grads)
    clip_scale = jnp.where(norm < hp["clip_norm"], 1.0, hp["clip_norm"] / norm)
    count = state.count + 1
    bias1 = 1.0 - B1 ** count.astype(jnp.float32)
    bias2 = 1.0 - B2 ** count.astype(jnp.float32)
    n_leaves = len(jax.tree.leaves(params))
    seeds = iter(range(n_leaves))

    def store(x, like, salt):
        if like.dtype == jnp.bfloat16 and rounding_seed is not None:
            return stochastic_round_bf16(x, rounding_seed + jnp.uint32(salt))
        return x.astype(like.dtype)

    def leaf(p, g, m, v):
        i = next(seeds)
        p32, m32, v32 = p.astype(jnp.float32), m.astype(jnp.float32), v.astype(jnp.float32)
        g32 = g.astype(jnp.float32) * clip_scale
        m_new = B1 * m32 + (1.0 - B1) * g32
        v_new = B2 * v32 + (1.0 - B2) * jnp.square(g32)
        update = (m_new / bias1) / (jnp.sqrt(v_new / bias2) + EPS) + hp["weight_decay"] * p32
        p_new = p32 - hp["learning_rate"] * update
        return (
            jnp.where(active, store(p_new, p, 3 * i), p),
            jnp.where(active, store(m_new, m, 3 * i + 1), m),
            jnp.where(active, store(v_new, v, 3 * i + 2), v),
        )

    out = jax.tree.map(leaf, params, grads, state.mu, state.nu)
    outer = jax.tree.structure(params)
    new_params, mu, nu = jax.tree.transpose(outer, jax.tree.structure((0, 0, 0)), out)
    return new_params, AdamWState(jnp.where(active, count, state.count), mu, nu, hp)
