"""Predict from an exported model.npz with numpy alone.

Nothing in this module's import chain imports jax, so an exported ensemble runs where JAX is not
installed (models that fit t-statistics, `targets.transform = "t_statistic"`, also need scipy).
The forward pass mirrors scp_jax.models.mlp and scp_jax.features.tables: member m reads the per-fold
tables (`features.fold_cell`, `features.fold_compound`) and, with SVD targets, the
decoder (`decoder.mean`, `decoder.basis`) at its own fold, the manifest's `members[m]["fold"]`.
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


class Predictor:
    """An exported ensemble: parameters stacked over members, feature tables, vocabularies, gene range."""

    def __init__(self, arrays, manifest):
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} export (format {manifest.get('format')!r})")
        if manifest.get("architecture") != "mlp" or manifest["model"].get("layer_norm"):
            raise ValueError(f"the numpy predictor runs plain MLPs; this is a {manifest.get('architecture')!r} model"
                             " (its run's submission.csv holds the JAX predictions)")
        self.arrays, self.manifest = arrays, manifest
        self.activation = ACTIVATIONS[manifest["model"]["activation"]]
        self.n_layers = len(manifest["model"]["hidden"])
        self.folds = np.array([row["fold"] for row in manifest["members"]], np.int64)

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name != MANIFEST}
            manifest = json.loads(str(npz[MANIFEST]))
        return cls(arrays, manifest)

    @property
    def genes(self):
        return self.manifest["genes"]

    def features(self, cell_index, compound_index):
        """[members, rows, width]: concat(cell row, compound row, the member's fold rows), as
        FeatureTables.rows does on the device."""
        shared = np.concatenate(
            [self.arrays["features.cell"][cell_index], self.arrays["features.compound"][compound_index]], axis=-1
        )
        parts = [np.broadcast_to(shared, (len(self.folds), *shared.shape))]
        for name, index in (("features.fold_cell", cell_index), ("features.fold_compound", compound_index)):
            if name in self.arrays:  # exports from before per-fold tables have none
                parts.append(self.arrays[name][self.folds][:, index])
        return np.concatenate(parts, axis=-1)

    def member_predictions(self, cell_index, compound_index, dtype=np.float32):
        """[members, rows, genes]: every member's prediction for each (cell, compound) row."""
        x = self.features(cell_index, compound_index).astype(dtype)
        for i in range(self.n_layers):
            x = self.activation(self._dense(x, f"params.layers.{i}", dtype))
        out = self._dense(x, "params.head", dtype)
        if "decoder.basis" in self.arrays:  # SVD targets: components -> genes with the member's fold basis
            basis = self.arrays["decoder.basis"][self.folds].astype(dtype)
            out = np.matmul(out, basis) + self.arrays["decoder.mean"][self.folds].astype(dtype)[:, None, :]
        if self.manifest.get("targets", {}).get("transform") == "t_statistic":
            from scp_jax.data.pvalues import expected_y_of_t  # scipy, for these models only

            out = expected_y_of_t(out, np).astype(dtype)
        return out

    def _dense(self, x, name, dtype):
        kernel, bias = self.arrays[f"{name}.kernel"].astype(dtype), self.arrays[f"{name}.bias"].astype(dtype)
        return np.matmul(x, kernel) + bias[:, None, :]

    def predict(self, cell_index, compound_index, aggregate="mean", clip=False, dtype=np.float32):
        """[rows, genes]: members aggregated by mean or median, optionally clipped to each gene's training range."""
        members = self.member_predictions(cell_index, compound_index, dtype)
        prediction = np.median(members, axis=0) if aggregate == "median" else members.mean(axis=0)
        if clip:
            prediction = np.clip(prediction, self.arrays["clip_min"], self.arrays["clip_max"])
        return prediction
