import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import features  # noqa: E402  (benchmarks/features.py)


def test_features_benchmark_quick_writes_both_tables(tmp_path):
    features.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "features-quick.json").read_text())  # --quick leaves features.* alone
    assert {row["cv"] for row in report["rows"]} == {"kfold", "b_myeloid"}
    for row in report["rows"]:
        assert row["cv_mrrmse"] > 0 and row["hidden_mrrmse"] > 0
    assert report["hidden_references"]["oracle"] < report["hidden_references"]["zeros"]
    assert "| + SVD targets |" in (tmp_path / "features-quick.md").read_text()
