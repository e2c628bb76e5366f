"""Member table, sweeps, per-member randomness, early stopping, NaN isolation, precision, sharding."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scp_jax.config import load_config
from scp_jax.engine.devices import MemberPlacement
from scp_jax.engine.ensemble import compiled_ensemble
from scp_jax.engine.members import MemberTable
from scp_jax.engine.cv import kfold_assignment
from scp_jax.engine.trainer import member_specs, train_ensemble
from scp_jax.precision import stochastic_round_bf16
from toy import sharding_summary, toy_queries, toy_train

BASE = ["model.hidden=[16]", "batch_size=8", "epochs=4", "epochs_per_chunk=2", "folds=3"]


def member_leaves(state, i):
    return [np.asarray(x)[i] for x in jax.tree.leaves(state.params)]


def test_sweep_is_the_product_of_members_and_values():
    config = load_config(None, ["ensemble=3", "folds=3", "sweep.learning_rate=[1e-3, 1e-2]", "sweep.dropout=[0.0, 0.2]"])
    table = MemberTable.from_config(config, config.folds)
    assert len(table) == 12
    combos = {(float(lr), float(d)) for lr, d in zip(table.hparams["learning_rate"], table.hparams["dropout"])}
    assert combos == {(np.float32(a), np.float32(b)) for a in (1e-3, 1e-2) for b in (0.0, 0.2)}
    assert list(table.fold[:3]) == [0, 1, 2] and list(table.seed[:3]) == [0, 0, 0]


def test_a_members_seed_and_fold_and_the_runs_seed_reach_its_keys():
    """Members 0..5: fold i % 3, seed i // 3. Initial parameters differ between members that share a
    fold (0 and 3), between members that share a seed (0 and 1), and between runs of another seed
    (config.seed), which is an input of the same compiled program, not a recompile."""
    def initial_params(seed):
        config = load_config(None, BASE + ["ensemble=6", f"seed={seed}"])
        specs = member_specs(config, MemberTable.from_config(config, config.folds), kfold_assignment(30, 3, 0))[0]
        ensemble = compiled_ensemble(config, (1, 1, 0, 0), 4)
        params = ensemble.init(jax.tree.map(jnp.asarray, specs)).params
        return ensemble, np.concatenate([np.asarray(leaf).reshape(6, -1) for leaf in jax.tree.leaves(params)], axis=1)

    members = MemberTable.from_config(load_config(None, BASE + ["ensemble=6"]), 3)
    assert list(members.fold[[0, 3, 1]]) == [0, 0, 1] and list(members.seed[[0, 3, 1]]) == [0, 1, 0]
    (ensemble, flat), (other_ensemble, other_seed) = initial_params(0), initial_params(1)
    assert not np.allclose(flat[0], flat[3]) and not np.allclose(flat[0], flat[1])
    assert other_ensemble is ensemble and not np.allclose(flat, other_seed)


def test_sweep_member_equals_that_member_alone_with_its_hyperparameters():
    """A member of a vmapped sweep == the same member trained alone. Learning rate, dropout, input
    masking, optimizer (AdamW or Lion) and a one-cycle schedule per member; an AdamW member alone
    compiles no Lion branch and still trains the same."""
    train = toy_train()
    config = load_config(None, BASE + ["ensemble=2", "sweep.optimizer=['adamw', 'lion']", "optim.schedule=onecycle",
                                       "sweep.learning_rate=[3e-3, 1e-2]", "sweep.dropout=[0.0, 0.3]",
                                       "sweep.input_mask=[0.2]"])
    ensemble = train_ensemble(config, train)
    for member, optimizer in ((7, "adamw"), (15, "lion")):  # learning_rate 1e-2, dropout 0.3, seed 0, fold 1
        row = ensemble.members.rows()[member]
        assert (row["optimizer"], row["learning_rate"], row["dropout"], row["fold"]) == (optimizer, 0.01, 0.3, 1)
        alone = train_ensemble(config, train, members=MemberTable.single(
            config, seed=0, fold=1, optimizer=optimizer, learning_rate=1e-2, dropout=0.3, input_mask=0.2))
        for stacked, single in zip(member_leaves(ensemble.state, member), member_leaves(alone.state, 0)):
            np.testing.assert_allclose(stacked, single, atol=1e-5)
    # Different dropout -> different parameters: the randomness is really per member.
    assert not np.allclose(member_leaves(ensemble.state, 5)[0], member_leaves(ensemble.state, 7)[0])


def test_every_members_schedule_ends_at_its_own_last_step():
    """kfold, 96 rows in 5 folds: 76 or 77 training rows, 19 or 20 batches of 4. A member's surplus
    batches are empty and do not step, so its schedule must count its own batches only."""
    config = load_config(None, BASE + ["ensemble=5", "folds=5", "batch_size=4", "epochs=2"])
    state = train_ensemble(config, toy_train()).state.opt_state
    count, total = np.asarray(state.count), np.asarray(state.hyperparams["total_steps"])
    assert set(count) == {38, 40}
    np.testing.assert_array_equal(count, total)


def test_l2_prior_per_member_shrinks_only_its_member():
    """`sweep.l2`: the member with the prior equals that member alone, and ends with smaller dense
    weights than its twin (same seed and fold) without it."""
    train = toy_train()
    config = load_config(None, BASE + ["ensemble=1", "optim.learning_rate=1e-2", "sweep.l2=[0.0, 3000.0]"])
    ensemble = train_ensemble(config, train)
    assert [row["l2"] for row in ensemble.members.rows()] == [0.0, 3000.0]
    alone = train_ensemble(config, train, members=MemberTable.single(config, seed=0, fold=0, l2=3000.0))
    for stacked, single in zip(member_leaves(ensemble.state, 1), member_leaves(alone.state, 0)):
        np.testing.assert_allclose(stacked, single, atol=1e-5)
    norms = [sum(np.sum(leaf ** 2) for leaf in member_leaves(ensemble.state, i)) for i in (0, 1)]
    assert norms[1] < 0.8 * norms[0]


def test_diverging_member_is_frozen_at_its_best_and_others_are_unaffected():
    train = toy_train()
    config = load_config(None, BASE + ["ensemble=2", "epochs=4", "sweep.learning_rate=[3e-3, 1e6]",
                                       "sweep.clip_norm=[1e9]"])
    result = train_ensemble(config, train, toy_queries(train))
    assert list(result.diverged) == [False, False, True, True]
    assert np.isfinite(result.test_predictions).all()
    for i in (2, 3):  # frozen at the best params (init params if no finite epoch): finite
        assert all(np.isfinite(leaf).all() for leaf in member_leaves(result.state, i))
    healthy = train_ensemble(config, train, members=MemberTable.from_config(config, config.folds).take([0, 1]))
    for i in (0, 1):
        for a, b in zip(member_leaves(result.state, i), member_leaves(healthy.state, i)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_keep_last_keeps_every_members_last_epoch_and_scores_it():
    """Even where a member's validation score was lower earlier (it overfits)."""
    overfit = BASE + ["ensemble=3", "keep='last'", "optim.learning_rate=0.05", "optim.clip_norm=100.0",
                      "model.hidden=[64]", "epochs=12"]
    history = []
    result = train_ensemble(load_config(None, overfit), toy_train(),
                            on_chunk=lambda epoch, metrics, seconds: history.append(metrics["val_mrrmse"]))
    scores = np.concatenate(history, axis=1)
    assert (scores.min(axis=1) < scores[:, -1]).any()
    np.testing.assert_array_equal(result.best_epoch, 11)
    np.testing.assert_array_equal(result.member_cv, scores[:, -1])
    for last, kept in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(result.state.best_params)):
        np.testing.assert_array_equal(last, kept)


def test_early_stopping_keeps_the_best_epoch_and_stops_updating():
    train = toy_train()
    overfit = BASE + ["ensemble=3", "patience=2", "optim.learning_rate=0.05", "optim.clip_norm=100.0",
                      "model.hidden=[64]"]
    history = []
    short = train_ensemble(load_config(None, overfit + ["epochs=12"]), train,
                           on_chunk=lambda epoch, metrics, seconds: history.append(metrics))
    scores = np.concatenate([m["val_mrrmse"] for m in history], axis=1)
    running = np.concatenate([m["running"] for m in history], axis=1)
    # The kept score is the best score seen while the member ran, at the epoch reported.
    np.testing.assert_allclose(short.member_cv, np.where(running, scores, np.inf).min(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(short.best_epoch, np.where(running, scores, np.inf).argmin(axis=1))
    stopped = short.stopped_epoch >= 0
    assert stopped.any()
    np.testing.assert_array_equal(short.stopped_epoch[stopped], short.best_epoch[stopped] + 2)
    # Best-epoch parameters are a real copy: a stopped member's last parameters moved on from them.
    for i in np.nonzero(stopped)[0]:
        best, last = (np.asarray(x)[i] for x in (short.state.best_params["head"]["kernel"][...],
                                                  short.state.params["head"]["kernel"][...]))
        assert not np.allclose(best, last)
    long = train_ensemble(load_config(None, overfit + ["epochs=20"]), train)
    for i in np.nonzero(stopped)[0]:  # more epochs change nothing once a member has stopped
        for a, b in zip(member_leaves(short.state, i), member_leaves(long.state, i)):
            np.testing.assert_array_equal(a, b)


def test_stochastic_rounding_is_unbiased_and_brackets_the_value():
    x = jnp.full((200_000,), 1.0 + 2.0**-10, jnp.float32)  # between two bf16 neighbours 1 and 1+2^-7
    rounded = np.asarray(stochastic_round_bf16(x, jnp.uint32(7)).astype(jnp.float32), np.float64)
    assert set(np.unique(rounded)) == {1.0, 1.0 + 2.0**-7}
    assert rounded.mean() == pytest.approx(1.0 + 2.0**-10, abs=2e-5)
    nearest = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
    assert (nearest == 1.0).all()  # round-to-nearest would lose the increment entirely


@pytest.mark.parametrize("precision", ["bf16", "bf16_state"])
def test_low_precision_modes_train(precision):
    train = toy_train()
    config = load_config(None, BASE + ["ensemble=3", "epochs=20", "epochs_per_chunk=10", "model.hidden=[32]",
                                       f"precision={precision}"])
    result = train_ensemble(config, train)
    assert result.ensemble_cv < 0.9 * result.baseline_cv["zeros"]
    if precision == "bf16_state":
        assert {str(x.dtype) for x in jax.tree.leaves(result.state.params)} == {"bfloat16"}


SHARDED_SCRIPT = """
import json, sys
import jax
sys.path.insert(0, {tests!r})
from toy import sharding_summary, toy_train
from scp_jax.config import load_config
from scp_jax.engine.devices import initialize_distributed
from scp_jax.engine.trainer import train_ensemble
initialize_distributed(False)  # joins when SCP_JAX_DISTRIBUTED=1
assert jax.device_count() == {devices}
print(json.dumps(sharding_summary(train_ensemble(load_config(None, {config!r}), toy_train()))))
"""


def run_on_devices(devices, config, processes=1, coordinator=None):
    """Train in `processes` local processes (one JAX distributed run, coordinated at `coordinator`) of
    `devices / processes` CPU devices each."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices // processes}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    if processes > 1:
        env.update(SCP_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=coordinator, SCP_JAX_NUM_PROCESSES=str(processes))
    script = SHARDED_SCRIPT.format(tests=str(Path(__file__).parent), devices=devices, config=config)
    with tempfile.TemporaryDirectory() as logs:  # files, not pipes: a chatty process never blocks on a full pipe
        outs = [open(Path(logs) / f"{i}.out", "w+") for i in range(processes)]
        running = [subprocess.Popen([sys.executable, "-c", script], env=dict(env, SCP_JAX_PROCESS_ID=str(i)),
                                    stdout=out, stderr=subprocess.STDOUT, text=True) for i, out in enumerate(outs)]
        try:
            for process in running:
                process.wait(timeout=300)
        finally:
            for process in running:
                process.kill()  # a no-op for the finished; frees a peer stuck in a collective
        results = []
        for process, out in zip(running, outs):
            out.seek(0)
            text = out.read()
            out.close()
            assert process.returncode == 0, text[-2000:]
            results.append(json.loads([line for line in text.splitlines() if line.startswith("{")][-1]))
    assert all(r == results[0] for r in results)  # every process sees the whole ensemble
    return results[0]


def test_sharded_over_8_devices_and_2_processes_equals_one_device(free_address):
    config = BASE + ["ensemble=6", "sweep.dropout=[0.1]"]  # 6 members pad to 8 on 8 devices
    one_cpu = MemberPlacement(jax.devices("cpu")[:1])  # in this process, whatever devices it has
    one = sharding_summary(train_ensemble(load_config(None, config), toy_train(), placement=one_cpu))
    eight = run_on_devices(8, config)
    two_hosts = run_on_devices(4, config, processes=2, coordinator=free_address())
    assert one["sharded"] == 1 and eight["sharded"] == 8 and two_hosts["sharded"] == 4
    for sharded in (eight, two_hosts):
        np.testing.assert_allclose(sharded["cv"], one["cv"], atol=1e-5)
        np.testing.assert_allclose(sharded["kernel"], one["kernel"], atol=1e-5)
        assert sharded["ensemble"] == pytest.approx(one["ensemble"], abs=1e-5)
