"""Load and validate the competition files (de_train.parquet, id_map.csv); write submissions and
out-of-fold predictions.

Every problem with a user's file is a UserError whose one-line message names the file, the column
and the row, so a bad input is fixed from the message alone rather than from a traceback.
"""

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from scp_jax.atomic import atomic_path
from scp_jax.errors import UserError

META_COLUMNS = ("cell_type", "sm_name", "sm_lincs_id", "SMILES", "control")
ID_MAP_COLUMNS = ("id", "cell_type", "sm_name")
HELD_OUT_CELLS = ("B cells", "Myeloid cells")  # the test's cell types, as the real data names them
MAX_ABS_TARGET = 324.0  # -log10 of the smallest float64 is 323.3


@dataclass(frozen=True)
class TrainSet:
    cell_type: np.ndarray  # [n] str
    sm_name: np.ndarray  # [n] str
    sm_lincs_id: np.ndarray  # [n] str
    control: np.ndarray  # [n] bool
    genes: tuple[str, ...]  # gene columns in file order
    targets: np.ndarray  # [n, g] float32
    cell_types: tuple[str, ...]  # vocabulary, sorted
    compounds: tuple[str, ...]  # vocabulary (sm_name), sorted
    compound_smiles: tuple[str, ...]  # aligned with compounds
    cell_index: np.ndarray  # [n] int32 into cell_types
    compound_index: np.ndarray  # [n] int32 into compounds
    source: str  # path it came from, for messages


@dataclass(frozen=True)
class Queries:
    """The id_map rows: which (cell type, compound) pairs to predict, indexed into a TrainSet."""

    ids: np.ndarray  # [q] as pandas reads them; written back unchanged
    cell_type: np.ndarray  # [q] str
    sm_name: np.ndarray  # [q] str
    cell_index: np.ndarray  # [q] int32 into TrainSet.cell_types
    compound_index: np.ndarray  # [q] int32 into TrainSet.compounds


def read_parquet(path, read=pq.ParquetFile.read):
    """`read` of a parquet file (its whole table by default), a missing or unreadable file a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a parquet file' if path.is_dir() else 'file not found'}")
    try:
        return read(pq.ParquetFile(path))  # skips the dataset layer: faster on 18k columns
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({_first_line(err)})") from None


def _refuse_repeated_columns(names, path):
    seen = {}
    for position, column in enumerate(names):
        if seen.setdefault(column, position) != position:
            raise UserError(f"{path}: column '{column}' appears twice (columns {seen[column]} and {position})")


def _gene_names(schema):
    """Every column but the metadata and a pandas index (a frame saved without index=False stores its
    index as a column, named in the file's pandas metadata; pandas reads it back as the index)."""
    index = {name for name in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(name, str)}
    return tuple(c for c in schema.names if c not in META_COLUMNS and c not in index)


def gene_columns(path):
    """The gene columns of a training parquet, from its footer alone (no data read)."""
    return _gene_names(read_parquet(path, lambda file: file.schema_arrow))


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _row_label(table, row):
    """'row 5 (T cells CD4+, Belinostat)': the position plus what a person would search for."""
    names = [str(table.column(c)[row].as_py()) for c in ("cell_type", "sm_name") if c in table.column_names]
    return f"row {row} ({', '.join(names)})" if names else f"row {row}"


def _meta_strings(table, path, column):
    values = table.column(column)
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{path}: column '{column}' is empty at {_row_label(table, row)}")
    return np.asarray(_as_strings(values, path, column), dtype=object)


NAME_RULE = "a name must be non-empty, without spaces around it (' NK cells' would be a cell type of its own)"


def _is_clean_name(name):
    return bool(name) and name == name.strip()


def _names(table, path, column):
    """A column of names (cell types, compounds): text, each clean (NAME_RULE)."""
    values = _meta_strings(table, path, column)
    row = next((row for row, value in enumerate(values) if not _is_clean_name(value)), None)
    if row is not None:
        raise UserError(f"{path}: column '{column}' holds {values[row]!r} at row {row}; {NAME_RULE}")
    return values


def _as_strings(values, path, column):
    """A column as Python strings; a type without a text form (a list, a struct) is a user error."""
    try:
        return values.cast(pa.string()).to_pylist()
    except pa.ArrowException:
        raise UserError(f"{path}: column '{column}' must hold text, got {values.type}") from None


def _control_flags(table, path):
    values = table.column("control")
    kind = values.type
    if not (pa.types.is_boolean(kind) or pa.types.is_integer(kind)):
        raise UserError(f"{path}: column 'control' must be boolean, got {kind}")
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{path}: column 'control' is empty at {_row_label(table, row)}")
    flags = values.to_numpy()
    if pa.types.is_integer(kind) and not np.isin(flags, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flags, (0, 1)))[0])
        raise UserError(f"{path}: column 'control' holds {flags[row]} at {_row_label(table, row)}; it must be 0 or 1")
    return flags.astype(bool)


def _target_matrix(table, path, genes):
    targets = np.empty((table.num_rows, len(genes)), dtype=np.float32)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, reported below
        for j, gene in enumerate(genes):
            column = table.column(gene)
            if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
                bad = next((i for i, v in enumerate(column.to_pylist()) if not _is_number(v)), 0)
                value = column[bad].as_py()
                raise UserError(f"{path}: gene column '{gene}' is not numeric ({column.type}): {show(value)}"
                                f" at {_row_label(table, bad)}")
            targets[:, j] = column.to_numpy()  # nulls become NaN and are caught below
    plausible = np.abs(targets) <= MAX_ABS_TARGET  # False for NaN and inf too
    if not plausible.all():
        row, j = (int(i) for i in np.argwhere(~plausible)[0])
        value = table.column(genes[j])[row].as_py()
        if value is None:
            problem = "null value"
        elif np.isfinite(value):
            problem = (f"value {show(value)}, beyond ±{MAX_ABS_TARGET:g} (no signed -log10 p-value is: float64 p-values"
                       " end near 5e-324)")
        else:
            problem = f"non-finite value {value}"
        raise UserError(f"{path}: gene column '{genes[j]}' has {problem} at {_row_label(table, row)}")
    return targets


def show(value):
    """repr of a file value for messages: 7 and 'x', not np.int64(7)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _is_number(value):
    try:
        return value is not None and np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def load_train(path) -> TrainSet:
    """Read de_train.parquet: metadata columns, then every other column is a gene target."""
    table = read_parquet(path)
    _refuse_repeated_columns(table.column_names, path)
    for column in META_COLUMNS:
        if column not in table.column_names:
            raise UserError(f"{path}: missing required column '{column}'")
    genes = _gene_names(table.schema)
    if not genes:
        raise UserError(f"{path}: no gene columns (only {', '.join(table.column_names)})")
    if "id" in genes:  # a submission's key column
        raise UserError(f"{path}: a gene column is named 'id', the name of a submission's key column")
    unclean = [gene for gene in genes if not _is_clean_name(gene)]
    if unclean:
        raise UserError(f"{path}: a gene column is named {unclean[0]!r}; {NAME_RULE}")
    if table.num_rows == 0:
        raise UserError(f"{path}: no rows")

    cell_type = _names(table, path, "cell_type")
    sm_name = _names(table, path, "sm_name")
    sm_lincs_id = _meta_strings(table, path, "sm_lincs_id")
    smiles = np.asarray(["" if s is None else s for s in _as_strings(table.column("SMILES"), path, "SMILES")], object)
    control = _control_flags(table, path)

    first_seen = {}
    for row, key in enumerate(zip(cell_type, sm_name)):
        if key in first_seen:
            raise UserError(
                f"{path}: duplicate row for cell_type={key[0]!r}, sm_name={key[1]!r} at rows {first_seen[key]} and {row}"
            )
        first_seen[key] = row

    compound_smiles, first_row = {}, {}
    for row, (name, smi) in enumerate(zip(sm_name, smiles)):
        if compound_smiles.setdefault(name, smi) != smi:
            if not (smi and compound_smiles[name]):
                given, empty = (row, first_row[name]) if smi else (first_row[name], row)
                raise UserError(f"{path}: compound {name!r} has SMILES at row {given} and an empty one at row {empty}")
            raise UserError(f"{path}: compound {name!r} has two different SMILES (second at row {row})")
        first_row.setdefault(name, row)

    targets = _target_matrix(table, path, genes)
    cell_types = tuple(sorted(set(cell_type)))
    compounds = tuple(sorted(compound_smiles))
    return TrainSet(
        cell_type=cell_type,
        sm_name=sm_name,
        sm_lincs_id=sm_lincs_id,
        control=control,
        genes=genes,
        targets=targets,
        cell_types=cell_types,
        compounds=compounds,
        compound_smiles=tuple(compound_smiles[c] for c in compounds),
        cell_index=_index_into(cell_type, cell_types),
        compound_index=_index_into(sm_name, compounds),
        source=str(path),
    )


def _index_into(values, vocabulary):
    position = {v: i for i, v in enumerate(vocabulary)}
    return np.fromiter((position[v] for v in values), dtype=np.int32, count=len(values))


def input_paths(data):
    """Paths of the training parquet and id map a config's [data] table names (None: no id map); the
    built-in synthetic world, built on first use, when it names no training file."""
    if data.train:
        train_path = Path(data.train)
    else:
        from scp_jax.data.synth import default_world  # synth builds on this module

        train_path = default_world(genes=data.synth_genes, seed=data.synth_seed) / "de_train.parquet"
    id_map_path = Path(data.id_map) if data.id_map else train_path.with_name("id_map.csv")
    if data.id_map and not id_map_path.exists():
        raise UserError(f"{id_map_path}: id map not found")
    return train_path, id_map_path if id_map_path.exists() else None


def read_csv(path, text=(), required=()):
    """A CSV file as a DataFrame; a missing or unreadable file, or one without a `required` column, is a
    one-line UserError. The cells of the `text` columns are kept as written, not parsed: '007' is not 7
    and a compound named 'NA' is not missing; only an empty cell is."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a CSV file' if path.is_dir() else 'file not found'}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:  # pandas renames a repeated column: 'G1.1'
            _refuse_repeated_columns(next(csv.reader(file), []), path)
        frame = pd.read_csv(path, index_col=False)  # rows with a trailing comma: no first column as the index
        text = [column for column in text if column in frame.columns]
        if text:  # by name: usecols gives the columns in the file's order
            written = pd.read_csv(path, usecols=text, dtype=str, keep_default_na=False, na_values=[""], index_col=False)
            frame[text] = written[text].to_numpy()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not a readable CSV file ({_first_line(err)})") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing required column '{missing[0]}'")
    return frame


def parse_ids(text):
    """An id column's values from their text: integers when every id is written as one (Kaggle's 0..254,
    so a submission writes them back unquoted), else the text itself ('007' stays '007')."""
    text = np.asarray(text, dtype=object)
    if all(re.fullmatch(r"0|-?[1-9][0-9]{0,17}", value) for value in text):  # one text per integer: not '-0'
        return text.astype(np.int64)
    return text


def read_id_map(path):
    """(ids, cell types, compounds) of an id map, checked alike for training and prediction: a readable
    CSV with the three columns, no empty cell, no repeated id."""
    path = Path(path)
    frame = read_csv(path, text=ID_MAP_COLUMNS, required=ID_MAP_COLUMNS)
    if frame.empty:
        raise UserError(f"{path}: no rows: nothing to predict")
    for column in ID_MAP_COLUMNS:
        missing = frame[column].isna().to_numpy()
        if missing.any():
            raise UserError(f"{path}: column '{column}' is empty at row {int(np.flatnonzero(missing)[0])}")
    ids = parse_ids(frame["id"])
    duplicated = frame["id"].duplicated().to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        first = int(np.flatnonzero(ids == ids[row])[0])
        raise UserError(f"{path}: duplicate id {show(ids[row])} at rows {first} and {row}")
    return ids, *(frame[column].to_numpy(dtype=object) for column in ("cell_type", "sm_name"))


def id_map_index(path, column, values, vocabulary, source):
    """[q] int32 positions of an id map column's values in a training vocabulary (of `source`: the
    training file or the model); a value not there is a one-line error naming its row."""
    known = set(vocabulary)
    for row, value in enumerate(values):
        if value not in known:
            raise UserError(f"{path}: row {row}: {column} {value!r} never seen in training data ({source})")
    return _index_into(values, vocabulary)


def load_id_map(path, train: TrainSet) -> Queries:
    """Read id_map.csv and check every query can be answered from the training vocabularies."""
    path = Path(path)
    ids, cell_type, sm_name = read_id_map(path)
    cell_index = id_map_index(path, "cell_type", cell_type, train.cell_types, train.source)
    compound_index = id_map_index(path, "sm_name", sm_name, train.compounds, train.source)
    for row, compound in enumerate(compound_index):
        if not train.compound_smiles[compound]:
            raise UserError(f"{path}: row {row}: sm_name {sm_name[row]!r} has no SMILES in training data"
                            f" ({train.source})")
    return Queries(ids=ids, cell_type=cell_type, sm_name=sm_name, cell_index=cell_index, compound_index=compound_index)


def write_submission(path, ids, genes, predictions):
    """Write `id` then one column per gene (training order), atomically, as Kaggle expects."""
    predictions = np.asarray(predictions, dtype=np.float32)
    if predictions.shape != (len(ids), len(genes)):
        raise ValueError(f"predictions shape {predictions.shape} != (ids {len(ids)}, genes {len(genes)})")
    finite = np.isfinite(predictions)
    if not finite.all():
        row, j = np.argwhere(~finite)[0]
        raise UserError(f"{path}: refusing to write non-finite prediction for id {show(ids[row])}, gene '{genes[j]}'")
    with atomic_path(path) as tmp:
        pa_csv.write_csv(_gene_table({"id": ids}, genes, predictions), tmp)


def write_oof(path, train, predictions):
    """The out-of-fold predictions of the validated rows (the others are all NaN), laid out like the
    training parquet (`cell_type`, `sm_name`, genes), atomically: what a stacking model trains on."""
    rows = np.flatnonzero(~np.isnan(predictions).all(axis=1))
    keys = {"cell_type": train.cell_type[rows], "sm_name": train.sm_name[rows]}
    with atomic_path(path) as tmp:
        pq.write_table(_gene_table(keys, train.genes, predictions[rows]), tmp)


def _gene_table(keys, genes, values):
    """An arrow table: the `keys` columns ({name: [rows]}), then one float32 column per gene of `values`."""
    values = np.asarray(values, dtype=np.float32)
    columns = [pa.array(np.asarray(v)) for v in keys.values()] + [pa.array(values[:, j]) for j in range(len(genes))]
    return pa.Table.from_arrays(columns, names=[*keys, *genes])
