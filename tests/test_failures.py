"""Each failure mode of a training run is one line on stderr and exit code 2, not a traceback."""

import collections
import shutil
from pathlib import Path

import jax
import pytest

from scp_jax import train
from scp_jax.errors import UserError

CI_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "ci.toml")
TINY = ["--config", CI_CONFIG, "--ensemble", "2", "--epochs", "2", "--set", "model.hidden=[8]", "--set", "folds=2"]


def fails(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([str(a) for a in argv])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith("error: ") and error.count("\n") == 1, error
    return error


@pytest.mark.parametrize("argv, message", [
    (["--ensemble", "0"], "ensemble must be >= 1"),
    (["--set", "checkpoint_evry=3"], "unknown key 'checkpoint_evry'"),
    (["--set", "checkpoint_keep=two"], "checkpoint_keep must be int"),
    (["--set", "checkpoint_every=0"], "checkpoint_every must be >= 1"),
])
def test_config_errors(argv, message, capsys):
    assert message in fails(argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--set", "features=['onehot', 'fingerprints']"], "unknown feature set 'fingerprints'"),
    (["--set", "targets.svd=700"], "targets.svd = 700 exceeds the rank bound"),
    (["--set", "pseudo_labels.enabled=true"], "pseudo_labels.enabled needs an id map"),
])
def test_config_errors_found_while_fitting_leave_nothing(small_world, tmp_path, capsys, argv, message):
    """Found after the run dir was made: it is removed again, with the folders made for it."""
    shutil.copy(small_world / "de_train.parquet", tmp_path)  # no id_map.csv beside it
    assert message in fails(["--data", tmp_path / "de_train.parquet", "--out", tmp_path / "new" / "run", *TINY, *argv],
                            capsys)
    assert not (tmp_path / "new").exists()


def test_run_dir_not_writable(small_world, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = fails(["--data", small_world / "de_train.parquet", "--out", blocker / "run", *TINY], capsys)
    assert "run dir is not writable" in error
    error = fails(["--data", small_world / "de_train.parquet", "--out", blocker, *TINY], capsys)
    assert "a-file: run dir is not a directory" in error


def test_run_dir_reuses_only_an_untouched_start(tmp_path):
    """A start that never trained (a kill before the first epoch) is reused; a run with any epoch is refused."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("epochs = 2\n")
    (run / "metrics.jsonl").write_text("")
    assert train.prepare_run_dir(run) == (run, [])
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(UserError, match="run dir already holds files"):
        train.prepare_run_dir(run)


def test_disk_too_full_for_checkpoints_stops_before_training(small_world, tmp_path, capsys, monkeypatch):
    from scp_jax.engine import checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run = tmp_path / "run"
    error = fails(["--data", small_world / "de_train.parquet", "--out", run, *TINY], capsys)
    assert "checkpoints need about" in error and "lower checkpoint_keep, ensemble or model.hidden ([8])" in error
    assert not run.exists()
    error = fails(["--data", small_world / "de_train.parquet", "--out", run, *TINY, "--set", "model.kind='factorized'"],
                  capsys)
    assert "lower checkpoint_keep, ensemble or model.rank (16)" in error


def test_device_out_of_memory_names_the_settings(small_world, tmp_path, capsys, monkeypatch):
    from scp_jax.engine import ensemble, trainer

    def exhausted(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.")

    def hungry(*args):
        engine = ensemble.Ensemble(*args)
        engine.train_chunk = exhausted
        return engine

    monkeypatch.setattr(trainer, "compiled_ensemble", hungry)
    error = fails(["--data", small_world / "de_train.parquet", "--out", tmp_path / "run", *TINY], capsys)
    assert "device out of memory training 2 members" in error and "lower ensemble, batch_size (64) or model.hidden ([8])" in error


def test_resume_without_checkpoint(small_world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'epochs = 2\nensemble = 2\n[data]\ntrain = "{small_world / "de_train.parquet"}"\n')
    assert "no complete checkpoint" in fails(["--resume", run], capsys)
    assert "takes no other flags" in fails(["--resume", run, "--epochs", "3"], capsys)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no 'Mean of empty slice' from the progress line
def test_every_member_diverged_is_one_line_before_any_result(small_world, tmp_path, capsys):
    run = tmp_path / "run"
    error = fails(["--data", small_world / "de_train.parquet", "--out", run, *TINY,
                   "--set", "optim.learning_rate=1e30", "--set", "optim.clip_norm=1e30"], capsys)
    assert "every member diverged (NaN/Inf) before a finite score" in error
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.toml", "metrics.jsonl"]


def test_missing_default_config_is_an_error(tmp_path, capsys, monkeypatch):
    """A non-editable install lacks configs/: no silent fall back to the code's defaults, another recipe."""
    monkeypatch.setattr(train, "DEFAULT_CONFIG", tmp_path / "configs" / "default.toml")
    assert "default config not found" in fails(["--epochs", "2"], capsys)
