"""The member table: each member of an ensemble is (seed, fold, hyperparameters).

`--ensemble N` gives N (seed, fold) pairs, member i on fold i mod K with seed i div K; a config
`[sweep]` crosses them with lists of hyperparameters. The table is data, not code: every column
becomes a per-member array inside the one compiled program.
"""

import dataclasses
import itertools

import numpy as np

HYPERPARAMETERS = ("learning_rate", "weight_decay", "clip_norm", "dropout", "input_mask")


def _default(config, name):
    return getattr(config.optim, name) if hasattr(config.optim, name) else getattr(config.model, name)


@dataclasses.dataclass(frozen=True)
class MemberTable:
    seed: np.ndarray  # [members] int
    fold: np.ndarray  # [members] int
    hparams: dict  # name -> [members] float32

    @classmethod
    def from_config(cls, config):
        grid = [getattr(config.sweep, name) or (_default(config, name),) for name in HYPERPARAMETERS]
        rows = [
            (i // config.folds, i % config.folds, combo)
            for combo in itertools.product(*grid)
            for i in range(config.ensemble)
        ]
        return cls(
            seed=np.array([r[0] for r in rows], np.int32),
            fold=np.array([r[1] for r in rows], np.int32),
            hparams={name: np.array([r[2][j] for r in rows], np.float32) for j, name in enumerate(HYPERPARAMETERS)},
        )

    @classmethod
    def single(cls, config, seed, fold, **hparams):
        """One member, e.g. to retrain a member of an ensemble alone."""
        values = {name: hparams.get(name, _default(config, name)) for name in HYPERPARAMETERS}
        return cls(np.array([seed], np.int32), np.array([fold], np.int32),
                   {k: np.array([v], np.float32) for k, v in values.items()})

    def __len__(self):
        return len(self.seed)

    def take(self, index):
        index = np.asarray(index)
        return MemberTable(self.seed[index], self.fold[index], {k: v[index] for k, v in self.hparams.items()})

    def rows(self):
        return [
            {"member": i, "seed": int(self.seed[i]), "fold": int(self.fold[i]),
             **{k: float(f"{v[i]:.7g}") for k, v in self.hparams.items()}}
            for i in range(len(self))
        ]
