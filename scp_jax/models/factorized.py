"""A factorized (CP, rank R) model of the cell type x compound x gene tensor.

The effect of compound k on cell type c is `(u_c * w_k) @ L`: a cell-type embedding u and a compound
embedding w multiplied elementwise, read out by R gene loadings L. Each embedding is a linear map of
its own side's features only (one-hot: a free embedding; fingerprints and target encodings: shared
across compounds). That is why it suits this task: a B-cell query takes u_B from the 17 B-cell rows
and w_k from the compound's 4 T and NK rows, so each is learned where the data has it.

When it predicts genes, a learned tanh saturation, `cap * tanh(raw / cap)` with one cap for all
genes, bounds every gene's effect the way strong responses saturate, so the loadings need not bend
to fit the tails. (With SVD targets it predicts components, which need not saturate that way.)

With `row_scale` (one-hot features only), the whole prediction is multiplied by exp(s[cell] +
D[cell, compound]): a size per cell type and a deviation per (cell type, compound) pair. A row's
measured effect scales with how many cells it had, and a third of the rows have few: each training
pair learns its own size, so a damped row teaches the effect's shape at its own size. A pair never
trained on (a validation row, a query unless pseudo-labelled) keeps D's starting zero and gets
exp(s[cell]). The training rows pin only s + D, so after each epoch `center_row_scale` moves s to
the expected size of the cell type's trained pairs, and no trained pair's prediction changes.
(Without it, s drifted with the optimization's path: benchmarks/results/default-search.md, runs s1
and s2.) Expected, not typical: an unseen pair's size is unknown, and where noise dominates a row's
error (zeros are a strong baseline here) its RMSE grows with the square of the size error, so the
best single guess is the mean size. Log sizes are roughly normal: the mean is exp(median + sd^2 / 2),
with a robust sd (MAD) pooled over cell types, since weak rows pin their sizes poorly and a cell
type with 13 training pairs is too few to read a spread from (default-search.md, run s3).
"""

import jax.numpy as jnp
from flax import nnx

from scp_jax.features.tables import split_sides
from scp_jax.models.mlp import maybe_dropout


class Factorized(nnx.Module):
    def __init__(self, layout, out_features, *, rank=16, saturate=True, cap=1.0, row_scale=False, dtype=None,
                 param_dtype=jnp.float32, rngs):
        """`layout`: the widths of the four feature parts (FeatureTables.layout); `cap`: where the
        saturation starts out (it is learned)."""
        self.layout = tuple(layout)
        cell, compound, fold_cell, fold_compound = self.layout
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The cell embedding starts near 1, so at first every cell type shares the compound's effect.
        self.cell = nnx.Linear(cell + fold_cell, rank, bias_init=nnx.initializers.ones,
                               kernel_init=nnx.initializers.normal(0.1 / max(cell + fold_cell, 1) ** 0.5), **dense)
        self.compound = nnx.Linear(compound + fold_compound, rank, **dense)
        self.loadings = nnx.Linear(rank, out_features, use_bias=False, **dense)
        self.offset = nnx.Param(jnp.zeros(out_features, param_dtype))
        self.log_cap = nnx.Param(jnp.log(jnp.asarray(cap, param_dtype))) if saturate else None
        self.cell_log_scale = nnx.Param(jnp.zeros(cell + fold_cell, param_dtype)) if row_scale else None
        self.pair_log_scale = (nnx.Param(jnp.zeros((cell + fold_cell, compound + fold_compound), param_dtype))
                               if row_scale else None)

    def __call__(self, x, *, dropout_rate=0.0, key=None):
        cell, compound = split_sides(x, self.layout)
        h = maybe_dropout(self.cell(cell) * self.compound(compound), dropout_rate, key, 0)
        out = self.loadings(h).astype(jnp.float32)
        if self.log_cap is not None:
            cap = jnp.exp(self.log_cap[...].astype(jnp.float32))
            out = cap * jnp.tanh(out / cap)
        out = out + self.offset[...].astype(jnp.float32)
        if self.cell_log_scale is not None:
            cell, compound = cell.astype(jnp.float32), compound.astype(jnp.float32)
            log_scale = cell @ self.cell_log_scale[...].astype(jnp.float32) + jnp.sum(
                (cell @ self.pair_log_scale[...].astype(jnp.float32)) * compound, axis=-1)
            out = out * jnp.exp(log_scale)[..., None]
        return out

    def center_row_scale(self, trained):
        """Set each cell type's size s to the log of the mean size of its trained pairs (`trained` [cell
        types, compounds] bool), median(s + D) + sd^2 / 2, and take what s moved out of their D, so
        trained pairs keep their sizes (up to D's rounding; s moves first, so a low-precision s cannot
        shift them all) and unseen ones get the mean. sd: 1.4826 x the median absolute deviation of
        trained log sizes from their cell type's median, over all cell types. A cell type without
        trained pairs keeps its s."""
        pair = self.pair_log_scale[...].astype(jnp.float32)
        cell = self.cell_log_scale[...].astype(jnp.float32)
        median = jnp.nanmedian(jnp.where(trained, pair, jnp.nan), axis=1)
        sd = 1.4826 * jnp.nanmedian(jnp.where(trained, jnp.abs(pair - median[:, None]), jnp.nan))
        mean = median + jnp.square(sd) / 2
        new_cell = (cell + jnp.where(jnp.isnan(mean), 0.0, mean)).astype(self.cell_log_scale[...].dtype)
        moved = new_cell.astype(jnp.float32) - cell
        self.cell_log_scale[...] = new_cell
        self.pair_log_scale[...] = jnp.where(trained, pair - moved[:, None], pair).astype(self.pair_log_scale[...].dtype)
