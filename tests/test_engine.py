import numpy as np

from scp_jax.config import load_config
from scp_jax.engine.cv import kfold_assignment
from scp_jax.engine.trainer import train_ensemble
from toy import toy_queries, toy_train

CONFIG = ["model.hidden=[16]", "batch_size=8", "epochs=6", "epochs_per_chunk=4", "folds=3"]


def test_training_beats_zeros_and_writes_test_predictions():
    train = toy_train()
    config = load_config(None, CONFIG + ["ensemble=3", "epochs=30", "epochs_per_chunk=10", "model.hidden=[32]"])
    result = train_ensemble(config, train, toy_queries(train))
    assert result.ensemble_cv < result.baseline_cv["zeros"]
    assert result.test_predictions.shape == (8, train.targets.shape[1])
    assert np.isfinite(result.test_predictions).all()


def test_kfold_assignment_is_balanced_and_seeded():
    folds = kfold_assignment(614, 5, seed=3)
    assert sorted(np.bincount(folds)) == [122, 123, 123, 123, 123]
    np.testing.assert_array_equal(folds, kfold_assignment(614, 5, seed=3))
    assert not np.array_equal(folds, kfold_assignment(614, 5, seed=4))


def test_same_config_same_numbers():
    train = toy_train()
    config = load_config(None, CONFIG + ["ensemble=3"])
    a, b = train_ensemble(config, train), train_ensemble(config, train)
    np.testing.assert_array_equal(a.member_cv, b.member_cv)
