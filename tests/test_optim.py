import jax
import numpy as np
import optax
import pytest

from scp_jax.config import OPTIMIZERS, SCHEDULES
from scp_jax.engine import optim

TOTAL = 10


def optax_reference(optimizer, schedule, lr=1e-2, wd=1e-3, clip=0.5):
    rate = {
        "constant": lr,
        "cosine": optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=3, decay_steps=TOTAL),
        "onecycle": optax.cosine_onecycle_schedule(TOTAL, lr),
    }[schedule]
    update = optax.adamw(rate, weight_decay=wd) if optimizer == "adamw" else optax.lion(rate, weight_decay=wd)
    return optax.chain(optax.clip_by_global_norm(clip), update)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("clip", [0.5, 1e3])  # gradients' norm is about 19: clipped, then not
def test_fused_step_equals_optax(optimizer, schedule, clip):
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(keys[0], (5, 7)), "b": jax.random.normal(keys[1], (7,))}
    reference = optax_reference(optimizer, schedule, clip=clip)
    ref_state, ref_params = reference.init(params), params
    state = optim.init(params, learning_rate=1e-2, weight_decay=1e-3, clip_norm=clip,
                       optimizer=OPTIMIZERS.index(optimizer), schedule=SCHEDULES.index(schedule),
                       warmup=0.3, total_steps=TOTAL)
    fused = params
    step = jax.jit(optim.step, static_argnames="lion_branch")
    for i in range(TOTAL):
        grads = jax.tree.map(lambda x: 3 * jax.random.normal(jax.random.fold_in(keys[2], i), x.shape), params)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        frozen, frozen_state = step(fused, grads, state, active=False, lion_branch=True)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(fused)))
        assert int(frozen_state.count) == int(state.count)
        fused, state = step(fused, grads, state, lion_branch=optimizer == "lion")
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=2e-6, err_msg=f"update {i}")
