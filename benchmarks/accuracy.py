"""Accuracy of each recipe in configs/ on the synthetic world: CV, hidden truth, baselines, oracles.

Each recipe runs from the CLI exactly as a user would run it (`python -m scp_jax.train --config
configs/NAME.toml --ensemble N`), on the default synthetic world (18,211 genes), then its
submission is scored against the world's hidden truth next to the baselines (fitted on all
training rows), the Bayes oracle and the effect oracle (see scp_jax/data/synth.py). Writes
benchmarks/results/accuracy.{json,md} and each run's report.png as accuracy-RECIPE-report.png
(`--results` another folder), with the device the wall times ran on.

    python benchmarks/accuracy.py                         # every recipe, --ensemble 20
    python benchmarks/accuracy.py --recipes default --update            # rerun one recipe, keep the others
    python benchmarks/accuracy.py --recipes default --set model.rank=48 --name try1 --keep runs/
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("default", "transformer", "first_place", "second_place", "third_place")
RESULTS = ROOT / "benchmarks" / "results"


def run_recipe(recipe, ensemble, overrides, work):
    """Train one recipe through the CLI; (run dir, wall seconds)."""
    out = work / recipe
    command = [sys.executable, "-m", "scp_jax.train", "--config", str(ROOT / "configs" / f"{recipe}.toml"),
               "--ensemble", str(ensemble), "--out", str(out)]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return out, seconds


def device_label():
    """What the runs' wall times ran on: the accelerator's name, else the CPU core count."""
    import jax

    device = jax.devices()[0]
    return f"{os.cpu_count()} CPU cores" if device.platform == "cpu" else device.device_kind


def measure(recipe, ensemble, overrides, work, report_png):
    from scp_jax.config import load_config
    from scp_jax.data.score import ORACLES, score
    from scp_jax.data.synth import default_world

    run_dir, seconds = run_recipe(recipe, ensemble, overrides, work)
    cv = json.loads((run_dir / "cv.json").read_text())
    data = load_config(run_dir / "config.toml").data  # the world it trained on, e.g. with --set data.synth_genes=64
    if data.train:
        raise SystemExit(f"{recipe}: trained on {data.train}, which has no hidden truth to score against")
    hidden = score(default_world(genes=data.synth_genes, seed=data.synth_seed), run_dir / "submission.csv")
    shutil.copyfile(run_dir / "report.png", report_png)
    return {"recipe": recipe, "overrides": list(overrides), "members": len(cv["members"]), "scheme": cv["scheme"],
            "seconds": round(seconds, 1), "device": device_label(), "cv": cv["ensemble_cv_mrrmse"],
            "cv_baselines": cv["baselines_cv_mrrmse"],
            "hidden": hidden["submission"], "hidden_baselines": {k: v for k, v in hidden.items()
                                                                 if k not in ("submission", *ORACLES)},
            **{name: hidden.get(name) for name in ORACLES}}


def markdown(rows):
    """The table the README shows: one line per recipe, then the references."""
    first = rows[0]
    best_name = min(first["hidden_baselines"], key=first["hidden_baselines"].get)
    best, oracle, reachable = first["hidden_baselines"][best_name], first["oracle"], first["effect_oracle"]
    devices = ", ".join(dict.fromkeys(r.get("device", "2 CPU cores") for r in rows))  # rows before the field: CPU
    lines = ["| recipe | members | CV scheme | CV MRRMSE | hidden MRRMSE | gap closed | reachable gap closed |"
             f" wall ({devices}) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        closed = (best - r["hidden"]) / (best - oracle)
        closed_reachable = (best - r["hidden"]) / (best - reachable)
        cv = f"{r['cv']:.4f}" if r["cv"] is not None else "-"
        lines.append(f"| {r['recipe']} | {r['members']} | {r['scheme']} | {cv} | {r['hidden']:.4f} | {closed:.0%} |"
                     f" {closed_reachable:.0%} | {r['seconds']:.0f} s |")
    lines += ["", "| reference | CV MRRMSE (" + first["scheme"] + ") | hidden MRRMSE |", "|---|---|---|"]
    for name, value in sorted(first["hidden_baselines"].items(), key=lambda kv: kv[1]):
        cv = first["cv_baselines"][name] if first["cv_baselines"] else None
        lines.append(f"| {name} | {cv:.4f} | {value:.4f} |" if cv is not None else f"| {name} | - | {value:.4f} |")
    lines.append(f"| effect oracle (knows every effect, not the query row's cell count) | - | {reachable:.4f} |")
    lines.append(f"| Bayes oracle (also knows each query row's cell count and quality) | - | {oracle:.4f} |")
    lines += ["", f"Gap closed = (best baseline - recipe) / (best baseline - oracle) on the hidden truth; reachable gap"
              f" closed uses the effect oracle instead. Best baseline: {best_name} {best:.4f}, effect oracle"
              f" {reachable:.4f}, Bayes oracle {oracle:.4f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--ensemble", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    parser.add_argument("--name", default="accuracy", help="results file stem under benchmarks/results/")
    parser.add_argument("--update", action="store_true", help="keep the other recipes' rows of NAME.json")
    parser.add_argument("--keep", metavar="DIR", help="keep each recipe's run dir as DIR/RECIPE (default: deleted)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results (default: %(default)s)")
    args = parser.parse_args(argv)
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    recipes = args.recipes.split(",")
    keep = Path(args.keep).resolve() if args.keep else None  # resolved: train runs from the repo root
    # train refuses a run dir that holds files: say so before hours of other recipes
    taken = [r for r in recipes if keep and (keep / r).is_dir() and any((keep / r).iterdir())]
    if taken:
        parser.error(f"--keep {args.keep}: {taken[0]}/ already holds a run; pick another DIR")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = keep or Path(scratch)
        for recipe in recipes:
            report_png = results / f"{args.name}-{recipe}-report.png"
            rows.append(measure(recipe, args.ensemble, args.set, work, report_png))
            print(json.dumps({k: rows[-1][k] for k in ("recipe", "members", "seconds", "cv", "hidden")}), flush=True)
    if args.update and (results / f"{args.name}.json").is_file():
        fresh = {r["recipe"]: r for r in rows}
        old = json.loads((results / f"{args.name}.json").read_text())
        rows = [fresh.pop(r["recipe"], r) for r in old] + list(fresh.values())
    (results / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
