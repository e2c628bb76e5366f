"""Synthetic worlds: the real layout, parseable distinct SMILES, determinism, reference mode, scoring."""

import filecmp
import json
import os
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem

from scp_jax.data import default_world, load_id_map, load_train, make_world
from scp_jax.data.__main__ import main
from scp_jax.data.pvalues import expected_signed_log10_p, signed_log10_p
from scp_jax.data.synth import Params, _cell_counts, _effect_oracle
from scp_jax.errors import UserError

TRAIN_ROWS = {"NK cells": 146, "T cells CD4+": 146, "T regulatory cells": 146, "T cells CD8+": 142,
              "B cells": 17, "Myeloid cells": 17}
WORLD_FILES = ("de_train.parquet", "id_map.csv", "hidden/truth.parquet", "hidden/oracle.parquet",
               "hidden/effect_oracle.parquet", "world.json")


def test_layout_matches_the_real_task(small_world):
    train = load_train(small_world / "de_train.parquet")
    queries = load_id_map(small_world / "id_map.csv", train)
    assert pd.Series(train.cell_type).value_counts().to_dict() == TRAIN_ROWS
    assert sorted(set(train.sm_name[train.control])) == ["Belinostat", "Dabrafenib"]
    assert train.control.sum() == 12  # both controls in all 6 cell types
    held_out = set(train.sm_name[np.isin(train.cell_type, ["B cells", "Myeloid cells"])])
    assert len(held_out) == 17 and {"Belinostat", "Dabrafenib"} <= held_out
    assert pd.Series(queries.cell_type).value_counts().to_dict() == {"B cells": 128, "Myeloid cells": 127}
    assert not held_out & set(queries.sm_name) and len(set(queries.sm_name)) == 129
    assert list(queries.ids) == list(range(255))
    assert len(set(train.compound_smiles)) == 146
    assert all(Chem.MolFromSmiles(s) is not None for s in train.compound_smiles)
    assert all(lincs.startswith("LSM-") for lincs in train.sm_lincs_id)
    truth = pd.read_parquet(small_world / "hidden" / "truth.parquet")
    oracle = pd.read_parquet(small_world / "hidden" / "oracle.parquet")
    assert truth.columns.tolist() == oracle.columns.tolist() == ["id", *train.genes]
    assert (truth.id == queries.ids).all()
    assert json.loads((small_world / "world.json").read_text())["seed"] == 0


def test_same_seed_same_files_other_seed_other_world(small_world, tmp_path):
    again = make_world(tmp_path / "again", genes=64, seed=0)
    for name in WORLD_FILES:
        assert filecmp.cmp(small_world / name, again / name, shallow=False), name
    other = make_world(tmp_path / "other", genes=64, seed=1)
    assert not filecmp.cmp(small_world / "de_train.parquet", other / "de_train.parquet", shallow=False)


def test_oracle_expectation_matches_monte_carlo():
    means = np.array([-6.0, -1.0, 0.0, 0.3, 2.0, 9.0])
    draws = signed_log10_p(means + 1.4 * np.random.default_rng(0).standard_normal((200_000, 1)))
    np.testing.assert_allclose(expected_signed_log10_p(means, 1.4), draws.mean(0), atol=0.02)


def test_effect_oracle_matches_monte_carlo_over_cell_counts():
    """E[y | effect] over the cell count and quality distribution, against draws of the generator's own sampler."""
    effects = np.array([[-3.0, -0.5, 0.0, 0.4, 1.5, 6.0]])
    frame = pd.DataFrame({"cell_type": ["B cells"], "sm_name": ["c"]})
    layout = type("Layout", (), {"compounds": pd.DataFrame({"sm_name": ["c"]})})
    expected = _effect_oracle(Params(), lambda cells, compounds: effects, frame, layout)
    rng = np.random.default_rng(0)
    cells, scale = _cell_counts(rng, Params(), ["B cells"] * 100_000)
    t = effects * np.sqrt(cells / 100.0)[:, None] + scale[:, None] * rng.standard_normal((len(cells), 1))
    np.testing.assert_allclose(expected[0], signed_log10_p(t).mean(0), rtol=0.015, atol=0.03)  # 16 quantiles a quality


def test_score_orders_oracle_zeros_and_nonsense(small_world, tmp_path, capsys):
    truth = pd.read_parquet(small_world / "hidden" / "truth.parquet")
    oracle = pd.read_parquet(small_world / "hidden" / "oracle.parquet")
    oracle.to_csv(tmp_path / "oracle.csv", index=False)
    truth.assign(**{g: 3.0 for g in truth.columns[1:]}).to_csv(tmp_path / "threes.csv", index=False)
    main(["score", str(small_world), str(tmp_path / "oracle.csv"), "--json"])
    oracle_scores = json.loads(capsys.readouterr().out)["scores"]
    main(["score", str(small_world), str(tmp_path / "threes.csv")])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("score: submission=")
    threes = float(summary.split("submission=")[1].split()[0])
    assert oracle_scores["submission"] == pytest.approx(oracle_scores["oracle"])
    assert oracle_scores["oracle"] < oracle_scores["effect_oracle"] < oracle_scores["zeros"] < threes


def test_score_rejects_submission_missing_an_id(small_world, tmp_path, cli_error):
    pd.read_parquet(small_world / "hidden" / "oracle.parquet").iloc[1:].to_csv(tmp_path / "sub.csv", index=False)
    assert (cli_error(main, ["score", small_world, tmp_path / "sub.csv"])
            == f"error: {tmp_path / 'sub.csv'}: id 0 from id_map is missing")


def test_hidden_answers_missing_an_id_are_refused(small_world, tmp_path):
    from scp_jax.data.score import read_answers

    path = tmp_path / "truth.parquet"
    truth = pd.read_parquet(small_world / "hidden" / "truth.parquet")
    truth.iloc[:-1].to_parquet(path)
    ids, genes = truth["id"].to_numpy(), tuple(truth.columns[1:])
    with pytest.raises(UserError, match=rf"^{path}: id {ids[-1]} from id_map is missing$"):
        read_answers(path, genes, ids)
    with pytest.raises(UserError, match=rf"^{path}: missing column 'X'$"):
        read_answers(path, (*genes, "X"), ids[:-1])
    truth.assign(**{genes[1]: truth[genes[1]].where(truth.index != 4)}).to_parquet(path)  # a null
    with pytest.raises(UserError, match=rf"^{path}: gene column '{genes[1]}' has non-finite value nan at id {ids[4]}$"):
        read_answers(path, genes, ids)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"^{path}: not a readable parquet file"):
        read_answers(path, genes, ids)


@pytest.mark.filterwarnings("error")  # no overflow warnings either
def test_score_rejects_a_column_of_booleans_and_scores_a_huge_prediction_inf(small_world, tmp_path, cli_error, capsys):
    submission = pd.read_parquet(small_world / "hidden" / "oracle.parquet")
    gene = submission.columns[3]
    submission.assign(**{gene: submission[gene] > -np.inf}).to_csv(tmp_path / "sub.csv", index=False)
    assert cli_error(main, ["score", small_world, tmp_path / "sub.csv"]) == (
        f"error: {tmp_path / 'sub.csv'}: gene column '{gene}' has non-numeric value True at id 0")
    submission[gene] = submission[gene].astype(np.float64)
    submission.loc[5, gene] = 1e300
    submission.to_csv(tmp_path / "sub.csv", index=False)
    main(["score", str(small_world), str(tmp_path / "sub.csv")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("score: submission=inf ")


def test_default_world_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SCP_JAX_CACHE", str(tmp_path))
    previous = os.umask(0o022)
    try:
        world = default_world(genes=8, seed=3)
    finally:
        os.umask(previous)
    assert world == tmp_path / "worlds" / "synth-g8-s3"
    # readable by other users: not mkdtemp's 0700 nor mkstemp's 0600
    assert stat.S_IMODE(world.stat().st_mode) == 0o755
    assert {stat.S_IMODE((world / name).stat().st_mode) for name in WORLD_FILES} == {0o644}
    stamp = (world / "de_train.parquet").stat().st_mtime_ns
    assert default_world(genes=8, seed=3) == world
    assert (world / "de_train.parquet").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "worlds").iterdir()] == ["synth-g8-s3"]  # no temp folders left


def test_default_world_keeps_the_one_a_concurrent_caller_installed_while_building(tmp_path, monkeypatch):
    from scp_jax.data import synth

    monkeypatch.setenv("SCP_JAX_CACHE", str(tmp_path))
    target = tmp_path / "worlds" / "synth-g8-s3"

    def racing(out_dir, **kwargs):
        """A stand-in builder (default_world reads only world.json) that another caller beats."""
        for folder in (target, out_dir):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "world.json").write_text(json.dumps({"version": synth.VERSION}))
        (target / "theirs").write_text("")

    monkeypatch.setattr(synth, "make_world", racing)
    assert default_world(genes=8, seed=3) == target
    assert (target / "theirs").exists()
    assert [p.name for p in (tmp_path / "worlds").iterdir()] == ["synth-g8-s3"]  # no temp folders left


def test_reference_world_uses_real_genes_compounds_and_id_map(reference_dir, tmp_path):
    world = make_world(tmp_path / "ref", genes=32, seed=0, reference=reference_dir)
    train = load_train(world / "de_train.parquet")
    assert train.genes == tuple((reference_dir / "genes.txt").read_text().split()[:32])
    real = pd.read_csv(reference_dir / "compounds_smiles.csv").query("in_de_train == 1")
    assert set(train.compounds) == set(real.sm_name)
    assert dict(zip(train.compounds, train.compound_smiles)) == dict(zip(real.sm_name, real.SMILES))
    assert set(train.sm_name[train.control]) == set(real.sm_name[real.role == "positive_control"])
    held_out = set(train.sm_name[train.cell_type == "B cells"])
    assert held_out == set(real.sm_name[real.train_has_B_Myeloid == 1])
    assert pd.Series(train.cell_type).value_counts().to_dict() == TRAIN_ROWS
    pd.testing.assert_frame_equal(pd.read_csv(world / "id_map.csv"), pd.read_csv(reference_dir / "id_map.csv"))


def _break_smiles(table):
    table.loc[table.index[table["in_de_train"] == 1][0], "SMILES"] = "C1CC("
    return table


@pytest.mark.parametrize("name, change, message", [
    ("compounds_smiles.csv", lambda t: t.drop(columns="role"), "compounds_smiles.csv: missing required column 'role'"),
    ("compounds_smiles.csv", _break_smiles, "compounds_smiles.csv: invalid SMILES 'C1CC(' for compound"),
    ("compounds_smiles.csv", lambda t: _break_smiles(t).replace("C1CC(", None),
     "compounds_smiles.csv: invalid SMILES '' for compound"),
    ("id_map.csv", lambda t: t.assign(sm_name=t["sm_name"].where(t.index != 2, "Unobtainium")),
     "id_map.csv: row 2: ('B cells', 'Unobtainium') is no cell type x training compound of the world"),
    ("genes.txt", lambda genes: genes[:3] + genes[:1], "genes.txt: gene 'A1BG' is listed twice"),
    ("genes.txt", lambda genes: ["id", *genes], "genes.txt: gene 'id' is the name of a submission's key column"),
])
def test_reference_dir_that_would_give_an_invalid_world_writes_nothing(reference_dir, tmp_path, cli_error, name,
                                                                       change, message):
    reference = shutil.copytree(reference_dir, tmp_path / "ref")
    if name == "genes.txt":
        (reference / name).write_text("\n".join(change((reference / name).read_text().split())) + "\n")
    else:
        change(pd.read_csv(reference / name)).to_csv(reference / name, index=False)
    cli_error(main, ["synth", "--out", tmp_path / "out", "--genes", "3", "--reference", reference], message)
    assert not (tmp_path / "out").exists()


def test_reference_dir_missing_a_file_writes_nothing(tmp_path, cli_error):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "genes.txt").write_text("A\nB\n")
    assert (cli_error(main, ["synth", "--out", tmp_path / "out", "--genes", "2", "--reference", tmp_path / "ref"])
            == f"error: reference dir {tmp_path / 'ref'} lacks compounds_smiles.csv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("genes", ["0", "100000"])
def test_synth_gene_count_out_of_range(tmp_path, cli_error, genes):
    assert (cli_error(main, ["synth", "--out", tmp_path / "out", "--genes", genes])
            == f"error: --genes must be in [1, 99999], got {genes}")
    assert not (tmp_path / "out").exists()


def test_synth_writes_a_whole_world_or_nothing(small_world, tmp_path, cli_error, monkeypatch):
    from scp_jax.data import synth

    (tmp_path / "empty").mkdir()
    main(["synth", "--out", str(tmp_path / "empty"), "--genes", "64"])
    assert filecmp.cmp(small_world / "de_train.parquet", tmp_path / "empty" / "de_train.parquet", shallow=False)
    before = (tmp_path / "empty" / "world.json").read_text()
    assert (cli_error(main, ["synth", "--out", tmp_path / "empty", "--genes", "8"])
            == f"error: {tmp_path / 'empty'}: already exists and is not an empty folder; write the world to a new one")
    assert (tmp_path / "empty" / "world.json").read_text() == before

    def interrupted(*args):
        raise KeyboardInterrupt  # after de_train.parquet and id_map.csv are written

    monkeypatch.setattr(synth, "_effect_oracle", interrupted)
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C: `interrupted`, exit code 130
        main(["synth", "--out", str(tmp_path / "new"), "--genes", "8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no world, no hidden build folder
