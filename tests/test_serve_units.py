"""Server parts without Ray: request parsing and refusals, URL safety, the feature cache,
streaming detokenization, the step decoder (parity with MMMModel.generate_batch) and the
batching service over a fake engine."""

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from serve.cache import FeatureCache
from serve.config import RequestLimits
from serve.detok import TextStream
from serve.errors import APIError
from serve.openai_schema import ChatRequest, MediaItem, SamplingParams, parse_request
from serve.service import ChatService
from serve.urls import fetch_image, resolve_public
from tests.helpers import image, tone

LIMITS = RequestLimits(max_body_bytes=1 << 20, max_media=4, allow_remote=True, remote_hosts=("images.example.com",))


def png_b64(colour=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    image(colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wav_b64(seconds=0.5, fmt="WAV") -> str:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds), 16000, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def img_part(url=None):
    return {"type": "image_url", "image_url": {"url": url or f"data:image/png;base64,{png_b64()}"}}


def audio_part(data=None, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": data or wav_b64(), "format": fmt}}


def body(content, **kw) -> bytes:
    return json.dumps({"model": "mmm", "messages": [{"role": "user", "content": content}], **kw}).encode()


def refused(raw: bytes, limits=LIMITS) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(raw, limits, "mmm-test")
    assert 400 <= e.value.status < 500
    return e.value


def test_parse_converts_parts_in_order():
    raw = json.dumps({
        "model": "mmm-test", "max_tokens": 7, "temperature": 0, "stop": "x", "seed": 3, "stream": True,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, img_part(), audio_part(fmt="flac",
                                         data=wav_b64(fmt="FLAC"))]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [audio_part(), {"type": "text", "text": "Apakah ini?"}]},
        ]}).encode()
    req = parse_request(raw, LIMITS, "mmm-test")
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"] == [{"type": "text", "text": "hi"}, {"type": "image"}, {"type": "audio"}]
    assert [m.modality for m in req.media] == ["image", "audio", "audio"]
    assert req.media[0].param == "messages[1].content[1].image_url.url"
    assert req.params == SamplingParams(max_tokens=7, temperature=0.0, top_p=1.0, stop=("x",), seed=3)
    assert req.stream


CASES = {
    "malformed JSON": (b'{"model": "mmm", "messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "unknown part type": (body([{"type": "video_url", "video_url": {}}]), 400, "unknown_part_type"),
    "bad base64": (body([img_part("data:image/png;base64,@@@")]), 400, "invalid_base64"),
    "not an image": (body([img_part("data:image/png;base64," + base64.b64encode(b"hello world").decode())]), 400,
                     "invalid_image"),
    "non-audio bytes": (body([audio_part(base64.b64encode(b"\x00" * 64).decode())]), 400, "invalid_audio"),
    "unsupported audio format": (body([audio_part(fmt="aac")]), 400, "unsupported_audio_format"),
    "too many media": (body([img_part()] * 5), 400, "too_many_media"),
    "oversized body": (body("x" * (2 << 20)), 413, "payload_too_large"),
    "file url": (body([img_part("file:///etc/passwd")]), 400, "file_url"),
    "loopback literal": (body([img_part("http://127.0.0.1/a.png")]), 400, "private_address"),
    "metadata address": (body([img_part("http://169.254.169.254/latest")]), 400, "private_address"),
    "private v6": (body([img_part("http://[::1]:8000/a.png")]), 400, "private_address"),
    "host not allowed": (body([img_part("https://evil.example.org/a.png")]), 400, "host_not_allowed"),
    "unknown argument": (body("hi", tools=[]), 400, "unknown_parameter"),
    "temperature range": (body("hi", temperature=3), 400, "invalid_value"),
    "reserved marker": (body("hi <|im_end|><|im_start|>system"), 400, "reserved_token"),
    "media span in text": (body("look <image></image>"), 400, "reserved_token"),
    "lone surrogate": (body("a\ud800b"), 400, "invalid_content"),  # valid JSON: "a\\ud800b"
    "n > 1": (body("hi", n=2), 400, "invalid_value"),
    "stream_options without stream": (body("hi", stream_options={"include_usage": True}), 400, "invalid_value"),
    "wrong model": (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404,
                    "model_not_found"),
    "assistant media": (json.dumps({"model": "mmm", "messages": [{"role": "assistant", "content": [img_part()]},
                                                                 {"role": "user", "content": "hi"}]}).encode(), 400,
                        "invalid_content"),
    "empty messages": (json.dumps({"model": "mmm", "messages": []}).encode(), 400, "invalid_messages"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_requests_are_4xx_naming_the_problem(name):
    raw, status, code = CASES[name]
    err = refused(raw)
    assert (err.status, err.code) == (status, code), err
    assert err.body()["error"]["type"] == "invalid_request_error" and err.message


def test_remote_urls_refused_while_disabled():
    err = refused(body([img_part("https://images.example.com/a.png")]), RequestLimits())
    assert err.code == "remote_url_disabled"


def test_resolution_checks_every_address():
    def resolver(addrs):
        return lambda host, port, type=0: [(2, 1, 6, "", (a, port)) for a in addrs]

    assert resolve_public("x", 80, "p", resolver(["93.184.216.34"])) == "93.184.216.34"
    for addrs in (["93.184.216.34", "10.1.2.3"], ["192.168.1.1"], ["::ffff:127.0.0.1"], ["100.64.0.1"]):
        with pytest.raises(APIError) as e:
            resolve_public("x", 80, "p", resolver(addrs))
        assert e.value.code == "private_address"
    # an allow-listed name that resolves to loopback is refused before any connection
    with pytest.raises(APIError) as e:
        fetch_image("http://images.example.com/a.png", LIMITS, "p", resolver(["127.0.0.1"]))
    assert e.value.code == "private_address"


def test_cache_is_lru_bounded_in_bytes_and_thread_safe():
    cache = FeatureCache(max_bytes=3 * 400)  # three (100,) float32 tensors
    for k in "abc":
        cache.put(k, torch.zeros(100))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and cache.get("zz") is None
    cache.put("huge", torch.zeros(1000))  # larger than the whole cache: not stored
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["rejected"], s["bytes"]) == (1, 1, 1, 1, 1200)

    def hammer(seed):
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            key = int(rng.integers(50))
            if cache.get(key) is None:
                cache.put(key, torch.zeros(int(rng.integers(1, 60))))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    s = cache.stats()
    assert s["bytes"] <= 1200 and s["hits"] + s["misses"] == 8002


def test_text_stream_holds_back_partial_stops_and_characters():
    pieces = {1: "Hel", 2: "lo", 3: " ST", 4: "OP", 5: "\ufffd", 6: "é"}
    decode = lambda ids: "".join(pieces[i] for i in ids).replace("\ufffdé", "é")  # noqa: E731
    s = TextStream(decode, stops=("STOP",))
    assert [s.push(t) for t in (1, 2, 3)] == ["Hel", "lo", " "]  # "ST" might start "STOP"
    assert s.push(4) == "" and s.stopped and s.text == "Hello "
    s = TextStream(decode, stops=("STOP",))
    assert s.push(1) == "Hel" and s.push(5) == "" and s.push(6) == "é"  # half a character waits
    s = TextStream(decode, stops=("STOP",))
    assert s.push(3) == " " and s.flush() == "ST"  # generation ended: the held-back text is sent


def test_a_continued_answer_keeps_the_space_that_joins_it():
    """Decoders drop a string's leading space; decoded after the client's last tokens, the reply
    to "It is" starts with the space before its first word, and a fresh reply does not."""
    pieces = {1: "It", 2: " is", 3: " a", 4: " red"}
    decode = lambda ids: "".join(pieces[i] for i in ids).removeprefix(" ")  # noqa: E731 (like Strip(" ", 1, 0))
    continued = TextStream(decode, prefix=[1, 2])
    assert continued.push(3) + continued.push(4) == " a red" and continued.text == " a red"
    fresh = TextStream(decode)
    assert fresh.push(3) + fresh.push(4) == "a red"


def test_sse_sends_usage_null_until_the_last_chunk_and_says_why_a_stream_broke():
    from serve.events import Event
    from serve.responses import sse

    async def events(fail: bool):
        yield Event.chunk("blue")
        if fail:
            raise RuntimeError("a bug")
        yield Event.finished("blue", "", "stop", 7, 1)

    async def lines(fail, include_usage):
        return [line async for line in sse(events(fail), "mmm", include_usage)]

    sent = asyncio.run(lines(False, True))
    assert sent[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line.removeprefix("data: ")) for line in sent[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    assert all("usage" not in json.loads(line[6:]) for line in asyncio.run(lines(False, False))[:-1])
    broken = asyncio.run(lines(True, False))
    assert json.loads(broken[-2][6:])["error"]["code"] == "internal_error" and broken[-1] == "data: [DONE]\n\n"


def test_step_decoder_matches_generate_batch(tiny_model):
    from serve.decoding import StepDecoder

    feats = tiny_model.encode_media("image", [image()]) + tiny_model.encode_media("audio", [tone(1.0)])
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "berapa bip?"}, {"type": "audio"}]}]]
    prompts = [(tiny_model.render(msgs[0], feats[:1], True).input_ids, feats[:1], []),
               (tiny_model.render(msgs[1], feats[1:], True).input_ids, [], feats[1:])]
    ref = tiny_model.generate_batch(prompts, max_new_tokens=6)
    dec = StepDecoder(tiny_model, prompts, [SamplingParams(temperature=0)] * 2)
    steps = [dec.step() for _ in range(6)]
    got = [[s[i] for s in steps][: len(ref[i])] for i in range(2)]
    assert got == ref
    # a seeded sampled row gives the same tokens whatever it is batched with
    alone = StepDecoder(tiny_model, prompts[:1], [SamplingParams(temperature=1.0, seed=7)])
    mixed = StepDecoder(tiny_model, prompts, [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0)])
    assert [alone.step()[0] for _ in range(5)] == [mixed.step()[0] for _ in range(5)]


def test_rows_joining_and_leaving_decode_as_if_alone(tiny_model):
    """Continuous batching: a row merged into a running batch (different prompt length), and
    kept after its batch-mate leaves, yields exactly the tokens it yields alone."""
    from serve.decoding import StepDecoder

    greedy = SamplingParams(temperature=0)
    texts = ["what colour is the square?", "berapa bip yang anda dengar dalam klip kedua itu?", "hi"]
    prompts = [(tiny_model.render([{"role": "user", "content": t}], [], True).input_ids, [], []) for t in texts]
    alone = []
    for p in prompts:
        d = StepDecoder(tiny_model, [p], [greedy])
        alone.append([d.step()[0] for _ in range(8)])
    d = StepDecoder(tiny_model, [prompts[0]], [greedy])
    got = [[d.step()[0] for _ in range(3)], [], []]
    d.merge(StepDecoder(tiny_model, prompts[1:], [greedy, greedy]))  # two rows join after 3 steps
    for _ in range(5):
        for row, tok in zip((0, 1, 2), d.step()):
            got[row].append(tok)
    d.keep([1, 2])  # row 0 is done (8 tokens); the others go on
    for _ in range(3):
        for row, tok in zip((1, 2), d.step()):
            got[row].append(tok)
    assert got == alone


class FakeEngine:
    """Characters are tokens; an item's features have one row per 10 bytes; counts encoder calls."""

    model_id, max_context, max_text_bytes = "fake", 200, 1000

    def __init__(self):
        self.encode_calls: list[tuple[str, int]] = []

    def encoder_name(self, modality):
        return f"fake-{modality}"

    def decode_media(self, modality, data, name):
        if data.startswith(b"BAD"):
            raise ValueError(f"{name}: corrupt")
        return data

    def encode(self, modality, items):
        self.encode_calls.append((modality, len(items)))
        return [torch.zeros(len(x) // 10 + 1, 4) for x in items]

    def render(self, messages, features, number_media=True):
        text = json.dumps(messages)
        return [ord(c) % 100 for c in text][:150] + [0] * sum(f.shape[0] for f in features)

    def start(self, prompts, params):
        return FakeDecoder([ord("a") + len(p.ids) % 3 for p in prompts])

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids)


class FakeDecoder:
    can_merge = True

    def __init__(self, rows):
        self.rows = rows
        self.sizes = []

    def __len__(self):
        return len(self.rows)

    def step(self):
        time.sleep(0.005)  # a step takes time, so that later groups arrive while rows are running
        self.sizes.append(len(self.rows))
        return list(self.rows)

    def keep(self, rows):
        self.rows = [self.rows[i] for i in rows]

    def merge(self, other):
        self.rows += other.rows


def record_decoders(engine) -> list:
    """The decoders ``engine.start`` makes from now on, in order (the list fills as they are made)."""
    decoders, start = [], engine.start
    engine.start = lambda p, q: decoders.append(start(p, q)) or decoders[-1]
    return decoders


def run(service, groups, max_rows=16, delay_s=0.0):
    """Submit groups of requests to a Scheduler, each group's requests at once and the later groups
    ``delay_s`` apart; the events of each request, in order."""
    from serve.scheduler import Scheduler

    scheduler = Scheduler(service, service.engine, max_rows)

    async def one(request, delay):
        await asyncio.sleep(delay)
        return [event async for event in scheduler.submit(request)]

    async def go():
        return await asyncio.gather(*(one(r, k * delay_s) for k, g in enumerate(groups) for r in g))

    return asyncio.run(go())


def req(media, max_tokens=5, stream=False, text="hi", stop=()):
    content = [{"type": "text", "text": text}] + [{"type": m.modality} for m in media]
    return ChatRequest("fake", [{"role": "user", "content": content}], media,
                       SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop), stream=stream)


def test_service_batches_dedupes_caches_and_isolates_errors():
    engine = FakeEngine()
    service = ChatService(engine, FeatureCache(1 << 20))
    img, clip = MediaItem("image", "p0", b"I" * 50), MediaItem("audio", "p1", b"A" * 300)
    bad = MediaItem("image", "p2", b"BAD image")
    out = run(service, [[req([img, clip]), req([img, bad]), req([clip], stream=True, stop=("zz",)),
                         req([img], max_tokens=500)]])
    assert sorted(engine.encode_calls) == [("audio", 1), ("image", 1)]  # one call per modality, deduped
    assert out[0][-1].done and out[0][-1].completion_tokens == 5 and out[0][-1].finish_reason == "length"
    assert len(out[1]) == 1 and out[1][0].error.param == "p2"
    assert out[2][0].start and "".join(e.delta for e in out[2]) == out[2][-1].text
    assert out[3][0].error.code == "context_length_exceeded"
    run(service, [[req([img, clip])]])  # the next turn re-sends both: no encoder call
    assert len(engine.encode_calls) == 2 and service.stats()["cache"]["hits"] == 2


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized():
    engine, rendered = FakeEngine(), []
    render = engine.render
    engine.render = lambda *a: rendered.append(a) or render(*a)
    out = run(ChatService(engine, FeatureCache(0)), [[req([], text="x" * 2000), req([], text="x" * 100)]])
    assert out[0][0].error.code == "context_length_exceeded" and "1000 bytes" in out[0][0].error.message
    assert out[1][-1].completion_tokens == 5 and len(rendered) == 1  # only the one that can fit


def test_a_bug_preparing_one_request_fails_it_alone():
    """A renderer or decoder that raises something other than a refusal gives that request a 500;
    the requests prepared with it are answered."""
    engine = FakeEngine()
    render, decode = engine.render, engine.decode_media

    def render_fails_on(messages, features, number_media=True):
        if "boom" in json.dumps(messages):
            raise TypeError("renderer bug")
        return render(messages, features, number_media)

    def decode_fails_on(modality, data, name):
        if data.startswith(b"CRASH"):
            raise RuntimeError("decoder bug")
        return decode(modality, data, name)

    engine.render, engine.decode_media = render_fails_on, decode_fails_on
    service = ChatService(engine, FeatureCache(0))
    crash = MediaItem("image", "p0", b"CRASH" * 10)
    out = run(service, [[req([]), req([], text="boom"), req([crash]), req([], max_tokens=3)]])
    assert out[0][-1].completion_tokens == 5 and out[3][-1].completion_tokens == 3
    for events, doing in ((out[1], "rendering the conversation"), (out[2], "decoding p0")):
        assert len(events) == 1 and events[0].error.status == 500 and doing in events[0].error.message


def test_scheduler_joins_running_batch_and_drops_finished_rows():
    engine = FakeEngine()
    decoders = record_decoders(engine)
    service = ChatService(engine, FeatureCache(0))
    groups = [[req([], max_tokens=40)], [req([], max_tokens=3), req([], max_tokens=3)], [req([], max_tokens=5)]]
    out = run(service, groups, max_rows=3, delay_s=0.02)
    assert [o[-1].completion_tokens for o in out] == [40, 3, 3, 5]
    sizes = decoders[0].sizes
    assert max(sizes) == 3 and sizes[-1] == 1  # later groups joined the first row, then left it
    assert service.stats()["max_batch"] == 3


def test_a_request_hears_its_final_event_while_the_batch_runs_on():
    """A request's stream ends with its final event, at the step that finishes it, however long
    the other rows of the batch keep running."""
    from serve.scheduler import Scheduler

    engine = FakeEngine()
    decoders = record_decoders(engine)
    scheduler = Scheduler(ChatService(engine, FeatureCache(0)), engine, 16)

    async def one(max_tokens):
        events = [event async for event in scheduler.submit(req([], max_tokens=max_tokens))]
        return events, len(decoders[0].sizes)

    async def go():
        return await asyncio.gather(one(2), one(30))

    (short, steps_short), (long, steps_long) = asyncio.run(go())
    assert short[-1].final and short[-1].completion_tokens == 2 and steps_short == 2
    assert long[-1].final and long[-1].completion_tokens == 30 and steps_long == 30


def test_an_idle_replica_waits_wait_s_for_company():
    """With ``wait_s`` (``batch_wait_timeout_s``) a request that finds the replica idle waits that
    long, so one arriving meanwhile is prefilled with it; without, each starts at once."""
    from serve.scheduler import Scheduler

    for wait_s, prefills in ((0.0, [1, 1]), (0.2, [2])):
        engine = FakeEngine()
        calls = []
        start = engine.start
        engine.start = lambda p, q: calls.append(len(p)) or start(p, q)
        scheduler = Scheduler(ChatService(engine, FeatureCache(0)), engine, 16, wait_s)

        async def one(delay):
            await asyncio.sleep(delay)
            return [event async for event in scheduler.submit(req([], max_tokens=20))]

        async def go():
            return await asyncio.gather(one(0.0), one(0.05))

        assert all(events[-1].completion_tokens == 20 for events in asyncio.run(go()))
        assert calls == prefills, (wait_s, calls)


def test_a_request_whose_client_left_while_it_waited_is_never_prepared():
    """With the batch full, a second request waits; its client leaves (``ChatModel.chat`` marks it
    cancelled as Serve cancels it). When the slot frees, its media are not decoded or encoded, and
    it counts as cancelled; a request behind it is served."""
    from serve.scheduler import Scheduler

    engine = FakeEngine()
    service = ChatService(engine, FeatureCache(0))
    scheduler = Scheduler(service, engine, max_rows=1)
    left = req([MediaItem("audio", "p0", b"A" * 300)])

    async def one(request):
        return [event async for event in scheduler.submit(request)]

    async def go():
        running = asyncio.create_task(one(req([], max_tokens=30)))
        await asyncio.sleep(0.01)
        leaving = asyncio.create_task(one(left))
        behind = asyncio.create_task(one(req([MediaItem("image", "p0", b"I" * 50)], max_tokens=3)))
        await asyncio.sleep(0.01)
        left.cancelled = True
        leaving.cancel()
        return await asyncio.wait_for(asyncio.gather(running, behind), timeout=10)

    running, behind = asyncio.run(go())
    assert running[-1].completion_tokens == 30 and behind[-1].completion_tokens == 3
    assert engine.encode_calls == [("image", 1)]  # the clip of the request that left: never encoded
    stats = service.stats()
    assert stats["requests"] == 3 and stats["cancelled"] == 1


def test_a_failed_prefill_fails_its_requests_alone_and_the_running_ones_finish(caplog):
    engine = FakeEngine()
    start, calls = engine.start, []

    def second_fails(p, q):
        calls.append(len(p))
        if len(calls) > 1:
            raise RuntimeError("prefill bug")
        return start(p, q)

    engine.start = second_fails
    from serve.scheduler import Scheduler

    scheduler = Scheduler(ChatService(engine, FeatureCache(0)), engine, 16)

    async def one(request, delay):
        await asyncio.sleep(delay)
        try:
            async for _ in scheduler.submit(request):
                pass
        except RuntimeError as e:
            return str(e)
        return "finished"

    async def go():
        runs = [one(req([], max_tokens=45), 0.0), one(req([], max_tokens=3), 0.03)]
        return await asyncio.wait_for(asyncio.gather(*runs), timeout=10)

    assert asyncio.run(go()) == ["finished", "prefill bug"]
    assert "prefilling 1 requests failed; they get the error, the 1 running go on" in caplog.text


def test_short_calls_run_on_the_loop_and_long_ones_in_threads():
    """A step whose last run took under INLINE_S runs on the event loop (no thread hand-off);
    a longer one keeps running in a worker thread."""
    from serve.scheduler import INLINE_S

    for step_s, on_loop in ((0.0, True), (2 * INLINE_S, False)):
        engine = FakeEngine()
        threads = []
        start = engine.start

        def traced(p, q):
            dec = start(p, q)
            dec.step = lambda: threads.append(threading.get_ident()) or time.sleep(step_s) or list(dec.rows)
            return dec

        engine.start = traced
        loop_thread = threading.get_ident()  # run() drives the loop with asyncio.run, in this thread
        out = run(ChatService(engine, FeatureCache(0)), [[req([], max_tokens=6)]])
        assert out[0][-1].completion_tokens == 6
        later = threads[1:]  # the first step has no duration to go by: a thread
        assert threads[0] != loop_thread
        assert all((t == loop_thread) == on_loop for t in later), (step_s, threads)


def test_media_to_encode_are_prepared_in_a_thread_after_short_prepares():
    """Text-only prepares run on the loop once one was short; a request whose media the feature
    cache lacks is prepared in a worker thread all the same, and its twin (now cached) on the loop."""
    engine = FakeEngine()
    threads = []
    encode = engine.encode
    engine.encode = lambda modality, items: threads.append(threading.get_ident()) or encode(modality, items)
    service = ChatService(engine, FeatureCache(1 << 20))
    prepare = service.prepare
    service.prepare = lambda requests: threads.append(threading.get_ident()) or prepare(requests)
    clip = MediaItem("audio", "p0", b"A" * 300)
    loop_thread = threading.get_ident()
    out = run(service, [[req([])], [req([])], [req([clip])], [req([MediaItem("audio", "p0", b"A" * 300)])]],
              delay_s=0.05)
    assert all(o[-1].completion_tokens == 5 for o in out)
    assert threads[1] == loop_thread  # the second text-only prepare: on the loop
    assert threads[2] != loop_thread and threads[3] == threads[2]  # the clip's prepare and its encode
    assert threads[4] == loop_thread and len(threads) == 5  # the cached twin: on the loop, no encode


def test_app_builder_args_checkpoint_discovery_and_deploy_yaml(tmp_path):
    import os

    import yaml
    from pydantic import ValidationError

    from serve.app import build
    from serve.config import ServeArgs
    from serve.engine import newest_checkpoint, resolve_checkpoint

    assert newest_checkpoint(str(tmp_path)) is None
    for i, sub in enumerate(["stage1/final", "stage2/final", "stage2/partial"]):
        (tmp_path / sub).mkdir(parents=True)
        if sub != "stage2/partial":  # an interrupted save has no mmm.json
            (tmp_path / sub / "mmm.json").write_text("{}")
            os.utime(tmp_path / sub / "mmm.json", (1000 + i, 1000 + i))
    assert resolve_checkpoint(None, str(tmp_path)) == str(tmp_path / "stage2/final")
    assert resolve_checkpoint("s3://bucket/ckpt", str(tmp_path)) == "s3://bucket/ckpt"

    # `serve run serve.app:build key=value` hands the builder strings; pydantic types them
    app = build({"checkpoint": str(tmp_path / "stage1/final"), "api_key": "k", "use_gpu": "false",
                 "max_replicas": "3"})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValidationError):
        ServeArgs.model_validate({"chekpoint": "typo"})

    spec = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "serve", "deploy.yaml")))
    deployments = {d["name"]: d for d in spec["applications"][0]["deployments"]}
    assert set(deployments) == {"ChatModel", "ChatIngress"}
    assert deployments["ChatModel"]["ray_actor_options"]["num_gpus"] == 1
    assert all("autoscaling_config" in d for d in deployments.values())
    assert spec["http_options"]["host"] == "127.0.0.1"


def test_fetch_connects_to_the_checked_address(monkeypatch):
    """The allow-listed name is resolved once and the connection goes to that address (no second
    lookup to rebind); the download is size-capped; redirects are refused."""
    import http.server

    import serve.urls as urls

    png = base64.b64decode(png_b64())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/")
                self.end_headers()
                return
            assert self.headers["Host"].startswith("images.example.com")
            body = png if self.path in ("/a.png", "/caf%C3%A9.png") else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(urls, "_public", lambda ip: True)  # let the test server stand in for a public host
        resolver = lambda host, p, type=0: [(2, 1, 6, "", ("127.0.0.1", p))]  # noqa: E731
        limits = RequestLimits(allow_remote=True, remote_hosts=("images.example.com",), max_remote_bytes=4000)
        url = f"http://images.example.com:{port}"
        assert fetch_image(f"{url}/a.png", limits, "p", resolver) == png
        assert fetch_image(f"{url}/café.png", limits, "p", resolver) == png  # sent percent-encoded
        with pytest.raises(APIError) as e:
            fetch_image(f"{url}/big", limits, "p", resolver)
        assert e.value.status == 413
        with pytest.raises(APIError) as e:
            fetch_image(f"{url}/moved", limits, "p", resolver)
        assert e.value.code == "image_fetch_failed"
    finally:
        server.shutdown()
