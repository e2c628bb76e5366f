"""`python -m scp_jax.predict RUN_DIR|model.npz --id-map CSV --out submission.csv`: predict with numpy.

A model.npz runs without jax; a RUN_DIR is exported on the fly (best-epoch parameters of its latest
checkpoint) and predicts its own id map unless given another. Cell types and compounds must be in
the model's training vocabulary.
"""

import argparse
import zipfile
from pathlib import Path

from scp_jax.errors import ArgumentParser, UserError, cli_main
from scp_jax.predictor import AGGREGATES, Predictor, read_npz


def parse_args(argv):
    parser = ArgumentParser(prog="python -m scp_jax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run dir or model.npz from `python -m scp_jax.export`")
    parser.add_argument("--id-map", help="id_map.csv: id, cell_type, sm_name (default for a run dir: the run's own)")
    parser.add_argument("--data", help="training parquet; its gene columns must match the model's")
    parser.add_argument("--out", required=True, help="submission.csv to write")
    parser.add_argument("--aggregate", choices=AGGREGATES,
                        help="how members combine (weighted: by 1 / each member's CV^2); default: as the run did")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction,
                        help="clip each gene to its training range; default: as the run did")
    return parser.parse_args(argv)


def load_model(source):
    """A run dir (exported on the fly) or a model.npz; a file that is no export and a model the numpy
    predictor refuses (a kind it does not run) are told apart."""
    path = Path(source)
    if path.is_dir():
        from scp_jax.export import export_run

        exported = export_run(path)
    elif not path.is_file():
        raise UserError(f"{path}: model not found (a run dir or a model.npz)")
    elif not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an npz archive (expected a model.npz from `python -m scp_jax.export`)")
    else:
        try:
            exported = read_npz(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path}: not a readable model.npz ({detail})") from None
    try:
        return Predictor(*exported)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def read_queries(path, model, source):
    """(ids, cell index, compound index) of an id map, in the model's vocabulary (`source`: the model's path)."""
    from scp_jax.data.dataset import id_map_index, read_id_map

    ids, cell_type, sm_name = read_id_map(path)
    return (ids, id_map_index(path, "cell_type", cell_type, model.manifest["cell_types"], source),
            id_map_index(path, "sm_name", sm_name, model.manifest["compounds"], source))


def run_id_map(model):
    """The id map a run dir trained with (its --id-map, the one beside its data, or the built-in world's)."""
    if not Path(model).is_dir():
        raise UserError(f"{model}: a model.npz needs --id-map (a run dir defaults to its own)")
    from scp_jax.config import run_data_config
    from scp_jax.data.dataset import input_paths

    id_map = input_paths(run_data_config(model))[1]
    if id_map is None:
        raise UserError(f"{model}: the run had no id map; pass --id-map")
    return id_map


@cli_main
def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.model)
    from scp_jax.data.dataset import gene_columns, write_submission

    if args.data and list(gene_columns(args.data)) != model.genes:
        raise UserError(f"{args.data}: gene columns differ from the {len(model.genes)} genes the model was trained on")
    ids, cell_index, compound_index = read_queries(args.id_map or run_id_map(args.model), model, args.model)
    try:
        predictions = model.predict(cell_index, compound_index, aggregate=args.aggregate, clip=args.clip)
    except ValueError as err:
        raise UserError(f"{args.model}: {err}") from None
    write_submission(args.out, ids, model.genes, predictions)
    method = model.aggregation(args.aggregate)[0]
    print(f"{len(ids)} rows x {len(model.genes)} genes ({method} of {model.votes.sum()} members) -> {args.out}")


if __name__ == "__main__":
    main()
