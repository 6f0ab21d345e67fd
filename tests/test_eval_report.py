"""The evaluation report puts the eval and eval_ood splits side by side, and a demo whose server
does not come up still reports its figures (no model needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jobs.demo as demo  # noqa: E402
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


def test_demo_server_start_is_retried_once_and_a_failed_chat_keeps_the_report(monkeypatch, tmp_path, capsys):
    import serve.demo

    calls = []

    def flaky(checkpoint, turns, log_path):
        calls.append(log_path)
        if len(calls) == 1:
            raise RuntimeError("`serve run` exited with code 1 before the app was up")
        return ["red"]

    monkeypatch.setattr(demo, "chat_turns", lambda data: ([["What colour?"]], ["red"]))
    monkeypatch.setattr(serve.demo, "serve_and_chat", flaky)
    chat = demo.serve_chat(demo.DEMOS["tiny"], tmp_path, tmp_path / "logs")
    assert chat == [("What colour?", "red", "red")]
    assert [Path(p).name for p in calls] == ["serve.log", "serve-retry.log"]
    assert "exited with code 1" in capsys.readouterr().err

    def down(checkpoint, turns, log_path):
        raise TimeoutError("the app was not healthy after 300 s")

    monkeypatch.setattr(serve.demo, "serve_and_chat", down)
    assert demo.serve_chat(demo.DEMOS["tiny"], tmp_path, tmp_path / "logs") is None
    report = demo.write_report(tmp_path, _result(0.9), {"evaluate": 10.0}, None).read_text()
    assert "| **overall** | **90.0%** |" in report and "The server did not come up" in report
