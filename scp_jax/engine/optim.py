"""Clipped AdamW or Lion with a learning-rate schedule, fused into one elementwise pass per leaf.

Training this model at batch 32 is bound by memory traffic in the optimizer, not by FLOPs. The
same maths as `optax.chain(optax.clip_by_global_norm(c), optax.adamw(schedule, weight_decay=wd))`
(or `optax.lion`; tests check both against optax), written so each leaf is read once (p, g, mu,
nu) and written once (p, mu, nu), with the stochastic rounding of bf16_state and the `active` flag
(which freezes a stopped member) inside that same pass. Every hyperparameter, the optimizer and
the schedule included, is a per-member array in the state, so a sweep stays one program; the Lion
branch is compiled only when some member uses it. On the H200 the AdamW pass ran as fast as the
optax chain in fp32 and 3% faster in bf16_state (benchmarks/results/throughput-gpu*.json). A
kernel's gradient may come as its low-rank factors (engine/lowrank.py); on one GPU its AdamW pass
then forms it tile by tile, so it is never read or written at all.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scp_jax.config import OPTIMIZERS, SCHEDULES
from scp_jax.engine import lowrank
from scp_jax.precision import store

B1, B2, EPS = 0.9, 0.999, 1e-8  # AdamW
LION_B1, LION_B2 = 0.9, 0.99
ONECYCLE_PCT, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # optax.cosine_onecycle_schedule's defaults
LION, COSINE, ONECYCLE = OPTIMIZERS.index("lion"), SCHEDULES.index("cosine"), SCHEDULES.index("onecycle")
# A member's values the fused step reads from its state: the optimizer's share of config.HYPERPARAMETERS,
# and the length of its schedule.
OPTIMIZER_INPUTS = ("learning_rate", "weight_decay", "clip_norm", "optimizer", "schedule", "warmup", "total_steps")


class OptimizerState(NamedTuple):
    count: jnp.ndarray  # updates applied so far (bias correction, schedule)
    mu: object  # first moments (AdamW) or momentum (Lion), like the params
    nu: object  # second moments, like the params (unused by Lion)
    hyperparams: dict  # OPTIMIZER_INPUTS: this member's values; optimizer and schedule as indices


def init(params, **hyperparams):
    """Zero moments like `params`; of `hyperparams` (a member's), the OPTIMIZER_INPUTS are kept, with the
    optimizer and schedule as indices into config.OPTIMIZERS and SCHEDULES."""
    hyperparams = {k: jnp.asarray(hyperparams[k], jnp.float32) for k in OPTIMIZER_INPUTS}
    mu, nu = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))
    return OptimizerState(jnp.zeros([], jnp.int32), mu, nu, hyperparams)


def _anneal(start, end, fraction):
    """Cosine interpolation from `start` (fraction 0) to `end` (fraction 1)."""
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(fraction, 0.0, 1.0)))


def learning_rate(hp, step):
    """The scheduled rate for update `step` (0-based) of `total_steps`, as optax's schedules give it:
    constant; cosine (linear warmup over `warmup` of the steps, then cosine to 0); one-cycle (cosine up
    from lr/25 over 30% of the steps, cosine down to lr/25e4)."""
    peak, total = hp["learning_rate"], jnp.maximum(hp["total_steps"], 1.0)
    step = step.astype(jnp.float32)
    warmup_steps = jnp.round(hp["warmup"] * total)
    cosine = jnp.where(step < warmup_steps, peak * step / jnp.maximum(warmup_steps, 1.0),
                       _anneal(peak, 0.0, (step - warmup_steps) / jnp.maximum(total - warmup_steps, 1.0)))
    rise = jnp.floor(ONECYCLE_PCT * total)
    start, end = peak / ONECYCLE_DIV, peak / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    onecycle = jnp.where(step < rise, _anneal(start, peak, step / rise), _anneal(peak, end, (step - rise) / (total - rise)))
    schedule = hp["schedule"]
    return jnp.where(schedule == COSINE, cosine, jnp.where(schedule == ONECYCLE, onecycle, peak))


def adamw(p, g, m, v, clip_scale, rate, weight_decay, bias1, bias2, active):
    """One leaf's clipped AdamW step on float32 values -> (p, mu, nu); unchanged where not `active`."""
    g = g * clip_scale
    m_new = B1 * m + (1.0 - B1) * g
    v_new = B2 * v + (1.0 - B2) * jnp.square(g)
    update = (m_new / bias1) / (jnp.sqrt(v_new / bias2) + EPS)
    p_new = p - rate * (update + weight_decay * p)
    return tuple(jnp.where(active > 0, new, old) for new, old in zip((p_new, m_new, v_new), (p, m, v)))


def lion(p, g, m, v, clip_scale, rate, weight_decay, active):
    """One leaf's clipped Lion step on float32 values -> (p, momentum, v unchanged)."""
    g = g * clip_scale
    update = jnp.sign(LION_B1 * m + (1.0 - LION_B1) * g)
    p_new = p - rate * (update + weight_decay * p)
    m_new = LION_B2 * m + (1.0 - LION_B2) * g
    return jnp.where(active > 0, p_new, p), jnp.where(active > 0, m_new, m), v


def store_leaf(values, dtype, seed=None):
    """A leaf's new (p, mu, nu) in its dtype; with a `seed`, bf16 rounding seeded seed, seed + 1, seed + 2
    (the fused kernel in engine/lowrank.py seeds them the same way)."""
    return tuple(store(x, dtype, None if seed is None else seed + jnp.uint32(k)) for k, x in enumerate(values))


def step(params, grads, state, active=True, rounding_seed=None, lion_branch=False, lowrank_impl="xla"):
    """One clipped, scheduled AdamW or Lion step; returns (params, state). `active=False` returns them
    unchanged.

    `rounding_seed` (uint32) switches on stochastic rounding for bfloat16 leaves; `lion_branch`
    compiles the Lion branch (members pick theirs with hyperparams["optimizer"]). A gradient leaf
    may be a lowrank.Factored: with `lowrank_impl` "pallas" (or "interpret", for tests off a GPU) its
    AdamW step is one fused kernel where lowrank.fusable says so; else ("xla") XLA forms it first.
    """
    hp = state.hyperparams
    norm = jnp.sqrt(sum(lowrank.sq_norm(g) for g in jax.tree.leaves(grads)))
    clip_scale = jnp.where(norm < hp["clip_norm"], 1.0, hp["clip_norm"] / norm)
    count = state.count + 1
    rate = learning_rate(hp, state.count)
    bias1 = 1.0 - B1 ** count.astype(jnp.float32)
    bias2 = 1.0 - B2 ** count.astype(jnp.float32)
    is_lion = hp["optimizer"] == LION
    adamw_scalars = (clip_scale, rate, hp["weight_decay"], bias1, bias2, active)

    def leaf(index, p, g, m, v):
        seed = None if rounding_seed is None else rounding_seed + jnp.uint32(3 * index)
        if lowrank.fusable(g) and lowrank_impl != "xla" and not lion_branch:
            return lowrank.fused_update(adamw, p, m, v, g, adamw_scalars, seed, interpret=lowrank_impl == "interpret")
        g = g.dense() if isinstance(g, lowrank.Factored) else g.astype(jnp.float32)
        old = [x.astype(jnp.float32) for x in (p, m, v)]
        new = adamw(old[0], g, old[1], old[2], *adamw_scalars)
        if lion_branch:
            lion_new = lion(old[0], g, old[1], old[2], clip_scale, rate, hp["weight_decay"], active)
            new = [jnp.where(is_lion, a, b) for a, b in zip(lion_new, new)]
        return store_leaf(new, p.dtype, seed)

    leaves, treedef = jax.tree.flatten(params)
    others = [treedef.flatten_up_to(tree) for tree in (grads, state.mu, state.nu)]  # a Factored grad is one leaf
    new = [leaf(i, *args) for i, args in enumerate(zip(leaves, *others))]
    new_params, mu, nu = (treedef.unflatten(column) for column in zip(*new))
    return new_params, OptimizerState(jnp.where(active, count, state.count), mu, nu, hp)
