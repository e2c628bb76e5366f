"""A tiny additive world (cell effect + compound effect + noise) for fast engine tests."""

from types import SimpleNamespace

import jax
import numpy as np


def toy_train(n_rows=96, n_genes=24, n_cells=4, n_compounds=24, seed=0):
    rng = np.random.default_rng(seed)
    cell_index = np.arange(n_rows, dtype=np.int32) % n_cells
    compound_index = rng.integers(0, n_compounds, n_rows).astype(np.int32)
    targets = (
        rng.normal(size=(n_cells, n_genes))[cell_index]
        + rng.normal(size=(n_compounds, n_genes))[compound_index]
        + 0.5 * rng.normal(size=(n_rows, n_genes))
    ).astype(np.float32)
    return SimpleNamespace(
        targets=targets,
        cell_index=cell_index,
        compound_index=compound_index,
        cell_types=tuple(f"cell{i}" for i in range(n_cells)),
        compounds=tuple(f"cmpd{i}" for i in range(n_compounds)),
        genes=tuple(f"G{i}" for i in range(n_genes)),
    )


def toy_queries(train, n=8):
    return SimpleNamespace(ids=np.arange(n), cell_index=train.cell_index[:n], compound_index=train.compound_index[:n])


def sharding_summary(result):
    """What the sharding test compares between device counts: member scores, the ensemble's CV, how many
    devices hold the parameters and a few of the first parameter's values (host lists, JSON-ready)."""
    from scp_jax.engine.devices import to_host

    params = jax.tree.leaves(result.state.params)
    return {"cv": result.member_cv.tolist(), "ensemble": result.ensemble_cv,
            "sharded": len(params[0].sharding.device_set), "kernel": to_host(params[0])[:6].ravel().tolist()}
