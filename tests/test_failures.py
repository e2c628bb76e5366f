"""Each failure mode of a training run is one line on stderr and exit code 2, not a traceback."""

import collections
from pathlib import Path

import jax
import pytest

from scp_jax import train

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


def test_run_dir_not_writable(small_world, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = fails(["--data", small_world / "de_train.parquet", "--out", blocker / "run", *TINY], capsys)
    assert "run dir is not writable" in error


def test_disk_too_full_for_checkpoints_stops_before_training(small_world, tmp_path, capsys, monkeypatch):
    from scp_jax.engine import checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    run = tmp_path / "run"
    error = fails(["--data", small_world / "de_train.parquet", "--out", run, *TINY], capsys)
    assert "checkpoints need about" in error and "lower checkpoint_keep" in error
    assert (run / "metrics.jsonl").read_text() == "" and not list((run / "checkpoints").glob("[0-9]*"))


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
