"""benchmarks/recipes.py's table: the variety columns beside FID."""

from __future__ import annotations

from types import SimpleNamespace

from helpers import REPO_ROOT


def test_the_recipes_table_shows_recall_within_class_for_conditional_rows_only(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from recipes import table

    scores = {"epoch": 1, "fid": 6.5, "kid": 0.09, "inception_score": 8.8, "class_coverage": 1.0, "class_kl": 0.005,
              "precision": 0.62, "recall": 0.35}
    results = {"default": {"scores": [{**scores, "recall_within_class": 0.34, "cond_accuracy": 0.96}],
                           "train_seconds": 10.0, "img_per_s": 100.0},
               "default+none": {"scores": [{**scores, "fid": 9.0}], "train_seconds": 10.0, "img_per_s": 100.0}}
    header, _, conditional, unconditional = table(results, SimpleNamespace(floor={"fid": 0.15}), 1).splitlines()
    cells = dict(zip(header.split(" | "), conditional.split(" | ")))
    assert (cells["precision"], cells["recall"], cells["recall in class"], cells["cond acc"]) == ("0.62", "0.35",
                                                                                               "0.34", "0.960")
    assert dict(zip(header.split(" | "), unconditional.split(" | ")))["recall in class"] == "-"
