"""`python -m scp_jax.predict RUN_DIR|model.npz --id-map CSV --out submission.csv`: predict with numpy.

A model.npz runs without jax; a RUN_DIR is exported on the fly (best-epoch parameters of its latest
checkpoint). Cell types and compounds must be in the model's training vocabulary.
"""

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scp_jax.errors import UserError, cli_main
from scp_jax.predictor import AGGREGATES, Predictor


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m scp_jax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run dir or model.npz from `python -m scp_jax.export`")
    parser.add_argument("--id-map", required=True, help="id_map.csv: id, cell_type, sm_name")
    parser.add_argument("--data", help="training parquet; its gene columns must match the model's")
    parser.add_argument("--out", required=True, help="submission.csv to write")
    parser.add_argument("--aggregate", choices=AGGREGATES,
                        help="how members combine (weighted: by 1 / each member's CV^2); default: as the run did")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction,
                        help="clip each gene to its training range; default: as the run did")
    return parser.parse_args(argv)


def load_model(source):
    path = Path(source)
    if path.is_dir():
        from scp_jax.export import export_run

        try:
            return Predictor(*export_run(path))
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
    if not path.is_file():
        raise UserError(f"{path}: model not found (a run dir or a model.npz)")
    try:
        return Predictor.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable model.npz ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def read_queries(path, model):
    """(ids, cell index, compound index) of an id map, in the model's vocabulary."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable CSV file ({str(err).splitlines()[0]})") from None
    indices = []
    for column, vocabulary in (("cell_type", "cell_types"), ("sm_name", "compounds")):
        if column not in frame.columns or "id" not in frame.columns:
            raise UserError(f"{path}: missing required column '{column if 'id' in frame.columns else 'id'}'")
        position = {name: i for i, name in enumerate(model.manifest[vocabulary])}
        values = frame[column].astype(str).tolist()
        unknown = next((row for row, value in enumerate(values) if value not in position), None)
        if unknown is not None:
            raise UserError(f"{path}: row {unknown}: {column} {values[unknown]!r} is not in the model's training data")
        indices.append(np.array([position[v] for v in values], np.int32))
    return frame["id"].to_numpy(), *indices


def check_genes(data_path, model):
    try:
        names = pq.read_schema(data_path).names
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{data_path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    from scp_jax.data.dataset import META_COLUMNS

    if [n for n in names if n not in META_COLUMNS] != model.genes:
        raise UserError(f"{data_path}: gene columns differ from the {len(model.genes)} genes the model was trained on")


@cli_main
def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.model)
    if args.data:
        check_genes(args.data, model)
    ids, cell_index, compound_index = read_queries(args.id_map, model)
    from scp_jax.data.dataset import write_submission

    try:
        predictions = model.predict(cell_index, compound_index, aggregate=args.aggregate, clip=args.clip)
    except ValueError as err:
        raise UserError(f"{args.model}: {err}") from None
    write_submission(args.out, ids, model.genes, predictions)
    method = args.aggregate or model.run_aggregate[0]
    print(f"{len(ids)} rows x {len(model.genes)} genes ({method} of {model.votes.sum()} members) -> {args.out}")


if __name__ == "__main__":
    main()
