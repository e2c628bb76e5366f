"""Host side of training: build the member table and data, run compiled chunks, score the CV.

The host touches the device only between chunks: to log the chunk's metrics and, at the end, to
pull out-of-fold and test predictions.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from scp_jax.engine.ensemble import Data, Ensemble, MemberSpec, member_keys
from scp_jax.features.tables import build_tables
from scp_jax.metrics import BASELINES, fit_baselines, mrrmse


@dataclasses.dataclass(frozen=True)
class MemberTable:
    """Member i = (seed i // folds, fold i % folds): seeds repeat the whole set of folds."""

    seed: np.ndarray
    fold: np.ndarray

    @classmethod
    def for_ensemble(cls, ensemble, folds):
        index = np.arange(ensemble)
        return cls(seed=index // folds, fold=index % folds)

    def __len__(self):
        return len(self.seed)

    def rows(self):
        return [{"member": i, "seed": int(s), "fold": int(f)} for i, (s, f) in enumerate(zip(self.seed, self.fold))]


def kfold_assignment(n_rows, folds, seed):
    """Fold id per training row: a seeded shuffle dealt round-robin, so fold sizes differ by <= 1."""
    fold_of_row = np.empty(n_rows, np.int32)
    fold_of_row[np.random.default_rng(seed).permutation(n_rows)] = np.arange(n_rows) % folds
    return fold_of_row


def padded_rows(masks):
    """Row indices of each member's mask, padded to the longest with weight 0 (fixed shapes for vmap)."""
    width = max(int(masks.sum(axis=1).max()), 1)
    rows = np.zeros((len(masks), width), np.int32)
    weight = np.zeros((len(masks), width), np.float32)
    for i, mask in enumerate(masks):
        (index,) = np.nonzero(mask)
        rows[i, : len(index)], weight[i, : len(index)] = index, 1.0
    return {"val_rows": jnp.asarray(rows), "val_weight": jnp.asarray(weight)}


@dataclasses.dataclass
class TrainResult:
    members: MemberTable
    member_cv: np.ndarray  # [members] best validation MRRMSE
    best_epoch: np.ndarray  # [members]
    ensemble_cv: float  # out-of-fold mean of members, over rows some member validates
    baseline_cv: dict  # same rows, baselines fitted per fold
    test_predictions: np.ndarray | None  # [queries, genes] mean over members
    state: object  # final MemberState (stacked over members), for checkpoints and export


def baseline_cv(train, fold_of_row, validated_folds):
    """Out-of-fold baseline predictions on the folds the ensemble validates, scored like the ensemble."""
    oof = {name: np.zeros_like(train.targets) for name in BASELINES}
    rows = np.isin(fold_of_row, validated_folds)
    for fold in validated_folds:
        val = fold_of_row == fold
        preds = fit_baselines(
            train.targets, train.cell_index, train.compound_index, ~val, train.cell_index[val], train.compound_index[val]
        )
        for name in BASELINES:
            oof[name][val] = preds[name]
    return {name: mrrmse(train.targets[rows], oof[name][rows]) for name in BASELINES}


def train_ensemble(config, train, queries=None, members=None, on_chunk=None):
    """Train the whole ensemble; `on_chunk(epoch, metrics, seconds)` is called after each chunk."""
    members = members or MemberTable.for_ensemble(config.ensemble, config.folds)
    fold_of_row = kfold_assignment(len(train.targets), config.folds, config.seed)
    val_masks = fold_of_row[None, :] == members.fold[:, None]
    tables = build_tables(config.features, train)
    data = Data(
        targets=jnp.asarray(train.targets),
        cell_index=jnp.asarray(train.cell_index),
        compound_index=jnp.asarray(train.compound_index),
        tables=tables,
    )
    specs = MemberSpec(
        key=member_keys(config.seed, members.seed, members.fold),
        train_mask=jnp.asarray(~val_masks),
        **padded_rows(val_masks),
    )
    engine = Ensemble(config, tables.width, train.targets.shape[1])
    steps = engine.steps_per_epoch(~val_masks)
    state = engine.init(specs.key)

    epoch = 0
    while epoch < config.epochs:
        n_epochs = min(config.epochs_per_chunk, config.epochs - epoch)
        start = time.perf_counter()
        state, metrics = engine.train_chunk(state, specs, data, n_epochs, steps)
        metrics = jax.tree.map(np.asarray, metrics)  # blocks until the chunk is done
        epoch += n_epochs
        if on_chunk is not None:
            on_chunk(epoch, metrics, time.perf_counter() - start)

    oof = np.asarray(
        engine.mean_prediction(state.best_params, val_masks, tables, data.cell_index, data.compound_index)
    )
    validated = np.isin(fold_of_row, members.fold)
    test_predictions = None
    if queries is not None:
        test_predictions = np.asarray(
            engine.mean_prediction(
                state.best_params,
                np.ones((len(members), len(queries.ids)), bool),
                tables,
                jnp.asarray(queries.cell_index),
                jnp.asarray(queries.compound_index),
            )
        )
    return TrainResult(
        members=members,
        member_cv=np.asarray(state.best_score),
        best_epoch=np.asarray(state.best_epoch),
        ensemble_cv=mrrmse(train.targets[validated], oof[validated]),
        baseline_cv=baseline_cv(train, fold_of_row, np.unique(members.fold)),
        test_predictions=test_predictions,
        state=state,
    )
