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


def signed_log10_p(t):
    """sign(t) * -log10(two-sided normal p-value), computed in log space."""
    t = np.asarray(t, np.float64)
    return -np.sign(t) * (special.log_ndtr(-np.abs(t)) + _LN2) / _LN10


def t_statistic(y):
    """The inverse of `signed_log10_p`, exact to float64 rounding even for p far below 1e-300."""
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

    A sum over nodes of elementwise terms, which XLA fuses into one pass: no [nodes, ...] array.
    """
    log_ndtr = special.log_ndtr if xp is np else _jax_log_ndtr
    total = 0.0
    for node, weight in zip(np.sqrt(2.0) * _NODES, _WEIGHTS / np.sqrt(np.pi)):
        shifted = t + node
        total = total + weight * -xp.sign(shifted) * (log_ndtr(-xp.abs(shifted)) + _LN2)
    return total / _LN10


def _jax_log_ndtr(x):
    from jax.scipy.special import log_ndtr

    return log_ndtr(x)
