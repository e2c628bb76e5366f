"""Feature tables: per-cell-type and per-compound matrices gathered by index on the device.

A row's input is `concat(cell_table[cell], compound_table[compound])`, so features never get
materialized per row on the host and new feature sets only add columns to a table.
"""

import jax.numpy as jnp
import numpy as np
from flax import struct

from scp_jax.errors import UserError


@struct.dataclass
class FeatureTables:
    cell: jnp.ndarray  # [n_cell_types, d_cell]
    compound: jnp.ndarray  # [n_compounds, d_compound]

    @property
    def width(self):
        return self.cell.shape[1] + self.compound.shape[1]

    def rows(self, cell_index, compound_index):
        """Features of the rows named by index (works under jit and vmap)."""
        return jnp.concatenate([self.cell[cell_index], self.compound[compound_index]], axis=-1)


def build_tables(feature_names, train):
    """Stack the configured feature sets into one cell table and one compound table."""
    cell_parts, compound_parts = [], []
    for name in feature_names:
        if name == "onehot":
            cell_parts.append(np.eye(len(train.cell_types), dtype=np.float32))
            compound_parts.append(np.eye(len(train.compounds), dtype=np.float32))
        else:
            raise UserError(f"config: unknown feature set {name!r} (known: onehot)")
    if not cell_parts:
        raise UserError("config: features is empty; name at least one feature set, e.g. ['onehot']")
    return FeatureTables(
        cell=jnp.asarray(np.concatenate(cell_parts, axis=1)),
        compound=jnp.asarray(np.concatenate(compound_parts, axis=1)),
    )
