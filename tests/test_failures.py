"""Each failure mode of a training run is one line on stderr and exit code 2, not a traceback."""

import collections
import datetime
import shutil
from pathlib import Path

import jax
import pytest

from conftest import CI_CONFIG
from scp_jax import export, train
from scp_jax.errors import UserError

TINY = ["--config", CI_CONFIG, "--ensemble", "2", "--epochs", "2", "--set", "model.hidden=[8]", "--set", "folds=2"]


@pytest.mark.parametrize("argv, message", [
    (["--ensemble", "0"], "ensemble must be >= 1"),
    (["--set", "checkpoint_evry=3"], "unknown key 'checkpoint_evry'"),
    (["--set", "checkpoint_keep=two"], "checkpoint_keep must be int"),
    (["--set", "checkpoint_every=0"], "checkpoint_every must be >= 1"),
])
def test_config_errors(argv, message, cli_error):
    assert message in cli_error(train.main, argv)


@pytest.mark.parametrize("argv, message", [
    (["--set", "features=['onehot', 'fingerprints']"], "unknown feature set 'fingerprints'"),
    (["--set", "targets.svd=700"], "targets.svd = 700 exceeds the rank bound"),
    (["--set", "pseudo_labels.enabled=true", "--set", "keep='last'"], "pseudo_labels.enabled needs an id map"),
])
def test_config_errors_found_while_fitting_leave_nothing(small_world, tmp_path, cli_error, argv, message):
    """Found after the run dir was made: it is removed again, with the folders made for it."""
    shutil.copy(small_world / "de_train.parquet", tmp_path)  # no id_map.csv beside it
    assert message in cli_error(train.main, ["--data", tmp_path / "de_train.parquet", "--out", tmp_path / "new" / "run",
                                             *TINY, *argv])
    assert not (tmp_path / "new").exists()


def test_run_dir_not_writable(small_world, tmp_path, cli_error):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", blocker / "run", *TINY])
    assert "run dir is not writable" in error
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", blocker, *TINY])
    assert "a-file: run dir is not a directory" in error


def test_a_run_dir_is_never_shared_and_cleanup_spares_other_runs(tmp_path, capsys):
    """A dir that looks like a fresh start may be a run starting: refused. A failed run's cleanup
    removes its own start but leaves a parent another run has put files in, without raising."""
    run, created = train.prepare_run_dir(tmp_path / "runs" / "a")
    assert created == [tmp_path / "runs" / "a", tmp_path / "runs"]
    (run / "checkpoints").mkdir()
    (run / "config.toml").write_text("epochs = 2\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="run dir already holds files"):
        train.prepare_run_dir(run)
    (tmp_path / "runs" / "b").mkdir()  # another run, started meanwhile
    train.discard_start(run, created)
    assert not run.exists() and (tmp_path / "runs" / "b").is_dir()
    assert capsys.readouterr().out == f"run dir {run} removed again: nothing was trained\n"  # the header named it


def test_runs_started_in_the_same_second_get_their_own_default_run_dirs(tmp_path, monkeypatch):
    """runs/<timestamp> was checked, then made with exist_ok: two runs of one second shared it or failed."""
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 2, 15, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datetime, "datetime", Frozen)
    made = [train.prepare_run_dir(None) for _ in range(3)]
    stem = Path("runs") / "20261202-150000"
    assert made == [(stem, [stem, Path("runs")]), (Path(f"{stem}-2"), [Path(f"{stem}-2")]),
                    (Path(f"{stem}-3"), [Path(f"{stem}-3")])]
    assert all(run.is_dir() for run, _ in made)


def test_disk_too_full_for_checkpoints_stops_before_training(small_world, tmp_path, cli_error, monkeypatch):
    from scp_jax.engine import checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run = tmp_path / "run"
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", run, *TINY])
    assert "checkpoints need about" in error and "lower checkpoint_keep, ensemble or model.hidden ([8])" in error
    assert not run.exists()
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", run, *TINY,
                                   "--set", "model.kind='factorized'"])
    assert "lower checkpoint_keep, ensemble or model.rank (16)" in error


def test_device_out_of_memory_names_the_settings(small_world, tmp_path, cli_error, monkeypatch):
    from scp_jax.engine import ensemble, trainer

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.")

    def hungry(*args):
        engine = ensemble.Ensemble(*args)
        engine.train_chunk = exhausted
        return engine

    monkeypatch.setattr(trainer, "compiled_ensemble", hungry)
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", tmp_path / "run", *TINY])
    assert "device out of memory training 2 members" in error and "lower ensemble, batch_size (64) or model.hidden ([8])" in error


def test_resume_without_checkpoint(small_world, tmp_path, cli_error):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'epochs = 2\nensemble = 2\n[data]\ntrain = "{small_world / "de_train.parquet"}"\n')
    assert "no complete checkpoint" in cli_error(train.main, ["--resume", run])
    assert "takes no other flags" in cli_error(train.main, ["--resume", run, "--epochs", "3"])


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no 'Mean of empty slice' from the progress line
def test_every_member_diverged_is_one_line_before_any_result(small_world, tmp_path, cli_error):
    run = tmp_path / "run"
    error = cli_error(train.main, ["--data", small_world / "de_train.parquet", "--out", run, *TINY,
                                   "--set", "optim.learning_rate=1e30", "--set", "optim.clip_norm=1e30"])
    assert "every member diverged (NaN/Inf) before a finite score" in error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.toml", "metrics.jsonl"]
    cli_error(export.main, [run, "--out", tmp_path / "m.npz"], "no member kept a best epoch", "nothing to export")
    assert not (tmp_path / "m.npz").exists()


def test_missing_default_config_is_an_error(tmp_path, cli_error, monkeypatch):
    """A non-editable install lacks configs/: no silent fall back to the code's defaults, another recipe."""
    monkeypatch.setattr(train, "DEFAULT_CONFIG", tmp_path / "configs" / "default.toml")
    assert "default config not found" in cli_error(train.main, ["--epochs", "2"])


@pytest.mark.parametrize("module, argv, message", [
    ("scp_jax.train", ["--bogus"], "error: unrecognized arguments: --bogus; see python -m scp_jax.train --help"),
    ("scp_jax.export", ["run", "--out", "m.npz", "--step", "-1"],
     "error: argument --step: expected a step number or 'best', got '-1'; see python -m scp_jax.export --help"),
    ("scp_jax.predict", ["m.npz"], "error: the following arguments are required: --out;"),
    ("scp_jax.data.__main__", ["synth", "--genes", "x"], "error: argument --genes: invalid int value: 'x';"
     " see python -m scp_jax.data synth --help"),
    ("scp_jax.features.__main__", ["morgan"], "error: the following arguments are required: --out;"),
    ("scp_jax.report", [], "error: the following arguments are required: run_dir;"),
])
def test_bad_flags_are_one_line_errors(cli_error, module, argv, message):
    """argparse's own errors too (it prints its usage first)."""
    import importlib

    assert cli_error(importlib.import_module(module).main, argv).startswith(message)


def test_exit_on_signal_restores_what_it_replaced_and_respects_an_ignored_sigint():
    import signal

    from scp_jax.errors import exit_on_signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, whatever pytest inherited
    try:
        with exit_on_signal(lambda word: "bye"):
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        previous_fd = signal.set_wakeup_fd(-1)  # what it restored
        signal.set_wakeup_fd(previous_fd)
        assert previous_fd == -1
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's
        with exit_on_signal(lambda word: "bye"):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
