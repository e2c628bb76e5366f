"""Orbax checkpoints of a run in RUN_DIR/checkpoints/<epoch>/, one step per checkpoint epoch.

A step holds three items: `state`, the whole MemberState (parameters, optimizer state, best
parameters and scores, epoch) as a flat {name: array} dict; `tables`, the feature tables and the
per-gene training range (numpy), with the per-fold tables and the SVD target decoder
(`decoder.mean`, `decoder.basis`, per fold slot) when the run has them; `metadata`, JSON (resolved config TOML, member table, feature spec,
vocabularies, gene names). Randomness is derived from member keys and the epoch, so these are all a
resumed run needs to continue bit-identically.

Orbax writes a step into `<epoch>.orbax-checkpoint-tmp*` and renames it when complete, so a
half-written step is never listed. Kept: the latest `checkpoint_keep` steps plus the best one, where
best = lowest mean over members of the validation MRRMSE of the step's current (last-epoch)
parameters (their train loss under cv = "full"). Every step's `best_params` already hold each
member's best epoch; the best step's last-epoch parameters are the ensemble stopped at its best
checkpoint, which `export --step best --last` exports (`best_step`).
"""

import contextlib
import hashlib
import json
import operator
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from scp_jax.config import RESUMABLE_KEYS, changed_keys, parse_config, to_toml
from scp_jax.errors import UserError

STATE, TABLES, METADATA = "state", "tables", "metadata"
ITEMS = (STATE, TABLES, METADATA)
SCORE = "mean_val_mrrmse"
EMPTY_TABLES = "empty_tables"  # metadata: {name: shape} of zero-width tables (e.g. no per-fold features)


def leaf_name(path):
    """`.opt_state.mu['head']['kernel'].value` -> `opt_state.mu.head.kernel`; list indices become parts too
    (`.layers[0]` -> `layers.0`)."""
    text = re.sub(r"\.value$", "", jax.tree_util.keystr(path))
    return ".".join(part for part in re.split(r"[.\[\]']+", text) if part)


def flatten(tree):
    named = {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert len(named) == len(jax.tree.leaves(tree)), "two leaves map to one checkpoint name"
    return named


def unflatten(template, named):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree.unflatten(treedef, [named[leaf_name(path)] for path, _ in paths])


def place_like(state, named, n_members):
    """Restored host leaves (real members only) placed like the live state: the padding members that
    fill the devices repeat member i % n, and each leaf takes the live leaf's sharding."""
    leaves = {}
    for name, like in flatten(state).items():
        x = named.get(name)
        if x is None or x.shape != (n_members, *like.shape[1:]) or x.dtype != like.dtype:
            got = "missing" if x is None else f"{x.dtype}{list(x.shape)}"
            raise UserError(f"checkpoint leaf {name} is {got}, this run needs {like.dtype}{[n_members, *like.shape[1:]]}")
        padded = x[np.arange(like.shape[0]) % n_members]
        leaves[name] = jax.make_array_from_callback(like.shape, like.sharding, lambda index, a=padded: a[index])
    return unflatten(state, leaves)


def open_manager(directory, config=None, clean=False):
    """A manager that writes (given the run's config: creates the dir, applies the keep policy) or only reads.
    `clean`: remove the temporary folders of saves a killed run left, a resume's job (a new run has none,
    and Orbax cleans in a thread that would race a failed start's removal of the run dir)."""
    keep = None
    score = operator.itemgetter(SCORE)
    if config is not None:
        keep = policies.AnyPreservationPolicy([
            policies.LatestN(n=config.checkpoint_keep),
            # A step without metrics (written before they were) is not kept as the best forever.
            policies.BestN(get_metric_fn=score, reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
    # best_fn makes Orbax write each step's metrics and read them back in a later process: without
    # them a resumed run's BestN saw every earlier step as unscored and kept it forever.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep, best_fn=score, best_mode="min", create=config is not None,
        cleanup_tmp_directories=clean
    )
    handlers = {STATE: ocp.StandardCheckpointHandler(), TABLES: ocp.StandardCheckpointHandler(),
                METADATA: ocp.JsonCheckpointHandler()}
    for step in complete_steps(directory):
        _check_metrics(Path(directory) / str(step) / "metrics" / "metrics", step)
    return ocp.CheckpointManager(Path(directory).absolute(), item_handlers=handlers, options=options)


def _check_metrics(path, step):
    """The manager reads every step's metrics as it opens, and a damaged file failed there with a
    traceback. A step without one (older, or being deleted by a run that is saving) has no score."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return
    with corruption_guard(path, step):
        metrics = json.loads(text)
        if not isinstance(metrics, dict) or not isinstance(metrics.get(SCORE), float | int):
            raise ValueError(f"no {SCORE} in {text[:100]!r}")


def kept_steps(directory):
    """The complete steps, oldest first; a UserError when there is none."""
    directory = Path(directory)
    steps = []
    if directory.is_dir():
        manager = open_manager(directory)
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise UserError(f"{directory}: no complete checkpoint (training stopped before the first checkpoint_every epochs?)")
    return steps


def complete_steps(directory):
    """The complete steps on disk, oldest first, from folder names alone (Orbax renames a step's folder
    to its number once the step is complete): no Orbax manager, so it may run while one is saving."""
    directory = Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def latest_step(directory):
    """The newest complete step, or a UserError saying there is none."""
    return kept_steps(directory)[-1]


def best_step(directory, steps):
    """Of the kept `steps` (kept_steps), the one whose last-epoch parameters scored best (the one the keep
    policy preserves); ties go to the later step."""
    manager = open_manager(directory)
    try:
        scores = {}
        for step in steps:
            with corruption_guard(Path(directory) / str(step) / METADATA, step):
                scores[step] = restore_metadata(manager, step)[SCORE]
    finally:
        manager.close()
    return min(scores, key=lambda step: (scores[step], -step))


def restore_metadata(manager, step):
    return manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]


def restore_items(directory, step, state_targets=None):
    """Restore one step; `state_targets` (abstract leaves with shardings) default to host CPU arrays.

    Any failure names the step and the file it concerns, so a corrupted step is found from the message.
    """
    step_dir = Path(directory) / str(step)
    for name in ("_CHECKPOINT_METADATA", f"{STATE}/_METADATA", f"{TABLES}/_METADATA", f"{METADATA}/metadata"):
        if not (step_dir / name).is_file():
            raise UserError(f"{step_dir}: checkpoint step {step} is missing file {name}")
    manager = open_manager(directory)
    try:
        return restore_step(manager, step_dir, step, state_targets)
    finally:
        manager.close()


def restore_step(manager, step_dir, step, state_targets):
    with corruption_guard(step_dir / METADATA, step):
        metadata = restore_metadata(manager, step)
    with corruption_guard(step_dir, step):
        saved = manager.item_metadata(step)  # reads every item's array metadata
    with corruption_guard(step_dir / TABLES, step):
        tables = restore_arrays(manager, step, TABLES, host_targets(saved[TABLES]))
    with corruption_guard(step_dir / STATE, step):
        state = restore_arrays(manager, step, STATE, state_targets or host_targets(saved[STATE]))
    tables = jax.tree.map(np.asarray, tables)
    for name, shape in metadata.get(EMPTY_TABLES, {}).items():  # Orbax cannot save zero-size arrays
        tables[name] = np.zeros(shape, np.float32)
    return state, tables, metadata


def restore_arrays(manager, step, item, targets):
    return dict(manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(targets)}))[item])


READ_ERRORS = (ValueError, OSError, KeyError, TypeError, RuntimeError)  # what a damaged step raises in Orbax


@contextlib.contextmanager
def corruption_guard(path, step):
    """Orbax/TensorStore failures as one line naming the step and (in TensorStore's words) the file,
    relative to the step dir. Orbax wraps TensorStore's read errors in a plain Exception whose own
    text is a repr of the TensorStore spec: the cause says which file failed. Other errors (a
    MemoryError, a bug of ours) pass through: calling them corruption would send the user to delete
    a good step."""
    try:
        yield
    except Exception as err:
        if isinstance(err, UserError) or not (isinstance(err, READ_ERRORS) or type(err) is Exception):
            raise
        step_dir = path if path.name == str(step) else path.parent
        detail = first_line(err.__cause__ or err).replace(str(step_dir.absolute()) + "/", "")
        raise UserError(f"{path}: checkpoint step {step} is corrupted ({detail})") from None


def host_targets(saved):
    """Targets for an item as saved, placed on the host CPU whatever devices wrote it."""
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return {name: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=cpu) for name, meta in saved.items()}


def first_line(err):
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else type(err).__name__


def data_fingerprint(train, queries=None):
    """sha256 of what training reads from the data files: targets, rows, SMILES and, for a pseudo-label
    run, its queries. Their paths may change on resume (data moved); this may not."""
    digest = hashlib.sha256("\n".join(train.compound_smiles).encode())
    arrays = (train.targets, train.cell_index, train.compound_index, train.control)
    for array in arrays + (() if queries is None else (queries.cell_index, queries.compound_index)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_metadata(config, train, members, fingerprint):
    return {
        "format": 1,
        "config_toml": to_toml(config),
        "data_sha256": fingerprint,
        "members": members.rows(),
        "features": list(config.features),
        "cell_types": list(train.cell_types),
        "compounds": list(train.compounds),
        "genes": list(train.genes),
    }


def run_tables(tables, train, decoder=None):
    """Everything array-shaped that export needs besides parameters (host numpy)."""
    named = {f"features.{name}": np.asarray(value) for name, value in flatten(tables).items()}
    if decoder is not None:
        named["decoder.mean"], named["decoder.basis"] = np.asarray(decoder.mean), np.asarray(decoder.basis)
    named["clip_min"] = train.targets.min(axis=0)
    named["clip_max"] = train.targets.max(axis=0)
    return named


class Checkpointer:
    """The trainer's hook: `start(initial_state, members, tables, decoder)` before the loop, `save(epoch, state, metrics)`
    after each chunk. A context manager: leaving it waits for the async saves and closes the manager."""

    def __init__(self, directory, config, train, resume=False, queries=None):
        """`queries`: the id map's rows, which a pseudo-label run trains on."""
        self.directory, self.config, self.train, self.resume = Path(directory), config, train, resume
        self.fingerprint = data_fingerprint(train, queries if config.pseudo_labels.enabled else None)
        self.manager = open_manager(self.directory, config, clean=resume)
        if resume:
            try:
                self.step = latest_step(self.directory)
                self.check_resumable(self.step)
            except BaseException:
                self.manager.close()
                raise

    def check_resumable(self, step):
        """Refuse to resume with a config.toml edited since `step`, or other data or vocabularies (before any
        data is fitted or compiled): the run would continue as neither the old nor the new one."""
        with corruption_guard(self.directory / str(step) / METADATA, step):
            metadata = restore_metadata(self.manager, step)
        if metadata.get("data_sha256", self.fingerprint) != self.fingerprint:  # checkpoints before it have none
            paths = "data.train" + (" or data.id_map (pseudo labels train on it)" if self.config.pseudo_labels.enabled else "")
            raise UserError(f"{self.directory / str(step)}: checkpoint step {step} was trained on other data than {paths}"
                            " now holds; resume with the data it started with, or start a new run")
        try:
            saved = parse_config(metadata["config_toml"])
        except UserError as err:  # a key this version no longer has
            raise UserError(f"{self.directory / str(step)}: checkpoint step {step} was written by another version"
                            f" of scp_jax ({err}); resume it with that version") from None
        changes = {k: v for k, v in changed_keys(saved, self.config).items() if k not in RESUMABLE_KEYS}
        if changes:
            key = min(changes)
            raise UserError(f"{self.directory.parent / 'config.toml'}: {', '.join(sorted(changes))} changed since checkpoint"
                            f" step {step} ({key}: {changes[key][0]} then, {changes[key][1]} now); a resumed run"
                            " continues with the config it started with: set it back, or start a new run")
        for key in ("genes", "cell_types", "compounds"):
            self.check_written_for(key, metadata.get(key), list(getattr(self.train, key)), step)

    def check_written_for(self, key, saved, ours, step):
        if saved != ours:
            raise UserError(f"{self.directory / str(step)}: checkpoint step {step} was written for other {key}")

    def start(self, state, members, tables, decoder=None):
        """(state, epoch) to start from: the latest complete step when resuming, else (state, 0). Also
        what every save writes beside the state (metadata, tables), and a check for disk space."""
        self.metadata = run_metadata(self.config, self.train, members, self.fingerprint)
        self.n_members = len(members)
        self.tables = run_tables(tables, self.train, decoder)
        check_disk_space(self.directory, state_bytes(state), self.config)
        if not self.resume:
            return state, 0
        # The config, data and vocabularies were checked when resuming began (check_resumable).
        named, tables, metadata = restore_items(self.directory, self.step)
        self.check_written_for("members", metadata.get("members"), self.metadata["members"], self.step)
        # The data fingerprint covers what the fold tables are fitted on, not the feature files, RDKit and
        # ChemBERTa behind these two. Compared to float32 rounding: embeddings computed on another device
        # (chemberta-model:DIR) may differ in their last bits, and resuming there must work.
        for name in ("features.cell", "features.compound"):
            saved, now = tables.get(name), self.tables[name]
            if saved is not None and (saved.shape != now.shape or not np.allclose(saved, now, rtol=1e-5, atol=1e-6)):
                raise UserError(f"{self.directory / str(self.step)}: checkpoint step {self.step} was trained on another"
                                f" {name} table than features {list(self.config.features)} now give (a features file"
                                " or RDKit changed since?); resume with what it started with, or start a new run")
        return place_like(state, named, self.n_members), self.step

    def save(self, epoch, state, metrics, last=False):
        """Save at checkpoint_every epochs and the last epoch; only the real members, not device padding."""
        if epoch % self.config.checkpoint_every == 0 or last:
            # cv = "full" has no validation score: its best step is then the one with the lowest train loss.
            scores = next((s[np.isfinite(s)] for s in (metrics["val_mrrmse"][:, -1], metrics["train_loss"][:, -1])
                           if np.isfinite(s).any()), np.array([np.inf]))
            score = float(scores.mean())
            # The next chunk donates `state` (and leaf[:n] may be the leaf itself): this relies on Orbax
            # copying device arrays to the host before save() returns, as it does without a
            # device_host_max_bytes limit; only the writing to disk runs in the background.
            named = {name: leaf[: self.n_members] for name, leaf in flatten(state).items()}
            write_step(self.manager, epoch, named, self.tables, self.metadata, score)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()  # an open manager's threads would trip over the interpreter's shutdown


def write_step(manager, epoch, named_state, tables, metadata, score):
    """Start an async save of one step; `manager.wait_until_finished()` makes it durable.

    Zero-size tables (no per-fold features, say) go into the metadata as shapes: Orbax cannot save them.
    """
    empty = {name: list(np.shape(value)) for name, value in tables.items() if not np.size(value)}
    tables = {name: value for name, value in tables.items() if name not in empty}
    metadata = dict(metadata, **{EMPTY_TABLES: empty})
    manager.save(epoch, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(named_state),
        TABLES: ocp.args.StandardSave(tables),
        METADATA: ocp.args.JsonSave(dict(metadata, epoch=epoch, **{SCORE: score})),
    }), metrics={SCORE: score})


def state_bytes(state):
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def check_disk_space(directory, checkpoint_bytes, config):
    """Fail before training if the kept checkpoints (latest `checkpoint_keep`, the best, one being written)
    can't fit."""
    probe = next(p for p in (directory, *directory.parents) if p.exists())
    keep = config.checkpoint_keep
    need = checkpoint_bytes * (keep + 2)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(
            f"{directory}: checkpoints need about {need / 2**20:.0f} MiB ({keep} kept + best + one in flight,"
            f" {checkpoint_bytes / 2**20:.0f} MiB each) but only {free / 2**20:.0f} MiB are free;"
            f" free space or lower checkpoint_keep, ensemble or {config.size_settings()}"
        )
