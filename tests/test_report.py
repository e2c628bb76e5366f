"""report.png from a hand-made run dir: written atomically, also without validation, clear errors."""

import json
import math

from scp_jax.report import draw, main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINES = {"zeros": 1.29, "cell_mean": 1.24, "cell_median": 1.25, "compound_mean": 1.27,
             "compound_median": 1.28, "additive": 1.21}


def make_run(run_dir, val, running, ensemble=1.17, baselines=BASELINES, statuses=None, scheme="kfold"):
    """A run dir with metrics.jsonl (members x epochs) and cv.json; member scores are their best val score."""
    members, epochs = len(val), len(val[0])
    with (run_dir / "metrics.jsonl").open("w") as f:
        for e in range(epochs):
            line = {"epoch": e + 1, "train_loss": [1.0 / (e + 1 + m) for m in range(members)],
                    "val_mrrmse": [val[m][e] for m in range(members)], "running": [running[m][e] for m in range(members)]}
            f.write(json.dumps(line) + "\n")  # json writes NaN for float("nan")
    rows = []
    for m in range(members):
        scores = [v if running[m][e] and not math.isnan(v) else math.inf for e, v in enumerate(val[m])]
        best = min(range(epochs), key=scores.__getitem__)
        rows.append({"member": m, "seed": m, "fold": m % 2, "cv_mrrmse": None if math.isinf(scores[best]) else scores[best],
                     "best_epoch": best + 1 if not math.isinf(scores[best]) else epochs,
                     "status": (statuses or ["completed"] * members)[m]})
    cv = {"scheme": scheme, "folds": 2 if scheme == "kfold" else 0, "ensemble_cv_mrrmse": ensemble,
          "baselines_cv_mrrmse": baselines, "members": rows}
    (run_dir / "cv.json").write_text(json.dumps(cv))
    return run_dir


def check_png(run_dir):
    png = run_dir / "report.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > len(PNG_MAGIC)
    assert sorted(p.name for p in run_dir.iterdir()) == ["cv.json", "metrics.jsonl", "report.png"]  # no temp files


def test_report_kfold(tmp_path):
    nan = float("nan")
    val = [[1.5, 1.3, 1.2, 1.18, 1.19, 1.2],
           [1.6, 1.4, nan, 1.22, 1.21, 1.23],  # one epoch without a score
           [1.5, 1.25, 1.3, 1.35, 1.4, 1.4],   # early-stopped after epoch 4: values after it are not training
           [1.4, 1.3, 1.24, 1.2, 1.19, 1.185]]
    running = [[True] * 6, [True] * 6, [True] * 4 + [False] * 2, [True] * 6]
    make_run(tmp_path, val, running, statuses=["completed", "completed", "early_stopped", "completed"])
    assert write_report(tmp_path) == tmp_path / "report.png"
    check_png(tmp_path)


def test_curves_zoom_past_early_epochs_but_keep_every_best_in_view(tmp_path):
    val = [[9.0, 1.3, 1.2, 1.18],  # a first epoch far above everything
           [2.4, 2.1, 2.0, 2.05]]  # a hard fold: its whole curve above every reference line
    make_run(tmp_path, val, [[True] * 4] * 2)
    bottom, top = draw(tmp_path).axes[0].get_ylim()
    assert 2.0 < top < 9.0 and bottom < 1.17


def test_report_full_without_scores(tmp_path):
    nan = float("nan")
    make_run(tmp_path, [[nan] * 5] * 3, [[True] * 5] * 3, ensemble=None, baselines=None, scheme="full")
    write_report(tmp_path)
    check_png(tmp_path)


def test_cli_missing_cv_json(tmp_path, cli_error):
    make_run(tmp_path, [[1.3, 1.2]], [[True, True]])
    (tmp_path / "cv.json").unlink()
    cli_error(main, [tmp_path], "cv.json")
    assert not (tmp_path / "report.png").exists()
