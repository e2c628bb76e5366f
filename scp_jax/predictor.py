"""Predict from an exported model.npz with numpy alone.

Nothing in this module's import chain imports jax, so an exported ensemble runs where JAX is not
installed (models that fit t-statistics, `targets.transform = "t_statistic"`, also need scipy).
The forward passes mirror scp_jax.models.mlp (MLP, with or without LayerNorm),
scp_jax.models.factorized and scp_jax.features.tables: member m reads the per-fold tables
(`features.fold_cell`, `features.fold_compound`) and, with SVD targets, the decoder (`decoder.mean`,
`decoder.basis`) at its own fold, the manifest's `members[m]["fold"]`.
"""

import hashlib
import json
import tomllib

import numpy as np

from scp_jax.config import AGGREGATES
from scp_jax.errors import UserError

MANIFEST = "manifest"
DIGEST = "sha256"
FORMAT = "scp-jax-npz/3"  # /2: members' scores and epochs, per-fold tables, a digest; /3: it covers the manifest


def relu(x):
    return np.maximum(x, 0)


def gelu(x):
    """jax.nn.gelu's default: the tanh approximation."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi).astype(x.dtype) * (x + x.dtype.type(0.044715) * x**3)))


ACTIVATIONS = {"relu": relu, "gelu": gelu}
ARCHITECTURES = ("mlp", "factorized")


def layer_norm(x, scale, bias, epsilon=1e-6):
    """flax.nnx.LayerNorm's defaults (fast variance E[x^2] - E[x]^2, clipped at 0), with [members, width]
    scale and bias."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = np.maximum(np.square(x).mean(axis=-1, keepdims=True) - np.square(mean), 0)
    return (x - mean) / np.sqrt(variance + x.dtype.type(epsilon)) * scale[:, None, :] + bias[:, None, :]


def member_weights(scores):
    """`weighted` aggregation's weights, here and in the engine: 1 / CV^2, 1 for a member without a
    finite score."""
    scores = np.asarray(scores)
    return np.where(np.isfinite(scores), 1.0 / np.square(scores), 1.0).astype(np.float32)


def export_digest(arrays, manifest_text):
    """sha256 over the manifest's JSON text and every array's name, dtype, shape and bytes: what an export
    stores beside them, so a model edited or damaged after export is refused instead of predicting
    from what is left."""
    digest = hashlib.sha256(manifest_text.encode())
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, array.shape]).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def read_npz(path):
    """(arrays, manifest) of an exported model.npz, checked against its digest (an export of another
    format is the Predictor's to refuse)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if name not in (MANIFEST, DIGEST)}
        text = str(npz[MANIFEST])
        digest = str(npz[DIGEST]) if DIGEST in npz.files else None
    manifest = json.loads(text)
    if manifest.get("format") == FORMAT and digest != export_digest(arrays, text):
        raise UserError(f"{path}: its arrays or manifest differ from what was exported (edited or damaged since);"
                        " export the run again")
    return arrays, manifest


class Predictor:
    """An exported ensemble: parameters stacked over members, feature tables, vocabularies, gene range."""

    def __init__(self, arrays, manifest):
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} export (format {manifest.get('format')!r}); export the run again")
        if manifest.get("architecture") not in ARCHITECTURES:
            raise ValueError(f"the numpy predictor runs {' and '.join(ARCHITECTURES)} models; this is a"
                             f" {manifest.get('architecture')!r} model (its run's submission.csv holds the JAX"
                             " predictions)")
        self.arrays, self.manifest = arrays, manifest
        self.folds = np.array([row["fold"] for row in manifest["members"]], np.int64)
        # As the engine aggregates: a member that never kept a best epoch (it diverged before any finite
        # score) has no trained parameters, best or last, and does not vote.
        self.votes = arrays["members.best_epoch"] >= 0
        if not self.votes.any():
            raise ValueError("no member kept a best epoch (each diverged before a finite validation score)")
        config = tomllib.loads(manifest.get("config_toml", "")).get("aggregate", {})
        self.run_aggregate = config.get("method", "mean"), config.get("clip_to_train_range", False)

    def aggregation(self, aggregate=None, clip=None):
        """(method, clip) a prediction uses: the given ones, else the run's own `[aggregate]` settings,
        so a run's submission is reproduced."""
        return aggregate or self.run_aggregate[0], self.run_aggregate[1] if clip is None else clip

    @property
    def genes(self):
        return self.manifest["genes"]

    def _table_rows(self, name, index):
        """[members, rows, width] of one feature table: a shared table's rows for every member, or a
        per-fold table's rows at each member's fold."""
        table = self.arrays[f"features.{name}"]
        if name.startswith("fold_"):
            return table[self.folds][:, index]
        return np.broadcast_to(table[index], (len(self.folds), len(index), table.shape[-1]))

    def features(self, cell_index, compound_index):
        """[members, rows, width]: concat(cell row, compound row, the member's fold rows), as
        FeatureTables.rows does on the device."""
        parts = (self._table_rows("cell", cell_index), self._table_rows("compound", compound_index),
                 self._table_rows("fold_cell", cell_index), self._table_rows("fold_compound", compound_index))
        return np.concatenate(parts, axis=-1)

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
        cell = np.concatenate([self._table_rows("cell", cell_index), self._table_rows("fold_cell", cell_index)], -1)
        compound = np.concatenate([self._table_rows("compound", compound_index),
                                   self._table_rows("fold_compound", compound_index)], -1)
        cell, compound = cell.astype(dtype), compound.astype(dtype)
        h = self._dense(cell, "params.cell", dtype) * self._dense(compound, "params.compound", dtype)
        out = self._dense(h, "params.loadings", dtype)
        if "params.log_cap" in self.arrays:  # the learned saturation of gene-space models
            cap = np.exp(self._param("params.log_cap", dtype))[:, None, None]
            out = cap * np.tanh(out / cap)
        out = out + self._param("params.offset", dtype)[:, None, :]
        if "params.cell_log_scale" in self.arrays:  # each pair's size (cell type's + the pair's deviation)
            log_scale = (cell @ self._param("params.cell_log_scale", dtype)[:, :, None]
                         + np.sum((cell @ self._param("params.pair_log_scale", dtype)) * compound, -1, keepdims=True))
            out = out * np.exp(log_scale)
        return out

    def _param(self, name, dtype):
        return self.arrays[name].astype(dtype)

    def _dense(self, x, name, dtype):
        """A stacked nnx.Linear: [members, rows, in] -> [members, rows, out], with its bias if it has one."""
        out = np.matmul(x, self._param(f"{name}.kernel", dtype))
        return out + self._param(f"{name}.bias", dtype)[:, None, :] if f"{name}.bias" in self.arrays else out

    def predict(self, cell_index, compound_index, aggregate=None, clip=None, dtype=np.float32):
        """[rows, genes]: the voting members combined by `aggregate` (mean, median or weighted by 1 / CV^2),
        optionally clipped to each gene's training range; both default as `aggregation` says."""
        aggregate, clip = self.aggregation(aggregate, clip)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        members = self.member_predictions(cell_index, compound_index, dtype)[self.votes]
        if aggregate == "median":
            prediction = np.median(members, axis=0)
        else:
            weights = (member_weights(self.arrays["members.best_score"])[self.votes] if aggregate == "weighted"
                       else np.ones(len(members)))
            prediction = np.einsum("m,mrg->rg", (weights / weights.sum()).astype(dtype), members)
        if clip:
            prediction = np.clip(prediction, self.arrays["clip_min"], self.arrays["clip_max"])
        return prediction
