"""The evaluation report puts the eval and eval_ood splits side by side (no model needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.demo import accuracy_table  # noqa: E402
from jobs.evaluate import table  # noqa: E402


def _result(overall: float) -> dict:
    kinds = {"visual_context": overall, "multi_audio": overall - 0.1}
    return {"overall": overall, "by_kind": kinds, "by_lang": {"en": overall, "ms": overall},
            "by_kind_lang": {f"{k}/{lg}": v for k, v in kinds.items() for lg in ("en", "ms")},
            "counts": {"turns": 20, "by_kind": {k: 10 for k in kinds}}, "loss": 0.5}


def test_tables_show_both_splits_and_only_eval_without_ood():
    both = _result(0.9) | {"ood": _result(0.7)}
    text = table(both)
    assert "ood all" in text.splitlines()[0]
    assert text.splitlines()[-1].split()[1:] == ["90.0%", "90.0%", "90.0%", "70.0%", "70.0%", "70.0%", "20"]
    assert "ood" not in table(_result(0.9))
    md = accuracy_table(both)
    assert "| **overall** | **90.0%** | **70.0%** |" in md and "| multi_audio | 80.0% | 60.0% |" in md
    assert "| **overall** | **90.0%** | **-** |" in accuracy_table(_result(0.9))
