"""Which features help, and which CV scheme predicts the test score? (synthetic world, hidden truth)

For each feature set x CV scheme: train an ensemble on de_train with the id_map queries, report
its CV MRRMSE beside the MRRMSE of its submission against hidden/truth.parquet. Writes
`features.md` and `features.json` to --out.

    python benchmarks/features.py [--quick] [--out benchmarks/results]   # --quick writes features-quick.*
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from scp_jax.atomic import write_text
from scp_jax.config import load_config
from scp_jax.data.dataset import load_id_map, load_train
from scp_jax.data.score import read_answers
from scp_jax.data.synth import default_world, make_world
from scp_jax.engine.trainer import train_ensemble
from scp_jax.metrics import fit_baselines, mrrmse

SCHEMES = ("kfold", "b_myeloid")
FULL = {"genes": 18211, "ensemble": 5, "epochs": 20, "te_svd": 32, "target_svd": 64}
QUICK = {"genes": 64, "ensemble": 2, "epochs": 2, "te_svd": 4, "target_svd": 8}  # and only the last feature set


def feature_sets(settings):
    """(label, config overrides), each adding one thing to the one before."""
    morgan = ['features=["onehot", "morgan"]']
    encoded = ['features=["onehot", "morgan", "target_encoding"]', f"target_encoding.svd={settings['te_svd']}"]
    return [
        ("one-hot", ['features=["onehot"]']),
        ("+ Morgan", morgan),
        ("+ target encodings", encoded),
        ("+ SVD targets", encoded + [f"targets.svd={settings['target_svd']}"]),
    ]


def hidden_references(world, train, queries):
    """Hidden-truth MRRMSE of zeros, the oracle and the baselines fitted on all training rows."""
    truth = read_answers(world / "hidden" / "truth.parquet", train.genes, queries.ids)
    oracle = read_answers(world / "hidden" / "oracle.parquet", train.genes, queries.ids)
    baselines = fit_baselines(train.targets, train.cell_index, train.compound_index, np.ones(len(train.targets), bool),
                              queries.cell_index, queries.compound_index)
    scores = {"oracle": mrrmse(truth, oracle)}
    scores.update({name: mrrmse(truth, pred) for name, pred in baselines.items()})
    return truth, scores


def run(world, settings, sets):
    train = load_train(world / "de_train.parquet")
    queries = load_id_map(world / "id_map.csv", train)
    truth, references = hidden_references(world, train, queries)
    common = [f"ensemble={settings['ensemble']}", f"epochs={settings['epochs']}", "epochs_per_chunk=10"]
    rows, baseline_cv = [], {}
    for label, overrides in sets:
        for scheme in SCHEMES:
            config = load_config(None, common + overrides + [f"cv={scheme}"])
            start = time.perf_counter()
            result = train_ensemble(config, train, queries)
            rows.append({"features": label, "cv": scheme, "cv_mrrmse": result.ensemble_cv,
                         "hidden_mrrmse": mrrmse(truth, result.test_predictions),
                         "seconds": round(time.perf_counter() - start, 1), "config": overrides})
            baseline_cv[scheme] = result.baseline_cv
            print(f"{label:<20} {scheme:<10} CV {result.ensemble_cv:.4f} hidden {rows[-1]['hidden_mrrmse']:.4f}"
                  f" ({rows[-1]['seconds']} s)", flush=True)
    return {"settings": settings, "rows": rows, "hidden_references": references, "baselines_cv": baseline_cv,
            "tracking": tracking(rows)}


def tracking(rows):
    """Per scheme: mean |CV - hidden| and whether CV ranks the feature sets as the hidden truth does."""
    out = {}
    for scheme in SCHEMES:
        mine = [r for r in rows if r["cv"] == scheme]
        cv, hidden = np.array([r["cv_mrrmse"] for r in mine]), np.array([r["hidden_mrrmse"] for r in mine])
        out[scheme] = {"mean_abs_gap": float(np.mean(np.abs(cv - hidden))),
                       "same_ranking": bool((np.argsort(cv) == np.argsort(hidden)).all())}
    return out


def markdown(report):
    s = report["settings"]
    lines = [
        "# Features x CV scheme on the synthetic world",
        "",
        f"World: {s['genes']} genes, seed 0. Ensemble {s['ensemble']} members, {s['epochs']} epochs, default MLP "
        f"(hidden 64-64), target_encoding.svd = {s['te_svd']}, targets.svd = {s['target_svd']} (loss in genes). "
        f"Runtime {s['seconds']:.0f} s.",
        "CV: out-of-fold MRRMSE of the ensemble; hidden: its submission (mean of all members) vs hidden/truth.parquet.",
        "",
        "| features | kfold CV | b_myeloid CV | hidden (kfold members) | hidden (b_myeloid members) |",
        "|---|---|---|---|---|",
    ]
    by = {(r["features"], r["cv"]): r for r in report["rows"]}
    for label in dict.fromkeys(r["features"] for r in report["rows"]):
        k, b = by[(label, "kfold")], by[(label, "b_myeloid")]
        lines.append(f"| {label} | {k['cv_mrrmse']:.4f} | {b['cv_mrrmse']:.4f} | {k['hidden_mrrmse']:.4f} "
                     f"| {b['hidden_mrrmse']:.4f} |")
    ref, cv = report["hidden_references"], report["baselines_cv"]
    lines += ["", "| reference | kfold CV | b_myeloid CV | hidden |", "|---|---|---|---|"]
    lines += [f"| {name} | {cv['kfold'][name]:.4f} | {cv['b_myeloid'][name]:.4f} | {ref[name]:.4f} |"
              for name in ("zeros", "compound_median", "additive")]
    lines.append(f"| oracle | | | {ref['oracle']:.4f} |")
    lines += ["", "| scheme | mean abs(CV - hidden) | ranks feature sets like hidden |", "|---|---|---|"]
    lines += [f"| {scheme} | {t['mean_abs_gap']:.4f} | {t['same_ranking']} |" for scheme, t in report["tracking"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 64 genes, 2 members, 2 epochs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for features.{json,md} (features-quick.* with --quick: the committed results stay)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(tmp, genes=settings["genes"]) if args.quick else default_world(genes=settings["genes"])
        sets = feature_sets(settings)
        report = run(world, settings, sets[-1:] if args.quick else sets)
    settings["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "features-quick" if args.quick else "features"
    write_text(out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    write_text(out / f"{stem}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
