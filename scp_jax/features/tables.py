"""Feature tables: per-cell-type and per-compound matrices gathered by index on the device.

A row's input is `concat(cell[cell], compound[compound], fold_cell[fold, cell],
fold_compound[fold, compound])`, so features never get materialized per row on the host. The
`fold_*` tables hold what depends on a member's training rows (target encodings): one slot per
fold plus a last slot fitted on all rows (see `scp_jax.engine.cv`).
"""

import jax.numpy as jnp
import numpy as np
from flax import struct

from scp_jax.errors import UserError
from scp_jax.features.cache import COMPOUND_SPECS, compound_features
from scp_jax.features.targets import fold_svd, target_encoding_tables

FEATURE_SETS = ", ".join(["'onehot'", *COMPOUND_SPECS.values(), "'target_encoding'"])


@struct.dataclass
class FeatureTables:
    cell: jnp.ndarray  # [n_cell_types, d_cell]
    compound: jnp.ndarray  # [n_compounds, d_compound]
    fold_cell: jnp.ndarray  # [slots, n_cell_types, d_fold_cell]
    fold_compound: jnp.ndarray  # [slots, n_compounds, d_fold_compound]

    @property
    def layout(self):
        """The widths of a row's four feature parts, in `rows` order (what models are built for)."""
        return self.cell.shape[1], self.compound.shape[1], self.fold_cell.shape[2], self.fold_compound.shape[2]

    def rows(self, fold, cell_index, compound_index):
        """Features of the rows named by index, as a member of slot `fold` sees them (works under jit and vmap)."""
        parts = (self.cell[cell_index], self.compound[compound_index],
                 self.fold_cell[fold][cell_index], self.fold_compound[fold][compound_index])
        return jnp.concatenate(parts, axis=-1)


def split_sides(x, layout):
    """Undo `rows`' concatenation into a row's two sides: features [..., F] -> (cell side
    [..., cell + fold_cell], compound side [..., compound + fold_compound]); `layout` is the tables'."""
    cell, compound, fold_cell, _ = layout
    return (jnp.concatenate([x[..., :cell], x[..., cell + compound: cell + compound + fold_cell]], axis=-1),
            jnp.concatenate([x[..., cell: cell + compound], x[..., cell + compound + fold_cell:]], axis=-1))


def _concat(parts, shape):
    return np.concatenate(parts, axis=-1) if parts else np.zeros(shape, np.float32)


def build_tables(config, train, train_masks):
    """Stack the configured feature sets; `train_masks` [slots, n] are the rows each slot may learn from."""
    if not config.features:
        raise UserError("config: features is empty; name at least one feature set, e.g. ['onehot']")
    n_slots, n_cells, n_compounds = len(train_masks), len(train.cell_types), len(train.compounds)
    cell, compound, fold_cell, fold_compound = [], [], [], []
    for name in config.features:
        kind = name.partition(":")[0]
        if name == "onehot":
            cell.append(np.eye(n_cells, dtype=np.float32))
            compound.append(np.eye(n_compounds, dtype=np.float32))
        elif name == "target_encoding":
            te = config.target_encoding
            basis = fold_svd(train.targets, train_masks, te.svd, "target_encoding.svd").basis if te.svd else None
            cells, compounds = target_encoding_tables(train, train_masks, te.stats, basis)
            fold_cell.append(cells)
            fold_compound.append(compounds)
        elif kind in COMPOUND_SPECS:
            from scp_jax.features.molecular import smiles_errors_of

            with smiles_errors_of(train):
                compound.append(compound_features(name, train.compound_smiles))
        else:
            raise UserError(f"config: unknown feature set {name!r}; valid: {FEATURE_SETS}")
    return FeatureTables(
        cell=jnp.asarray(_concat(cell, (n_cells, 0))),
        compound=jnp.asarray(_concat(compound, (n_compounds, 0))),
        fold_cell=jnp.asarray(_concat(fold_cell, (n_slots, n_cells, 0))),
        fold_compound=jnp.asarray(_concat(fold_compound, (n_slots, n_compounds, 0))),
    )


def target_decoder(config, targets, train_masks):
    """The per-slot SVD the model's outputs are decoded with, on device; None when it predicts genes."""
    if not config.targets.svd:
        return None
    svd = fold_svd(targets, train_masks, config.targets.svd, "targets.svd")
    return type(svd)(mean=jnp.asarray(svd.mean, jnp.float32), basis=jnp.asarray(svd.basis, jnp.float32))
