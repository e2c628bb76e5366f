import dataclasses
import re

import pytest

from scp_jax.config import changed_keys, load_config, parse_config, run_data_config, to_toml
from scp_jax.errors import UserError


def test_overrides_and_round_trip(tmp_path):
    config = load_config(None, ["model.hidden=[64, 32]", "optim.learning_rate=3e-4", "epochs=3", "data.train=x.parquet"])
    assert config.model.hidden == (64, 32) and config.optim.learning_rate == 3e-4 and config.epochs == 3
    assert config.data.train == "x.parquet"
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=1", "unknown key 'optim.lr'"),
        ("ensemble=0", "ensemble must be >= 1"),
        ("epochs=ten", "epochs must be int"),
        ("model.hidden=64", "model.hidden must be a list"),
        ("folds=1", "folds must be >= 2"),
        ("ensemble=true", "ensemble must be int"),
        ("keep='first'", "keep must be 'best' or 'last'"),
        ("pseudo_labels.enabled=true", "pseudo_labels.enabled needs keep = 'last'"),
        ("data.synth_genes=-5", "data.synth_genes must be >= 1"),
        ("optim.learning_rate=-1", r"optim.learning_rate must be > 0, got -1.0"),
        ("model.dropout=1.5", r"model.dropout must be in \[0, 1\), got 1.5"),
        ("sweep.weight_decay=[0.1, -1]", r"sweep.weight_decay must be >= 0, got -1"),
        ("optim.learning_rate=nan", "optim.learning_rate must be a finite number, got nan"),
        ("loss.huber_delta=inf", "loss.huber_delta must be a finite number, got inf"),
        ("sweep.learning_rate=[1e-3, -inf]", r"sweep.learning_rate\[1\] must be a finite number, got -inf"),
        ("epochs=10000000000", "epochs must be <= 1000000, got 10000000000"),
        ("patience=1000000000000", "patience must be <= 1000000, got 1000000000000"),
        ("data.synth_genes=200000", "data.synth_genes must be <= 99999, got 200000"),
        ("batch_size=1000000000000000", r"batch_size must be < 2\*\*31, got 1000000000000000"),
        ("ensemble=100000000", "ensemble \\(100000000\\) x the sweep's combinations gives 100,000,000 members; at most 1,000,000"),
        ("features=['onehot', 'morgan', 'onehot']", "features lists 'onehot' more than once"),
        ("sweep.optimizer=['adamw', 'sgd']", "sweep.optimizer must be one of adamw, lion, got 'sgd'"),
        ("seed=-1", r"seed must be in \[0, 2\*\*31\), got -1"),
        ("seed=2147483648", r"seed must be in \[0, 2\*\*31\)"),
    ],
)
def test_bad_config_is_one_line_user_error(override, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_member_count_and_factorized_sides_are_checked_before_any_work():
    sweep = [f"sweep.{name}=[{', '.join(['0.1'] * 10)}]" for name in ("warmup", "weight_decay", "l2", "dropout",
                                                                        "input_mask", "learning_rate", "clip_norm")]
    with pytest.raises(UserError, match="gives 40,000,000 members; at most 1,000,000"):  # 4 x 10^7
        load_config(None, ["ensemble=4", *sweep])
    with pytest.raises(UserError, match=r"features \['morgan:bits=16'\] give no cell-type side: add 'onehot' or"):
        load_config(None, ["model.kind='factorized'", "features=['morgan:bits=16']"])
    load_config(None, ["ensemble=4", *sweep[:3]])  # 4,000 members
    load_config(None, ["model.kind='factorized'", "features=['target_encoding', 'morgan:bits=16']"])
    load_config(None, ["features=['morgan:bits=16']"])  # an MLP takes compound features alone


def test_an_inline_table_override_keeps_the_files_other_keys(tmp_path):
    (tmp_path / "c.toml").write_text("[model]\nkind = 'resmlp'\nhidden = [16]\n")
    config = load_config(tmp_path / "c.toml", ['model={kind="mlp", dropout=0.1}'])
    assert (config.model.kind, config.model.hidden, config.model.dropout) == ("mlp", (16,), 0.1)


def test_a_bad_value_of_a_config_file_alone_names_the_file(tmp_path):
    (tmp_path / "config.toml").write_text("epochs = 'x'\n")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'config.toml'}: epochs must be int, got 'x'")):
        load_config(tmp_path / "config.toml")
    with pytest.raises(UserError, match=re.escape("config: epochs must be int, got 'x'")):  # file or --set: either
        load_config(tmp_path / "config.toml", ["ensemble=2"])


def test_a_run_dir_made_by_an_older_version_still_names_its_data(tmp_path):
    """A pseudo-label run with keep = "best" (refused since its labels leaked) is refused on --resume, but
    `predict RUN_DIR` still finds its id map."""
    (tmp_path / "config.toml").write_text('[data]\ntrain = "/d/de_train.parquet"\n[pseudo_labels]\nenabled = true\n')
    assert run_data_config(tmp_path).train == "/d/de_train.parquet"
    with pytest.raises(UserError, match="config.toml: pseudo_labels.enabled needs keep = 'last'"):
        load_config(tmp_path / "config.toml")
    (tmp_path / "config.toml").write_text('data = 3\n')
    with pytest.raises(UserError, match="config.toml: data must be a table"):
        run_data_config(tmp_path)


def test_unreadable_config_file_is_one_line_user_error(tmp_path):
    (tmp_path / "latin.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    for path, message in ((tmp_path, "cannot read config (Is a directory)"),
                          (tmp_path / "latin.toml", "cannot read config (not UTF-8 text")):
        with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
            load_config(path)


def test_train_stores_data_paths_absolute(tmp_path, monkeypatch):
    """So `--resume` finds the data from any folder."""
    from scp_jax.train import parse_args, resolve_config

    monkeypatch.chdir(tmp_path)
    config = resolve_config(parse_args(["--data", "world/de_train.parquet", "--id-map", "ids.csv"]))
    assert (config.data.train, config.data.id_map) == (str(tmp_path / "world/de_train.parquet"), str(tmp_path / "ids.csv"))


def test_changed_keys_in_toml_spelling_and_a_key_of_a_later_version_at_its_default():
    """What resume compares: a checkpoint written before `lowrank_grads` existed has the same config."""
    config = load_config(None, ["epochs=3"])
    older = to_toml(config).replace("lowrank_grads = false\n", "")
    assert "lowrank_grads" not in older and changed_keys(parse_config(older), config) == {}
    edited = dataclasses.replace(config, epochs=4, precision="bf16")
    assert changed_keys(parse_config(older), edited) == {"epochs": ("3", "4"), "precision": ('"fp32"', '"bf16"')}
