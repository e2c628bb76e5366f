"""Host side of training: build the member table and data, run compiled chunks, score the CV.

The host touches the device only between chunks: to log the chunk's metrics, to copy a checkpoint
out, and, at the end, to pull out-of-fold and test predictions.
"""

import contextlib
import dataclasses
import functools
import time

import jax
import numpy as np

from scp_jax.data.pvalues import t_of_expected_y, t_statistic
from scp_jax.engine.cv import make_folds
from scp_jax.engine.devices import MemberPlacement, to_host
from scp_jax.engine.ensemble import Data, MemberSpec, compiled_ensemble
from scp_jax.engine.members import MemberTable
from scp_jax.errors import UserError
from scp_jax.features.tables import build_tables, target_decoder
from scp_jax.metrics import BASELINES, fit_baselines, mrrmse
from scp_jax.predictor import member_weights


def padded_rows(masks):
    """Row indices of each member's mask, padded to the longest with weight 0 (fixed shapes for vmap)."""
    width = max(int(masks.sum(axis=1).max()), 1)
    rows = np.zeros((len(masks), width), np.int32)
    weight = np.zeros((len(masks), width), np.float32)
    for i, mask in enumerate(masks):
        (index,) = np.nonzero(mask)
        rows[i, : len(index)], weight[i, : len(index)] = index, 1.0
    return rows, weight


@dataclasses.dataclass
class TrainResult:
    """Predictions are the voting members' best parameters combined by `aggregate.method`, clipped to the
    training range of the rows that trained them when `aggregate.clip_to_train_range`."""

    members: MemberTable
    folds: object  # scp_jax.engine.cv.Folds: the scheme, each row's fold, the fold count
    member_cv: np.ndarray  # [members] best validation MRRMSE (NaN without validation rows, cv = "full")
    best_epoch: np.ndarray  # [members]
    stopped_epoch: np.ndarray  # [members] epoch a member stopped at (early stop or divergence), -1 if never
    diverged: np.ndarray  # [members] bool
    ensemble_cv: float | None  # MRRMSE of oof_predictions over the rows some member validates; None if none
    baseline_cv: dict | None  # same rows, baselines fitted per fold; None if no row is validated
    oof_predictions: np.ndarray  # [n, genes] out-of-fold: each row by the members validating it; NaN if none
    test_predictions: np.ndarray | None  # [queries, genes] by all members
    state: object  # final MemberState (stacked over members, padding included)
    pseudo_targets: np.ndarray | None = None  # [slots, queries, genes] the queries' labels from each slot's stage-1 members


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


def chunk_ends(config, start):
    """Epochs after `start` where a chunk ends: every epochs_per_chunk, every checkpoint_every, the last.

    A function of the config alone, so a resumed run compiles and runs the same chunks as an
    uninterrupted one (part of why resuming is bit-identical).
    """
    ends = {e for e in range(1, config.epochs) if e % config.epochs_per_chunk == 0 or e % config.checkpoint_every == 0}
    return sorted(e for e in ends | {config.epochs} if e > start)


@contextlib.contextmanager
def out_of_memory_hint(config, n_members):
    """Turn XLA's RESOURCE_EXHAUSTED into a one-line UserError naming the settings that size memory."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise UserError(
            f"device out of memory training {n_members} members: lower ensemble, batch_size"
            f" ({config.batch_size}) or {config.size_settings()}"
            f" [{str(err).strip().splitlines()[0][:200]}]"
        ) from None


def member_specs(config, members, fold_of_row, n_pseudo=0):
    """Specs, [members, n] validation masks and minibatches per epoch; a member validates the rows of
    its fold (none for the all-rows slot, whose rows are all -1 or another fold) and trains on the rest
    plus `n_pseudo` pseudo-labelled rows.

    Every member runs as many minibatches as the one with the most training rows (fixed shapes for
    vmap); another member's surplus batches are empty and do not step, so its schedule's length
    (`total_steps`, one of its hyperparameters) counts only its own batches and ends where it stops.
    """
    val_masks = fold_of_row[None, :] == members.fold[:, None]
    val_rows, val_weight = padded_rows(val_masks)
    train_masks = np.concatenate([~val_masks, np.ones((len(members), n_pseudo), bool)], axis=1)
    member_steps = np.ceil(train_masks.sum(axis=1) / config.batch_size)
    hparams = dict(members.hparams, total_steps=(member_steps * config.epochs).astype(np.float32))
    spec = MemberSpec(run_seed=np.full(len(members), config.seed, np.int32), seed=members.seed, fold=members.fold,
                      train_mask=train_masks, val_rows=val_rows, val_weight=val_weight, hparams=hparams)
    return spec, val_masks, max(int(member_steps.max()), 1)


def slot_ranges(targets, train_masks):
    """Per slot, each gene's min and max over the slot's training rows: [slots, genes] twice."""
    return (np.stack([targets[m].min(axis=0) for m in train_masks]),
            np.stack([targets[m].max(axis=0) for m in train_masks]))


def train_ensemble(config, train, queries=None, folds=None, members=None, on_chunk=None, placement=None,
                   checkpointer=None, on_pseudo_chunk=None):
    """Train the whole ensemble; `on_chunk(epoch, metrics, seconds)` is called after each chunk.
    `folds` (the config's make_folds) and `members` (its MemberTable) are made here when not given.

    `checkpointer` (engine.checkpoint.Checkpointer, open: its saves are durable once the caller
    leaves it) may restore the starting state and epoch and saves after each chunk. With
    `pseudo_labels.enabled`, a first stage (reported to `on_pseudo_chunk`, not checkpointed: a resumed
    run recomputes it, deterministically) labels the queries for the second, which is the run's result.
    """
    folds = make_folds(config.cv, train, config.folds, config.seed) if folds is None else folds
    members = MemberTable.from_config(config, folds.n_folds) if members is None else members
    last_fold = max(folds.n_folds - 1, 0)  # under "full", the all-rows slot 0; else the folds, not that slot
    if members.scheme != folds.scheme or members.fold.max() > last_fold:
        raise UserError(f"members ({members.scheme}, folds up to {members.fold.max()}) do not fit"
                        f" cv {folds.scheme!r} with {folds.n_folds} folds")
    placement = placement or MemberPlacement()
    fitted = _fit_folds(config, train, folds)
    stage = functools.partial(_train_stage, config, train, folds, fitted, members, placement, queries)
    to_result = functools.partial(_result, train=train, folds=folds, fitted=fitted, queries=queries)
    if not config.pseudo_labels.enabled:
        return to_result(stage(on_chunk=on_chunk, checkpointer=checkpointer))
    if queries is None:
        raise UserError("config: pseudo_labels.enabled needs an id map: its rows are what stage 1 labels")
    labels = _pseudo_labels(config, stage(on_chunk=on_pseudo_chunk), queries, fitted, train.targets.shape[1])
    # Stage-1 labels are predictions, mapped back from t when the loss fits t: invert that map.
    fit_labels = labels if fitted.fit_targets is None else t_of_expected_y(labels).astype(np.float32)
    second = to_result(stage(on_chunk=on_chunk, checkpointer=checkpointer, pseudo_targets=fit_labels))
    return dataclasses.replace(second, pseudo_targets=labels)


@dataclasses.dataclass(frozen=True)
class _FoldFits:
    """What both stages of a run share, fitted once: feature tables, target decoder, the loss's targets,
    the clip ranges."""

    train_masks: np.ndarray  # [slots, n]: slot k = fold k's training rows, slot K = all rows
    tables: object  # FeatureTables
    decoder: object  # TargetSVD or None
    fit_targets: np.ndarray | None  # [n, genes] t-statistics when the loss fits them; None: the targets
    clip_ranges: tuple | None  # per slot, each gene's training (min, max), [slots, genes] each; None: no clipping

    def clip(self, predictions, slot):
        """Predictions clipped to slot `slot`'s training range ([rows] slots, or one), if the run clips."""
        return predictions if self.clip_ranges is None else np.clip(predictions, *(r[slot] for r in self.clip_ranges))


def _fit_folds(config, train, folds):
    train_masks = folds.train_masks()
    fit_targets = None
    if config.targets.transform == "t_statistic":
        fit_targets = t_statistic(train.targets).astype(np.float32)
    decoder = target_decoder(config, train.targets if fit_targets is None else fit_targets, train_masks)
    clip_ranges = slot_ranges(train.targets, train_masks) if config.aggregate.clip_to_train_range else None
    return _FoldFits(train_masks, build_tables(config, train, train_masks), decoder, fit_targets, clip_ranges)


def _run_chunks(config, engine, state, epoch, specs, data, steps, n_members, on_chunk, checkpointer):
    """The host loop: compiled chunks of epochs from `epoch` on, metrics and checkpoints between them."""
    if (to_host(state.stopped_at)[:n_members] >= 0).all():  # restored after every member stopped early
        return state
    for end in chunk_ends(config, epoch):
        start = time.perf_counter()
        with out_of_memory_hint(config, n_members):
            state, metrics = engine.train_chunk(state, specs, data, end - epoch, steps)
            metrics = {k: v[:n_members] for k, v in to_host(metrics).items()}  # blocks until the chunk is done
        epoch = end
        if on_chunk is not None:
            on_chunk(epoch, metrics, time.perf_counter() - start)
        stopping = (to_host(state.stopped_at)[:n_members] >= 0).all()
        if checkpointer is not None:
            checkpointer.save(epoch, state, metrics, last=end == config.epochs or stopping)
        if stopping:
            break  # every member stopped: nothing left to compute
    return state


def _stage_data(config, train, queries, fitted, pseudo_targets):
    """What a stage trains on: the training rows, then (with `pseudo_targets`) the queries, weighted
    by `pseudo_labels.weight`; with the loss on SVD components, targets encoded once per slot."""
    index = (train.cell_index, train.compound_index)
    row_weight = None
    if pseudo_targets is not None:
        index = tuple(np.concatenate([a, b]) for a, b in zip(index, (queries.cell_index, queries.compound_index)))
        row_weight = np.concatenate([np.ones(len(train.targets)),
                                     np.full(len(queries.cell_index), config.pseudo_labels.weight)])
        row_weight = row_weight.astype(np.float32)
    data = Data(train.targets, *index, fitted.tables, fitted.decoder, pseudo_targets, row_weight, fitted.fit_targets)
    if fitted.decoder is not None and config.targets.loss_space == "components":
        data = data.with_component_targets()
    return data


@dataclasses.dataclass(frozen=True)
class _Stage:
    """A trained ensemble, and how its members vote."""

    members: MemberTable
    padded: MemberTable  # the members, padded to fill every device: padding member i repeats member i % n
    summary: dict  # per member: best_score, best_epoch, stopped_at, diverged
    votes: np.ndarray  # [padded] bool: members that kept a best epoch
    val_masks: np.ndarray  # [padded, n_rows] the rows each member validates
    state: object  # MemberState on device, stacked over the padded members
    # ([padded, rows] masks, cell_index, compound_index[, method]) -> [rows, genes]: each row's voters combined
    aggregate: object


def _train_stage(config, train, folds, fitted, members, placement, queries, on_chunk=None, checkpointer=None,
                 pseudo_targets=None):
    """One ensemble, trained on the training rows (plus the queries, labelled per slot by
    `pseudo_targets` [slots, q, genes], in the loss's space)."""
    padded = members.take(np.arange(placement.padded(len(members))) % len(members))
    n = len(members)
    n_pseudo = 0 if pseudo_targets is None else len(queries.cell_index)
    specs, val_masks, steps = member_specs(config, padded, folds.fold_of_row, n_pseudo)
    data = placement.replicate(_stage_data(config, train, queries, fitted, pseudo_targets))
    engine = compiled_ensemble(config, fitted.tables.layout, train.targets.shape[1], members.program_options())
    specs = placement.shard(specs)
    state = engine.init(specs)

    epoch = 0
    if checkpointer is not None:
        state, epoch = checkpointer.start(state, members, fitted.tables, fitted.decoder)
    state = _run_chunks(config, engine, state, epoch, specs, data, steps, n, on_chunk, checkpointer)

    summary = to_host({"best_score": state.best_score, "best_epoch": state.best_epoch, "stopped_at": state.stopped_at,
                       "diverged": state.diverged})
    summary = {k: v[:n] for k, v in summary.items()}
    # Padding members, and members that never kept a best epoch (diverged before a finite score), don't vote.
    votes = np.zeros(len(padded), bool)
    votes[:n] = summary["best_epoch"] >= 0
    weights = placement.shard(member_weights(np.resize(summary["best_score"], len(padded))))  # read by "weighted"

    def aggregate(masks, cell_index, compound_index, method=config.aggregate.method):
        index = placement.replicate((cell_index, compound_index))
        return to_host(engine.aggregate_prediction(method, state.best_params, specs.fold,
                                                   placement.shard(masks), weights, data.tables, data.decoder, *index))

    return _Stage(members, padded, summary, votes, val_masks, state, aggregate)


def _pseudo_labels(config, stage, queries, fitted, n_genes):
    """[slots, q, genes]: each slot's labels of the queries, by the members of that fold (zeros for a
    slot no member has), clipped as the run clips. Nothing of the fold's validation rows may enter:
    the members keep their last epoch (config.keep = "last") and vote unweighted ("weighted" weighs
    them by their scores on those rows: a median run's labels are a median, the others' a mean)."""
    n_queries = len(queries.cell_index)
    method = "median" if config.aggregate.method == "median" else "mean"
    labels = np.zeros((len(fitted.train_masks), n_queries, n_genes), np.float32)
    for slot in np.unique(stage.members.fold):
        voters = stage.votes & (stage.padded.fold == slot)
        if not voters.any():  # its stage-2 members would train on no labels, silently
            raise UserError(f"pseudo labels: every stage-1 member of fold {slot} diverged (NaN/Inf) before a"
                            " finite score, so none can label the queries for that fold's stage 2"
                            " (lower optim.learning_rate or optim.clip_norm)")
        labels[slot] = fitted.clip(stage.aggregate(np.repeat(voters[:, None], n_queries, axis=1), queries.cell_index,
                                                   queries.compound_index, method), slot)
    return labels


def _result(stage, train, folds, fitted, queries):
    """The stage's TrainResult: its members' scores, out-of-fold and test predictions, the baselines."""
    fold_of_row, votes = folds.fold_of_row, stage.votes
    oof = stage.aggregate(stage.val_masks & votes[:, None], train.cell_index, train.compound_index)
    oof = fitted.clip(oof, fold_of_row)  # a row of fold k: fold k's training range
    test_predictions = None
    if queries is not None:
        test_predictions = stage.aggregate(np.repeat(votes[:, None], len(queries.cell_index), axis=1),
                                           queries.cell_index, queries.compound_index)
        test_predictions = fitted.clip(test_predictions, -1)  # the last slot trains on all rows
    voting_folds = stage.members.fold[votes[:len(stage.members)]]
    validated = np.isin(fold_of_row, voting_folds)
    return TrainResult(
        members=stage.members,
        folds=folds,
        member_cv=stage.summary["best_score"],
        best_epoch=stage.summary["best_epoch"],
        stopped_epoch=stage.summary["stopped_at"],
        diverged=stage.summary["diverged"],
        ensemble_cv=mrrmse(train.targets[validated], oof[validated]) if validated.any() else None,
        baseline_cv=baseline_cv(train, fold_of_row, np.unique(voting_folds)),
        oof_predictions=oof,
        test_predictions=test_predictions,
        state=stage.state,
    )
