"""The whole chain on one machine: ``make demo`` (tiny preset) and ``make demo-real`` (small-real).

Usage:
    python jobs/demo.py                 # reuse whatever earlier runs finished
    python jobs/demo.py --preset small-real   # real Whisper-base + SmolLM2-135M: outputs/demo-real
    python jobs/demo.py --fresh         # start over (removes outputs/demo)
    python jobs/demo.py --until evaluate   # stop before serving
    python jobs/demo.py --verbose       # every job's full output on the terminal too

Starts its own local Ray (``ray start --head`` on 127.0.0.1, stopped by PID at the end) and runs
each job as a user would on a cluster, with ``RAY_ADDRESS`` pointing at it:

    [weights] -> synthesize -> features -> pretrain (stage 1) -> finetune (stage 2) -> evaluate
    -> serve (``serve run serve.app:build``) and a 3-turn chat through the OpenAI API

The small-real preset first materialises its real weights (jobs/weights.py, cached), speaks
phrases in English and Malay with espeak-ng besides the shapes and beeps, trains stage 2 with
LoRA, reports transcription (eval.json's ``speech``) and chats about a real alsa-utils recording.

A step whose output is already complete is skipped, so a rerun resumes where the last one
stopped. Everything lands under ``outputs/demo/``: ``data/`` (media, features, dialogues),
``stage1/`` and ``stage2/`` (exports + metrics), ``eval.json``, PNG plots and ``report.md``.

The terminal gets one line per step, the chat and the accuracy table. Each job's whole output is
in ``outputs/demo/logs/<step>.log``, the local cluster's own logs in ``outputs/demo/logs/ray/``
and the server's in ``outputs/demo/logs/serve.log``; ``--verbose`` (or ``MMM_VERBOSE=1``) also
streams every job's output to the terminal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.steplog import StepFailed, last_json, run_logged, verbose_from_env  # noqa: E402


@dataclass
class Step:
    name: str
    done_marker: str | None
    """A file (relative to the demo folder) that exists only once the step finished; None: the
    step is idempotent and cheap to rerun, so it always runs."""
    argv: list[str]


@dataclass(frozen=True)
class Demo:
    """What differs between the demos of two presets."""

    preset: str
    out: str
    synthesize: tuple[str, ...] = ()
    """The synthesizer's key=value settings beyond its defaults."""
    weights: bool = False
    """Materialise the preset's real weights first (jobs/weights.py)."""
    evaluate: tuple[str, ...] = ()
    """The evaluation's key=value settings beyond its defaults."""


DEMOS = {
    "tiny": Demo("tiny", "outputs/demo"),
    # 3000 spoken phrases (1500 a language, one in eight held out) carry the transcription: held-out
    # word accuracy grew with the distinct clips (1000 -> 2000 -> 3000, one recipe: English 0.79 ->
    # 0.87 -> 0.90, Malay 0.79 -> 0.81 -> 0.89) more than with steps; 100 shapes and 60 beep clips
    # keep the other kinds in training. Pretrained Whisper encodes a 30 s window per clip whatever
    # its length (~0.4-2 s of one core), so the clip count sets the features step's time (~22
    # minutes here); an answer costs a 135M-parameter LM's decode, so 50 dialogues a split are
    # scored (docs/LEARNING.md, "small-real")
    "small-real": Demo("small-real", "outputs/demo-real", weights=True, synthesize=(
        "offline.speech=true", "offline.num_speech=3000", "offline.num_images=100", "offline.num_audio=60",
        "dialogues.num_dialogues=2000", "dialogues.speech_rate=0.5"), evaluate=("max_dialogues=50",)),
}


def steps(out: Path, demo: Demo = DEMOS["tiny"]) -> list[Step]:
    data = out / "data"
    model = [] if demo.preset == "tiny" else [f"model.preset={demo.preset}"]
    return [Step("weights", None, ["jobs/weights.py", demo.preset])] * demo.weights + [
        Step("synthesize", "data/dialogues", ["jobs/synthesize.py", f"out={data}", *demo.synthesize]),
        Step("features", None,  # skips media already in the feature store
             ["jobs/features.py", f"source={data}/manifest.parquet", f"out={data}", *model]),
        Step("pretrain", "stage1/final/mmm.json",
             ["jobs/pretrain.py", "--data", str(data), f"run.output_dir={out}/stage1",
              f"run.storage_path={out}/ray_results", "run.name=demo-stage1", *model]),
        Step("finetune", "stage2/final/mmm.json",
             ["jobs/finetune.py", "--data", str(data), f"model.init={out}/stage1/final",
              f"run.output_dir={out}/stage2", f"run.storage_path={out}/ray_results", "run.name=demo-stage2"]),
        Step("evaluate", "eval.json",
             ["jobs/evaluate.py", f"model={out}/stage2/final", f"data={data}", f"out={out}",
              f"metrics=[{out}/stage1/metrics.jsonl, {out}/stage2/metrics.jsonl]", *demo.evaluate]),
    ]


def with_overrides(all_steps: list[Step], overrides: list[str]) -> list[Step]:
    """Append each ``STEP:key=value`` to that step's command line (a bad step name is an error)."""
    by_name = {s.name: s for s in all_steps}
    for item in overrides:
        name, sep, kv = item.partition(":")
        if not sep or name not in by_name or "=" not in kv:
            raise SystemExit(f"--set {item!r}: expected STEP:key=value with STEP one of {sorted(by_name)}")
        by_name[name].argv.append(kv)
    return all_steps


def run_step(step: Step, out: Path, env: dict, verbose: bool) -> float:
    marker = out / step.done_marker if step.done_marker else None
    if marker is not None and marker.exists():
        print(f"{step.name}: done earlier ({_shown(marker)}), skipped", flush=True)
        return 0.0
    log = out / "logs" / f"{step.name}.log"
    if verbose:
        print(f"\n== {step.name}: python {' '.join(step.argv)}", flush=True)
    seconds = run_logged(step.name, [sys.executable, "-u", *step.argv], log, cwd=REPO, env=env, verbose=verbose)
    if marker is not None and not marker.exists():
        raise StepFailed(f"step {step.name} finished but did not write {marker}; see {_shown(log)}")
    print(f"{step.name}: {seconds:.0f} s, {describe(step.name, last_json(log) or {}, out)}", flush=True)
    return seconds


def describe(name: str, summary: dict, out: Path) -> str:
    """The figures a reader wants from each job's last-line JSON summary, in a few words."""
    if name == "synthesize":
        media = summary.get("media", {})
        count = lambda kind: sum(v for k, v in media.items() if k.startswith(kind))  # noqa: E731
        spoken = f", {count('speech')} spoken phrases" if count("speech") else ""
        return f"{count('image')} images, {count('audio')} beep clips{spoken}, {summary.get('dialogues')} dialogues"
    if name == "features":
        enc = summary.get("encoded", {})
        return (f"{sum(enc.values())} items encoded ({', '.join(f'{v} {k}' for k, v in enc.items())}), "
                f"{summary.get('skipped', 0)} already stored, {summary.get('errors', 0)} errors")
    if name in ("pretrain", "finetune"):
        loss = summary.get("loss")
        return (f"{summary.get('steps')} steps, loss {summary.get('first_loss', float('nan')):.3f} -> "
                f"{loss if loss is None else round(loss, 3)}, {summary.get('train_seconds')} s of training")
    if name == "evaluate" and (out / "eval.json").exists():
        ev = json.loads((out / "eval.json").read_text())
        return f"{ev['overall']:.1%} exact match on {ev['counts']['turns']} held-out turns"
    return "done"


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def chat_turns(data: Path):
    """Two held-out images and two held-out clips with known facts, asked about over 3 turns
    (the third in Malay). Returns the turns as OpenAI parts and the expected answers."""
    import pyarrow.parquet as pq

    from mmm.media import decode_audio, decode_image
    from serve.demo import audio_part, image_part

    rows = [r for r in pq.read_table(data / "manifest.parquet").to_pylist() if r["split"] == "eval"]
    images = [r for r in rows if r["modality"] == "image"][:2]
    clips = [r for r in rows if r["modality"] == "audio"][:2]
    load = lambda r: (data / r["uri"]).read_bytes()  # noqa: E731 (uris are relative to the data root)
    im = [image_part(decode_image(load(r))) for r in images]
    au = [audio_part(decode_audio(load(r))) for r in clips]
    facts = [json.loads(r["facts"]) for r in images + clips]
    turns = [  # bare media parts: the server numbers them (Image 1, Image 2, ...) and ends their lines
        [im[0], im[1], "What colour are the shapes in image 1?"],
        [au[0], au[1], "How many beeps are in audio 2?"],
        ["Berapa banyak bentuk dalam gambar 2?"],
    ]
    # a named item's answer starts with its name (pipelines/synth/questions.py)
    expected = [f"image 1 {facts[0]['colour']}", f"audio 2 {facts[3]['count']}", f"gambar 2 {facts[1]['count']}"]
    return turns, expected


def real_chat_turns(data: Path):
    """small-real: a real human recording (alsa-utils), a held-out spoken Malay phrase and an
    image, over 3 turns. Returns the turns and the expected answers."""
    import pyarrow.parquet as pq

    from evaluation.speech import real_recordings
    from mmm.media import decode_audio, decode_image
    from serve.demo import audio_part, image_part

    rows = [r for r in pq.read_table(data / "manifest.parquet").to_pylist() if r["split"] == "eval"]
    phrase = next(r for r in rows if r["kind"] == "speech" and json.loads(r["facts"])["lang"] == "ms"
                  and json.loads(r["facts"])["group"] == "seen")
    image = next(r for r in rows if r["kind"] == "image")
    load = lambda r: (data / r["uri"]).read_bytes()  # noqa: E731
    recording = next(((p, t) for p, t in real_recordings() if t != "no speech"), None)
    if recording is None:
        raise RuntimeError("no real recording found: apt-get install alsa-utils")
    turns = [
        [audio_part(decode_audio(recording[0].read_bytes())), "What is said in the audio?"],
        [audio_part(decode_audio(load(phrase))), "Apakah yang disebut dalam audio 2?"],
        [image_part(decode_image(load(image))), "What colour are the shapes in the image?"],
    ]
    return turns, [recording[1], json.loads(phrase["facts"])["phrase"], json.loads(image["facts"])["colour"]]


def accuracy_table(ev: dict) -> str:
    """Held-out media drawn like the training media, and (when present) their out-of-range twins."""
    ood = ev.get("ood") or {}
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = ["| group | held-out (eval) | other rendering (eval_ood) |", "| --- | --- | --- |",
             f"| **overall** | **{pct(ev['overall'])}** | **{pct(ood.get('overall'))}** |"]
    lines += [f"| {k} | {pct(v)} | {pct(ood.get('by_kind', {}).get(k))} |" for k, v in sorted(ev["by_kind"].items())]
    lines += [f"| lang={k} | {pct(v)} | {pct(ood.get('by_lang', {}).get(k))} |" for k, v in sorted(ev["by_lang"].items())]
    return "\n".join(lines)


SERVE_LOGS = ("serve.log", "serve-retry.log")
"""The server's log of each try (under the demo's logs/)."""


def write_report(out: Path, ev: dict, timings: dict, chat: list[tuple] | None, preset: str = "tiny") -> Path:
    """report.md; ``chat`` None says the server did not come up (the figures above it still stand)."""
    lines = [f"# MMM demo report ({preset} preset)", "", "## Accuracy on held-out media (exact match)", "",
             accuracy_table(ev), "", f"Eval loss: {ev.get('loss', float('nan')):.3f}", ""]
    if ev.get("speech"):
        from evaluation.speech import table as speech_table

        lines += ["## Transcription of held-out speech (speech in eval.json)", "", "```", speech_table(ev["speech"]),
                  "```", ""]
    lines += ["![accuracy](accuracy.png)", "", "## Training loss", "", "![loss](loss.png)", "",
              "tensorboard --logdir " + str(out), "", "## A conversation through the OpenAI API", ""]
    if chat is None:
        lines += ["The server did not come up: see " + " and ".join(f"logs/{name}" for name in SERVE_LOGS) + "."]
    from evaluation.exact import normalize  # the evaluation's own notion of a right answer

    for q, a, want in chat or []:
        verdict = "right" if normalize(a) == normalize(want) else "wrong"
        lines += [f"- **user:** {q}", f"  **mmm:** {a} (expected: {want}; {verdict})"]
    lines += ["", "## Step timings (s)", ""] + [f"- {k}: {v:.0f}" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve_chat(demo: Demo, out: Path, logs: Path) -> list[tuple] | None:
    """Serve the stage-2 export and hold the demo's 3-turn chat: (question, answer, expected) per
    turn, or None (said on stderr) when the server does not come up."""
    from serve.demo import serve_and_chat

    turns, expected = (chat_turns if demo.preset == "tiny" else real_chat_turns)(out / "data")
    print("\nA 3-turn chat through the OpenAI API (serve run serve.app:build):", flush=True)
    answers = None
    # Two tries: `serve run` starts its own Ray, whose raylet must register with the GCS within a
    # wait that Ray fixes at 30 s; on a machine still busy with other work that can fail once.
    for log in (logs / name for name in SERVE_LOGS):
        try:
            answers = serve_and_chat(str(out / "stage2" / "final"), turns, log_path=str(log))
            break
        except (RuntimeError, TimeoutError) as e:
            print(f"serve: {e}; its log: {_shown(log)}", file=sys.stderr)
    if answers is None:
        return None
    names = {"image_url": "[image]", "input_audio": "[audio]"}
    texts = ["".join(p if isinstance(p, str) else names[p["type"]] for p in turn).replace("\n", " ") for turn in turns]
    return list(zip(texts, answers, expected))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(DEMOS), default="tiny", help="whose demo to run")
    ap.add_argument("--out", default=None, help="the demo folder (default: outputs/demo, outputs/demo-real)")
    ap.add_argument("--fresh", action="store_true", help="remove the demo folder first")
    ap.add_argument("--until", choices=[s.name for s in steps(Path("."), DEMOS["small-real"])] + ["serve"], default="serve")
    ap.add_argument("--set", action="append", default=[], metavar="STEP:key=value",
                    help="an override for one step's job, e.g. finetune:train.max_steps=100 (repeatable)")
    ap.add_argument("--verbose", action="store_true", default=verbose_from_env(),
                    help="stream every job's output to the terminal too (also MMM_VERBOSE=1)")
    args = ap.parse_args(argv)
    demo = DEMOS[args.preset]
    out = (REPO / (args.out or demo.out)).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    from jobs.local_ray import LocalRayCluster

    start, timings, logs = time.time(), {}, out / "logs"
    cluster = LocalRayCluster(num_cpus=4)  # logical CPUs > cores: Ray Data's actors never starve
    print(f"local Ray cluster on 127.0.0.1; logs of every step in {_shown(logs)}/", flush=True)
    env = cluster.env | {"RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}", "PYTHONPATH": str(REPO)}
    try:
        try:
            cluster.start()  # inside the outer try: a start that times out still leaves daemons to stop
        except RuntimeError as e:
            raise StepFailed(f"the local Ray cluster did not start: {e}") from e
        for step in with_overrides(steps(out, demo), args.set):
            timings[step.name] = run_step(step, out, env, args.verbose)
            if step.name == args.until:
                break
    except StepFailed as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        cluster.stop(keep_logs=logs / "ray")
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else None
    chat: list[tuple] | None = []
    if args.until == "serve":
        t = time.time()
        chat = serve_chat(demo, out, logs)
        timings["serve + chat"] = time.time() - t
    if ev is not None:
        print("Accuracy on held-out media:\n" + accuracy_table(ev))
        if ev.get("speech"):
            from evaluation.speech import table as speech_table

            print("\nTranscription of held-out speech (1 - WER):\n" + speech_table(ev["speech"]))
        print(f"\nreport: {_shown(write_report(out, ev, timings, chat, demo.preset))}")
    print(f"demo finished in {time.time() - start:.0f} s")
    return 1 if chat is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
