"""How ``make demo`` shows a job: its output in a log file, one summary line on the terminal."""

import json
import sys

import pytest

from jobs.demo import describe, with_overrides, steps
from jobs.steplog import StepFailed, last_json, run_logged

NOISY = "import json, sys\nfor i in range(50): print(f'progress {i}', file=sys.stderr)\nprint(json.dumps({'dialogues': 7}))"


def test_output_goes_to_the_log_and_not_the_terminal(tmp_path, capsys):
    log = tmp_path / "logs" / "synthesize.log"
    seconds = run_logged("synthesize", [sys.executable, "-c", NOISY], log, cwd=tmp_path, env={}, verbose=False)
    assert seconds >= 0 and capsys.readouterr().out == ""
    text = log.read_text()
    assert "progress 49" in text and last_json(log) == {"dialogues": 7}


def test_verbose_streams_the_output_too(tmp_path, capsys):
    run_logged("x", [sys.executable, "-c", NOISY], tmp_path / "x.log", cwd=tmp_path, env={}, verbose=True)
    assert "progress 49" in capsys.readouterr().out


def test_a_failed_job_shows_its_tail_and_the_log_path(tmp_path, capsys):
    log = tmp_path / "bad.log"
    with pytest.raises(StepFailed, match=str(log)):
        run_logged("bad", [sys.executable, "-c", "print('why it broke'); raise SystemExit(3)"], log,
                   cwd=tmp_path, env={}, verbose=False)
    out = capsys.readouterr().out
    assert "exit code 3" in out and "why it broke" in out


def test_summaries_and_overrides(tmp_path):
    assert describe("synthesize", {"media": {"image/train": 9, "image/eval": 1, "audio/train": 4}, "dialogues": 30},
                    tmp_path) == "10 images, 4 beep clips, 30 dialogues"
    assert "12 steps, loss 5.000 -> 1.5" in describe("finetune", {"steps": 12, "loss": 1.5, "first_loss": 5.0}, tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps({"overall": 0.5, "counts": {"turns": 8}}))
    assert describe("evaluate", {}, tmp_path) == "50.0% exact match on 8 held-out turns"
    out = with_overrides(steps(tmp_path), ["finetune:train.max_steps=5"])
    assert out[3].name == "finetune" and out[3].argv[-1] == "train.max_steps=5"
    with pytest.raises(SystemExit, match="STEP:key=value"):
        with_overrides(steps(tmp_path), ["nosuchstep:a=1"])
