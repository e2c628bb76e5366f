"""On-disk cache of compound features, and the resolver behind training-config feature specs.

A cache entry is keyed by everything that determines its content (kind, SMILES in order, settings,
format version), so a stale entry can never be returned; entries are plain `.npy` files.
"""

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from scp_jax.atomic import atomic_path
from scp_jax.errors import UserError

FORMAT_VERSION = 1
_MORGAN_DEFAULTS = {"radius": 2, "bits": 2048, "counts": False}
# Each kind of compound feature set `compound_features` resolves, and how a config spells it.
COMPOUND_SPECS = {"morgan": "'morgan[:radius=2,bits=2048,counts=false]'", "descriptors": "'descriptors'",
                  "chemberta": "'chemberta:FILE.npz'", "chemberta-model": "'chemberta-model:DIR_OR_ID'"}


def default_cache_dir():
    """`$SCP_JAX_CACHE/features`, else `~/.cache/scp_jax/features`."""
    root = os.environ.get("SCP_JAX_CACHE")
    return Path(root) / "features" if root else Path.home() / ".cache" / "scp_jax" / "features"


def feature_key(kind: str, smiles: Sequence[str], settings: dict) -> str:
    payload = json.dumps([FORMAT_VERSION, kind, list(smiles), settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_features(kind: str, smiles: Sequence[str], settings: dict, compute: Callable[[], np.ndarray],
                    cache_dir=None) -> np.ndarray:
    """`compute()` once per (kind, SMILES, settings); later calls load the stored float32 array."""
    path = Path(cache_dir or default_cache_dir()) / f"{kind}-{feature_key(kind, smiles, settings)}.npy"
    if path.is_file():
        return np.load(path)
    features = np.asarray(compute(), dtype=np.float32)
    if features.shape[0] != len(smiles):
        raise ValueError(f"{kind} features have {features.shape[0]} rows for {len(smiles)} SMILES")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features)
    return features


def _parse_options(text: str, defaults: dict, spec: str) -> dict:
    """`key=value,...` into typed options; unknown keys or bad values are user errors."""
    options, given = dict(defaults), set()
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise UserError(f"feature spec {spec!r}: unknown option {key!r}; valid: {', '.join(defaults)}")
        if key in given:
            raise UserError(f"feature spec {spec!r}: option {key!r} given twice")
        given.add(key)
        try:
            if isinstance(defaults[key], bool):
                options[key] = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            else:
                options[key] = int(value)
        except (KeyError, ValueError):
            raise UserError(f"feature spec {spec!r}: bad value {value!r} for {key!r}") from None
    return options


def _check_feature_file(path, smiles, features):
    """One row of finite numbers per stored SMILES, so a truncated or NaN file fails here, not in training."""
    if smiles.ndim != 1:
        raise UserError(f"{path}: 'smiles' must be 1-D, got shape {smiles.shape}; regenerate it")
    if features.ndim != 2 or features.dtype.kind not in "biuf":
        raise UserError(f"{path}: 'features' must be a 2-D numeric array, got {features.dtype} of shape "
                        f"{features.shape}; regenerate it")
    if len(features) != len(smiles):
        raise UserError(f"{path}: 'features' has {len(features)} rows for {len(smiles)} SMILES; regenerate it")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf in training
        finite = np.isfinite(features.astype(np.float32))
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        raise UserError(f"{path}: 'features' has value {features[row, column]}, not a finite float32, at row {row} "
                        f"(SMILES {str(smiles[row])!r}), column {column}; regenerate it")
    first = {}
    for row, text in enumerate(smiles.tolist()):
        if first.setdefault(text, row) != row and not np.array_equal(features[first[text]], features[row]):
            raise UserError(f"{path}: SMILES {text!r} has rows {first[text]} and {row} with different features;"
                            " regenerate it")


def load_feature_file(path, smiles: Sequence[str]) -> np.ndarray:
    """Rows of a features `.npz` (from `python -m scp_jax.features`) aligned to `smiles` by SMILES."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        raise UserError(f"no features file {str(path)!r}: expected the .npz written by `python -m scp_jax.features`")
    try:
        with np.load(path, allow_pickle=False) as stored:
            if not {"smiles", "features"} <= set(stored.files):
                raise UserError(f"{path} lacks 'smiles'/'features' arrays; write it with `python -m scp_jax.features`")
            stored_smiles, features = stored["smiles"], stored["features"]
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # corrupt, or object arrays that need pickle
        raise UserError(f"{path}: not a readable features .npz ({str(err).splitlines()[0]}); regenerate it") from None
    _check_feature_file(path, stored_smiles, features)
    row_of = {s: row for row, s in reversed(list(enumerate(stored_smiles.tolist())))}
    missing = [s for s in smiles if s not in row_of]
    if missing:
        raise UserError(f"{path} has no features for {len(missing)} SMILES, e.g. {missing[0]!r}; regenerate it")
    return features[[row_of[s] for s in smiles]].astype(np.float32)


def _model_identity(model: str) -> dict:
    """What pins a ChemBERTa model's weights: HF cache snapshot dirs are commit-named; local files get size+mtime."""
    from scp_jax.features import chemberta

    weights = chemberta.weights_file(chemberta.resolve_model_dir(model))
    if weights is None:
        raise UserError(chemberta.offline_hint(model))
    weights = weights.resolve()
    stat = weights.stat()
    return {"weights": str(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def compound_features(spec: str, smiles: Sequence[str]) -> np.ndarray:
    """Features [n_smiles, d] for a config spec: `morgan[:radius=R,bits=B,counts=true]`, `descriptors`,
    `chemberta:FILE.npz` or `chemberta-model:DIR_OR_ID`."""
    kind, _, argument = spec.partition(":")
    if kind == "morgan":
        options = _parse_options(argument, _MORGAN_DEFAULTS, spec)
        from scp_jax.features.molecular import morgan_fingerprints

        return morgan_fingerprints(smiles, radius=options["radius"], n_bits=options["bits"], counts=options["counts"])
    if kind == "descriptors" and not argument:
        import rdkit

        from scp_jax.features.molecular import rdkit_descriptors

        settings = {"rdkit": rdkit.__version__}  # descriptor definitions change between RDKit releases
        return cached_features("descriptors", smiles, settings, lambda: rdkit_descriptors(smiles))
    if kind == "chemberta" and argument:
        return load_feature_file(argument, smiles)
    if kind == "chemberta-model" and argument:
        from scp_jax.features.chemberta import embed_smiles

        settings = {"model": argument, "pooling": "cls", **_model_identity(argument)}
        return cached_features("chemberta", smiles, settings, lambda: embed_smiles(smiles, argument, pooling="cls"))
    raise UserError(f"unknown compound feature spec {spec!r}; valid: {', '.join(COMPOUND_SPECS.values())}")
