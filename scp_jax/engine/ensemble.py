"""The ensemble as one compiled program.

Every member is a pure pytree (parameters, optimizer state, best parameters, flags). One member's
epoch is written once, for a single member, then `jax.vmap` lays it over the member axis and
`jax.lax.scan` runs a chunk of epochs inside one `jax.jit`, so the host only sees chunk ends.
Member i's randomness is `fold_in(key(config.seed), seed_i, fold_i)` further folded with the epoch
and step: it depends on who the member is, not on how many members train beside it, so a member
trains the same alone or in an ensemble. Its hyperparameters are arrays in its optimizer state
and spec, so a sweep is one program too.

A member's `fold` is also its slot in the per-fold feature tables and target SVD (fitted on that
fold's training rows only); every gather by fold happens on device, inside the vmap.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from scp_jax.config import HYPERPARAMETERS, LossConfig, ModelConfig, TargetsConfig
from scp_jax.data.pvalues import expected_y_of_t
from scp_jax.engine import lowrank, optim
from scp_jax.engine.losses import dense_weight_norm, mixed_loss
from scp_jax.metrics import masked_mrrmse_jax
from scp_jax.models import build_model

_INIT, _SHUFFLE, _NOISE, _ROUNDING = range(4)  # streams folded into a member's key (_NOISE: input masks, dropout)


@struct.dataclass
class Data:
    """Everything on device that all members share (broadcast, not copied, over members)."""

    targets: jnp.ndarray  # [n, genes] the real training rows
    cell_index: jnp.ndarray  # [n + q] real rows, then pseudo-labelled rows
    compound_index: jnp.ndarray  # [n + q]
    tables: "FeatureTables"  # noqa: F821  (scp_jax.features.tables)
    decoder: "TargetSVD | None" = None  # noqa: F821  (scp_jax.features.targets); None: the model predicts genes
    pseudo_targets: jnp.ndarray | None = None  # [slots, q, genes]: a slot's labels come from that slot's members
    row_weight: jnp.ndarray | None = None  # [n + q] loss weight of each row; None: all 1
    fit_targets: jnp.ndarray | None = None  # [n, genes] what the loss fits, if not `targets` (t-statistics)
    component_targets: jnp.ndarray | None = None  # [slots, n + q, k] for a loss on SVD components

    @property
    def loss_targets(self):
        """[n, genes] what the loss fits for the real rows."""
        return self.targets if self.fit_targets is None else self.fit_targets

    def row_targets(self, fold, rows):
        """What the loss fits for rows, as fold `fold`'s members see them: pseudo rows (index >= n) take
        that fold's labels; with component targets, their encoding by that fold's basis."""
        if self.component_targets is not None:
            return self.component_targets[fold][rows]
        fit = self.loss_targets
        n = fit.shape[0]
        real = fit[jnp.minimum(rows, n - 1)]
        if self.pseudo_targets is None:
            return real
        pseudo = self.pseudo_targets[fold][jnp.maximum(rows - n, 0)]
        return jnp.where((rows < n)[..., None], real, pseudo)

    def with_component_targets(self):
        """For a loss on SVD components: every row's fit target encoded by every slot's basis, once, and
        not at each step, where it cost a [batch, genes] x [genes, k] product per member."""
        fit = self.loss_targets
        slots = range(self.decoder.basis.shape[0])
        rows = [fit if self.pseudo_targets is None else jnp.concatenate([fit, self.pseudo_targets[s]]) for s in slots]
        encoded = jnp.stack([self.decoder.encode(s, r) for s, r in zip(slots, rows)])
        return self.replace(component_targets=encoded, fit_targets=None, pseudo_targets=None)


@struct.dataclass
class MemberSpec:
    """What makes a member itself: its key, its rows, its hyperparameters."""

    run_seed: jnp.ndarray  # int: config.seed, the root of the member's key (an input: seeds share a program)
    seed: jnp.ndarray  # int
    fold: jnp.ndarray  # int; also the slot of the per-fold tables and target SVD the member uses
    train_mask: jnp.ndarray  # [n + pseudo rows] bool
    val_rows: jnp.ndarray  # [v] row indices, padded to the largest validation set
    val_weight: jnp.ndarray  # [v] 1 for a real validation row, 0 for padding
    hparams: dict  # name -> scalar: config.HYPERPARAMETERS, and total_steps (its schedule's length)


@struct.dataclass
class MemberState:
    params: nnx.State
    opt_state: optim.OptimizerState
    best_params: nnx.State
    best_score: jnp.ndarray  # validation MRRMSE of best_params
    best_epoch: jnp.ndarray
    epoch: jnp.ndarray  # epochs completed
    stopped_at: jnp.ndarray  # epoch the member stopped updating (patience or divergence); -1 = running
    diverged: jnp.ndarray  # loss or score turned NaN/Inf; parameters were reset to the best


def tree_select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _value_and_grad(loss_fn, params, *args):
    return jax.value_and_grad(loss_fn)(params, *args)


def _fold_in(key, *data):
    for d in data:
        key = jax.random.fold_in(key, d)
    return key


@dataclasses.dataclass(frozen=True)
class Program:
    """All of a config that the compiled program reads; runs whose configs agree here share one Ensemble
    and its compiled programs. The rest of a config reaches the program as inputs (the run's seed, the
    schedule, the member table and its hyperparameter values, the model's dropout and input masking
    among them; the feature tables, whose widths are `layout`; pseudo-labelled rows) or not at all
    (paths, chunking, checkpoints), so the engine cannot read it by mistake: it is not here."""

    batch_size: int
    precision: str
    lowrank_grads: bool
    keep: str
    patience: int
    model: ModelConfig  # its hyperparameters (dropout, input_mask) at their defaults: they are inputs
    loss: LossConfig
    targets: TargetsConfig

    @classmethod
    def of(cls, config):
        defaults = ModelConfig()
        inputs = {name: getattr(defaults, name) for name in HYPERPARAMETERS if hasattr(defaults, name)}
        return cls(config.batch_size, config.precision, config.lowrank_grads, config.keep, config.patience,
                   dataclasses.replace(config.model, **inputs), config.loss, config.targets)


def compiled_ensemble(config, layout, n_genes, options=frozenset()):
    """One Ensemble (and its compiled programs) per Program and shape."""
    return _cached_ensemble(Program.of(config), tuple(layout), n_genes, options)


@functools.lru_cache(maxsize=16)
def _cached_ensemble(program, layout, n_genes, options):
    return Ensemble(program, layout, n_genes, options)


class Ensemble:
    """Compiled init / train-chunk / predict functions for one Program and data shape (`layout`: the
    feature tables' FeatureTables.layout)."""

    def __init__(self, config, layout, n_genes, options=frozenset()):
        """`config`: a Config or its Program; `options` (MemberTable.program_options) names the random
        masks and optimizers some member uses: only those are built, since they cost time and compile time."""
        self.program = program = Program.of(config)
        self.options = options
        self.loss = mixed_loss(program.loss)
        n_out = program.targets.svd or n_genes  # with SVD targets the model predicts components
        self._make = lambda key: build_model(program, layout, n_out, nnx.Rngs(key))
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: self._make(0)), nnx.Param)
        self.lowrank_impl = lowrank.default_impl() if program.lowrank_grads else "xla"
        self.init = jax.jit(jax.vmap(self._init_member))
        self.train_chunk = jax.jit(
            jax.vmap(self._train_chunk_member, in_axes=(0, 0, None, None, None)),
            static_argnums=(3, 4),
            donate_argnums=0,
        )

    def member_key(self, spec, *streams):
        """The member's own key (from the run's seed, its seed and fold), folded with a stream, epoch, step..."""
        return _fold_in(jax.random.key(spec.run_seed), spec.seed, spec.fold, *streams)

    def _init_member(self, spec):
        params = nnx.state(self._make(self.member_key(spec, _INIT)), nnx.Param)
        opt_state = optim.init(params, **spec.hparams)  # moments take the parameters' dtype
        return MemberState(
            params=params,
            opt_state=opt_state,
            best_params=jax.tree.map(jnp.copy, params),
            best_score=jnp.array(jnp.inf, jnp.float32),
            best_epoch=jnp.array(-1, jnp.int32),
            epoch=jnp.array(0, jnp.int32),
            stopped_at=jnp.array(-1, jnp.int32),
            diverged=jnp.array(False),
        )

    def outputs(self, params, tables, fold, cell_index, compound_index, spec=None, key=None):
        """The model's outputs (genes, or SVD components) for rows, with fold `fold`'s tables; with a key
        (training), input masking and dropout from the spec."""
        x = tables.rows(fold, cell_index, compound_index)
        model = nnx.merge(self.graphdef, params)
        if key is None:
            return model(x)
        mask_key, dropout_key = jax.random.split(key)
        if "input_mask" in self.options:
            x = jnp.where(jax.random.uniform(mask_key, x.shape) >= spec.hparams["input_mask"], x, 0.0)
        if "dropout" in self.options:
            return model(x, dropout_rate=spec.hparams["dropout"], key=dropout_key)
        return model(x)

    def apply(self, params, tables, decoder, fold, cell_index, compound_index):
        """Predictions of the targets for rows: the outputs, decoded with fold `fold`'s basis for SVD
        targets, and mapped from t-statistics to E[signed -log10 p] when the loss fits t."""
        out = self.outputs(params, tables, fold, cell_index, compound_index)
        out = out if decoder is None else decoder.decode(fold, out)
        return expected_y_of_t(out, jnp) if self.program.targets.transform == "t_statistic" else out

    def _loss(self, params, data, rows, weights, row_mass, spec, key):
        """The member's mean loss over a batch of rows, weighted by `weights` (a row's pseudo-label weight,
        0 for padding), plus its l2 prior; `row_mass`: the weights of all its training rows, summed."""
        pred = self.outputs(params, data.tables, spec.fold, data.cell_index[rows], data.compound_index[rows], spec, key)
        target = data.row_targets(spec.fold, rows)
        if data.decoder is not None and data.component_targets is None:
            pred = data.decoder.decode(spec.fold, pred)
        loss = jnp.sum(self.loss(pred, target) * weights) / jnp.maximum(jnp.sum(weights), 1e-6)
        if "l2" in self.options:  # the loss is a mean over the member's weighted rows and outputs: so is the prior
            loss = loss + spec.hparams["l2"] * dense_weight_norm(nnx.merge(self.graphdef, params)) / (row_mass * pred.shape[-1])
        return loss

    def _epoch(self, state, spec, data, steps, trained=None):
        """One epoch of one member: shuffle its training rows, `steps` minibatches, validate; `trained`
        (`row_scale` models): the member's trained pairs, whose log-normal mean size unseen pairs get."""
        batch_size = self.program.batch_size
        n_rows = spec.train_mask.shape[0]
        key = self.member_key(spec, _SHUFFLE, state.epoch)
        # Training rows first in a random order; validation rows sort last and are never used.
        order = jnp.argsort(jnp.where(spec.train_mask, jax.random.uniform(key, (n_rows,)), 2.0))
        slots = jnp.arange(steps * batch_size)
        rows = order[slots % n_rows].reshape(steps, batch_size)
        n_train = jnp.sum(spec.train_mask)
        weights = (slots < n_train).astype(jnp.float32).reshape(steps, batch_size)
        if data.row_weight is not None:  # pseudo-labelled rows: in the gradient and the epoch's loss alike
            weights = weights * data.row_weight[rows]
        row_mass = n_train if data.row_weight is None else jnp.sum(spec.train_mask * data.row_weight)

        noise_key = self.member_key(spec, _NOISE, state.epoch)  # folded with the step below
        rounding_key = self.member_key(spec, _ROUNDING, state.epoch) if self.program.precision == "bf16_state" else None
        grad_fn = lowrank.value_and_grad if self.program.lowrank_grads else _value_and_grad

        def step(carry, batch):
            params, opt_state = carry
            index, batch_rows, batch_weights = batch
            step_key = jax.random.fold_in(noise_key, index)
            loss, grads = grad_fn(self._loss, params, data, batch_rows, batch_weights, row_mass, spec, step_key)
            # Stopped members and empty batches (fewer training rows) leave the member untouched.
            active = jnp.logical_and(state.stopped_at < 0, index * batch_size < n_train)
            rounding_seed = None
            if rounding_key is not None:
                rounding_seed = jax.random.bits(jax.random.fold_in(rounding_key, index), (), jnp.uint32)
            new = optim.step(params, grads, opt_state, active, rounding_seed, "lion" in self.options, self.lowrank_impl)
            return new, loss * jnp.sum(batch_weights)

        batches = (jnp.arange(steps), rows, weights)
        (params, opt_state), weighted_losses = jax.lax.scan(step, (state.params, state.opt_state), batches)
        train_loss = jnp.sum(weighted_losses) / jnp.maximum(jnp.sum(weights), 1e-6)
        if trained is not None:
            params = self._center_row_scale(params, trained)

        val = spec.val_rows
        pred = self.apply(params, data.tables, data.decoder, spec.fold, data.cell_index[val], data.compound_index[val])
        has_val = jnp.sum(spec.val_weight) > 0
        val_score = jnp.where(has_val, masked_mrrmse_jax(data.targets[val], pred, spec.val_weight), jnp.nan)
        return self._after_epoch(state, params, opt_state, train_loss, val_score, has_val)

    def _trained_pairs(self, params, spec, data):
        """[cell types, compounds] bool: the pairs among the member's training rows (a row_scale model's D)."""
        shape = nnx.merge(self.graphdef, params).pair_log_scale[...].shape
        return jnp.zeros(shape, bool).at[data.cell_index, data.compound_index].max(spec.train_mask)

    def _center_row_scale(self, params, trained):
        """Unseen pairs get the log-normal mean size of their cell type's trained pairs (models/factorized.py)."""
        model = nnx.merge(self.graphdef, params)
        model.center_row_scale(trained)
        return nnx.state(model, nnx.Param)

    def _after_epoch(self, state, params, opt_state, train_loss, val_score, has_val):
        """Keep the best parameters (a real copy), stop on patience, freeze a diverged member at its best.

        A member without validation rows (cv = "full") scores NaN: that is not divergence (only a
        non-finite train loss is), and its best epoch is always the last one. So is every member's
        with `keep = "last"`: with a handful of validation rows per fold, the epoch they pick can be
        noise (benchmarks/results/default-search.md, last section), and the CV then scores the last
        epoch too.
        """
        running = state.stopped_at < 0
        diverged = running & ~(jnp.isfinite(train_loss) & (jnp.isfinite(val_score) | ~has_val))
        better = jnp.where(has_val, val_score < state.best_score, True) if self.program.keep == "best" else True
        improved = running & ~diverged & better
        best_epoch = jnp.where(improved, state.epoch, state.best_epoch)
        patience = self.program.patience
        out_of_patience = (state.epoch - best_epoch >= patience) if patience else jnp.array(False)
        best_params = tree_select(improved, params, state.best_params)
        state = MemberState(
            params=tree_select(diverged, best_params, params),
            opt_state=opt_state,
            best_params=best_params,
            best_score=jnp.where(improved, val_score, state.best_score),
            best_epoch=best_epoch,
            epoch=state.epoch + 1,
            stopped_at=jnp.where(running & (diverged | out_of_patience), state.epoch, state.stopped_at),
            diverged=state.diverged | diverged,
        )
        return state, {"train_loss": train_loss, "val_mrrmse": val_score, "running": running}

    def _train_chunk_member(self, state, spec, data, n_epochs, steps):
        trained = self._trained_pairs(state.params, spec, data) if self.program.model.row_scale else None  # once a chunk
        return jax.lax.scan(lambda s, _: self._epoch(s, spec, data, steps, trained), state, length=n_epochs)

    @jax.jit(static_argnums=0)
    def predict_members(self, params, folds, tables, decoder, cell_index, compound_index):
        """[members, rows, genes]: every member's gene-space prediction for the rows, each with its own
        fold's tables and decoder (`folds` [members])."""
        member = jax.vmap(self.apply, in_axes=(0, None, None, 0, None, None))
        return member(params, tables, decoder, folds, cell_index, compound_index)

    @jax.jit(static_argnums=(0, 1))
    def aggregate_prediction(self, method, params, folds, masks, weights, tables, decoder, cell_index, compound_index):
        """Per row, the members whose mask holds that row combined by `method` (NaN if none): "mean",
        "median" or "weighted" (mean with the per-member `weights`)."""
        preds = self.predict_members(params, folds, tables, decoder, cell_index, compound_index)
        count = jnp.sum(masks, axis=0)[:, None]
        if method == "median":
            combined = jnp.nanmedian(jnp.where(masks[:, :, None], preds, jnp.nan), axis=0)
        else:  # a member without a vote may predict NaN (it diverged early): 0 x NaN would spread it
            votes = masks * (weights[:, None] if method == "weighted" else 1.0)
            preds = jnp.where(masks[:, :, None], preds, 0.0)
            combined = jnp.einsum("mr,mrg->rg", votes, preds) / jnp.maximum(jnp.sum(votes, axis=0), 1e-12)[:, None]
        return jnp.where(count > 0, combined, jnp.nan)
