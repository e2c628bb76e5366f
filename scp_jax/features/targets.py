"""Per-fold statistics of the training targets: SVD bases and target encodings.

Everything here is fitted per slot on that slot's training rows only (`train_masks[s]`), so a
validation row's targets can never reach the features or the basis of the members validating it.
"""

import numpy as np
from flax import struct

from scp_jax.errors import UserError


@struct.dataclass
class TargetSVD:
    """Centered truncated SVD per slot: y ~ mean[s] + c @ basis[s], with orthonormal basis rows."""

    mean: np.ndarray  # [slots, genes]
    basis: np.ndarray  # [slots, k, genes]

    def encode(self, slot, targets):
        return (targets - self.mean[slot]) @ self.basis[slot].T

    def decode(self, slot, components):
        return components @ self.basis[slot] + self.mean[slot]


def fold_svd(targets, train_masks, k, what):
    """Mean and top-k right singular vectors of each slot's centered training targets (float64 fit)."""
    means, bases = [], []
    for mask in train_masks:
        rows = np.asarray(targets[mask], np.float64)
        mean = rows.mean(axis=0)
        _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
        if k > len(vt):
            raise UserError(f"config: {what} = {k} exceeds the rank bound {len(vt)} of a fold's training targets")
        means.append(mean)
        bases.append(vt[:k])
    return TargetSVD(mean=np.stack(means), basis=np.stack(bases))


def _statistic(name, rows):
    if name in ("mean", "std", "median"):
        return getattr(np, name)(rows, axis=0)
    return np.quantile(rows, {"q25": 0.25, "q75": 0.75}[name], axis=0)


def group_encoding(targets, groups, n_groups, fit_mask, stats, basis=None):
    """[n_groups, len(stats) * d + 1] float64: each statistic of a group's fitted rows, then an 'unseen' flag.

    d = genes, or k when `basis` [k, genes] projects each statistic; a group without fitted rows
    gets zeros and flag 1.
    """
    width = len(targets[0]) if basis is None else len(basis)
    table = np.zeros((n_groups, len(stats) * width + 1))
    for g in range(n_groups):
        rows = np.asarray(targets[fit_mask & (groups == g)], np.float64)
        if not len(rows):
            table[g, -1] = 1.0
            continue
        values = [_statistic(name, rows) for name in stats]
        table[g, :-1] = np.concatenate(values if basis is None else [v @ basis.T for v in values])
    return table


def target_encoding_tables(train, train_masks, stats, basis=None):
    """Per slot, cell-type and compound encodings: ([slots, cells, d], [slots, compounds, d]) float32."""
    def per_slot(groups, n_groups):
        return np.stack([
            group_encoding(train.targets, groups, n_groups, mask, stats, None if basis is None else basis[s])
            for s, mask in enumerate(train_masks)
        ]).astype(np.float32)

    return per_slot(train.cell_index, len(train.cell_types)), per_slot(train.compound_index, len(train.compounds))
