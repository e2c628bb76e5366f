"""The member table: each member of an ensemble is (seed, fold, hyperparameters), under one CV scheme.

`--ensemble N` gives N (seed, fold) pairs, member i on fold i mod K with seed i div K, K the
scheme's number of folds (`scp_jax.engine.cv`); under `full` (K = 0) member i is seed i on the
all-rows slot, fold K = 0. A config `[sweep]` crosses them with lists of hyperparameters. The table is data, not code: every column
becomes a per-member array inside the one compiled program.
"""

import dataclasses
import itertools

import numpy as np

from scp_jax.config import CATEGORIES, HYPERPARAMETERS, OPTIMIZERS


def _code(name, value):
    return CATEGORIES[name].index(value) if name in CATEGORIES else value


@dataclasses.dataclass(frozen=True)
class MemberTable:
    seed: np.ndarray  # [members] int
    fold: np.ndarray  # [members] int
    hparams: dict  # name -> [members] float32
    scheme: str = "kfold"  # the CV scheme the folds belong to (config.cv)

    @classmethod
    def from_config(cls, config, n_folds):
        """`n_folds`: the scheme's fold count, make_folds(...).n_folds: config.folds for kfold only (0 for
        "full")."""
        rows = [
            (i // n_folds, i % n_folds, combo) if n_folds else (i, 0, combo)
            for combo in itertools.product(*config.sweep_grid())
            for i in range(config.ensemble)
        ]
        return cls(
            seed=np.array([r[0] for r in rows], np.int32),
            fold=np.array([r[1] for r in rows], np.int32),
            hparams={name: np.array([_code(name, r[2][j]) for r in rows], np.float32) for j, name in enumerate(HYPERPARAMETERS)},
            scheme=config.cv,
        )

    @classmethod
    def single(cls, config, seed, fold, **hparams):
        """One member, e.g. to retrain a member of an ensemble alone."""
        values = {name: hparams.get(name, config.hyperparameter(name)) for name in HYPERPARAMETERS}
        return cls(np.array([seed], np.int32), np.array([fold], np.int32),
                   {k: np.array([_code(k, v)], np.float32) for k, v in values.items()}, config.cv)

    def program_options(self):
        """The optional program parts some member needs: "dropout", "input_mask", "l2", "lion"."""
        used = {name for name in ("dropout", "input_mask", "l2") if self.hparams[name].any()}
        if (self.hparams["optimizer"] == OPTIMIZERS.index("lion")).any():
            used.add("lion")
        return frozenset(used)

    def __len__(self):
        return len(self.seed)

    def take(self, index):
        index = np.asarray(index)
        return MemberTable(self.seed[index], self.fold[index], {k: v[index] for k, v in self.hparams.items()},
                           self.scheme)

    def rows(self):
        return [
            {"member": i, "scheme": self.scheme, "seed": int(self.seed[i]), "fold": int(self.fold[i]),
             **{k: CATEGORIES[k][int(v[i])] if k in CATEGORIES else float(f"{v[i]:.7g}")
                for k, v in self.hparams.items()}}
            for i in range(len(self))
        ]
