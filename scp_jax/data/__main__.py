"""python -m scp_jax.data {synth,score,check}: make synthetic worlds, score submissions, validate files."""

import time

from scp_jax.data.dataset import load_id_map, load_train
from scp_jax.errors import ArgumentParser, cli_main


def _parser():
    parser = ArgumentParser(prog="python -m scp_jax.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic world (de_train, id_map, hidden answers)")
    synth.add_argument("--out", required=True, help="world directory to write")
    synth.add_argument("--genes", type=int, default=18211)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--reference", help="dir with the real genes.txt, compounds_smiles.csv, id_map.csv")
    score = commands.add_parser("score", help="MRRMSE of a submission against a world's hidden truth")
    score.add_argument("world", help="world directory")
    score.add_argument("submission", help="submission CSV: id + one column per gene")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check = commands.add_parser("check", help="validate de_train.parquet (and id_map.csv) and summarize")
    check.add_argument("train", help="de_train.parquet")
    check.add_argument("id_map", nargs="?", help="id_map.csv")
    return parser


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from scp_jax.data.synth import make_world

        start = time.perf_counter()
        out = make_world(args.out, genes=args.genes, seed=args.seed, reference=args.reference)
        print(f"wrote world {out} (genes {args.genes}, seed {args.seed}) in {time.perf_counter() - start:.1f}s")
    elif args.command == "score":
        from scp_jax.data.score import report, score

        print(report(score(args.world, args.submission), args.world, args.submission, as_json=args.json))
    else:
        train = load_train(args.train)
        print(f"{args.train}: {len(train.targets)} rows, {len(train.genes)} genes, "
              f"{len(train.cell_types)} cell types, {len(train.compounds)} compounds")
        if args.id_map:
            queries = load_id_map(args.id_map, train)
            print(f"{args.id_map}: {len(queries.ids)} queries")


if __name__ == "__main__":
    main()
