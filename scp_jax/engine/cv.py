"""Cross-validation schemes: which fold validates each training row.

A scheme gives `fold_of_row` (-1: a row every member trains on) and `n_folds`. Per-fold tables and
target bases have `n_folds + 1` slots; the last slot trains on every row and is the one the `full`
scheme's members use, so "no holdout" is just a fold that validates nothing.
"""

import dataclasses

import numpy as np

from scp_jax.data.dataset import HELD_OUT_CELLS
from scp_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Folds:
    scheme: str
    fold_of_row: np.ndarray  # [n] int, -1 = never validated
    n_folds: int

    def train_masks(self):
        """[n_folds + 1, n] bool: the rows each slot trains on (slot n_folds: all of them)."""
        return self.fold_of_row[None, :] != np.arange(self.n_folds + 1)[:, None]


def kfold_assignment(n_rows, folds, seed):
    """Fold id per training row: a seeded shuffle dealt round-robin, so fold sizes differ by <= 1."""
    fold_of_row = np.empty(n_rows, np.int32)
    fold_of_row[np.random.default_rng(seed).permutation(n_rows)] = np.arange(n_rows) % folds
    return fold_of_row


def _held_out_rows(train):
    held = np.isin(np.asarray(train.cell_types, object)[train.cell_index], HELD_OUT_CELLS)
    if not held.any():
        raise UserError(f"config: this cv scheme needs {' or '.join(map(repr, HELD_OUT_CELLS))} training rows")
    return held


def b_myeloid_assignment(train, folds, seed):
    """Folds over the compounds with B/Myeloid rows; a fold validates only those compounds' B/Myeloid rows.

    Their T/NK rows stay in training: the test predicts B/Myeloid rows of compounds seen only on T/NK.
    The positive controls always train: they have rows in every cell type, so no test row is one, and
    their few huge-effect rows would otherwise weigh on the score more than any test-like rows.
    """
    held = _held_out_rows(train) & ~train.control
    if not held.any():
        raise UserError("config: cv = 'b_myeloid' needs B/Myeloid training rows of a compound that is not a control")
    compounds = np.unique(train.compound_index[held])
    n_folds = min(folds, len(compounds))
    fold_of_compound = np.full(len(train.compounds), -1, np.int32)
    fold_of_compound[np.random.default_rng(seed).permutation(compounds)] = np.arange(len(compounds)) % n_folds
    return np.where(held, fold_of_compound[train.compound_index], -1).astype(np.int32), n_folds


def leave_cell_type_out_assignment(train):
    """Fold k validates the k-th T/NK cell type on the compounds without B/Myeloid rows.

    Its rows on the B/Myeloid compounds stay in training, so the held-out cell type is seen on those
    few compounds only, exactly as B and Myeloid cells are in the test.
    """
    held = _held_out_rows(train)
    with_held_out = np.isin(train.compound_index, np.unique(train.compound_index[held]))
    others = [i for i, name in enumerate(train.cell_types) if name not in HELD_OUT_CELLS]
    if not others:
        raise UserError("config: cv = 'leave_cell_type_out' needs a cell type other than"
                        f" {' and '.join(HELD_OUT_CELLS)} to hold out")
    for cell in others:
        if (with_held_out | (train.cell_index != cell)).all():
            raise UserError(f"config: cv = 'leave_cell_type_out' would validate nothing on {train.cell_types[cell]!r}:"
                            " it has no rows outside the compounds with B/Myeloid rows")
    fold_of_cell = np.full(len(train.cell_types), -1, np.int32)
    fold_of_cell[others] = np.arange(len(others))
    return np.where(with_held_out, -1, fold_of_cell[train.cell_index]).astype(np.int32), len(others)


def make_folds(scheme, train, folds, seed):
    n_rows = len(train.targets)
    if scheme == "kfold":
        if folds > n_rows:
            raise UserError(f"config: folds = {folds} is more than the {n_rows} training rows: a fold would validate"
                            " nothing")
        return Folds(scheme, kfold_assignment(n_rows, folds, seed), folds)
    if scheme == "b_myeloid":
        return Folds(scheme, *b_myeloid_assignment(train, folds, seed))
    if scheme == "leave_cell_type_out":
        return Folds(scheme, *leave_cell_type_out_assignment(train))
    if scheme == "full":
        return Folds(scheme, np.full(n_rows, -1, np.int32), 0)
    raise UserError(f"config: unknown cv scheme {scheme!r}")
