"""MRRMSE (the competition metric) and the baselines every model must beat.

MRRMSE = mean over rows of the root-mean-squared error over genes. Baselines are fitted on a
subset of rows (`fit_mask`) so cross-validation scores them on exactly the folds the models see.
"""

import jax.numpy as jnp
import numpy as np

BASELINES = ("zeros", "cell_mean", "cell_median", "compound_mean", "compound_median", "additive")


def row_rmse(y_true, y_pred):
    """Per-row RMSE over genes, in float64 (numpy)."""
    diff = np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64)
    return np.sqrt(np.mean(diff * diff, axis=-1))


def mrrmse(y_true, y_pred):
    """Mean over rows of the RMSE over genes (numpy, float64)."""
    return float(np.mean(row_rmse(y_true, y_pred)))


def row_rmse_jax(y_true, y_pred):
    """Per-row RMSE over genes (jax.numpy; usable inside jit/vmap)."""
    return jnp.sqrt(jnp.mean(jnp.square(y_true - y_pred), axis=-1))


def masked_mrrmse_jax(y_true, y_pred, row_mask):
    """MRRMSE over the rows where `row_mask` is true (jax.numpy)."""
    per_row = row_rmse_jax(y_true, y_pred)
    return jnp.sum(per_row * row_mask) / jnp.maximum(jnp.sum(row_mask), 1)


def _group_stat(targets, groups, n_groups, fit_mask, stat):
    """Per-group statistic over fitted rows; groups without fitted rows get NaN."""
    table = np.full((n_groups, targets.shape[1]), np.nan)
    for g in range(n_groups):
        rows = fit_mask & (groups == g)
        if rows.any():
            table[g] = stat(targets[rows], axis=0)
    return table


def fit_baselines(targets, cell_index, compound_index, fit_mask, query_cell_index, query_compound_index):
    """Predict the query rows with each baseline fitted on `targets[fit_mask]`.

    A compound or cell type with no fitted row falls back to zeros (the strong prior on this
    task); `additive` is cell mean + compound mean - global mean, with the same fallbacks. No query
    rows (a fold without validation rows) gives empty predictions.
    """
    targets = np.asarray(targets, np.float64)
    fit_mask = np.asarray(fit_mask, bool)
    n_cells = 1 + max(np.max(cell_index, initial=-1), np.max(query_cell_index, initial=-1))
    n_compounds = 1 + max(np.max(compound_index, initial=-1), np.max(query_compound_index, initial=-1))
    tables = {
        "cell_mean": (_group_stat(targets, cell_index, n_cells, fit_mask, np.mean), query_cell_index),
        "cell_median": (_group_stat(targets, cell_index, n_cells, fit_mask, np.median), query_cell_index),
        "compound_mean": (_group_stat(targets, compound_index, n_compounds, fit_mask, np.mean), query_compound_index),
        "compound_median": (
            _group_stat(targets, compound_index, n_compounds, fit_mask, np.median),
            query_compound_index,
        ),
    }
    preds = {"zeros": np.zeros((len(query_cell_index), targets.shape[1]))}
    for name, (table, index) in tables.items():
        preds[name] = np.nan_to_num(table[index], nan=0.0)
    global_mean = targets[fit_mask].mean(axis=0)
    compound_effect = np.nan_to_num(tables["compound_mean"][0] - global_mean, nan=0.0)
    preds["additive"] = preds["cell_mean"] + compound_effect[query_compound_index]
    return {name: preds[name].astype(np.float32) for name in BASELINES}
