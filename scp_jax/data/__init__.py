"""Competition data: loading and validation, synthetic worlds with hidden answers, scoring."""

from scp_jax.data.dataset import META_COLUMNS, Queries, TrainSet, load_id_map, load_train, write_submission
from scp_jax.data.synth import default_world, make_world

__all__ = ["META_COLUMNS", "Queries", "TrainSet", "default_world", "load_id_map", "load_train", "make_world",
           "write_submission"]
