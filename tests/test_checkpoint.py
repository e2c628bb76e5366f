"""Checkpoints, resume after SIGKILL, export, the jax-free predictor and device-count portability.

One tiny world (32 genes, 4 members, hidden [16], fitted as t-statistics) trained by the CLI in
subprocesses that share a persistent compilation cache, so the whole file stays well under a minute
on 2 cores.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from conftest import CI_CONFIG, ROOT
from scp_jax.config import load_config
from scp_jax.data.dataset import load_train
from scp_jax.data.synth import make_world
from scp_jax.engine.checkpoint import kept_steps, latest_step, open_manager, restore_items, write_step
from scp_jax.engine.cv import make_folds
from stalled_train import STALL_ENV

RUN = ["--config", CI_CONFIG, "--ensemble", "4", "--epochs", "6", "--set", "checkpoint_every=3", "--set", "epochs_per_chunk=2",
       "--set", "model.hidden=[16]", "--set", "model.activation='gelu'", "--set", "targets.transform='t_statistic'"]


def env(tmp, **extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)


def cli(module, *args, environ):
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], env=environ, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    return output


def kill_when_stalled(process, epoch):
    """SIGKILL a run held by STALL_ENV once it reports the stall after `epoch` (its saves are then durable)."""
    for line in process.stdout:
        if line.startswith(f"stalled after epoch {epoch}"):
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 6-epoch run, and one SIGKILLed after epoch 4 (checkpoint 3 on disk; a half-written
    metrics line after it) then resumed."""
    tmp = tmp_path_factory.mktemp("runs")
    world = make_world(tmp / "world", genes=32, seed=0)
    data = ["--data", world / "de_train.parquet"]
    finish(cli("scp_jax.train", *data, "--out", tmp / "straight", *RUN, environ=env(tmp)))  # fills the cache
    kill_when_stalled(cli("stalled_train", *data, "--out", tmp / "resumed", *RUN,
                          environ=env(tmp, **{STALL_ENV: "4"})), epoch=4)
    resumed = tmp / "resumed"
    assert latest_step(resumed / "checkpoints") == 3
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 4  # epoch 4 logged, not checkpointed
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 5, "train_loss": [2.7')  # as if killed while appending epoch 5
    # A half-written step 6 (Orbax's tmp dir, never renamed) must never be picked up.
    (resumed / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000").mkdir()
    (resumed / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000" / "junk").write_text("half")
    assert latest_step(resumed / "checkpoints") == 3
    output = finish(cli("scp_jax.train", "--resume", resumed, environ=env(tmp)))
    return {"tmp": tmp, "world": world, "straight": tmp / "straight", "resumed": resumed, "output": output}


def test_resume_after_sigkill_is_bit_identical(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    for name in ("submission.csv", "oof.parquet", "metrics.jsonl", "cv.json"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name
    a, _, meta_a = restore_items(straight / "checkpoints", 6)
    b, _, meta_b = restore_items(resumed / "checkpoints", 6)
    assert a.keys() == b.keys() and meta_a == meta_b
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(k.startswith("opt_state.") and k.endswith("mu.head.kernel") for k in a) and "best_params.head.kernel" in a


def signal_when_stalled(process, epoch, number):
    """Send signal `number` to a run held by STALL_ENV after `epoch`; (exit code, its output after the stall)."""
    for line in process.stdout:
        if line.startswith(f"stalled after epoch {epoch}"):
            break
    os.kill(process.pid, number)
    output, _ = process.communicate(timeout=60)
    return process.returncode, output


@pytest.mark.parametrize("epoch, number, word, code", [(2, signal.SIGINT, "interrupted", 130),
                                                       (4, signal.SIGINT, "interrupted", 130),
                                                       (4, signal.SIGTERM, "terminated", 143)])
def test_ctrl_c_or_sigterm_ends_a_run_in_one_line_and_keeps_what_resumes(runs, tmp_path, epoch, number, word, code):
    """With a checkpoint on disk: the line says where to resume from; without one: the run dir goes,
    so its --out can be used again. Never a traceback (KeyboardInterrupt unwound through XLA and Orbax)."""
    run = tmp_path / "runs" / "stopped"
    process = cli("stalled_train", "--data", runs["world"] / "de_train.parquet", "--out", run, *RUN,
                  environ=env(runs["tmp"], **{STALL_ENV: str(epoch)}))
    assert signal_when_stalled(process, epoch, number) == (code, (
        f"{word}: {run} keeps checkpoints up to epoch 3; continue with --resume {run}\n" if epoch == 4  # every 3
        else f"run dir {run} removed again: nothing was checkpointed\n{word} before the first checkpoint: nothing kept\n"))
    if epoch == 4:
        assert latest_step(run / "checkpoints") == 3
    else:
        assert not (tmp_path / "runs").exists()


def test_oof_parquet_holds_the_rows_the_cv_scores(runs):
    """oof.parquet: every validated row once, keyed like the training parquet; the CV in cv.json is its
    MRRMSE against the targets (float64)."""
    truth = pd.read_parquet(runs["world"] / "de_train.parquet")
    oof = pd.read_parquet(runs["straight"] / "oof.parquet")
    genes = list(oof.columns[2:])
    assert list(oof.columns[:2]) == ["cell_type", "sm_name"] and genes == list(truth.columns[5:])
    folds = make_folds("kfold", load_train(runs["world"] / "de_train.parquet"), 5, 0)
    assert len(oof) == np.isin(folds.fold_of_row, range(4)).sum() == 492  # 4 members validate 4 of the 5 folds
    truth = oof[["cell_type", "sm_name"]].merge(truth, on=["cell_type", "sm_name"], validate="one_to_one")
    errors = (oof[genes].to_numpy(np.float64) - truth[genes].to_numpy(np.float64)) ** 2
    cv = json.loads((runs["straight"] / "cv.json").read_text())["ensemble_cv_mrrmse"]
    assert cv == pytest.approx(np.sqrt(errors.mean(axis=1)).mean(), rel=1e-6)


def test_numpy_predictor_matches_jax_and_runs_without_jax(runs, tmp_path, cli_error):
    import jax
    import jax.numpy as jnp

    from scp_jax.config import load_config
    from scp_jax.engine.checkpoint import unflatten
    from scp_jax.engine.cv import kfold_assignment
    from scp_jax.engine.ensemble import compiled_ensemble
    from scp_jax.engine.members import MemberTable
    from scp_jax.engine.trainer import member_specs
    from scp_jax.export import export_run, main as export_main, write_npz
    from scp_jax.features.tables import FeatureTables
    from scp_jax.predict import main as predict_main
    from scp_jax.predictor import Predictor, read_npz

    model = tmp_path / "model.npz"
    assert export_main(["--last", str(runs["straight"]), "--out", str(model)]) is None
    blocked = tmp_path / "blocked"
    (blocked / "jax").mkdir(parents=True)
    (blocked / "jax" / "__init__.py").write_text("raise ImportError('jax is blocked in this test')\n")
    environ = dict(os.environ, PYTHONPATH=f"{blocked}{os.pathsep}{ROOT}")
    out = tmp_path / "sub.csv"
    id_map = runs["world"] / "id_map.csv"
    finish(cli("scp_jax.predict", model, "--id-map", id_map, "--out", out, environ=environ))
    probe = subprocess.run([sys.executable, "-c", "import jax"], env=environ, capture_output=True, text=True)
    assert "jax is blocked" in probe.stderr

    # JAX: the same last-epoch parameters through the Flax model.
    named, tables, meta = restore_items(runs["straight"] / "checkpoints", 6)
    config = load_config(runs["straight"] / "config.toml")
    feature_tables = FeatureTables(**{k: jnp.asarray(tables[f"features.{k}"])
                                      for k in ("cell", "compound", "fold_cell", "fold_compound")})
    engine = compiled_ensemble(config, feature_tables.layout, len(meta["genes"]))
    specs, _, _ = member_specs(config, MemberTable.from_config(config, config.folds), kfold_assignment(614, config.folds, config.seed))
    params = {k[len("params."):]: v for k, v in named.items() if k.startswith("params.")}
    stacked = unflatten(jax.eval_shape(engine.init, specs).params, params)
    queries = pd.read_csv(id_map)
    cells = np.array([meta["cell_types"].index(c) for c in queries.cell_type])
    compounds = np.array([meta["compounds"].index(c) for c in queries.sm_name])
    reference = np.asarray(engine.predict_members(stacked, specs.fold, feature_tables, None, cells, compounds)).mean(axis=0)
    numpy_csv = pd.read_csv(out).to_numpy()[:, 1:].astype(np.float64)
    np.testing.assert_allclose(numpy_csv, reference, atol=1e-5)

    arrays, manifest = export_run(runs["straight"], "last")
    predictor = Predictor(arrays, manifest)
    np.testing.assert_allclose(predictor.predict(cells, compounds, dtype=np.float64), reference, atol=1e-5)
    clipped = predictor.predict(cells, compounds, aggregate="median", clip=True)
    assert (clipped >= predictor.arrays["clip_min"]).all() and (clipped <= predictor.arrays["clip_max"]).all()

    # An export of an older format is refused in one line, nothing written.
    write_npz(tmp_path / "old.npz", arrays, {**manifest, "format": "scp-jax-npz/1"})
    cli_error(predict_main, [tmp_path / "old.npz", "--id-map", id_map, "--out", tmp_path / "old.csv"],
              "format 'scp-jax-npz/1'); export the run again")
    assert not (tmp_path / "old.csv").exists()

    # A run dir predicts its own id map by default: its submission, to float32 rounding.
    predict_main([str(runs["straight"]), "--out", str(tmp_path / "own.csv")])
    own, submitted = (pd.read_csv(path) for path in (tmp_path / "own.csv", runs["straight"] / "submission.csv"))
    assert own["id"].tolist() == submitted["id"].tolist()
    np.testing.assert_allclose(own.to_numpy()[:, 1:].astype(float), submitted.to_numpy()[:, 1:].astype(float), atol=1e-5)

    # A model edited after export (a weight changed, a bias dropped, a gene name dropped) is refused, not
    # predicted from (the last crashed the predictor).
    stored, manifest = read_npz(model)
    weight = {**stored, "params.head.kernel": stored["params.head.kernel"] + np.float32(1)}
    edits = {"weight": (weight, manifest), "bias": ({k: v for k, v in stored.items() if k != "params.head.bias"}, manifest),
             "genes": (stored, {**manifest, "genes": manifest["genes"][:-1]})}
    for name, (arrays, edited) in edits.items():
        np.savez(tmp_path / f"{name}.npz", manifest=np.array(json.dumps(edited)), **arrays)
        cli_error(predict_main, [tmp_path / f"{name}.npz", "--id-map", id_map, "--out", tmp_path / "edited.csv"],
                  "arrays or manifest differ from what was exported")
    assert not (tmp_path / "edited.csv").exists()


TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from scp_jax.config import load_config
    from scp_jax.engine.checkpoint import open_manager, restore_items, write_step
    source, target, config = sys.argv[1:]
    assert len(jax.devices()) == 2, jax.devices()
    host, tables, metadata = restore_items(source, 6)
    over_members = NamedSharding(Mesh(np.array(jax.devices()), ("member",)), PartitionSpec("member"))
    targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=over_members) for k, v in host.items()}
    sharded, _, _ = restore_items(source, 6, targets)
    for name, value in sharded.items():
        assert len(value.sharding.device_set) == 2, name
        np.testing.assert_array_equal(np.asarray(value), host[name])
    manager = open_manager(target, load_config(config))
    write_step(manager, 6, sharded, tables, metadata, 1.0)
    manager.wait_until_finished()
""")


def test_checkpoint_restores_on_another_device_count(runs, tmp_path):
    """1 device -> restored sharded over 2 (subprocess) -> saved from 2 -> restored on this 1-device process."""
    import jax

    straight = runs["straight"]
    environ = env(runs["tmp"], XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES, straight / "checkpoints", tmp_path / "ckpt",
                           straight / "config.toml"], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(jax.devices()) == 1
    host, _, _ = restore_items(straight / "checkpoints", 6)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in host.items()}
    back, _, _ = restore_items(tmp_path / "ckpt", 6, targets)
    for name, value in back.items():
        assert value.sharding == one
        np.testing.assert_array_equal(np.asarray(value), host[name], err_msg=name)


def test_a_resumed_run_keeps_only_the_latest_and_the_best_steps(tmp_path):
    """Scores survive a restart: a later process (a resumed run) ranks the steps an earlier one wrote,
    so they are not all kept as unscored."""
    config = load_config(None, ["checkpoint_keep=1"])

    def write(scores):
        manager = open_manager(tmp_path, config)
        for step, score in scores.items():
            write_step(manager, step, {"w": np.full(3, step, np.float32)}, {"t": np.ones(2, np.float32)}, {}, score)
        manager.close()

    write({1: 0.5, 2: 0.9, 3: 0.8})
    assert kept_steps(tmp_path) == [1, 3]  # the best and the latest
    write({4: 0.7, 5: 0.6})
    assert kept_steps(tmp_path) == [1, 5]


def copy_checkpoints(runs, tmp_path):
    shutil.copy(runs["straight"] / "config.toml", tmp_path)
    shutil.copytree(runs["straight"] / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage, message", [
    (lambda step: (step / "metadata" / "metadata").write_text("{not json"), r"6/metadata: checkpoint step 6 is corrupted"),
    (lambda step: (step / "state" / "_METADATA").unlink(), r"6: checkpoint step 6 is missing file state/_METADATA"),
    # Orbax reads every step's metrics as it opens the checkpoints: this failed with a traceback
    (lambda step: (step / "metrics" / "metrics").write_text(""), r"6/metrics/metrics: checkpoint step 6 is corrupted"),
    (lambda step: (step / "metrics" / "metrics").write_text("[1]"), r"6/metrics/metrics: .* corrupted \(no mean_val_mrrmse"),
    (lambda step: [f.write_bytes(b"\0" * 16) for f in (step / "state" / "d").iterdir()], r"6: checkpoint step 6 is corrupted .*state/"),
    # the arrays' data: Orbax wraps TensorStore's error (which names the file) in a plain Exception
    (lambda step: [f.write_bytes(f.read_bytes()[:10]) for f in (step / "state" / "ocdbt.process_0" / "d").iterdir()],
     r"6/state: checkpoint step 6 is corrupted \(OUT_OF_RANGE: .* local file \"state/\""),
])
def test_corrupted_checkpoint_is_one_line_error(runs, tmp_path, cli_error, damage, message):
    from scp_jax.export import main as export_main

    damage(copy_checkpoints(runs, tmp_path) / "6")
    error = cli_error(export_main, [tmp_path, "--out", tmp_path / "m.npz"])
    assert re.search(message, error), error


def test_a_step_without_metrics_exports(runs, tmp_path):
    """As a step saved before steps had metrics, or one a saving run is deleting meanwhile: not corrupted."""
    from scp_jax.export import export_run

    (copy_checkpoints(runs, tmp_path) / "6" / "metrics" / "metrics").unlink()
    assert export_run(tmp_path)[1]["epoch"] == 6


def test_missing_checkpoint_or_run_dir_is_one_line_error(tmp_path, cli_error):
    from scp_jax.export import main as export_main
    from scp_jax.train import main as train_main

    (tmp_path / "a.parquet").touch()
    for run, message in ((tmp_path / "missing", "run dir not found"), (tmp_path, "not a run dir (no config.toml)"),
                         (tmp_path / "a.parquet", "a file, not a run dir")):
        for main, argv in ((export_main, [run, "--out", tmp_path / "m.npz"]), (train_main, ["--resume", run])):
            cli_error(main, argv, f"{run}: {message}")
    shutil.copy(CI_CONFIG, tmp_path / "config.toml")
    (tmp_path / "checkpoints").mkdir()
    cli_error(export_main, [tmp_path, "--out", tmp_path / "m.npz"], "no complete checkpoint")


def test_export_step_and_predict_refusals_in_one_line(runs, tmp_path, capsys, cli_error):
    """`export --step`, and predict's one-line refusals: an id map of the shared checks (unknown cell type,
    repeated id), a file that is no npz, outputs that cannot be written. Nothing is written."""
    from scp_jax.engine.checkpoint import restore_items
    from scp_jax.export import main as export_main
    from scp_jax.predict import main as predict_main

    scores = {step: restore_items(runs["straight"] / "checkpoints", step)[2]["mean_val_mrrmse"] for step in (3, 6)}
    export_main([str(runs["straight"]), "--last", "--step", "best", "--out", str(tmp_path / "m.npz")])
    assert f"checkpoint step {min(scores, key=scores.get)})" in capsys.readouterr().out
    id_map = pd.read_csv(runs["world"] / "id_map.csv")
    id_map.loc[3, "cell_type"] = "Neurons"
    id_map.to_csv(tmp_path / "unknown.csv", index=False)
    id_map.assign(id=id_map.id.where(id_map.index != 9, id_map.id[1])).to_csv(tmp_path / "repeated.csv", index=False)
    (tmp_path / "text.npz").write_text("not a zip")
    model, good = tmp_path / "m.npz", runs["world"] / "id_map.csv"
    cases = [
        (export_main, [runs["straight"], "--step", "4", "--out", tmp_path / "s.npz"], "no complete checkpoint step 4"),
        (export_main, [runs["straight"], "--out", model / "s.npz"], "m.npz is not a directory"),
        (predict_main, [model, "--id-map", tmp_path / "unknown.csv", "--out", tmp_path / "s.csv"],
         f"unknown.csv: row 3: cell_type 'Neurons' never seen in training data ({model})"),
        (predict_main, [model, "--id-map", tmp_path / "repeated.csv", "--out", tmp_path / "s.csv"],
         "duplicate id 1 at rows 1 and 9"),
        (predict_main, [tmp_path / "text.npz", "--id-map", good, "--out", tmp_path / "s.csv"], "text.npz: not an npz archive"),
        (predict_main, [model, "--id-map", good, "--out", tmp_path], "cannot write (Is a directory)"),
    ]
    cases.append((predict_main, [model, "--out", tmp_path / "s.csv"], "m.npz: a model.npz needs --id-map"))
    for main, argv, message in cases:
        cli_error(main, argv, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "repeated.csv", "text.npz", "unknown.csv"]


def test_resume_refuses_an_edited_config(runs, tmp_path, cli_error):
    """A config.toml edited after its checkpoints is refused, naming what changed, before any training; moved
    data and more kept checkpoints are no change to what is computed (the finished run resumes and predicts
    the same submission); other contents under the data's path are refused."""
    from scp_jax.train import main as train_main

    run = tmp_path / "run"
    shutil.copytree(runs["straight"], run)
    written = (run / "config.toml").read_text()
    edited = written.replace("epochs = 6", "epochs = 8").replace("learning_rate = 0.001", "learning_rate = 0.01")
    assert edited.count("= 8") == 1 and "learning_rate = 0.01" in edited
    (run / "config.toml").write_text(edited)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cli_error(train_main, ["--resume", run], "run/config.toml: epochs, optim.learning_rate changed since checkpoint step 6"
              " (epochs: 6 then, 8 now); a resumed run continues with the config it started with")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    moved = shutil.copytree(runs["world"], tmp_path / "moved")
    old_path = str(runs["world"] / "de_train.parquet")
    assert old_path in written and "checkpoint_keep = 2" in written
    (run / "config.toml").write_text(written.replace(old_path, str(moved / "de_train.parquet"))
                                     .replace("checkpoint_keep = 2", "checkpoint_keep = 3"))
    (run / "submission.csv").unlink()
    train_main(["--resume", str(run)])
    assert (run / "submission.csv").read_bytes() == (runs["straight"] / "submission.csv").read_bytes()
    table = pd.read_parquet(moved / "de_train.parquet")
    table[table.columns[5:]] *= 3  # the same file name, other contents
    table.to_parquet(moved / "de_train.parquet")
    cli_error(train_main, ["--resume", run], "6: checkpoint step 6 was trained on other data than data.train now holds")


def test_resume_refuses_a_changed_features_file(runs, tmp_path, cli_error):
    """A features file is named, not fingerprinted, by the config: the tables it gave are compared, to
    float32 rounding (embeddings computed on another device may differ in their last bits)."""
    from scp_jax.features.__main__ import main as features_main
    from scp_jax.train import main as train_main

    features = tmp_path / "morgan.npz"
    features_main(["morgan", "--bits", "16", "--data", str(runs["world"] / "de_train.parquet"), "--out", str(features)])
    run = tmp_path / "run"
    train_main(["--data", str(runs["world"] / "de_train.parquet"), "--out", str(run), "--config", str(CI_CONFIG),
                "--ensemble", "2", "--epochs", "2", "--set", "checkpoint_every=2", "--set", "epochs_per_chunk=2",
                "--set", "model.hidden=[8]", "--set", f"features=['onehot', 'chemberta:{features}']"])
    stored = dict(np.load(features))
    np.savez(features, **dict(stored, features=np.nextafter(stored["features"], np.float32(2))))  # 1 ulp: resumes
    train_main(["--resume", str(run)])
    np.savez(features, **dict(stored, features=stored["features"] + 1))
    cli_error(train_main, ["--resume", run], "2: checkpoint step 2 was trained on another features.compound table than"
              f" features ['onehot', 'chemberta:{features}'] now give")


def test_pseudo_label_run_resumes_bit_identical(runs, tmp_path, cli_error):
    """Stage 1 is not checkpointed: a resumed two-stage run recomputes its labels, then continues stage 2. Its
    stage 2 trains on the id map's rows: an id map with other rows is refused on resume."""
    data = ["--data", runs["world"] / "de_train.parquet"]
    recipe = ["--config", ROOT / "configs" / "third_place.toml", "--ensemble", "3", "--epochs", "4",
              "--set", "checkpoint_every=2", "--set", "epochs_per_chunk=2", "--set", "model.hidden=[16]",
              "--set", "targets.svd=4"]
    environ = env(runs["tmp"])
    finish(cli("scp_jax.train", *data, "--out", tmp_path / "straight", *recipe, environ=environ))  # fills the cache
    kill_when_stalled(cli("stalled_train", *data, "--out", tmp_path / "resumed", *recipe,
                          environ=env(runs["tmp"], **{STALL_ENV: "2"})), epoch=2)
    assert latest_step(tmp_path / "resumed" / "checkpoints") == 2
    finish(cli("scp_jax.train", "--resume", tmp_path / "resumed", environ=environ))
    for name in ("submission.csv", "metrics.jsonl", "metrics-stage1.jsonl", "cv.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    from scp_jax.train import main as train_main

    pd.read_csv(runs["world"] / "id_map.csv").iloc[:100].to_csv(tmp_path / "fewer.csv", index=False)
    config = tmp_path / "straight" / "config.toml"
    assert 'id_map = ""' in config.read_text()  # the one beside the data
    config.write_text(config.read_text().replace('id_map = ""', f'id_map = "{tmp_path / "fewer.csv"}"'))
    cli_error(train_main, ["--resume", tmp_path / "straight"], "trained on other data than data.train or data.id_map")


def test_two_process_cli_run_killed_and_resumed_matches_one_process(runs, tmp_path, free_address):
    """Two localhost processes, one CPU device each, train the run's members between them; process 0 alone
    writes the run dir (under the name it chose), the checkpoints are written jointly. Both are SIGKILLed
    after epoch 4 and the run resumes, again as two processes."""
    def launch(address, *args, module="scp_jax.train", **extra):
        environ = env(runs["tmp"], SCP_JAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=address,
                      SCP_JAX_NUM_PROCESSES="2", **extra)
        return [cli(module, *args, environ=dict(environ, SCP_JAX_PROCESS_ID=str(i))) for i in range(2)]

    data = ["--data", runs["world"] / "de_train.parquet"]
    for process in launch(free_address(), *data, "--out", tmp_path / "run", *RUN, module="stalled_train",
                          **{STALL_ENV: "4"}):
        kill_when_stalled(process, epoch=4)
    assert latest_step(tmp_path / "run" / "checkpoints") == 3
    processes = launch(free_address(), "--resume", tmp_path / "run")  # a new port: the killed one's may linger
    try:
        outputs = [finish(process) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert "CV MRRMSE" in outputs[0] and "CV MRRMSE" not in outputs[1]
    assert latest_step(tmp_path / "run" / "checkpoints") == 6
    straight = pd.read_csv(runs["straight"] / "submission.csv").to_numpy()[:, 1:].astype(float)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "run" / "submission.csv").to_numpy()[:, 1:].astype(float),
                               straight, atol=1e-4)
    scores = [[row["cv_mrrmse"] for row in json.loads((run / "cv.json").read_text())["members"]]
              for run in (runs["straight"], tmp_path / "run")]
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-5)
