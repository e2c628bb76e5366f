"""Each model kind: shapes, finite gradients, rows independent of their batch, dropout only in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scp_jax.config import MODEL_KINDS, load_config
from scp_jax.models import build_model
from scp_jax.models.sequence import tokenize

SMALL = ["model.hidden=[12, 12]", "model.tokens=4", "model.width=8", "model.depth=2", "model.heads=2"]


def small_model(kind, **extra):
    config = load_config(None, SMALL + [f"model.kind={kind}"] + [f"model.{k}={v}" for k, v in extra.items()])
    return build_model(config, (3, 3, 2, 2), 5, nnx.Rngs(0))  # cell, compound, fold_cell, fold_compound widths


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_rows_are_independent_of_their_batch_and_dropout_needs_a_key(kind):
    """Permuting the batch permutes the outputs and changes nothing else (no attention across rows);
    changing the other rows leaves a row's output alone; gradients reach every layer and are finite."""
    model = small_model(kind)
    x = jax.random.normal(jax.random.key(1), (7, 10))
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    other = x.at[1:].set(jax.random.normal(jax.random.key(2), (6, 10)))

    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def outputs(params):
        model = nnx.merge(graphdef, params)
        key = jax.random.key(3)
        grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, dropout_rate=0.1, key=key) ** 2))(params)
        return (model(x), model(x[perm]), model(other), model(x, dropout_rate=0.5, key=key),
                model(x, dropout_rate=0.0, key=key), model(x, dropout_rate=0.5), grads)

    out, permuted, changed, dropped, rate_zero, no_key, grads = outputs(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) >= len(leaves) - 1  # at most one dead leaf
    assert out.shape == (7, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(permuted, out[perm], atol=1e-5)
    np.testing.assert_allclose(changed[0], out[0], atol=1e-5)
    assert not np.allclose(dropped, out)
    np.testing.assert_allclose(rate_zero, out, atol=1e-6)
    np.testing.assert_array_equal(no_key, out)


def test_factorized_row_scale_equals_numpy_reference_and_starts_at_one():
    """exp(cell @ s + cell @ D @ compound) times the plain prediction, in float64; at initialization
    (s = 0, D = 0) every row keeps its plain size."""
    plain, scaled = small_model("factorized"), small_model("factorized", row_scale="true")
    x = np.asarray(jax.random.normal(jax.random.key(1), (7, 10)))
    np.testing.assert_allclose(scaled(jnp.asarray(x)), plain(jnp.asarray(x)), atol=1e-6)
    rng = np.random.default_rng(0)
    s, pair = rng.normal(size=5) * 0.3, rng.normal(size=(5, 5)) * 0.3  # cell + fold_cell = 5, compound + fold_compound = 5
    scaled.cell_log_scale[...], scaled.pair_log_scale[...] = jnp.asarray(s, jnp.float32), jnp.asarray(pair, jnp.float32)
    cell, compound = np.c_[x[:, :3], x[:, 6:8]], np.c_[x[:, 3:6], x[:, 8:10]]  # layout (3, 3, 2, 2)
    want = np.asarray(plain(jnp.asarray(x)), np.float64) * np.exp(cell @ s + np.sum((cell @ pair) * compound, 1))[:, None]
    np.testing.assert_allclose(scaled(jnp.asarray(x)), want, rtol=2e-5)


def test_center_row_scale_gives_unseen_pairs_the_mean_trained_size_and_keeps_trained_ones():
    """After centering, every trained (cell type, compound) pair predicts exactly what it did, and an
    unseen pair is predicted at the log-normal mean of its cell type's trained sizes, exp(median +
    sd^2 / 2) with sd the pooled MAD (numpy, float64); a cell type without trained pairs is left alone."""
    config = load_config(None, ["model.kind='factorized'", "model.row_scale=true", "model.rank=3"])
    model = build_model(config, (3, 4, 0, 0), 5, nnx.Rngs(0))  # one-hot: 3 cell types, 4 compounds
    rng = np.random.default_rng(0)
    s, pair = rng.normal(size=3), rng.normal(size=(3, 4))
    trained = np.array([[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    pair[~trained] = 0.0  # an untrained pair's D never leaves its starting zero
    model.cell_log_scale[...], model.pair_log_scale[...] = jnp.asarray(s, jnp.float32), jnp.asarray(pair, jnp.float32)
    cells, compounds = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    x = jnp.asarray(np.c_[np.eye(3)[cells.ravel()], np.eye(4)[compounds.ravel()]], jnp.float32)
    before = np.asarray(model(x), np.float64).reshape(3, 4, 5)
    model.center_row_scale(jnp.asarray(trained))
    after = np.asarray(model(x), np.float64).reshape(3, 4, 5)

    np.testing.assert_allclose(after[trained], before[trained], rtol=1e-5)
    np.testing.assert_allclose(after[2], before[2], rtol=1e-6)
    log_size = s[:, None] + pair
    medians = {cell: np.median(log_size[cell][trained[cell]]) for cell in (0, 1)}
    deviations = np.concatenate([log_size[cell][trained[cell]] - medians[cell] for cell in (0, 1)])
    sd = 1.4826 * np.median(np.abs(deviations))
    assert sd > 0.1  # the spread term is really tested
    for cell in (0, 1):
        want = np.exp(medians[cell] + sd**2 / 2 - log_size[cell, 2])  # compound 2: unseen
        np.testing.assert_allclose(after[cell, 2], before[cell, 2] * want, rtol=1e-5)
    model.center_row_scale(jnp.asarray(trained))  # every epoch: a second pass must not move s again
    np.testing.assert_allclose(np.asarray(model(x), np.float64).reshape(3, 4, 5), after, rtol=1e-5)


def test_center_row_scale_keeps_trained_sizes_when_s_is_too_coarse_to_move():
    """bf16 parameters: a move of s below half its rounding step must not shift every trained pair."""
    from scp_jax.models.factorized import Factorized

    model = Factorized((2, 3, 0, 0), 4, rank=3, row_scale=True, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.cell_log_scale[...] = jnp.array([1.0, 0.0], jnp.bfloat16)
    model.pair_log_scale[...] = jnp.array([[0.00325, 0.00325, 0.0], [0.0, 0.0, 0.0]], jnp.bfloat16)

    def sizes():
        return np.asarray(model.cell_log_scale[...], np.float32)[:, None] + np.asarray(model.pair_log_scale[...], np.float32)

    before = sizes()
    model.center_row_scale(jnp.array([[True, True, False], [False, False, False]]))
    np.testing.assert_array_equal(sizes(), before)


def test_tokenize_pads_and_keeps_order():
    x = jnp.arange(10.0)[None]
    tokens = tokenize(x, 4)
    assert tokens.shape == (1, 4, 3)
    np.testing.assert_array_equal(tokens.reshape(-1), np.r_[np.arange(10.0), 0, 0])


def test_model_config_errors():
    from scp_jax.errors import UserError

    with pytest.raises(UserError, match="model.kind"):
        load_config(None, ["model.kind=rnn"])
    with pytest.raises(UserError, match="multiple of model.heads"):
        load_config(None, ["model.kind=transformer", "model.width=10", "model.heads=4"])
    for override in ("model.kind=mlp", 'features=["onehot", "morgan"]'):
        with pytest.raises(UserError, match="row_scale needs model.kind = 'factorized' and features"):
            load_config(None, ["model.kind=factorized", "model.row_scale=true", override])


def test_numpy_predictor_refuses_what_it_cannot_run():
    from scp_jax.predictor import FORMAT, Predictor

    for architecture in ("transformer", "gru", "resmlp"):
        with pytest.raises(ValueError, match=f"runs mlp and factorized models; this is a '{architecture}' model"):
            Predictor({}, {"format": FORMAT, "architecture": architecture, "model": {}})
    manifest = {"format": FORMAT, "architecture": "mlp", "model": {}, "members": [{"fold": 0}] * 2}
    with pytest.raises(ValueError, match="no member kept a best epoch"):
        Predictor({"members.best_epoch": np.array([-1, -1])}, manifest)
    with pytest.raises(ValueError, match="aggregate must be one of"):
        Predictor({"members.best_epoch": np.array([3, -1])}, manifest).predict(np.zeros(1, int), np.zeros(1, int), "max")
    with pytest.raises(ValueError, match="not an scp-jax-npz/3 export .format 'scp-jax-npz/2'.; export the run again"):
        Predictor({}, {**manifest, "format": "scp-jax-npz/2"})


def test_factorized_prediction_of_a_whole_id_map_at_full_size_equals_numpy():
    """20 members x 255 rows x 18,211 genes through the vmapped model, as the engine predicts a
    submission, equal a float64 numpy forward. XLA:CPU's YNN fusions (jaxlib 0.10) gave every Myeloid
    row the B cells' size here (scp_jax/__init__.py turns them off); with 4 members, one row at a time,
    or 64 genes, it was right."""
    from scp_jax.models.factorized import Factorized

    members, rows, genes, layout = 20, 255, 18211, (6, 146, 0, 0)
    graphdef, _ = nnx.split(Factorized(layout, genes, row_scale=True, rngs=nnx.Rngs(0)), nnx.Param)
    states = []
    for m in range(members):
        model = Factorized(layout, genes, row_scale=True, rngs=nnx.Rngs(m))
        model.cell_log_scale[...] = jax.random.normal(jax.random.key(10 + m), (6,))
        states.append(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    cells = np.where(np.arange(rows) < 128, 0, 1)  # B cells, then Myeloid, as in the id map
    compounds = np.random.default_rng(0).integers(0, 146, rows)
    x = np.concatenate([np.eye(6)[cells], np.eye(146)[compounds]], axis=1).astype(np.float32)
    got = np.asarray(jax.jit(jax.vmap(lambda p, x: nnx.merge(graphdef, p)(x), in_axes=(0, None)))(params, x))
    got, checked = got[..., :256], slice(0, 256)  # every gene is predicted (the bug needs them); 256 are checked

    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), nnx.to_pure_dict(params))
    h = ((np.eye(6)[cells] @ p["cell"]["kernel"] + p["cell"]["bias"][:, None])
         * (np.eye(146)[compounds] @ p["compound"]["kernel"] + p["compound"]["bias"][:, None]))
    cap = np.exp(p["log_cap"])[:, None, None]
    want = cap * np.tanh(h @ p["loadings"]["kernel"][..., checked] / cap) + p["offset"][:, None, checked]
    want *= np.exp(p["cell_log_scale"][:, cells] + p["pair_log_scale"][:, cells, compounds])[..., None]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
