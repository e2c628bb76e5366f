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


def top_right_singular_vectors(x, k):
    """Top-k singular values [k] and right singular vectors [k, n] of x [m, n], via the eigenvectors of
    the smaller Gram matrix.

    With m ~ 500 rows and n ~ 18k genes, eigh of the m x m Gram matrix is ~4x cheaper than a full SVD.
    A singular value is the norm of x's projection on its vector, not the square root of a Gram
    eigenvalue, which squares the scale and leaves a zero singular value at ~1e-8 of the first.
    """
    m, n = x.shape
    if n <= m:
        _, vectors = np.linalg.eigh(x.T @ x)
        vt = vectors[:, ::-1][:, :k].T
        return np.linalg.norm(vt @ x.T, axis=1), vt
    _, vectors = np.linalg.eigh(x @ x.T)
    vt = vectors[:, ::-1][:, :k].T @ x  # rows: left singular vector times x = singular value times right one
    values = np.linalg.norm(vt, axis=1)
    return values, vt / np.maximum(values, 1e-300)[:, None]


def fold_svd(targets, train_masks, k, what):
    """Mean and top-k right singular vectors of each slot's centered training targets (float64 fit).

    Centering costs one rank, so k is bounded by min(rows - 1, genes); past the targets' numerical
    rank the extra vectors would be rounding noise, not orthonormal, so that is refused too.
    """
    means, bases = [], []
    last = len(train_masks) - 1
    for slot, mask in enumerate(train_masks):
        name = "the all-rows slot" if slot == last else f"fold {slot}"
        rows = np.asarray(targets[mask], np.float64)
        bound = min(len(rows) - 1, rows.shape[1])
        if k > bound:
            raise UserError(f"config: {what} = {k} exceeds the rank bound {bound} (min(rows - 1, genes)) of the "
                            f"centered training targets of {name}; lower {what}")
        mean = rows.mean(axis=0)
        values, basis = top_right_singular_vectors(rows - mean, k)
        if values[-1] <= 1e-12 * values[0]:
            rank = int(np.sum(values > 1e-12 * values[0]))
            raise UserError(f"config: {what} = {k} exceeds the rank {rank} of the centered training targets of "
                            f"{name}; lower {what} to at most {rank}")
        means.append(mean)
        bases.append(basis)
    return TargetSVD(mean=np.stack(means), basis=np.stack(bases))


_QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}


def _statistics(names, rows):
    """The named statistics of rows [r, genes], the quantiles from one sort."""
    wanted = [q for name, q in _QUANTILES.items() if name in names]
    quantiles = dict(zip(wanted, np.quantile(rows, wanted, axis=0))) if wanted else {}
    moments = {"mean": np.mean, "std": np.std}
    return [moments[name](rows, axis=0) if name in moments else quantiles[_QUANTILES[name]] for name in names]


def group_encoding(targets, groups, n_groups, fit_mask, stats, basis=None):
    """[n_groups, len(stats) * d + 1] float64: each statistic of a group's fitted rows, then an 'unseen' flag.

    d = genes, or k when `basis` [k, genes] projects each statistic; a group without fitted rows
    gets zeros and flag 1.
    """
    values = np.zeros((n_groups, len(stats), len(targets[0])))
    unseen = np.zeros((n_groups, 1))
    for g in range(n_groups):
        rows = np.asarray(targets[fit_mask & (groups == g)], np.float64)
        if len(rows):
            values[g] = _statistics(stats, rows)
        else:
            unseen[g] = 1.0
    if basis is not None:
        values = values @ np.asarray(basis, np.float64).T  # one matmul for every group and statistic
    return np.concatenate([values.reshape(n_groups, -1), unseen], axis=1)


def target_encoding_tables(train, train_masks, stats, basis=None):
    """Per slot, cell-type and compound encodings: ([slots, cells, d], [slots, compounds, d]) float32."""
    def per_slot(groups, n_groups):
        return np.stack([
            group_encoding(train.targets, groups, n_groups, mask, stats, None if basis is None else basis[s])
            for s, mask in enumerate(train_masks)
        ]).astype(np.float32)

    return per_slot(train.cell_index, len(train.cell_types)), per_slot(train.compound_index, len(train.compounds))
