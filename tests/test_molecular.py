"""RDKit features, the feature cache and spec resolver, and the morgan/descriptors CLI."""

import numpy as np
import pandas as pd
import pytest

from scp_jax.errors import UserError
from scp_jax.features.__main__ import main as features_main
from scp_jax.features.cache import cached_features, compound_features
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


def test_cache_hit_skips_compute_and_any_change_misses(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(len(calls)).normal(size=(2, 3))

    first = cached_features("morgan", ["CCO", "O"], {"radius": 2, "bits": 3}, compute, cache_dir=tmp_path)
    again = cached_features("morgan", ["CCO", "O"], {"bits": 3, "radius": 2}, compute, cache_dir=tmp_path)
    assert len(calls) == 1 and first.dtype == np.float32 and np.array_equal(first, again)
    cached_features("morgan", ["CCO", "N"], {"radius": 2, "bits": 3}, compute, cache_dir=tmp_path)
    cached_features("morgan", ["CCO", "O"], {"radius": 3, "bits": 3}, compute, cache_dir=tmp_path)
    cached_features("morgan", ["O", "CCO"], {"radius": 2, "bits": 3}, compute, cache_dir=tmp_path)
    cached_features("descriptors", ["CCO", "O"], {"radius": 2, "bits": 3}, compute, cache_dir=tmp_path)
    assert len(calls) == 5
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"] * 5  # no temp files left behind


def test_compound_feature_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("SCP_JAX_CACHE", str(tmp_path))
    morgan = compound_features("morgan:radius=1,bits=256,counts=true", MOLECULES)
    np.testing.assert_array_equal(morgan, morgan_fingerprints(MOLECULES, radius=1, n_bits=256, counts=True))
    assert compound_features("morgan", MOLECULES).shape == (len(MOLECULES), 2048)
    np.testing.assert_array_equal(compound_features("descriptors", MOLECULES), rdkit_descriptors(MOLECULES))
    assert len(list((tmp_path / "features").glob("descriptors-*.npy"))) == 1
    for bad, message in [("fingerprints", r"valid: 'morgan\[:radius"), ("morgan:size=3", "unknown option 'size'"),
                         ("morgan:counts=maybe", "bad value 'maybe'"), ("chemberta:missing.npz", "no features file"),
                         ("morgan:bits=16,bits=32", "option 'bits' given twice")]:
        with pytest.raises(UserError, match=message):
            compound_features(bad, MOLECULES)


def write_train(path, smiles_by_name):
    """A minimal de_train.parquet: two cell types per compound, two genes."""
    rows = [dict(cell_type=cell, sm_name=name, sm_lincs_id=f"LSM-{i}", SMILES=smiles, control=False,
                 GENE1=0.1 * i, GENE2=-0.2)
            for i, (name, smiles) in enumerate(smiles_by_name.items()) for cell in ("B cells", "NK cells")]
    pd.DataFrame(rows).to_parquet(path)
    return path


COMPOUNDS = {"Ethanol": "CCO", "Aspirin": "CC(=O)Oc1ccccc1C(=O)O", "Caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
             "Benzene": "c1ccccc1"}


@pytest.mark.parametrize("command", [["morgan", "--radius", "1", "--bits", "128", "--counts"], ["descriptors"]])
def test_cli_writes_features_in_compound_vocabulary_order(tmp_path, command, capsys):
    data = write_train(tmp_path / "de_train.parquet", COMPOUNDS)
    out = tmp_path / "features.npz"
    features_main([*command, "--data", str(data), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    stored = np.load(out)
    names = sorted(COMPOUNDS)
    assert stored["sm_name"].tolist() == names and stored["smiles"].tolist() == [COMPOUNDS[n] for n in names]
    assert stored["features"].dtype == np.float32 and stored["features"].shape[0] == len(names)
    expected = (morgan_fingerprints(stored["smiles"].tolist(), radius=1, n_bits=128, counts=True)
                if command[0] == "morgan" else rdkit_descriptors(stored["smiles"].tolist()))
    np.testing.assert_array_equal(stored["features"], expected)
    shuffled = ["c1ccccc1", "CCO"]  # the file is aligned by SMILES, not by position
    np.testing.assert_array_equal(compound_features(f"chemberta:{out}", shuffled),
                                  expected[[names.index("Benzene"), names.index("Ethanol")]])
    with pytest.raises(UserError, match="no features for 1 SMILES, e.g. 'O'"):
        compound_features(f"chemberta:{out}", ["CCO", "O"])


def test_cli_errors_are_one_line_exit_2(tmp_path, cli_error):
    """The compound sorts first but sits at file rows 2-3: the message names the file's row."""
    data = write_train(tmp_path / "de_train.parquet", {"Zeta": "CCO", "Broken": "C1CC(not a molecule"})
    error = cli_error(features_main, ["morgan", "--data", data, "--out", tmp_path / "f.npz"])
    assert error == (f"error: {data}: column 'SMILES' has invalid SMILES "
                     "'C1CC(not a molecule' for compound 'Broken' (first at row 2)")
    assert not list(tmp_path.glob("*.npz"))
    error = cli_error(features_main, ["morgan", "--bits", "100000000000", "--data", data, "--out", tmp_path / "f.npz"])
    assert "bits in [1, 65536], got radius=2, bits=100000000000" in error


@pytest.mark.parametrize("features, message", [
    (np.zeros((1, 2), np.float32), r"'features' has 1 rows for 2 SMILES"),
    (np.zeros(2, np.float32), r"'features' must be a 2-D numeric array"),
    (np.array([[0.0, 1.0], [2.0, np.nan]], np.float32),
     r"'features' has value nan, not a finite float32, at row 1 \(SMILES 'O'\), column 1"),
    (np.array([[0.0, 1e300], [2.0, 3.0]]),
     r"'features' has value 1e\+300, not a finite float32, at row 0 \(SMILES 'CCO'\), column 1"),
])
def test_feature_file_with_wrong_shape_or_non_finite_values_is_refused(tmp_path, features, message):
    path = tmp_path / "features.npz"
    np.savez(path, smiles=np.array(["CCO", "O"]), features=features)
    with pytest.raises(UserError, match=f"^{path}: {message}"):
        compound_features(f"chemberta:{path}", ["CCO"])


def test_feature_file_with_a_smiles_twice(tmp_path):
    """The same features twice is harmless; two different rows for one SMILES are refused."""
    path = tmp_path / "features.npz"
    np.savez(path, smiles=np.array(["CCO", "O", "CCO"]), features=np.array([[1.0], [2.0], [1.0]], np.float32))
    np.testing.assert_array_equal(compound_features(f"chemberta:{path}", ["O", "CCO"]), [[2.0], [1.0]])
    np.savez(path, smiles=np.array(["CCO", "O", "CCO"]), features=np.array([[1.0], [2.0], [3.0]], np.float32))
    with pytest.raises(UserError, match=f"^{path}: SMILES 'CCO' has rows 0 and 2 with different features"):
        compound_features(f"chemberta:{path}", ["CCO"])


@pytest.mark.parametrize("spec", ["morgan", "descriptors"])
def test_training_features_name_the_bad_smiles_file_row(tmp_path, monkeypatch, spec):
    from scp_jax.config import load_config
    from scp_jax.data.dataset import load_train
    from scp_jax.features.tables import build_tables

    monkeypatch.setenv("SCP_JAX_CACHE", str(tmp_path))
    data = write_train(tmp_path / "de_train.parquet", {"Zeta": "CCO", "Alpha": "c1ccccc1", "Beta": "C1CC(bad"})
    config = load_config(None, [f'features=["{spec}"]'])
    with pytest.raises(UserError, match=rf"^{data}: column 'SMILES' has invalid SMILES 'C1CC\(bad' for compound "
                                        r"'Beta' \(first at row 4\)$"):
        build_tables(config, load_train(data), np.ones((1, 6), bool))
