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
    chat = [("What colour?", "Image 1 red.", "image 1 red"), ("How many beeps?", "audio 2 2", "audio 2 1")]
    report = demo.write_report(tmp_path, _result(0.9), {"evaluate": 10.0}, chat).read_text()
    assert "(expected: image 1 red; right)" in report and "(expected: audio 2 1; wrong)" in report


def test_every_kind_scored_is_in_by_kind_so_the_kinds_add_up_to_overall():
    from evaluation.exact import score

    prompts = [{"reference": "red", "kind": k, "lang": "en"} for k in ("visual_context", "text", "my_chat")]
    result = score(prompts, ["red", "blue", "red"])
    assert result["by_kind"] == {"visual_context": 1.0, "my_chat": 1.0, "text": 0.0}
    assert sum(result["counts"]["by_kind"].values()) == result["counts"]["turns"] == 3


def test_answers_may_be_as_long_as_the_longest_reference():
    from evaluation.exact import ANSWER_MARGIN, answer_budget
    from mmm.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    verdict = "segi empat dan bulatan, jadi ya"
    budget = answer_budget(tok, [{"reference": "red"}, {"reference": verdict}])
    assert budget == len(tok(verdict, add_special_tokens=False).input_ids) + ANSWER_MARGIN


def test_speech_exact_counts_seen_phrases_and_unseen_ones_apart():
    from evaluation.speech import score, word_errors

    items = [{"lang": "en", "phrase": p, "group": g} for p, g in
             [("red cat", "seen"), ("blue dog", "seen"), ("green owl", "unseen"), ("no speech", "none")]]
    result = score(items, ["Red, cat.", "blue", "green owl", "no speech"])["en"]
    assert result == {"clips": 4, "exact": 0.5, "word_accuracy": 0.75, "unseen_exact": 1.0,
                      "unseen_word_accuracy": 1.0, "no_speech": 1.0}
    assert word_errors("a", "b c d e") == (4, 1)
    assert score(items[:1], ["b c d e"])["en"]["word_accuracy"] == 0.0  # WER above 1 is no accuracy, not less
    assert score(items[:1], [""])["en"]["word_accuracy"] == 0.0


def test_ood_column_scores_the_twins_of_the_eval_dialogues_scored(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.evaluate import EvalConfig, load_split, ood_rows
    from mmm.schema import DIALOGUES

    def row(i: int, split: str, suffix: str = "") -> dict:
        return {"dialogue_id": f"d{i:02d}{suffix}", "kind": "visual_context", "lang": "en", "media_ids": [],
                "messages": [], "split": split, "source": "test"}

    # d01 has no twin (a spoken phrase's dialogue has none), so the first 3 eval_ood rows are not twins of the first 3 eval rows
    rows = [row(i, "eval") for i in range(6)] + [row(i, "eval_ood", "-ood") for i in range(6) if i != 1]
    (tmp_path / "dialogues").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=DIALOGUES), tmp_path / "dialogues" / "part.parquet")
    cfg = EvalConfig(data=str(tmp_path), max_dialogues=3)
    scored = load_split(cfg)
    assert [r["dialogue_id"] for r in ood_rows(cfg, scored)] == ["d00-ood", "d02-ood"]
    other = EvalConfig(data=str(tmp_path), max_dialogues=2, ood_split="eval")  # not twins: its own first rows
    assert [r["dialogue_id"] for r in ood_rows(other, scored[:0])] == ["d00", "d01"]
