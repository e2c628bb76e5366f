"""Host side of training: build the member table and data, run compiled chunks, score the CV.

The host touches the device only between chunks: to log the chunk's metrics and, at the end, to
pull out-of-fold and test predictions.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from scp_jax.engine.cv import make_folds
from scp_jax.engine.ensemble import Data, Ensemble, MemberSpec, member_keys
from scp_jax.features.tables import build_tables, target_decoder
from scp_jax.metrics import BASELINES, fit_baselines, mrrmse


@dataclasses.dataclass(frozen=True)
class MemberTable:
    """Member i = (seed i // folds, fold i % folds): seeds repeat the whole set of folds.

    Under `full` (no folds) every member is a seed of the all-rows slot, fold 0.
    """

    seed: np.ndarray
    fold: np.ndarray
    scheme: str = "kfold"

    @classmethod
    def for_ensemble(cls, ensemble, folds):
        index = np.arange(ensemble)
        if folds.n_folds == 0:
            return cls(seed=index, fold=np.zeros_like(index), scheme=folds.scheme)
        return cls(seed=index // folds.n_folds, fold=index % folds.n_folds, scheme=folds.scheme)

    def __len__(self):
        return len(self.seed)

    def rows(self):
        return [{"member": i, "seed": int(s), "fold": int(f), "scheme": self.scheme}
                for i, (s, f) in enumerate(zip(self.seed, self.fold))]


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
    folds: object  # scp_jax.engine.cv.Folds
    member_cv: np.ndarray  # [members] best validation MRRMSE (NaN without validation rows)
    best_epoch: np.ndarray  # [members]
    ensemble_cv: float | None  # out-of-fold mean of members, over rows some member validates
    baseline_cv: dict | None  # same rows, baselines fitted per fold
    test_predictions: np.ndarray | None  # [queries, genes] mean over members
    state: object  # final MemberState (stacked over members), for checkpoints and export


def baseline_cv(train, fold_of_row, validated_folds):
    """Out-of-fold baseline predictions on the folds the ensemble validates, scored like the ensemble.

    None when no row is validated (cv = "full").
    """
    oof = {name: np.zeros_like(train.targets) for name in BASELINES}
    rows = np.isin(fold_of_row, validated_folds)
    if not rows.any():
        return None
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
    folds = make_folds(config.cv, train, config.folds, config.seed)
    members = members or MemberTable.for_ensemble(config.ensemble, folds)
    if members.scheme != folds.scheme or members.fold.max() > folds.n_folds:
        raise ValueError(f"members ({members.scheme}, folds up to {members.fold.max()}) do not fit cv {folds.scheme!r}")
    train_masks = folds.train_masks()  # [slots, n]; a member's slot is its fold
    val_masks = ~train_masks[members.fold]
    tables = build_tables(config, train, train_masks)
    data = Data(
        targets=jnp.asarray(train.targets),
        cell_index=jnp.asarray(train.cell_index),
        compound_index=jnp.asarray(train.compound_index),
        tables=tables,
        decoder=target_decoder(config, train.targets, train_masks),
    )
    member_folds = jnp.asarray(members.fold, jnp.int32)
    specs = MemberSpec(
        key=member_keys(config.seed, members.seed, members.fold),
        fold=member_folds,
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
        engine.mean_prediction(state.best_params, member_folds, val_masks, data, data.cell_index, data.compound_index)
    )
    validated = val_masks.any(axis=0)
    test_predictions = None
    if queries is not None:
        test_predictions = np.asarray(
            engine.mean_prediction(
                state.best_params,
                member_folds,
                np.ones((len(members), len(queries.ids)), bool),
                data,
                jnp.asarray(queries.cell_index),
                jnp.asarray(queries.compound_index),
            )
        )
    return TrainResult(
        members=members,
        folds=folds,
        member_cv=np.asarray(state.best_score),
        best_epoch=np.asarray(state.best_epoch),
        ensemble_cv=mrrmse(train.targets[validated], oof[validated]) if validated.any() else None,
        baseline_cv=baseline_cv(train, folds.fold_of_row, np.unique(members.fold)),
        test_predictions=test_predictions,
        state=state,
    )
