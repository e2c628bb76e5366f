"""The targets' scale: signed -log10 p-values of t-statistics, and the way back to the t-statistics.

Why: a limma target is y = sign(t) * -log10(2 * Phi(-|t|)), so its noise is heavy-tailed and grows
with the effect. The t-statistic behind it has unit normal noise, a scale on which a squared error
is the right likelihood. Training on t (`targets.transform = "t_statistic"`) then needs predictions
mapped back: the best guess of y for a predicted t is E[y(t + N(0, 1))], not y(t).
"""

import functools

import numpy as np
from scipy import special

_LN10, _LN2 = np.log(10.0), np.log(2.0)
_CORRECTION_END, _STEP = 40.0, 1.0 / 128


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
    grid = np.arange(0.0, np.abs(mean).max() + 0.02, 0.005)
    return np.sign(mean) * np.interp(np.abs(mean), grid, _expected_on_grid(grid, scale))  # odd in the mean


def _expected_on_grid(grid, scale):
    """E[signed_log10_p(grid + scale * N(0, 1))] by 160-node Gauss-Hermite, float64."""
    nodes, weights = np.polynomial.hermite.hermgauss(160)
    return signed_log10_p(grid[:, None] + np.sqrt(2.0) * scale * nodes) @ weights / np.sqrt(np.pi)


@functools.cache
def _noise_correction():
    """E[y(t + N(0, 1))] - y(t) on the uniform grid t = 0, _STEP, ..., _CORRECTION_END. Smooth and odd
    in t; beyond the grid it is within 1e-4 of the last value (its limit is 0.5 / ln 10, half of
    y'' = 1 / ln 10)."""
    grid = np.arange(round(_CORRECTION_END / _STEP) + 1) * _STEP
    return _expected_on_grid(grid, 1.0) - signed_log10_p(grid)


def expected_y_of_t(t, xp):
    """E[signed_log10_p(t + N(0, 1))] elementwise (xp: jax.numpy or numpy): y(t) plus the tabulated
    effect of the noise, linearly interpolated on its uniform grid. One log_ndtr per element: this
    runs after every epoch on the validation rows, where a 24-node quadrature cost more than the
    training step."""
    table = xp.asarray(_noise_correction(), t.dtype if xp is not np else np.float64)
    position = xp.minimum(xp.abs(t) / _STEP, len(table) - 1.0)
    left = xp.minimum(xp.floor(position).astype(xp.int32), len(table) - 2)
    fraction = position - left
    correction = table[left] * (1.0 - fraction) + table[left + 1] * fraction
    return signed_log10_p(t, xp) + xp.sign(t) * correction


def t_of_expected_y(y, step=1e-3):
    """The inverse of `expected_y_of_t` (numpy), by interpolation on a grid of t: the t-space label of
    a prediction that was mapped back, such as a stage-1 pseudo label."""
    y = np.asarray(y, np.float64)
    grid = np.arange(0.0, t_statistic(np.abs(y).max()) + 1.0, step)
    return np.sign(y) * np.interp(np.abs(y), expected_y_of_t(grid, np), grid)  # both odd and increasing
