"""Predict from an exported model.npz with numpy alone.

Nothing in this module's import chain imports jax, so an exported ensemble runs where JAX is not
installed (models that fit t-statistics, `targets.transform = "t_statistic"`, also need scipy).
The forward passes mirror scp_jax.models.mlp (MLP, with or without LayerNorm),
scp_jax.models.factorized and scp_jax.features.tables: member m reads the per-fold tables
(`features.fold_cell`, `features.fold_compound`) and, with SVD targets, the decoder (`decoder.mean`,
`decoder.basis`) at its own fold, the manifest's `members[m]["fold"]`.
"""

import json

import numpy as np

MANIFEST = "manifest"
FORMAT = "scp-jax-npz/1"


def relu(x):
    return np.maximum(x, 0)


def gelu(x):
    """jax.nn.gelu's default: the tanh approximation."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi).astype(x.dtype) * (x + x.dtype.type(0.044715) * x**3)))


ACTIVATIONS = {"relu": relu, "gelu": gelu}
ARCHITECTURES = ("mlp", "factorized")


def layer_norm(x, scale, bias, epsilon=1e-6):
    """flax.nnx.LayerNorm's defaults, with [members, width] scale and bias."""
    centered = x - x.mean(axis=-1, keepdims=True)
    normed = centered / np.sqrt(np.square(centered).mean(axis=-1, keepdims=True) + x.dtype.type(epsilon))
    return normed * scale[:, None, :] + bias[:, None, :]


def concat_present(*parts):
    return np.concatenate([p for p in parts if p is not None], axis=-1)


class Predictor:
    """An exported ensemble: parameters stacked over members, feature tables, vocabularies, gene range."""

    def __init__(self, arrays, manifest):
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} export (format {manifest.get('format')!r})")
        if manifest.get("architecture") not in ARCHITECTURES:
            raise ValueError(f"the numpy predictor runs {' and '.join(ARCHITECTURES)} models; this is a"
                             f" {manifest.get('architecture')!r} model (its run's submission.csv holds the JAX"
                             " predictions)")
        self.arrays, self.manifest = arrays, manifest
        self.folds = np.array([row["fold"] for row in manifest["members"]], np.int64)
        # As the engine aggregates: a member that never kept a best epoch (it diverged before any finite
        # score) has no best parameters and does not vote; `weighted` weighs a member by 1 / its CV^2.
        n = len(self.folds)
        best_epoch = arrays.get("members.best_epoch")  # exports from before these have none
        self.votes = best_epoch >= 0 if best_epoch is not None and manifest["params"] == "best" else np.ones(n, bool)
        score = arrays.get("members.best_score", np.full(n, np.nan))
        self.weights = np.where(np.isfinite(score), 1.0 / np.square(score), 1.0)

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name != MANIFEST}
            manifest = json.loads(str(npz[MANIFEST]))
        return cls(arrays, manifest)

    @property
    def genes(self):
        return self.manifest["genes"]

    def _table_rows(self, name, index):
        """[members, rows, width] of one feature table: a shared table's rows for every member, or a
        per-fold table's rows at each member's fold; None when the export has no such table."""
        table = self.arrays.get(f"features.{name}")  # exports from before per-fold tables have none
        if table is None:
            return None
        if name.startswith("fold_"):
            return table[self.folds][:, index]
        return np.broadcast_to(table[index], (len(self.folds), len(index), table.shape[-1]))

    def features(self, cell_index, compound_index):
        """[members, rows, width]: concat(cell row, compound row, the member's fold rows), as
        FeatureTables.rows does on the device."""
        return concat_present(self._table_rows("cell", cell_index), self._table_rows("compound", compound_index),
                              self._table_rows("fold_cell", cell_index),
                              self._table_rows("fold_compound", compound_index))

    def member_predictions(self, cell_index, compound_index, dtype=np.float32):
        """[members, rows, genes]: every member's prediction for each (cell, compound) row."""
        forward = self._factorized if self.manifest["architecture"] == "factorized" else self._mlp
        out = forward(cell_index, compound_index, dtype)
        if "decoder.basis" in self.arrays:  # SVD targets: components -> genes with the member's fold basis
            basis = self.arrays["decoder.basis"][self.folds].astype(dtype)
            out = np.matmul(out, basis) + self.arrays["decoder.mean"][self.folds].astype(dtype)[:, None, :]
        if self.manifest.get("targets", {}).get("transform") == "t_statistic":
            from scp_jax.data.pvalues import expected_y_of_t  # scipy, for these models only

            out = expected_y_of_t(out, np).astype(dtype)
        return out

    def _mlp(self, cell_index, compound_index, dtype):
        model = self.manifest["model"]
        x = self.features(cell_index, compound_index).astype(dtype)
        for i in range(len(model["hidden"])):
            x = self._dense(x, f"params.layers.{i}", dtype)
            if model.get("layer_norm"):
                norm = f"params.norms.{i}"
                x = layer_norm(x, self._param(f"{norm}.scale", dtype), self._param(f"{norm}.bias", dtype))
            x = ACTIVATIONS[model["activation"]](x)
        return self._dense(x, "params.head", dtype)

    def _factorized(self, cell_index, compound_index, dtype):
        """(cell embedding * compound embedding) @ loadings, each embedding from its own side's tables."""
        cell = concat_present(self._table_rows("cell", cell_index), self._table_rows("fold_cell", cell_index))
        compound = concat_present(self._table_rows("compound", compound_index),
                                self._table_rows("fold_compound", compound_index))
        h = self._dense(cell.astype(dtype), "params.cell", dtype) * self._dense(
            compound.astype(dtype), "params.compound", dtype)
        out = self._dense(h, "params.loadings", dtype)
        if "params.log_cap" in self.arrays:  # the learned saturation of gene-space models
            cap = np.exp(self._param("params.log_cap", dtype))[:, None, None]
            out = cap * np.tanh(out / cap)
        return out + self._param("params.offset", dtype)[:, None, :]

    def _param(self, name, dtype):
        return self.arrays[name].astype(dtype)

    def _dense(self, x, name, dtype):
        """A stacked nnx.Linear: [members, rows, in] -> [members, rows, out], with its bias if it has one."""
        out = np.matmul(x, self._param(f"{name}.kernel", dtype))
        return out + self._param(f"{name}.bias", dtype)[:, None, :] if f"{name}.bias" in self.arrays else out

    def predict(self, cell_index, compound_index, aggregate="mean", clip=False, dtype=np.float32):
        """[rows, genes]: the voting members combined by mean, median or weighted mean, optionally clipped
        to each gene's training range."""
        members = self.member_predictions(cell_index, compound_index, dtype)[self.votes]
        if aggregate == "median":
            prediction = np.median(members, axis=0)
        else:
            weights = self.weights[self.votes] if aggregate == "weighted" else np.ones(len(members))
            prediction = np.einsum("m,mrg->rg", (weights / weights.sum()).astype(dtype), members)
        if clip:
            prediction = np.clip(prediction, self.arrays["clip_min"], self.arrays["clip_max"])
        return prediction
