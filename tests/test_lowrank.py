"""Low-rank kernel gradients: the factors, the fused Pallas AdamW (interpreted here), the engine with them."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scp_jax.config import load_config
from scp_jax.engine import ensemble, lowrank, optim
from scp_jax.engine.trainer import train_ensemble
from scp_jax.errors import UserError
from scp_jax.models import MLP
from scp_jax.precision import store
from toy import toy_train

try:
    from jax.experimental.pallas import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
# Without it (deprecated since jax 0.11) the engine takes XLA's path, which the other tests cover.
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="this JAX has no Pallas Triton backend")

SCALARS = (0.5, 1e-2, 1e-3, 0.19, 0.0199, True)  # clip scale, rate, weight decay, bias corrections, active


def factored(rng, rows, n_in, n_out):
    return lowrank.Factored(jnp.asarray(rng.normal(size=(rows, n_in)), jnp.float32),
                            jnp.asarray(rng.normal(size=(rows, n_out)), jnp.float32))


def test_factors_give_the_gradient_and_its_norm():
    rng = np.random.default_rng(0)
    g = factored(rng, 5, 7, 9)
    dense = np.asarray(g.x, np.float64).T @ np.asarray(g.dy, np.float64)
    np.testing.assert_allclose(g.dense(), dense, rtol=1e-5)
    np.testing.assert_allclose(lowrank.sq_norm(g), np.sum(dense**2), rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("active", [True, False])
def test_fused_update_equals_adamw_on_the_dense_gradient(dtype, active):
    """Edge tiles (40 x 300 is no multiple of the tile), 20 rows (padded to 32), stochastic rounding
    of bf16 state with the same bits as the unfused path, an inactive member left untouched."""
    rng = np.random.default_rng(1)
    p, m, v = (jnp.asarray(rng.normal(size=(40, 300)) * s, dtype) for s in (1.0, 0.1, 0.01))
    v = jnp.abs(v)
    g = factored(rng, 20, 40, 300)
    seed = jnp.uint32(7) if dtype == jnp.bfloat16 else None
    scalars = (*SCALARS[:-1], active)
    got = lowrank.fused_update(optim.adamw, p, m, v, g, scalars, seed, interpret=True)
    want = optim.adamw(p.astype(jnp.float32), g.dense(), m.astype(jnp.float32), v.astype(jnp.float32), *scalars)
    want = [store(x, dtype, None if seed is None else seed + jnp.uint32(k)) for k, x in enumerate(want)]
    for name, a, b, old in zip(("p", "mu", "nu"), got, want, (p, m, v)):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(old, np.float32)) == (not active), name


@needs_triton
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_update_lowers_to_triton_for_a_gpu(monkeypatch, capsys, dtype):
    """The kernel as the engine gives it to a GPU (vmapped over members, each with its own rate and
    freeze flag, on W20's head): lowering it checks what Triton accepts (block shapes, masked edge
    tiles, scalar loads, the ops), without a GPU. 120 members stack over 2^31 elements of p, mu and
    nu, so their pointer offsets must be 64-bit: vmap folds the member into them."""
    from jax.experimental import pallas as pl

    def update(p, m, v, x, dy, rate, active, seed):
        scalars = (0.5, rate, 1e-3, 0.19, 0.0199, active)
        return lowrank.fused_update(optim.adamw, p, m, v, lowrank.Factored(x, dy), scalars,
                                    seed if dtype == jnp.bfloat16 else None)

    members = 120
    state = jax.ShapeDtypeStruct((members, 1024, 18211), dtype)
    args = (state, state, state, jax.ShapeDtypeStruct((members, 32, 1024), jnp.float32),
            jax.ShapeDtypeStruct((members, 32, 18211), jnp.float32), jax.ShapeDtypeStruct((members,), jnp.float32),
            jax.ShapeDtypeStruct((members,), jnp.bool_), jax.ShapeDtypeStruct((members,), jnp.uint32))
    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))  # prints the Triton IR
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    # No GPU here: name one (jax 0.12 takes the compute capability from it; 0.10 assumes 9.0, the H200's).
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=gpu)):
        exported = jax.export.export(jax.jit(jax.vmap(update)), platforms=["cuda"], disabled_checks=[triton])(*args)
    assert "xla.gpu.triton" in exported.mlir_module()
    state_pointers = [line for line in capsys.readouterr().out.splitlines()
                      if "tt.addptr" in line and ("masked_load" in line or "masked_swap" in line)]
    assert len(state_pointers) == 6, state_pointers
    assert all(re.search(r"tensor<[\dx]+xi64>", line) for line in state_pointers), state_pointers


def test_only_small_batches_are_fused():
    rng = np.random.default_rng(3)
    assert lowrank.fusable(factored(rng, lowrank.FUSED_ROWS, 100, 100))
    assert not lowrank.fusable(factored(rng, lowrank.FUSED_ROWS + 1, 100, 100))  # tiles would outgrow shared memory
    assert not lowrank.fusable(jnp.zeros((100, 100)))


def test_value_and_grad_factors_only_the_kernels_it_pays_to():
    """Loss and every gradient equal jax.value_and_grad's; a kernel whose side is not wider than the
    batch (the 3-wide head) keeps its dense gradient."""
    from flax import nnx

    model = MLP(12, (16,), 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.normal(size=(2, 4, 12)), jnp.float32), jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)

    def loss_fn(params, x, y):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x) - y))

    loss, grads = lowrank.value_and_grad(loss_fn, params, x, y)
    want_loss, want = jax.value_and_grad(loss_fn)(params, x, y)
    assert float(loss) == float(want_loss)
    assert isinstance(grads["layers"][0]["kernel"].get_value(), lowrank.Factored)  # 8 rows < 12 and 16
    assert not isinstance(grads["head"]["kernel"].get_value(), lowrank.Factored)  # 8 rows >= 3 outputs
    dense = jax.tree.map(lambda g: g.dense() if isinstance(g, lowrank.Factored) else g, grads,
                         is_leaf=lambda g: isinstance(g, lowrank.Factored))
    assert_same_leaves(dense, want, rtol=1e-5, atol=1e-7)


def assert_same_leaves(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tolerance)


@needs_triton
@pytest.mark.parametrize("precision", ["fp32", "bf16_state"])
def test_members_train_the_same_with_lowrank_gradients(monkeypatch, precision):
    """Dropout and input masking on. The fused kernel (interpreted) trains the members exactly as XLA
    forming x^T dy does, bf16 rounding bits included; in fp32 both match dense gradients. (bf16_state
    computes in bf16, where autodiff's dW is rounded to bf16 and x^T dy here is not.)"""
    train = toy_train()
    base = ["model.hidden=[16]", "batch_size=8", "epochs=2", "epochs_per_chunk=2", "folds=3", "ensemble=1",
            "sweep.dropout=[0.2]", "sweep.input_mask=[0.1]", f"precision={precision}"]
    runs = {}
    for impl in ("xla", "interpret"):
        monkeypatch.setattr(lowrank, "default_impl", lambda: impl)
        ensemble._cached_ensemble.cache_clear()  # programs built with the other implementation must not be reused
        runs[impl] = train_ensemble(load_config(None, base + ["lowrank_grads=true"]), train).state.params
    ensemble._cached_ensemble.cache_clear()
    assert_same_leaves(runs["xla"], runs["interpret"], rtol=1e-6 if precision == "fp32" else 0)
    if precision == "fp32":
        assert_same_leaves(train_ensemble(load_config(None, base), train).state.params, runs["xla"], rtol=1e-5, atol=1e-6)


def test_lowrank_gradients_refuse_an_l2_prior_and_models_without_their_dense_layers():
    with pytest.raises(UserError, match="lowrank_grads needs optim.l2 = 0"):
        load_config(None, ["lowrank_grads=true", "sweep.l2=[0.0, 1.0]"])
    with pytest.raises(UserError, match="lowrank_grads applies to mlp and resmlp models, got model.kind 'factorized'"):
        load_config(None, ["lowrank_grads=true", "model.kind='factorized'"])
