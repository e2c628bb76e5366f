"""RDKit features: fingerprint semantics on known molecules, standardized descriptors, bad SMILES errors."""

import numpy as np
import pytest

from scp_jax.errors import UserError
from scp_jax.features.molecular import morgan_fingerprints, rdkit_descriptors, standardize_columns

MOLECULES = ["CCO", "c1ccccc1", "C1CCCCC1", "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
             "CCN(CC)CC", "Clc1ccccc1", "OC(=O)CCCCC(=O)O"]


def test_morgan_bits_are_binary_and_counts_dominate_them():
    bits = morgan_fingerprints(MOLECULES, radius=2, n_bits=512)
    counts = morgan_fingerprints(MOLECULES, radius=2, n_bits=512, counts=True)
    assert bits.shape == counts.shape == (len(MOLECULES), 512) and bits.dtype == np.float32
    assert set(np.unique(bits)) == {0.0, 1.0}
    assert (counts >= bits).all() and ((counts > 0) == (bits > 0)).all()
    assert counts.sum() > bits.sum()  # benzene's six identical carbons count six times


def test_morgan_fingerprints_of_known_molecules():
    ethanol, benzene, cyclohexane = morgan_fingerprints(["CCO", "c1ccccc1", "C1CCCCC1"], radius=2, n_bits=2048)
    assert 1 <= ethanol.sum() <= 8  # 3 heavy atoms: a handful of environments
    assert not np.array_equal(benzene, cyclohexane)  # aromatic vs aliphatic ring
    assert morgan_fingerprints(["OCC"], n_bits=2048)[0].tolist() == ethanol.tolist()  # same molecule, other SMILES
    assert morgan_fingerprints(["CCO"], radius=0, n_bits=2048).sum() < ethanol.sum()


def test_descriptors_are_finite_and_standardized():
    table = rdkit_descriptors(MOLECULES)
    assert table.dtype == np.float32 and table.shape[0] == len(MOLECULES) and table.shape[1] > 50
    assert np.isfinite(table).all()
    np.testing.assert_allclose(table.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(table.std(axis=0), 1.0, atol=1e-4)


def test_standardize_imputes_median_and_drops_constant_columns():
    raw = np.array([[1.0, 5.0, np.nan], [2.0, 5.0, 3.0], [np.inf, 5.0, 3.0], [3.0, 5.0, 9.0]])
    table = standardize_columns(raw)
    assert table.shape == (4, 2)  # the constant column is gone
    expected_first = np.array([1.0, 2.0, 2.0, 3.0])  # inf -> median of 1, 2, 3
    np.testing.assert_allclose(table[:, 0], (expected_first - expected_first.mean()) / expected_first.std(), rtol=1e-6)
    assert np.isfinite(table).all()


@pytest.mark.parametrize("featurize", [morgan_fingerprints, rdkit_descriptors])
def test_invalid_smiles_names_row_and_text(featurize):
    with pytest.raises(UserError, match=r"row 1: 'C1CC\(not a molecule'"):
        featurize(["CCO", "C1CC(not a molecule"])
