"""The targets' scale: signed -log10 p-values of t-statistics, and the way back to the t-statistics.

Why: a limma target is y = sign(t) * -log10(2 * Phi(-|t|)), so its noise is heavy-tailed and grows
with the effect. The t-statistic behind it has unit normal noise, a scale on which a squared error
is the right likelihood. Training on t (`targets.transform = "t_statistic"`) then needs predictions
mapped back: the best guess of y for a predicted t is E[y(t + N(0, 1))], not y(t).
"""

import numpy as np
from scipy import special

_LN10, _LN2 = np.log(10.0), np.log(2.0)
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(24)


def signed_log10_p(t, xp=np):
    """sign(t) * -log10(two-sided normal p-value), computed in log space (xp: numpy, in float64, or
    jax.numpy)."""
    if xp is np:
        t, log_ndtr = np.asarray(t, np.float64), special.log_ndtr
    else:
        from jax.scipy.special import log_ndtr
    return -xp.sign(t) * (log_ndtr(-xp.abs(t)) + _LN2) / _LN10


def t_statistic(y):
    """The inverse of `signed_log10_p`, in log space so p far below 1e-300 still inverts (relative error
    about 1e-15, up to 1e-5 for |y| < 1e-10, where -|y| ln 10 - ln 2 cancels)."""
    y = np.asarray(y, np.float64)
    return -np.sign(y) * special.ndtri_exp(-np.abs(y) * _LN10 - _LN2)


def expected_signed_log10_p(mean, scale):
    """E[signed_log10_p(mean + scale * N(0, 1))] for a scalar scale, by tabulated 160-node Gauss-Hermite."""
    mean = np.asarray(mean, np.float64)
    nodes, weights = np.polynomial.hermite.hermgauss(160)
    grid = np.arange(0.0, np.abs(mean).max() + 0.02, 0.005)
    table = signed_log10_p(grid[:, None] + np.sqrt(2.0) * scale * nodes) @ weights / np.sqrt(np.pi)
    return np.sign(mean) * np.interp(np.abs(mean), grid, table)  # odd in the mean


def expected_y_of_t(t, xp):
    """E[signed_log10_p(t + N(0, 1))] elementwise, by 24-node Gauss-Hermite (xp: jax.numpy or numpy).

    A sum over nodes, never a [..., nodes] array; under JAX a fori_loop, so log_ndtr's large
    expression is compiled once rather than once per node.
    """
    nodes, weights = np.sqrt(2.0) * _NODES, _WEIGHTS / np.sqrt(np.pi)
    if xp is np:
        return sum(weight * signed_log10_p(t + node) for node, weight in zip(nodes, weights))
    import jax

    nodes, weights = xp.asarray(nodes, t.dtype), xp.asarray(weights, t.dtype)
    return jax.lax.fori_loop(0, len(nodes), lambda i, acc: acc + weights[i] * signed_log10_p(t + nodes[i], xp),
                             xp.zeros_like(t))


def t_of_expected_y(y, step=1e-3):
    """The inverse of `expected_y_of_t` (numpy), by interpolation on a grid of t: the t-space label of
    a prediction that was mapped back, such as a stage-1 pseudo label."""
    y = np.asarray(y, np.float64)
    grid = np.arange(0.0, t_statistic(np.abs(y).max()) + 1.0, step)
    return np.sign(y) * np.interp(np.abs(y), expected_y_of_t(grid, np), grid)  # both odd and increasing
