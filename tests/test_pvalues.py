"""The targets' scale: signed -log10 p-values and their t-statistics, against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from scp_jax.data.pvalues import (expected_signed_log10_p, expected_y_of_t, signed_log10_p, t_of_expected_y,
                                  t_statistic)


def test_signed_log10_p_matches_scipy_and_inverts_exactly():
    t = np.array([-37.0, -8.0, -1.0, -1e-6, 0.0, 0.5, 3.0, 12.0, 37.0])
    reference = np.sign(t) * -np.log10(2 * stats.norm.sf(np.abs(t)))
    np.testing.assert_allclose(signed_log10_p(t), reference, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t_statistic(signed_log10_p(t)), t, rtol=1e-10, atol=1e-12)
    y = np.array([-1000.0, -300.0, 0.0, 1e-9, 2.0, 300.0, 1000.0])  # p down to 1e-1000: beyond float64
    np.testing.assert_allclose(signed_log10_p(t_statistic(y)), y, rtol=1e-12, atol=1e-15)


def test_expected_y_of_t_matches_the_tabulated_reference_in_numpy_and_jax():
    t = np.concatenate([np.linspace(-30.0, 30.0, 601), [0.0, 1e-4, -1e-4, 39.99, 40.01, -55.0, 80.0]])
    reference = expected_signed_log10_p(t, 1.0)  # 160 nodes, float64
    np.testing.assert_allclose(expected_y_of_t(t, np), reference, rtol=1e-6, atol=2e-4)
    on_device = jax.jit(lambda x: expected_y_of_t(x, jnp))(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(on_device), reference, rtol=1e-5, atol=1e-3)
    draws = signed_log10_p(t[::60] + np.random.default_rng(0).standard_normal((100_000, 1)))
    np.testing.assert_allclose(expected_y_of_t(t[::60], np), draws.mean(0), rtol=5e-3, atol=0.01)


def test_t_of_expected_y_inverts_the_back_map():
    """Stage-1 pseudo labels are mapped-back predictions; stage 2 fits their t, not t_statistic(E[y])."""
    t = np.array([-25.0, -3.0, -0.5, 0.0, 0.1, 1.0, 7.0, 30.0])
    np.testing.assert_allclose(t_of_expected_y(expected_y_of_t(t, np)), t, atol=1e-4)
    assert np.all(np.abs(t_statistic(expected_y_of_t(t[4:6], np))) > 1.1 * t[4:6])  # the naive inverse inflates


def test_the_loss_fits_the_t_statistics_and_scores_the_targets():
    from scp_jax.engine.ensemble import Data

    y = np.array([[0.5, -2.0], [40.0, 0.0]], np.float32)
    data = Data(jnp.asarray(y), jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32), None,
                fit_targets=jnp.asarray(t_statistic(y), jnp.float32),
                pseudo_targets=jnp.full((1, 1, 2), 9.0))
    np.testing.assert_allclose(data.row_targets(0, jnp.array([1, 0, 2])), np.r_[t_statistic(y)[::-1], [[9.0, 9.0]]],
                               rtol=1e-6)
    np.testing.assert_array_equal(data.targets, y)  # validation scores the targets themselves
