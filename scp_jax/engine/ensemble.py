"""The ensemble as one compiled program.

Every member is a pure pytree (parameters, optimizer state, best parameters). One member's epoch
is written once, for a single member, then `jax.vmap` lays it over the member axis and
`jax.lax.scan` runs a chunk of epochs inside one `jax.jit`, so the host only sees chunk ends.
Member i's randomness is `fold_in(root, seed_i, fold_i)`: it depends on who the member is, not
on how many members train beside it, so a member trains the same alone or in an ensemble.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from scp_jax.metrics import masked_mrrmse_jax
from scp_jax.models import build_model

_INIT, _SHUFFLE = 0, 1  # streams folded into a member's key


@struct.dataclass
class Data:
    """Everything on device that all members share (broadcast, not copied, over members)."""

    targets: jnp.ndarray  # [n, genes]
    cell_index: jnp.ndarray  # [n]
    compound_index: jnp.ndarray  # [n]
    tables: "FeatureTables"  # noqa: F821  (scp_jax.features.tables)
    decoder: "TargetSVD | None"  # noqa: F821  (scp_jax.features.targets); None: the model predicts genes


@struct.dataclass
class MemberSpec:
    """What makes a member itself: its key and which rows it trains and validates on."""

    key: jax.Array
    fold: jnp.ndarray  # [] int: the slot of the per-fold tables and target basis this member uses
    train_mask: jnp.ndarray  # [n] bool
    val_rows: jnp.ndarray  # [v] row indices, padded to the largest validation set
    val_weight: jnp.ndarray  # [v] 1 for a real validation row, 0 for padding


@struct.dataclass
class MemberState:
    params: nnx.State
    opt_state: optax.OptState
    best_params: nnx.State
    best_score: jnp.ndarray  # validation MRRMSE of best_params
    best_epoch: jnp.ndarray
    epoch: jnp.ndarray  # epochs completed


def member_keys(root_seed, seeds, folds):
    root = jax.random.key(root_seed)
    return jax.vmap(lambda s, f: jax.random.fold_in(jax.random.fold_in(root, s), f))(
        jnp.asarray(seeds), jnp.asarray(folds)
    )


def make_optimizer(config):
    return optax.chain(
        optax.clip_by_global_norm(config.optim.clip_norm),
        optax.adamw(config.optim.learning_rate, weight_decay=config.optim.weight_decay),
    )


def tree_select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Ensemble:
    """Compiled init / train-chunk / predict functions for one config and data shape."""

    def __init__(self, config, in_features, n_genes):
        self.config = config
        self.n_genes = n_genes
        n_out = config.targets.svd or n_genes  # with SVD targets the model predicts components
        self.tx = make_optimizer(config)
        abstract = nnx.eval_shape(lambda: build_model(config, in_features, n_out, nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract, nnx.Param)
        self._make = lambda key: build_model(config, in_features, n_out, nnx.Rngs(key))
        self.init = jax.jit(jax.vmap(self._init_member))
        self.train_chunk = jax.jit(
            jax.vmap(self._train_chunk_member, in_axes=(0, 0, None, None, None)),
            static_argnums=(3, 4),
            donate_argnums=0,
        )

    def _init_member(self, key):
        params = nnx.state(self._make(jax.random.fold_in(key, _INIT)), nnx.Param)
        return MemberState(
            params=params,
            opt_state=self.tx.init(params),
            best_params=jax.tree.map(jnp.copy, params),
            best_score=jnp.array(jnp.inf, jnp.float32),
            best_epoch=jnp.array(-1, jnp.int32),
            epoch=jnp.array(0, jnp.int32),
        )

    def outputs(self, params, tables, fold, cell_index, compound_index):
        return nnx.merge(self.graphdef, params)(tables.rows(fold, cell_index, compound_index))

    def apply(self, params, tables, decoder, fold, cell_index, compound_index):
        """Gene-space predictions: the outputs, decoded with the member's fold basis for SVD targets."""
        out = self.outputs(params, tables, fold, cell_index, compound_index)
        return out if decoder is None else decoder.decode(fold, out)

    def _loss(self, params, data, fold, rows, weights):
        pred = self.outputs(params, data.tables, fold, data.cell_index[rows], data.compound_index[rows])
        target = data.targets[rows]
        if data.decoder is not None and self.config.targets.loss_space == "components":
            target = data.decoder.encode(fold, target)
        elif data.decoder is not None:
            pred = data.decoder.decode(fold, pred)
        per_row = jnp.mean(jnp.square(pred - target), axis=-1)
        return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def _epoch(self, state, spec, data, steps):
        """One epoch of one member: shuffle its training rows, `steps` minibatches, validate."""
        batch_size = self.config.batch_size
        n_rows = spec.train_mask.shape[0]
        key = jax.random.fold_in(jax.random.fold_in(spec.key, _SHUFFLE), state.epoch)
        # Training rows first in a random order; validation rows sort last and are never used.
        order = jnp.argsort(jnp.where(spec.train_mask, jax.random.uniform(key, (n_rows,)), 2.0))
        slots = jnp.arange(steps * batch_size)
        rows = order[slots % n_rows].reshape(steps, batch_size)
        weights = (slots < jnp.sum(spec.train_mask)).astype(jnp.float32).reshape(steps, batch_size)

        def step(carry, batch):
            params, opt_state = carry
            batch_rows, batch_weights = batch
            loss, grads = jax.value_and_grad(self._loss)(params, data, spec.fold, batch_rows, batch_weights)
            updates, new_opt_state = self.tx.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_opt_state)
            # An empty batch (a member with fewer training rows) must not move the optimizer.
            return tree_select(jnp.sum(batch_weights) > 0, new, carry), loss * jnp.sum(batch_weights)

        (params, opt_state), weighted_losses = jax.lax.scan(step, (state.params, state.opt_state), (rows, weights))
        train_loss = jnp.sum(weighted_losses) / jnp.maximum(jnp.sum(weights), 1.0)

        rows = spec.val_rows
        pred = self.apply(params, data.tables, data.decoder, spec.fold, data.cell_index[rows], data.compound_index[rows])
        # A member without validation rows (cv = "full") scores NaN and keeps its last epoch as best.
        has_val = jnp.sum(spec.val_weight) > 0
        val_score = jnp.where(has_val, masked_mrrmse_jax(data.targets[rows], pred, spec.val_weight), jnp.nan)
        improved = jnp.where(has_val, val_score < state.best_score, True)
        state = MemberState(
            params=params,
            opt_state=opt_state,
            best_params=tree_select(improved, params, state.best_params),
            best_score=jnp.where(improved, val_score, state.best_score),
            best_epoch=jnp.where(improved, state.epoch, state.best_epoch),
            epoch=state.epoch + 1,
        )
        return state, {"train_loss": train_loss, "val_mrrmse": val_score}

    def _train_chunk_member(self, state, spec, data, n_epochs, steps):
        return jax.lax.scan(lambda s, _: self._epoch(s, spec, data, steps), state, length=n_epochs)

    def steps_per_epoch(self, train_masks):
        return math.ceil(int(np.max(np.sum(train_masks, axis=1))) / self.config.batch_size)

    def mean_prediction(self, params, folds, masks, data, cell_index, compound_index):
        """Per row, the mean prediction of the members whose mask holds that row (NaN if none).

        Members are summed one at a time (`lax.scan`), so memory stays at one [rows, genes] array.
        """
        return self._mean_prediction(
            params, jnp.asarray(folds), jnp.asarray(masks, jnp.float32), data.tables, data.decoder, cell_index,
            compound_index,
        )

    @jax.jit(static_argnums=0)
    def _mean_prediction(self, params, folds, masks, tables, decoder, cell_index, compound_index):
        def add_member(total, member):
            member_params, fold, mask = member
            pred = self.apply(member_params, tables, decoder, fold, cell_index, compound_index)
            return total + mask[:, None] * pred, None

        zeros = jnp.zeros((cell_index.shape[0], self.n_genes), jnp.float32)
        total, _ = jax.lax.scan(add_member, zeros, (params, folds, masks))
        count = jnp.sum(masks, axis=0)[:, None]
        return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)
