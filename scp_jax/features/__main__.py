"""python -m scp_jax.features {chemberta,morgan,descriptors}: per-compound feature files for training.

The output `.npz` holds `sm_name`, `smiles` (the training set's compound vocabulary, in TrainSet.compounds
order) and float32 `features`, one row per compound; configs use it as `chemberta:FILE.npz`.
"""

import time
from pathlib import Path

import numpy as np

from scp_jax.atomic import atomic_path
from scp_jax.errors import ArgumentParser, UserError, cli_main
from scp_jax.features.molecular import morgan_fingerprints, rdkit_descriptors, smiles_errors_of


def _parser():
    parser = ArgumentParser(prog="python -m scp_jax.features", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    chemberta = commands.add_parser("chemberta", help="ChemBERTa embeddings (Flax port, weights from disk)")
    chemberta.add_argument("--model", default="DeepChem/ChemBERTa-77M-MTR", help="HF id in the local cache, or DIR")
    chemberta.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    chemberta.add_argument("--batch-size", type=int, default=64)
    morgan = commands.add_parser("morgan", help="Morgan fingerprints (RDKit)")
    morgan.add_argument("--radius", type=int, default=2)
    morgan.add_argument("--bits", type=int, default=2048)
    morgan.add_argument("--counts", action="store_true", help="count environments per bit instead of 0/1")
    commands.add_parser("descriptors", help="standardized RDKit 2D descriptors")
    for command in commands.choices.values():
        command.add_argument("--data", help="de_train.parquet (default: the default synthetic world's)")
        command.add_argument("--out", required=True, help="output .npz")
    return parser


def _featurizer(args):
    """SMILES -> features for the command; a model loads here, before the data, so a missing one fails fast."""
    if args.command == "chemberta":
        from scp_jax.features.chemberta import embed_with, load_chemberta

        model = load_chemberta(args.model)
        return lambda smiles: embed_with(model, smiles, pooling=args.pooling, batch_size=args.batch_size)
    if args.command == "morgan":
        return lambda smiles: morgan_fingerprints(smiles, radius=args.radius, n_bits=args.bits, counts=args.counts)
    return rdkit_descriptors


def write_features(path, sm_name, smiles, features):
    """Atomic .npz with string arrays only, so it loads without pickle."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sm_name=np.asarray(sm_name, dtype=str), smiles=np.asarray(smiles, dtype=str),
                 features=np.asarray(features, dtype=np.float32))


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    if Path(args.out).suffix != ".npz":
        raise UserError(f"--out must end in .npz (it stores SMILES next to the features), got {args.out!r}")
    featurize = _featurizer(args)
    from scp_jax.data.dataset import load_train

    if args.data is None:
        from scp_jax.data.synth import default_world

        args.data = default_world() / "de_train.parquet"
    train = load_train(args.data)
    start = time.perf_counter()
    with smiles_errors_of(train):
        features = featurize(list(train.compound_smiles))
    write_features(args.out, train.compounds, train.compound_smiles, features)
    print(f"wrote {args.out}: {args.command} features {features.shape[0]} compounds x {features.shape[1]} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
