"""Loader validation: each bad input gives exit code 2 and one `error:` line naming the problem."""

import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from scp_jax.data import load_id_map, load_train, write_submission
from scp_jax.data.__main__ import main
from scp_jax.data.score import read_submission


@pytest.fixture
def world(small_world, tmp_path):
    """A private copy of the small world, safe to corrupt."""
    return shutil.copytree(small_world, tmp_path / "world")


def rewrite_train(world, change):
    frame = change(pd.read_parquet(world / "de_train.parquet"))
    frame.to_parquet(world / "de_train.parquet", index=False)
    return world / "de_train.parquet"


def test_loads_small_world(small_world):
    train = load_train(small_world / "de_train.parquet")
    queries = load_id_map(small_world / "id_map.csv", train)
    assert train.targets.shape == (614, 64) and train.targets.dtype == np.float32
    assert train.cell_types == tuple(sorted(train.cell_types)) and len(train.cell_types) == 6
    assert len(train.compounds) == 146 and len(train.compound_smiles) == 146
    assert all(train.compounds[i] == name for i, name in zip(train.compound_index, train.sm_name))
    assert all(train.cell_types[i] == cell for i, cell in zip(train.cell_index, train.cell_type))
    assert queries.ids.dtype == np.int64 and len(queries.ids) == 255
    assert all(train.compounds[i] == name for i, name in zip(queries.compound_index, queries.sm_name))


def test_missing_file(cli_error, tmp_path):
    cli_error(main, ["check", tmp_path / "nope.parquet"], "nope.parquet", "not found")


def test_id_map_that_is_a_folder(cli_error, world):
    cli_error(main, ["check", world / "de_train.parquet", world], f"error: {world}: a folder, not a CSV file")
    cli_error(main, ["check", world], f"error: {world}: a folder, not a parquet file")


def test_a_saved_pandas_index_is_no_gene(world, tmp_path):
    """A frame filtered and saved without index=False stores its index as a column; pandas reads it
    back as the index, and so does the loader: it is not trained on, nor written as a gene."""
    frame = pd.read_parquet(world / "de_train.parquet")
    frame = frame.drop(index=[3])  # a row filtered out: the index is no range, and is stored as a column
    frame.to_parquet(tmp_path / "indexed.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "indexed.parquet").names
    train = load_train(tmp_path / "indexed.parquet")
    assert list(train.genes) == list(frame.columns[5:])
    np.testing.assert_array_equal(train.targets, frame.iloc[:, 5:].to_numpy(np.float32))


def test_not_parquet(cli_error, tmp_path):
    (tmp_path / "de_train.parquet").write_text("cell_type,sm_name\n")
    cli_error(main, ["check", tmp_path / "de_train.parquet"], "not a readable parquet")


def test_missing_required_column(cli_error, world):
    path = rewrite_train(world, lambda f: f.drop(columns="SMILES"))
    cli_error(main, ["check", path], "missing required column 'SMILES'")


def test_no_gene_columns(cli_error, world):
    path = rewrite_train(world, lambda f: f[["cell_type", "sm_name", "sm_lincs_id", "SMILES", "control"]])
    cli_error(main, ["check", path], "no gene columns")


def test_non_numeric_target(cli_error, world):
    def change(frame):
        frame["G00007"] = frame["G00007"].astype(str)
        frame.loc[3, "G00007"] = "high"
        return frame

    path = rewrite_train(world, change)
    cli_error(main, ["check", path], "'G00007'", "not numeric", "'high'", "row 3")


def test_non_finite_target(cli_error, world):
    path = rewrite_train(world, lambda f: f.assign(G00005=f["G00005"].where(f.index != 11, np.inf)))
    cli_error(main, ["check", path], "'G00005'", "non-finite", "row 11")


def tiny_table(path, **columns):
    """A two-row de_train.parquet written by pyarrow, which allows what pandas would not (repeated names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = dict(cell_type=["B cells", "NK cells"], sm_name=["A", "A"], sm_lincs_id=["L", "L"],
                SMILES=["CCO", "CCO"], control=[False, False])
    names = [*base, *(name.split("__")[0] for name in columns)]  # G1__2 -> a second column named G1
    pq.write_table(pa.Table.from_arrays([pa.array(v) for v in [*base.values(), *columns.values()]], names=names), path)
    return path


@pytest.mark.filterwarnings("error")  # no RuntimeWarning from the float32 cast either
@pytest.mark.parametrize("columns, fragments", [
    (dict(G1=[1.0, 2.0], G1__2=[3.0, 4.0]), ["column 'G1' appears twice (columns 5 and 6)"]),
    (dict(G1=[1.0, 1e300]), ["gene column 'G1' has value 1e+300, beyond ±324", "at row 1 (NK cells, A)"]),
    (dict(G1=[-324.5, 1.0]), ["gene column 'G1' has value -324.5, beyond ±324", "at row 0 (B cells, A)"]),
    (dict(G1=[1.0, None]), ["gene column 'G1' has null value at row 1 (NK cells, A)"]),
    ({"": [1.0, 2.0]}, ["a gene column is named ''; a name must be non-empty, without spaces around it"]),
    ({"G1 ": [1.0, 2.0]}, ["a gene column is named 'G1 '"]),
])
def test_repeated_columns_and_impossible_values(cli_error, tmp_path, columns, fragments):
    path = tiny_table(tmp_path / "de_train.parquet", **columns)
    cli_error(main, ["check", path], f"error: {path}: ", *fragments)


@pytest.mark.parametrize("column", ["cell_type", "sm_name", "SMILES"])
def test_meta_column_without_a_text_form(cli_error, tmp_path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tiny_table(tmp_path / "de_train.parquet", G1=[1.0, 2.0])
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index(column), column, pa.array([["x"], ["y"]]))
    pq.write_table(table, path)
    cli_error(main, ["check", path], f"error: {path}: column '{column}' must hold text, got list<element: string>")


@pytest.mark.parametrize("column, value, message", [
    ("cell_type", "NK cells ", "column 'cell_type' holds 'NK cells ' at row 3; a name must be non-empty"),
    ("sm_name", "", "column 'sm_name' holds '' at row 3; a name must be non-empty"),
    ("control", 2, "column 'control' holds 2 at row 3"),
])
def test_unclean_names_and_control_flags(cli_error, world, column, value, message):
    path = rewrite_train(world, lambda f: f.assign(**{column: f[column].astype(type(value)).where(f.index != 3, value)}))
    cli_error(main, ["check", path], message)


@pytest.mark.parametrize("emptied", [0, 1])
def test_compound_with_and_without_smiles(cli_error, world, emptied):
    frame = pd.read_parquet(world / "de_train.parquet")
    name = frame["sm_name"].iloc[0]
    rows = [0, int(np.flatnonzero(frame["sm_name"] == name)[1])]
    path = rewrite_train(world, lambda f: f.assign(SMILES=f["SMILES"].where(f.index != rows[emptied], None)))
    cli_error(main, ["check", path], f"compound {name!r} has SMILES at row {rows[1 - emptied]} and an empty one at"
                                     f" row {rows[emptied]}")


def test_duplicate_row(cli_error, world):
    path = rewrite_train(world, lambda f: f.assign(
        cell_type=f["cell_type"].where(f.index != 5, f["cell_type"][0]),
        sm_name=f["sm_name"].where(f.index != 5, f["sm_name"][0]),
    ))
    cli_error(main, ["check", path], "duplicate row", "rows 0 and 5")


def rewrite_id_map(world, change):
    frame = change(pd.read_csv(world / "id_map.csv"))
    frame.to_csv(world / "id_map.csv", index=False)
    return world / "id_map.csv"


def test_id_map_unknown_compound(cli_error, world):
    path = rewrite_id_map(world, lambda f: f.assign(sm_name=f["sm_name"].where(f.index != 4, "Unobtainium")))
    cli_error(main, ["check", world / "de_train.parquet", path],
              "row 4", "'Unobtainium'", "never seen in training data")


def test_id_map_compound_without_smiles(cli_error, world):
    compound = pd.read_csv(world / "id_map.csv")["sm_name"][4]
    rewrite_train(world, lambda f: f.assign(SMILES=f["SMILES"].where(f["sm_name"] != compound, None)))
    cli_error(main, ["check", world / "de_train.parquet", world / "id_map.csv"],
              "row 4", repr(compound), "has no SMILES in training data")


def test_id_map_unknown_cell_type(cli_error, world):
    path = rewrite_id_map(world, lambda f: f.assign(cell_type=f["cell_type"].where(f.index != 2, "Neurons")))
    cli_error(main, ["check", world / "de_train.parquet", path], "row 2", "'Neurons'", "never seen")


def test_id_map_duplicate_id(cli_error, world):
    path = rewrite_id_map(world, lambda f: f.assign(id=f["id"].where(f.index != 9, 1)))
    cli_error(main, ["check", world / "de_train.parquet", path], "duplicate id 1", "rows 1 and 9")


def test_gene_named_like_the_submission_key(cli_error, world):
    path = rewrite_train(world, lambda f: f.rename(columns={f.columns[5]: "id"}))
    cli_error(main, ["check", path], "a gene column is named 'id'")


def test_id_map_without_rows(cli_error, world):
    path = rewrite_id_map(world, lambda f: f.iloc[:0])
    cli_error(main, ["check", world / "de_train.parquet", path], "id_map.csv: no rows")


def test_id_map_missing_column(cli_error, world):
    path = rewrite_id_map(world, lambda f: f.drop(columns="cell_type"))
    cli_error(main, ["check", world / "de_train.parquet", path], "id_map.csv", "missing required column 'cell_type'")


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scp_jax.data", "check", str(tmp_path / "missing.parquet")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.parquet'}: file not found"]


def test_submission_round_trip(small_world, tmp_path):
    train = load_train(small_world / "de_train.parquet")
    queries = load_id_map(small_world / "id_map.csv", train)
    rng = np.random.default_rng(0)
    shape = (len(queries.ids), len(train.genes))
    predictions = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(np.float32)
    write_submission(tmp_path / "sub.csv", queries.ids, train.genes, predictions)
    read = read_submission(tmp_path / "sub.csv", queries.ids, train.genes)
    np.testing.assert_array_equal(read.astype(np.float32), predictions)
    assert pd.read_csv(tmp_path / "sub.csv").columns.tolist() == ["id", *train.genes]


def test_id_map_text_is_kept_as_written(world, tmp_path):
    """Ids with leading zeros stay text (written back as they came, not as 7), and a compound named
    'NA' is a compound, not a missing cell (pandas reads both as other values by default)."""
    frame = pd.read_csv(world / "id_map.csv", dtype=str)
    compound = frame["sm_name"][4]
    rewrite_train(world, lambda f: f.assign(sm_name=f["sm_name"].replace(compound, "NA")))
    frame.assign(id=[f"{i:03d}" for i in range(len(frame))], sm_name=frame["sm_name"].replace(compound, "NA")).to_csv(
        world / "id_map.csv", index=False)
    written = (world / "id_map.csv").read_text()
    assert written.splitlines()[5].startswith("004,") and ",NA\n" in written  # the text the loader must keep
    train = load_train(world / "de_train.parquet")
    queries = load_id_map(world / "id_map.csv", train)
    assert queries.ids[7] == "007" and queries.sm_name[4] == "NA"
    assert train.compounds[queries.compound_index[4]] == "NA"
    predictions = np.arange(len(queries.ids) * len(train.genes), dtype=np.float32).reshape(len(queries.ids), -1)
    write_submission(tmp_path / "sub.csv", queries.ids, train.genes, predictions)
    assert (tmp_path / "sub.csv").read_text().splitlines()[8].startswith('"007",')
    np.testing.assert_array_equal(read_submission(tmp_path / "sub.csv", queries.ids, train.genes), predictions)


def test_id_map_columns_in_any_order(world):
    frame = pd.read_csv(world / "id_map.csv", dtype=str)
    frame[["sm_name", "id", "cell_type"]].to_csv(world / "id_map.csv", index=False)
    train = load_train(world / "de_train.parquet")
    queries = load_id_map(world / "id_map.csv", train)
    assert queries.ids.tolist() == frame["id"].astype(int).tolist()
    assert queries.sm_name.tolist() == frame["sm_name"].tolist()
    assert queries.cell_type.tolist() == frame["cell_type"].tolist()


@pytest.mark.parametrize("header, message", [("id,A,B,A", "column 'A' appears twice (columns 1 and 3)"),
                                             ("id,A,id", "column 'id' appears twice (columns 0 and 2)")])
def test_submission_with_a_repeated_column(tmp_path, header, message):
    """Named as in the file: pandas would call the second one 'A.1'."""
    from scp_jax.errors import UserError

    (tmp_path / "sub.csv").write_text(header + "\n" + ",".join(["0"] * len(header.split(","))) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'sub.csv'}: {message}")):
        read_submission(tmp_path / "sub.csv", np.arange(1), ("A", "B"))


def test_id_map_oddities(world, cli_error):
    """'-0' and '0' are two ids, not one integer twice; rows ending in a comma read as the header says."""
    text = (world / "id_map.csv").read_text().splitlines()
    (world / "id_map.csv").write_text("\n".join([text[0], *(line + "," for line in text[1:])]) + "\n")
    train = load_train(world / "de_train.parquet")
    queries = load_id_map(world / "id_map.csv", train)
    assert queries.ids.tolist() == list(range(len(text) - 1)) and queries.cell_type[0] == text[1].split(",")[1]
    (world / "id_map.csv").write_text("\n".join([text[0], text[1], "-" + text[1]]) + "\n")
    assert load_id_map(world / "id_map.csv", train).ids.tolist() == ["0", "-0"]


def test_submission_with_an_empty_id(tmp_path):
    from scp_jax.errors import UserError

    (tmp_path / "sub.csv").write_text("id,A\n0,1.0\n,2.0\n")
    with pytest.raises(UserError, match=r"sub.csv: column 'id' is empty at row 1$"):
        read_submission(tmp_path / "sub.csv", np.arange(2), ("A",))


def test_write_submission_refuses_non_finite(tmp_path):
    from scp_jax.errors import UserError

    with pytest.raises(UserError, match="non-finite"):
        write_submission(tmp_path / "sub.csv", np.arange(2), ("A", "B"), np.array([[0.0, np.nan], [1.0, 2.0]]))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask, mode):
    from scp_jax.atomic import write_text

    previous = os.umask(umask)
    try:
        write_text(tmp_path / "out.txt", "x")
        write_submission(tmp_path / "sub.csv", np.arange(1), ("A",), np.zeros((1, 1)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "sub.csv").stat().st_mode) == mode
