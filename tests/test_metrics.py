import jax.numpy as jnp
import numpy as np
import pytest

from scp_jax.metrics import fit_baselines, masked_mrrmse_jax, mrrmse


def reference_mrrmse(y_true, y_pred):
    """Straight from the definition, row by row, in float64."""
    rows = []
    for t, p in zip(np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)):
        rows.append(np.sqrt(sum((a - b) ** 2 for a, b in zip(t, p)) / len(t)))
    return sum(rows) / len(rows)


def test_mrrmse_matches_float64_reference():
    rng = np.random.default_rng(0)
    y_true = rng.standard_t(2, size=(17, 33)).astype(np.float32)
    y_pred = rng.normal(size=(17, 33)).astype(np.float32)
    expected = reference_mrrmse(y_true, y_pred)
    assert mrrmse(y_true, y_pred) == pytest.approx(expected, rel=1e-12)
    assert float(masked_mrrmse_jax(jnp.asarray(y_true), jnp.asarray(y_pred), jnp.ones(17))) == pytest.approx(
        expected, rel=1e-5
    )


def test_masked_mrrmse_uses_only_masked_rows():
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.normal(size=(10, 5)), rng.normal(size=(10, 5))
    mask = np.arange(10) % 3 == 0
    got = float(masked_mrrmse_jax(jnp.asarray(y_true), jnp.asarray(y_pred), jnp.asarray(mask, jnp.float32)))
    assert got == pytest.approx(reference_mrrmse(y_true[mask], y_pred[mask]), rel=1e-5)


def test_mrrmse_is_mean_of_row_rmse_not_global_rmse():
    y_true = np.zeros((2, 4))
    y_pred = np.array([[0.0, 0, 0, 0], [2, 2, 2, 2]])
    assert mrrmse(y_true, y_pred) == pytest.approx(1.0)  # a global RMSE would give sqrt(2)


def test_baselines_against_hand_computed_tables():
    targets = np.array([[1.0, 2], [3, 4], [5, 6], [7, 8]])
    cell = np.array([0, 0, 1, 1])
    compound = np.array([0, 1, 0, 1])
    fit = np.array([True, True, True, False])
    preds = fit_baselines(targets, cell, compound, fit, np.array([1]), np.array([1]))
    np.testing.assert_allclose(preds["zeros"], [[0, 0]])
    np.testing.assert_allclose(preds["cell_mean"], [[5, 6]])  # only row 2 of cell 1 is fitted
    np.testing.assert_allclose(preds["compound_mean"], [[3, 4]])
    global_mean = targets[fit].mean(axis=0)
    np.testing.assert_allclose(preds["additive"], [[5, 6]] + (np.array([3, 4]) - global_mean))


def test_baseline_falls_back_to_zero_for_unseen_compound():
    targets = np.ones((3, 2))
    preds = fit_baselines(targets, np.zeros(3, int), np.array([0, 0, 1]), np.array([True, True, False]),
                          np.array([0]), np.array([1]))
    np.testing.assert_allclose(preds["compound_mean"], [[0, 0]])
    np.testing.assert_allclose(preds["compound_median"], [[0, 0]])


def test_baselines_of_no_query_rows_are_empty():
    """A fold without validation rows: the CV's out-of-fold loop assigns nothing instead of crashing."""
    targets = np.arange(8.0).reshape(4, 2)
    empty = np.zeros(0, int)
    preds = fit_baselines(targets, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.ones(4, bool), empty, empty)
    assert {name: p.shape for name, p in preds.items()} == {name: (0, 2) for name in preds}
