"""Feature sets, per-fold target encodings, SVD targets and CV schemes, on the 64-gene world."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from conftest import CI_CONFIG
from scp_jax.config import load_config, to_toml
from scp_jax.data.dataset import load_id_map, load_train
from scp_jax.data.dataset import HELD_OUT_CELLS
from scp_jax.engine.cv import make_folds
from scp_jax.engine.trainer import slot_ranges, train_ensemble
from scp_jax.errors import UserError
from scp_jax.features.tables import build_tables, split_sides, target_decoder
from scp_jax.features.targets import fold_svd

ENGINE = ["model.hidden=[16]", "batch_size=32", "epochs=3", "epochs_per_chunk=3", "ensemble=4"]


@pytest.fixture(scope="module")
def train(small_world):
    return load_train(small_world / "de_train.parquet")


def held_out_rows(train):
    return np.isin(np.asarray(train.cell_types)[train.cell_index], HELD_OUT_CELLS)


def member_features(config, train, folds):
    """Every slot's input features for every row, through the engine's own table build and gather."""
    tables = build_tables(config, train, folds.train_masks())
    slots = jnp.arange(folds.n_folds + 1)
    gather = jax.vmap(tables.rows, in_axes=(0, None, None))
    return np.asarray(gather(slots, jnp.asarray(train.cell_index), jnp.asarray(train.compound_index)))


def test_table_shapes(train):
    config = load_config(None, ['features=["onehot", "morgan:bits=128", "target_encoding"]', "target_encoding.svd=4",
                                'target_encoding.stats=["mean", "q75"]'])
    folds = make_folds("kfold", train, 5, 0)
    tables = build_tables(config, train, folds.train_masks())
    n_cells, n_compounds = len(train.cell_types), len(train.compounds)
    assert tables.cell.shape == (n_cells, n_cells)
    assert tables.compound.shape == (n_compounds, n_compounds + 128)
    assert tables.fold_cell.shape == (6, n_cells, 2 * 4 + 1)  # 5 folds + the all-rows slot; 2 stats x 4 + flag
    assert tables.fold_compound.shape == (6, n_compounds, 2 * 4 + 1)
    assert tables.layout == (n_cells, n_compounds + 128, 9, 9)
    assert tables.rows(2, jnp.arange(3), jnp.arange(3)).shape == (3, sum(tables.layout))
    # The factorized model's two sides: a row's cell-type features, and its compound's.
    cells, compounds = jnp.array([0, 1, 1]), jnp.array([2, 0, 5])
    cell_side, compound_side = split_sides(tables.rows(2, cells, compounds), tables.layout)
    np.testing.assert_array_equal(cell_side, np.c_[tables.cell[cells], tables.fold_cell[2][cells]])
    np.testing.assert_array_equal(compound_side, np.c_[tables.compound[compounds], tables.fold_compound[2][compounds]])


@pytest.mark.parametrize("svd", [0, 3])
def test_target_encoding_equals_float64_recomputation(train, svd):
    """pandas statistics of the fold's training rows; with `svd`, each projected on the top right
    singular vectors of those rows, centered (numpy's SVD; a vector's sign is arbitrary)."""
    config = load_config(None, ['features=["target_encoding"]', f"target_encoding.svd={svd}"])
    folds = make_folds("b_myeloid", train, 5, 0)
    tables = build_tables(config, train, folds.train_masks())
    fold = 1
    fit = folds.fold_of_row != fold
    frame = pd.DataFrame(train.targets[fit].astype(np.float64))
    basis = np.linalg.svd(frame - frame.mean(), full_matrices=False)[2][:svd] if svd else None
    for groups, table, n in ((train.cell_index, tables.fold_cell, len(train.cell_types)),
                             (train.compound_index, tables.fold_compound, len(train.compounds))):
        by = frame.groupby(groups[fit])
        stats = [s.to_numpy() for s in (by.mean(), by.std(ddof=0), by.median(), by.quantile(0.25), by.quantile(0.75))]
        expected = np.zeros((n, table.shape[2]))
        expected[:, -1] = 1.0
        seen = by.mean().index.to_numpy()
        expected[seen, :-1] = np.concatenate([s if basis is None else s @ basis.T for s in stats], axis=1)
        expected[seen, -1] = 0.0
        got = np.asarray(table[fold], np.float64)
        if svd:  # flip each of numpy's vectors to the table's sign
            signs = np.sign(np.sum(got[:, :-1] * expected[:, :-1], axis=0).reshape(5, svd).sum(axis=0))
            expected[:, :-1] *= np.tile(signs, 5)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_b_myeloid_compounds_held_out_of_one_fold_lose_nothing_else(train):
    config = load_config(None, ['features=["target_encoding"]'])
    folds = make_folds("b_myeloid", train, 5, 0)
    tables = build_tables(config, train, folds.train_masks())
    # a compound whose B/Myeloid rows are validated still has its T/NK rows: it is never "unseen"
    assert not np.asarray(tables.fold_compound[:, :, -1]).any()


def test_svd_targets_round_trip_at_full_rank():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(80, 24)).astype(np.float32)
    masks = np.stack([np.arange(80) % 2 == 0, np.ones(80, bool)])
    svd = fold_svd(targets, masks, 24, "targets.svd")
    for slot in range(2):
        np.testing.assert_allclose(svd.basis[slot] @ svd.basis[slot].T, np.eye(24), atol=1e-10)
        np.testing.assert_allclose(svd.decode(slot, svd.encode(slot, targets)), targets, atol=1e-5)
    with pytest.raises(UserError, match="targets.svd = 25 exceeds the rank bound 24"):
        fold_svd(targets, masks, 25, "targets.svd")


def test_svd_gram_route_spans_numpys_float64_subspace():
    """Genes > rows (every real run): the Gram route's basis is orthonormal and spans np.linalg.svd's top k."""
    rng = np.random.default_rng(1)
    targets = rng.normal(size=(40, 300)) * rng.lognormal(0.0, 1.0, 300)
    masks = np.stack([np.arange(40) % 4 != 0, np.ones(40, bool)])
    svd = fold_svd(targets, masks, 29, "targets.svd")  # fold 0: 30 rows, centered rank 29
    for slot, k in ((0, 29), (1, 29)):
        rows = targets[masks[slot]]
        _, _, vt = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
        basis = svd.basis[slot]
        np.testing.assert_allclose(svd.mean[slot], rows.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=1e-10)
        np.testing.assert_allclose(basis.T @ basis, vt[:k].T @ vt[:k], atol=1e-8)
    with pytest.raises(UserError, match="targets.svd = 30 exceeds the rank bound 29 .* of fold 0"):
        fold_svd(targets, masks, 30, "targets.svd")


@pytest.mark.parametrize("genes", [300, 24])
def test_svd_past_the_numerical_rank_of_a_fold_is_refused(genes):
    """4 distinct rows, repeated: centered rank 3, so a 4th vector would be rounding noise."""
    targets = np.repeat(np.random.default_rng(2).normal(size=(4, genes)), 10, axis=0)
    masks = np.ones((2, 40), bool)
    basis = fold_svd(targets, masks, 3, "target_encoding.svd").basis[0]
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-10)
    with pytest.raises(UserError, match="target_encoding.svd = 4 exceeds the rank 3 .* of fold 0; lower"):
        fold_svd(targets, masks, 4, "target_encoding.svd")


def test_svd_decoder_on_device_uses_the_members_fold(train):
    config = load_config(None, ["targets.svd=5"])
    folds = make_folds("kfold", train, 3, 0)
    decoder = target_decoder(config, train.targets, folds.train_masks())
    assert decoder.basis.shape == (4, 5, len(train.genes)) and decoder.mean.shape == (4, len(train.genes))
    mean = train.targets[folds.fold_of_row != 2].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(np.asarray(decoder.mean[2]), mean, atol=1e-5)


def test_cv_scheme_masks(train):
    held_all = held_out_rows(train)
    b_compounds = np.unique(train.compound_index[held_all])
    assert len(b_compounds) == 17
    held = held_all & ~train.control  # the positive controls' rows always train
    assert held_all.sum() - held.sum() == 4 and train.control[held_all].sum() == 4

    b = make_folds("b_myeloid", train, 5, 0)
    assert b.n_folds == 5
    validated = b.fold_of_row >= 0
    np.testing.assert_array_equal(validated, held)  # every non-control B/Myeloid row, nothing else
    for fold in range(5):
        rows = b.fold_of_row == fold
        compounds = np.unique(train.compound_index[rows])
        # exactly the B/Myeloid rows of this fold's compounds; their T/NK rows train
        np.testing.assert_array_equal(rows, held & np.isin(train.compound_index, compounds))
        assert b.train_masks()[fold][~held & np.isin(train.compound_index, compounds)].all()
    assert all(len(np.unique(train.compound_index[b.fold_of_row == f])) == 3 for f in range(5))  # 15 / 5 folds
    assert b.train_masks()[5].all()  # the all-rows slot

    lcto = make_folds("leave_cell_type_out", train, 5, 0)
    assert lcto.n_folds == 4
    for fold in range(4):
        rows = lcto.fold_of_row == fold
        assert len(np.unique(train.cell_index[rows])) == 1
        assert not held[rows].any() and not np.isin(train.compound_index[rows], b_compounds).any()
    assert (lcto.fold_of_row[np.isin(train.compound_index, b_compounds)] == -1).all()

    full = make_folds("full", train, 5, 0)
    assert full.n_folds == 0 and full.train_masks().shape == (1, len(train.targets)) and full.train_masks().all()

    k = make_folds("kfold", train, 5, 0)
    assert (k.fold_of_row >= 0).all() and k.train_masks()[5].all()


def test_b_myeloid_refuses_data_whose_only_b_myeloid_rows_are_controls(train):
    controls_only = dataclasses.replace(train, control=held_out_rows(train))
    with pytest.raises(UserError, match="B/Myeloid training rows of a compound that is not a control"):
        make_folds("b_myeloid", controls_only, 5, 0)


def test_folds_that_would_validate_nothing_are_refused(train):
    with pytest.raises(UserError, match="folds = 615 is more than the 614 training rows"):
        make_folds("kfold", train, 615, 0)
    assert make_folds("kfold", train, 614, 0).n_folds == 614
    b_compounds = np.unique(train.compound_index[held_out_rows(train)])
    nk = train.cell_types.index("NK cells")
    only_shared = dataclasses.replace(  # NK cells seen on the B/Myeloid compounds only
        train, cell_index=np.where((train.cell_index == nk) & ~np.isin(train.compound_index, b_compounds),
                                   train.cell_types.index("T cells CD4+"), train.cell_index))
    with pytest.raises(UserError, match="validate nothing on 'NK cells'"):
        make_folds("leave_cell_type_out", only_shared, 5, 0)
    assert train.cell_types[:2] == HELD_OUT_CELLS  # sorted, so every other cell type can become Myeloid cells
    held_only = dataclasses.replace(train, cell_types=HELD_OUT_CELLS, cell_index=np.minimum(train.cell_index, 1))
    with pytest.raises(UserError, match="needs a cell type other than B cells and Myeloid cells"):
        make_folds("leave_cell_type_out", held_only, 5, 0)


def fitted_on_targets(config, train, folds):
    """Per slot, everything fitted on targets: the members' input features, the SVD target decoder and
    the per-gene clip range."""
    masks = folds.train_masks()
    decoder = target_decoder(config, train.targets, masks)
    clip_range = np.stack(slot_ranges(train.targets, masks), axis=1)  # [slots, (low, high), genes]
    return [(features, decoder.mean[slot], decoder.basis[slot], clip_range[slot])
            for slot, features in enumerate(member_features(config, train, folds))]


@pytest.mark.parametrize("scheme, svd", [("kfold", 0), ("b_myeloid", 4), ("leave_cell_type_out", 0)])  # full validates nothing
def test_validation_targets_never_reach_the_inputs_of_members_validating_them(train, scheme, svd):
    config = load_config(None, ['features=["onehot", "target_encoding"]', f"target_encoding.svd={svd}", "targets.svd=3"])
    folds = make_folds(scheme, train, 5, 0)
    before = fitted_on_targets(config, train, folds)
    for row in np.flatnonzero(folds.fold_of_row >= 0)[:2]:
        targets = train.targets.copy()
        targets[row] += 5.0
        after = fitted_on_targets(config, dataclasses.replace(train, targets=targets), folds)
        for slot in range(folds.n_folds + 1):
            for a, b in zip(after[slot], before[slot]):
                if folds.fold_of_row[row] == slot:
                    np.testing.assert_array_equal(a, b)  # validates the row: blind to it
                else:
                    assert not np.array_equal(a, b)  # trains on it: what it fits moves


def test_out_of_fold_predictions_are_clipped_to_their_folds_training_range(train):
    """Gene 0 is 5 in every row but one validation row, where it is -100: the rows of that row's fold
    must come out at exactly 5 (their members never saw -100), whatever the model predicts; every
    row is clipped to its own fold's range (numpy), and the CV scores the clipped predictions."""
    row = 7
    targets = train.targets.copy()
    targets[:, 0], targets[row, 0] = 5.0, -100.0
    train = dataclasses.replace(train, targets=targets)
    overrides = ENGINE + ["ensemble=5", "folds=5"]
    free = train_ensemble(load_config(None, overrides), train).oof_predictions
    result = train_ensemble(load_config(None, overrides + ["aggregate.clip_to_train_range=true"]), train)
    fold_of_row = result.folds.fold_of_row
    same_fold = fold_of_row == fold_of_row[row]
    assert same_fold.sum() > 1 and (free[same_fold, 0] != 5.0).any()  # so an all-rows range would fail below
    np.testing.assert_array_equal(result.oof_predictions[same_fold, 0], 5.0)
    trains_row = fold_of_row[:, None] != fold_of_row[None, :]  # [row, training row]: rows of other folds
    low = np.stack([targets[mask].min(axis=0) for mask in trains_row])
    high = np.stack([targets[mask].max(axis=0) for mask in trains_row])
    np.testing.assert_array_equal(result.oof_predictions, np.clip(free, low, high))
    errors = (result.oof_predictions.astype(np.float64) - targets) ** 2
    assert result.ensemble_cv == pytest.approx(np.sqrt(errors.mean(axis=1)).mean(), rel=1e-6)


def test_unknown_feature_set_lists_the_valid_ones(train):
    config = load_config(None, ['features=["onehot", "fingerprints"]'])
    with pytest.raises(UserError, match="unknown feature set 'fingerprints'; valid: 'onehot', 'morgan"):
        build_tables(config, train, make_folds("full", train, 5, 0).train_masks())


@pytest.mark.parametrize("override, message", [
    ("cv=random", "cv must be one of kfold, b_myeloid"),
    ('target_encoding.stats=["max"]', "target_encoding.stats must be a non-empty subset"),
    ("targets.loss_space=pca", "targets.loss_space must be 'genes' or 'components'"),
    ("targets.svd=-1", "targets.svd must be >= 0"),
])
def test_bad_feature_config(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def run(small_world, train, overrides):
    config = load_config(None, ENGINE + overrides)
    return train_ensemble(config, train, load_id_map(small_world / "id_map.csv", train))


def test_component_targets_are_each_slots_encoding_of_its_real_and_pseudo_rows(train):
    from scp_jax.engine.ensemble import Data

    folds = make_folds("kfold", train, 3, 0)
    decoder = target_decoder(load_config(None, ["targets.svd=4"]), train.targets, folds.train_masks())
    pseudo = np.random.default_rng(0).normal(size=(4, 5, len(train.genes))).astype(np.float32)
    data = Data(jnp.asarray(train.targets), None, None, None, decoder, jnp.asarray(pseudo)).with_component_targets()
    n = len(train.targets)
    rows = np.array([0, 7, n, n + 4])
    for slot in range(4):
        labels = np.concatenate([train.targets, pseudo[slot]]).astype(np.float64)[rows]
        mean, basis = np.asarray(decoder.mean[slot], np.float64), np.asarray(decoder.basis[slot], np.float64)
        np.testing.assert_allclose(data.row_targets(slot, jnp.asarray(rows)), (labels - mean) @ basis.T,
                                   rtol=1e-4, atol=1e-4)


def test_engine_with_molecules_target_encoding_and_svd_components(small_world, train):
    result = run(small_world, train, ['features=["onehot", "morgan:bits=128", "target_encoding"]', "cv=b_myeloid",
                                      "target_encoding.svd=4", "targets.svd=8", "targets.loss_space=components"])
    assert result.members.scheme == "b_myeloid" and np.isfinite(result.member_cv).all()
    assert np.isfinite(result.ensemble_cv) and set(result.baseline_cv) >= {"zeros", "compound_median"}
    assert result.test_predictions.shape == (255, len(train.genes)) and np.isfinite(result.test_predictions).all()


def test_engine_with_chemberta_file_descriptors_and_svd_genes(small_world, train, tmp_path):
    path = tmp_path / "chemberta.npz"
    features = np.random.default_rng(0).normal(size=(len(train.compounds), 16)).astype(np.float32)
    np.savez(path, smiles=np.asarray(train.compound_smiles), features=features)
    result = run(small_world, train, [f'features=["chemberta:{path}", "descriptors", "target_encoding"]',
                                      "cv=leave_cell_type_out", "targets.svd=8"])
    assert result.folds.n_folds == 4 and sorted(result.members.fold) == [0, 1, 2, 3]
    assert np.isfinite(result.ensemble_cv) and np.isfinite(result.test_predictions).all()


@pytest.mark.parametrize("model", [
    ["targets.svd=8"],
    ["model.layer_norm=true", "model.activation='gelu'", "targets.svd=8", "aggregate.method='median'"],
    ["model.kind='factorized'", "model.rank=4", "targets.transform='t_statistic'",  # genes: saturation, row sizes
     "model.row_scale=true", "optim.l2=5.0", "aggregate.method='weighted'", 'features=["onehot"]'],
    ["model.kind='factorized'", "model.rank=4", "targets.transform='t_statistic'", "targets.svd=8",  # the default's
     "targets.loss_space='components'", "aggregate.method='weighted'", "aggregate.clip_to_train_range=true"],
], ids=["mlp", "mlp-layer-norm", "factorized-genes", "factorized-components"])
def test_export_and_numpy_predictor_apply_each_members_fold_tables_and_decoder(small_world, train, tmp_path, model):
    from scp_jax.engine.checkpoint import Checkpointer
    from scp_jax.export import export_run
    from scp_jax.predictor import Predictor

    config = load_config(None, ENGINE + ['features=["onehot", "target_encoding"]', "cv=b_myeloid",
                                         "target_encoding.svd=4", "checkpoint_every=3"] + model)
    queries = load_id_map(small_world / "id_map.csv", train)
    with Checkpointer(tmp_path / "checkpoints", config, train) as checkpointer:
        result = train_ensemble(config, train, queries, checkpointer=checkpointer)
    (tmp_path / "config.toml").write_text(to_toml(config))  # what makes tmp_path a run dir
    arrays, manifest = export_run(tmp_path)
    assert arrays["features.fold_cell"].shape[0] == 6
    if config.targets.svd:
        assert arrays["decoder.basis"].shape == (6, 8, len(train.genes))
    else:
        assert {"params.log_cap", "params.pair_log_scale"} <= arrays.keys()
    assert [row["scheme"] for row in manifest["members"]] == ["b_myeloid"] * 4
    predictor = Predictor(arrays, manifest)
    np.testing.assert_array_equal(predictor.folds, result.members.fold)
    assert predictor.votes.all() and len(np.unique(arrays["members.best_score"])) == 4  # each member its own CV
    # By default the predictor aggregates (and clips) as the run's config says.
    np.testing.assert_allclose(predictor.predict(queries.cell_index, queries.compound_index, dtype=np.float64),
                               result.test_predictions, atol=1e-4)


def test_cli_full_scheme_keeps_the_last_epoch_and_writes_null_cv(small_world, tmp_path, capsys):
    import json

    from scp_jax.train import main as train_main

    train_main(["--config", str(CI_CONFIG), "--data", str(small_world / "de_train.parquet"),
                "--out", str(tmp_path / "run"), "--ensemble", "2",
                "--epochs", "2", "--set", "cv=full", "--set", "model.hidden=[8]", "--set", "checkpoint_every=2",
                "--set", 'features=["onehot", "target_encoding"]'])
    report = json.loads((tmp_path / "run" / "cv.json").read_text())
    assert report["scheme"] == "full" and report["folds"] == 0
    assert report["ensemble_cv_mrrmse"] is None and report["baselines_cv_mrrmse"] is None
    for row in report["members"]:
        assert row["cv_mrrmse"] is None and row["best_epoch"] == 2 and row["status"] == "completed"  # the last, from 1
        assert row["stopped_epoch"] is None and row["scheme"] == "full" and row["fold"] == 0
    assert [row["seed"] for row in report["members"]] == [0, 1]
    assert np.isfinite(pd.read_csv(tmp_path / "run" / "submission.csv").iloc[:, 1:].to_numpy()).all()
    table = pd.read_csv(tmp_path / "run" / "members.csv")
    assert list(table.columns[:4]) == ["member", "scheme", "seed", "fold"]
    assert list(table.best_epoch) == [2, 2] and table.stopped_epoch.isna().all() and table.cv_mrrmse.isna().all()
    assert not (tmp_path / "run" / "oof.parquet").exists()  # nothing is out of fold
    assert "no validation rows" in capsys.readouterr().out
