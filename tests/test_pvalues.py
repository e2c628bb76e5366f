"""The targets' scale: signed -log10 p-values and their t-statistics, against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from scp_jax.data.pvalues import expected_signed_log10_p, expected_y_of_t, signed_log10_p, t_statistic


def test_signed_log10_p_matches_scipy_and_inverts_exactly():
    t = np.array([-37.0, -8.0, -1.0, -1e-6, 0.0, 0.5, 3.0, 12.0, 37.0])
    reference = np.sign(t) * -np.log10(2 * stats.norm.sf(np.abs(t)))
    np.testing.assert_allclose(signed_log10_p(t), reference, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(t_statistic(signed_log10_p(t)), t, rtol=1e-10, atol=1e-12)
    y = np.array([-1000.0, -300.0, 0.0, 1e-9, 2.0, 300.0, 1000.0])  # p down to 1e-1000: beyond float64
    np.testing.assert_allclose(signed_log10_p(t_statistic(y)), y, rtol=1e-12, atol=1e-15)


def test_expected_y_of_t_matches_the_tabulated_reference_in_numpy_and_jax():
    t = np.concatenate([np.linspace(-30.0, 30.0, 601), [0.0, 1e-4, -1e-4]])
    reference = expected_signed_log10_p(t, 1.0)  # 160 nodes, float64
    np.testing.assert_allclose(expected_y_of_t(t, np), reference, atol=1e-3)
    on_device = jax.jit(lambda x: expected_y_of_t(x, jnp))(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(on_device), reference, rtol=1e-5, atol=1e-3)
    draws = signed_log10_p(t[::60] + np.random.default_rng(0).standard_normal((100_000, 1)))
    np.testing.assert_allclose(expected_y_of_t(t[::60], np), draws.mean(0), rtol=5e-3, atol=0.01)
