"""What precision and low-rank gradients do to accuracy: one recipe on the synthetic world, once per variant.

Each variant trains the recipe from the CLI (as benchmarks/accuracy.py does) with `precision` and
`lowrank_grads` set, and is scored by its CV and against the hidden truth. Writes
benchmarks/results/precision.{json,md}.

    python benchmarks/precision.py                      # third_place (an MLP), 20 members
    python benchmarks/precision.py --recipe ci --ensemble 4
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from accuracy import RESULTS, measure

from scp_jax.atomic import write_text

VARIANTS = {
    "fp32": ["precision=fp32"],
    "bf16 compute": ["precision=bf16"],
    "bf16 state": ["precision=bf16_state"],
    "fp32, low-rank gradients": ["precision=fp32", "lowrank_grads=true"],
    "bf16 state, low-rank gradients": ["precision=bf16_state", "lowrank_grads=true"],
}


def markdown(recipe, rows):
    lines = [f"# Precision on the synthetic world: recipe `{recipe}`, {rows[0]['members']} members", "",
             f"CV: {rows[0]['scheme']}, out of fold. Hidden: the submission against the world's hidden truth.", "",
             "| variant | CV MRRMSE | hidden MRRMSE | wall (2 CPU cores) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['cv']:.4f} | {r['hidden']:.4f} | {r['seconds']:.0f} s |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="third_place")
    parser.add_argument("--ensemble", type=int, default=20)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, (variant, overrides) in enumerate(VARIANTS.items()):
            work = Path(scratch) / str(i)
            row = measure(args.recipe, args.ensemble, overrides, work, work / "report.png")
            rows.append({"variant": variant, **row})
            print(json.dumps({k: row[k] for k in ("seconds", "cv", "hidden")} | {"variant": variant}), flush=True)
    write_text(RESULTS / "precision.json", json.dumps(rows, indent=2) + "\n")
    write_text(RESULTS / "precision.md", markdown(args.recipe, rows))
    print(markdown(args.recipe, rows))


if __name__ == "__main__":
    sys.exit(main())
