"""OpenAI-compatible multimodal chat server on Ray Serve.

    serve run serve.app:mmm                        # newest checkpoint under outputs/demo, else tiny untrained
    serve run serve.app:build checkpoint=outputs/demo/stage2/final api_key=KEY port=8000
    serve deploy serve/deploy.yaml                 # the same app with autoscaling + GPU options

Two deployments composed with ``.bind()``: ``ChatIngress`` (FastAPI: auth, body limits, request
parsing, remote-image fetches, OpenAI responses and SSE) and ``ChatModel`` (encoders + LM; groups
its scheduler joins concurrent requests into one running batch; caches encoder features). Routes:
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/stats`` (cache hit/miss/evictions),
``GET /health``.
"""

import asyncio
import hmac
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import RequestLimits, ServeArgs
from .engine import resolve_checkpoint
from .errors import APIError, internal_error, unavailable
from .events import Event
from .openai_schema import ChatRequest, parse_request
from .responses import completion, sse

INLINE_PARSE_BYTES = 1 << 20
"""Bodies up to this size are parsed on the event loop (~5 ms at most here, base64 included): a
worker thread's hand-off would cost a large share of a small request's parse."""

api = FastAPI(title="MMM", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the same OpenAI error shape as everything else.
    return JSONResponse(APIError(exc.status_code, str(exc.detail), None, "not_found").body(), exc.status_code)


@api.exception_handler(Exception)
async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    # Only our own bugs get here (bad input is always an APIError): a 500 in the same shape.
    return JSONResponse(internal_error(exc).body(), status_code=500)


# No access log here: each call is one the ingress already logs as an HTTP line, and the replica's
# loop is where every request's CPU counts.
@serve.deployment(max_ongoing_requests=32, logging_config={"enable_access_log": False})
class ChatModel:
    """Encoders + LM of one replica. Every request goes straight to the replica's one scheduler,
    which joins it to the running batch at the next decode step (``serve.scheduler``)."""

    def __init__(self, args: dict, checkpoint: str | None) -> None:
        import ray

        from .cache import FeatureCache
        from .engine import load_engine
        from .scheduler import Scheduler
        from .service import ChatService

        cfg = ServeArgs.model_validate(args)
        # The GPU follows the resources Ray gave this replica (the deploy YAML may add num_gpus).
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        engine = load_engine(checkpoint, cfg.preset, cfg.model_name, device, cfg.storage_options, cfg.prefix_cache_bytes)
        self.service = ChatService(engine, FeatureCache(cfg.cache_bytes), cfg.limits())
        self.scheduler = Scheduler(self.service, engine, cfg.max_batch_size, cfg.batch_wait_timeout_s)

    async def chat(self, request: ChatRequest):
        """One request's events (see ``serve.service``). When the client goes away (Serve cancels
        this generator), the request is marked so that the scheduler drops its row at the next
        decode step."""
        try:
            async for event in self.scheduler.submit(request):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            request.cancelled = True
            raise

    async def complete(self, request: ChatRequest) -> Event:
        """A non-streaming request's one event, its error or its finished answer, as a plain reply:
        a unary call costs the ingress less than a one-item stream (docs/SERVING.md, "Short calls
        on the loop"). Cancelled with its caller like ``chat``. The stream is read to its end, which
        is the final event: left open, ``chat`` would be closed later and take the finished request
        for one whose client went away."""
        last = None
        async for last in self.chat(request):
            pass
        if last is None or not last.final:
            raise RuntimeError("the model replica ended a request without its final event")
        return last

    def info(self) -> dict:
        return {"id": self.service.engine.model_id, "max_context": self.service.engine.max_context}

    def stats(self) -> dict:
        return {**self.service.stats(), "pid": os.getpid()}


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class ChatIngress:
    def __init__(self, model: DeploymentHandle, api_key: str | None, limits: RequestLimits) -> None:
        self.model, self.api_key, self.limits = model, api_key, limits
        self._chat = model.options(stream=True).chat  # every event of a request as it happens
        self._complete = model.complete  # only the last one
        self._info: dict | None = None

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    def _auth(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, refusing early on Content-Length and while reading (a missing or lying header)."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit", None,
                           "payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the {limit}-byte limit", None, "payload_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._auth(request)
        body = await self._body(request)
        model_id = (await self._model_info())["id"]
        if len(body) <= INLINE_PARSE_BYTES:
            req = parse_request(body, self.limits, model_id)
        else:  # base64 of MBs: off the loop
            req = await asyncio.to_thread(parse_request, body, self.limits, model_id)
        await self._fetch_remote(req)
        if not req.stream:
            final = await self._reply(self._complete.remote(req))
            return JSONResponse(completion(final, model_id))
        events = self._chat.remote(req)
        await self._reply(events.__anext__())  # the start event, or the request's 4xx before any output
        return StreamingResponse(sse(events, model_id, req.include_usage), media_type="text/event-stream")

    @staticmethod
    async def _reply(pending) -> Event:
        """The model's first (or only) event of a request; its error raised as the request's."""
        try:
            event = await pending
        except Exception as e:  # the replica died: a clean 503, never a hang or a bare 500
            raise unavailable(e) or e
        if event.error is not None:
            raise event.error
        return event

    async def _fetch_remote(self, req: ChatRequest) -> None:
        from mmm.media import sniff_modality

        from .errors import bad_request
        from .urls import fetch_image

        for item in req.media:
            if item.url is None:
                continue
            item.data = await asyncio.to_thread(fetch_image, item.url, self.limits, item.param)
            if sniff_modality(item.data) != "image":
                raise bad_request(f"{item.param} did not return an image", item.param, "invalid_image")
            item.url = None

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        info = await self._model_info()
        return {"object": "list", "data": [{"id": info["id"], "object": "model", "created": 0, "owned_by": "mmm",
                                            "max_context": info["max_context"]}]}

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        """Counters of one model replica (the one this call reaches): cache hits/misses/evictions, batches."""
        self._auth(request)
        return await self.model.stats.remote()

    @api.get("/health")
    async def health(self):
        info = await self._model_info()
        return {"status": "ok", "model": info["id"]}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _start_http(host: str, port: int) -> None:
    """Start Serve's proxy on host:port, unless Serve is already running (then its port stays).
    ``serve run`` calls the builder before it connects to Ray, so this connects first: to
    RAY_ADDRESS if set, else a fresh local cluster (never one found lying around)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), namespace="serve")
    serve.start(http_options={"host": host, "port": port})


def build(args: ServeArgs) -> Application:
    """The typed app builder: ``serve run serve.app:build key=value ...`` (see ``ServeArgs``)."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    if args.port is not None:
        _start_http(args.host, args.port)
    use_gpu = args.use_gpu if args.use_gpu is not None else _cuda_available()
    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing_requests}
    model = ChatModel.options(
        autoscaling_config=autoscaling,
        # One running batch and a full batch waiting to join it as rows free up.
        max_ongoing_requests=2 * args.max_batch_size,
        ray_actor_options={"num_cpus": args.model_num_cpus, "num_gpus": 1 if use_gpu else 0},
    ).bind(args.model_dump(), resolve_checkpoint(args.checkpoint, args.search_dir))
    ingress = ChatIngress.options(
        autoscaling_config={"min_replicas": 1, "max_replicas": max(1, args.max_replicas),
                            "target_ongoing_requests": 4 * args.target_ongoing_requests},
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    )
    return ingress.bind(model, args.api_key or os.environ.get("MMM_API_KEY") or None, args.limits())


mmm = build(ServeArgs())
