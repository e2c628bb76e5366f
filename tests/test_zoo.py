"""The model zoo, optimizers, schedules, aggregation and pseudo labels inside the vmapped engine."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scp_jax.config import MODEL_KINDS, load_config
from scp_jax.engine.cv import make_folds
from scp_jax.engine.ensemble import compiled_ensemble
from scp_jax.engine.losses import dense_weight_norm
from scp_jax.engine.members import MemberTable
from scp_jax.engine.trainer import train_ensemble
from scp_jax.errors import UserError
from scp_jax.features.tables import build_tables
from toy import toy_queries, toy_train

BASE = ["batch_size=8", "epochs=4", "epochs_per_chunk=4", "folds=3", "model.hidden=[16]", "model.tokens=4",
        "model.width=8", "model.depth=1", "model.heads=2"]


# Every kind beyond the MLP, which every other engine test trains.
@pytest.mark.parametrize("kind", [kind for kind in MODEL_KINDS if kind != "mlp"])
def test_model_kinds_train_as_a_vmapped_ensemble(kind):
    train = toy_train(n_genes=8)
    config = load_config(None, BASE + [f"model.kind={kind}", "ensemble=2", "epochs=3", "model.dropout=0.1",
                                       "loss.mse=0.5", "loss.mae=0.5", "loss.scale_free=0.5"])
    losses = []
    result = train_ensemble(config, train, on_chunk=lambda e, m, s: losses.append(m["train_loss"]))
    loss = np.concatenate(losses, axis=1)
    assert np.isfinite(loss).all() and (loss[:, -1] < loss[:, 0]).all()
    assert np.isfinite(result.member_cv).all() and np.isfinite(result.ensemble_cv)


def member_predictions(config, train, result, queries):
    tables = build_tables(config, train, result.folds.train_masks())
    engine = compiled_ensemble(config, tables.layout, train.targets.shape[1])
    return engine, tables, np.asarray(engine.predict_members(result.state.best_params, jnp.asarray(result.members.fold),
                                                             tables, None, queries.cell_index, queries.compound_index))


def test_median_weighted_and_clipped_aggregation_match_numpy():
    train, queries = toy_train(), toy_queries(toy_train())
    config = load_config(None, BASE + ["ensemble=6", "aggregate.method=median"])
    result = train_ensemble(config, train, queries)
    engine, tables, preds = member_predictions(config, train, result, queries)
    np.testing.assert_allclose(result.test_predictions, np.median(preds, axis=0), atol=1e-5)

    weights = 1.0 / result.member_cv**2
    masks = np.ones((6, len(queries.cell_index)), bool)
    masks[:, 0] = False  # a row no member votes for is NaN
    masks[2:, 1] = False  # a row only members 0 and 1 vote for
    args = (result.state.best_params, jnp.asarray(result.members.fold), masks, jnp.asarray(weights, jnp.float32), tables,
            None, queries.cell_index, queries.compound_index)
    for method, want in (("mean", preds.mean(axis=0)), ("weighted", np.average(preds, axis=0, weights=weights)),
                         ("median", np.median(preds, axis=0))):
        got = np.asarray(engine.aggregate_prediction(method, *args))
        assert np.isnan(got[0]).all()
        np.testing.assert_allclose(got[2:], want[2:], atol=1e-5, err_msg=method)
    np.testing.assert_allclose(engine.aggregate_prediction("median", *args)[1], preds[:2, 1].mean(axis=0), atol=1e-5)
    # A member without a vote that predicts NaN (it diverged before a finite epoch) leaves the others' mean alone.
    nan_params = jax.tree.map(lambda x: x.at[5].set(jnp.nan), result.state.best_params)
    masks[5] = False
    for method, w in (("mean", None), ("weighted", weights[:5])):
        got = np.asarray(engine.aggregate_prediction(method, nan_params, *args[1:2], masks, *args[3:]))
        np.testing.assert_allclose(got[2:], np.average(preds[:5, 2:], axis=0, weights=w), atol=1e-5, err_msg=method)

    clipped = train_ensemble(load_config(None, BASE + ["ensemble=6", "aggregate.clip_to_train_range=true",
                                                       "aggregate.method=median"]), train, queries)
    lo, hi = train.targets.min(axis=0), train.targets.max(axis=0)
    np.testing.assert_allclose(clipped.test_predictions, np.clip(result.test_predictions, lo, hi), atol=1e-6)


@pytest.mark.parametrize("transform", ["none", "t_statistic"])
def test_pseudo_labels_of_a_fold_come_from_that_folds_members_only(transform):
    """Stage 1's labels for slot k are the prediction of fold k's members, which never saw fold k's rows;
    stage 2 trains on them and gives a different ensemble."""
    train, queries = toy_train(), toy_queries(toy_train(), n=16)
    both = BASE + ["ensemble=6", f"targets.transform={transform}", "keep=last"]
    config = load_config(None, both + ["pseudo_labels.enabled=true", "pseudo_labels.weight=0.5"])
    stage1_chunks = []
    result = train_ensemble(config, train, queries, on_pseudo_chunk=lambda *a: stage1_chunks.append(a))
    assert stage1_chunks and result.pseudo_targets.shape == (4, 16, train.targets.shape[1])
    plain = load_config(None, both)
    for fold in range(3):
        members = MemberTable.from_config(plain, 3)
        only_fold = train_ensemble(plain, train, queries, members=members.take(np.flatnonzero(members.fold == fold)))
        np.testing.assert_allclose(result.pseudo_targets[fold], only_fold.test_predictions, atol=1e-5)
    np.testing.assert_array_equal(result.pseudo_targets[3], 0.0)  # the all-rows slot has no member here
    first_stage = train_ensemble(plain, train, queries)
    assert not np.allclose(result.test_predictions, first_stage.test_predictions, atol=1e-3)


def test_epoch_train_loss_is_the_weighted_mean_of_its_rows_losses_and_the_prior():
    """At a vanishing learning rate the parameters stay at their init through the epoch, so its train
    loss is a fixed mean over the member's training rows, each with its loss weight: a pseudo-labelled
    row counts pseudo_labels.weight, as in the gradient (it counted 1; float64 reference). The l2
    prior is worth l2 observations per weight among the rows' weighted observations."""
    train, queries = toy_train(), toy_queries(toy_train(), n=16)
    config = load_config(None, BASE + ["ensemble=6", "epochs=1", "epochs_per_chunk=1", "optim.learning_rate=1e-30",
                                       "optim.l2=3.0", "pseudo_labels.enabled=true", "pseudo_labels.weight=0.25",
                                       "keep=last"])
    losses = []
    result = train_ensemble(config, train, queries, on_chunk=lambda e, m, s: losses.append(m["train_loss"][:, 0]))
    tables = build_tables(config, train, result.folds.train_masks())
    engine = compiled_ensemble(config, tables.layout, train.targets.shape[1])
    folds = np.asarray(result.members.fold)
    rows = [np.concatenate([a, b]) for a, b in ((train.cell_index, queries.cell_index),
                                                (train.compound_index, queries.compound_index))]
    preds = np.asarray(engine.predict_members(result.state.params, jnp.asarray(folds), tables, None, *rows), np.float64)
    for member, fold in enumerate(folds):
        targets = np.concatenate([train.targets, result.pseudo_targets[fold]]).astype(np.float64)
        weights = np.concatenate([result.folds.train_masks()[fold], np.full(len(queries.cell_index), 0.25)])
        member_params = jax.tree.map(lambda x: x[member], result.state.params)
        prior = 3.0 * float(dense_weight_norm(nnx.merge(engine.graphdef, member_params)))
        want = np.average(np.mean((preds[member] - targets) ** 2, axis=1), weights=weights)
        want += prior / (np.sum(weights) * train.targets.shape[1])
        np.testing.assert_allclose(losses[0][member], want, rtol=1e-5, err_msg=f"member {member}")


def test_pseudo_labels_refuse_a_fold_whose_stage1_members_all_diverged():
    """Such a fold's stage 2 would otherwise train on labels no member gave (zeros, before this was an error)."""
    train, queries = toy_train(), toy_queries(toy_train())
    config = load_config(None, BASE + ["ensemble=3", "epochs=1", "pseudo_labels.enabled=true", "keep=last",
                                       "optim.learning_rate=1e30", "optim.clip_norm=1e30"])
    with pytest.raises(UserError, match=r"^pseudo labels: every stage-1 member of fold 0 diverged"):
        train_ensemble(config, train, queries)


def test_pseudo_labels_leak_nothing_of_a_folds_validation_rows_into_its_stage_2():
    """Labels by a fold's last epochs, unweighted (a weighted vote weighs members by their scores on the
    fold's validation rows): the fold's stage-2 members train the same whatever those rows hold."""
    train, queries = toy_train(), toy_queries(toy_train(), n=16)
    config = load_config(None, BASE + ["ensemble=6", "keep=last", "pseudo_labels.enabled=true",
                                       "aggregate.method=weighted", "aggregate.clip_to_train_range=true"])
    runs = []
    for noise in (0.0, 3.0):
        targets = train.targets.copy()
        validated = make_folds(config.cv, train, config.folds, config.seed).fold_of_row == 0
        targets[validated] += noise * np.random.default_rng(1).normal(size=targets[validated].shape)
        runs.append(train_ensemble(config, SimpleNamespace(**{**vars(train), "targets": targets}), queries))
    fold0 = np.flatnonzero(runs[0].members.fold == 0)
    np.testing.assert_array_equal(runs[0].pseudo_targets[0], runs[1].pseudo_targets[0])
    for a, b in zip(jax.tree.leaves(runs[0].state.params), jax.tree.leaves(runs[1].state.params)):
        np.testing.assert_array_equal(np.asarray(a)[fold0], np.asarray(b)[fold0])
    assert not np.array_equal(runs[0].pseudo_targets[1], runs[1].pseudo_targets[1])  # fold 1 trains on those rows
