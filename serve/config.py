"""Typed settings of the server: ``ServeArgs`` are the app builder's arguments (``key=value`` on
the ``serve run serve.app:build`` command line, validated by pydantic), ``RequestLimits`` the
part of them the request parser needs. Every default says why it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MiB = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; each bound keeps a single client from taking the server."""

    max_body_bytes: int = 64 * MiB
    """Whole JSON body. Base64 inflates by 4/3: room for ~16 photos or ~8 min of 16 kHz WAV."""
    max_media: int = 32
    """Images + audio clips in one request, counted over all turns (clients re-send the history):
    bounds decoding and encoder work per request."""
    allow_remote: bool = False
    """http(s) image URLs make the server fetch on a client's behalf (SSRF); off unless asked for."""
    remote_hosts: tuple[str, ...] = ()
    """Host names a remote image may come from, when remote URLs are enabled (exact match)."""
    max_remote_bytes: int = 20 * MiB
    """Largest remote image downloaded; matches ``MediaLimits.max_image_bytes``."""
    remote_timeout_s: float = 10.0
    """Connect + read timeout of a remote fetch, so a slow host cannot hold an ingress slot."""
    max_stop: int = 4
    """OpenAI's limit on stop sequences."""
    max_tokens_cap: int = 4096
    """Largest ``max_tokens`` accepted; the model's context usually binds first."""
    default_max_tokens: int = 256
    """Completion budget when the client gives none (clipped to what the context leaves)."""


class ServeArgs(BaseModel):
    """Arguments of ``serve.app:build`` (``serve run serve.app:build checkpoint=PATH api_key=KEY``)."""

    # A misspelt argument is an error, not a silent default; "model_name" is ours, not pydantic's.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    checkpoint: str | None = None
    """A directory written by ``MMMModel.save_pretrained`` (local or s3://). None: the newest under
    ``outputs/demo`` if there is one, else the tiny preset with random weights."""
    storage_options: dict[str, Any] | None = None
    """fsspec options for an s3:// checkpoint, as ``mmm.checkpoint`` takes them, e.g. ``{"client_kwargs":
    {"endpoint_url": "http://minio:9000"}}``. Keep keys out of it (args show up in dashboards): s3fs
    reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the replica's environment. None: s3fs's defaults."""
    preset: str = "tiny"
    """Preset built when there is no checkpoint (tiny: runs anywhere, offline)."""
    search_dir: str = "outputs/demo"
    """Where ``make demo`` exports checkpoints (``stage2/final``, ``stage1/final``)."""
    model_name: str | None = None
    """Id reported by /v1/models and expected in requests; None: ``mmm-<phase>``."""
    api_key: str | None = None
    """When set (or MMM_API_KEY is), every /v1 route requires ``Authorization: Bearer <api_key>``."""
    host: str = "127.0.0.1"
    """HTTP host used only when this builder starts Serve itself (``port`` given)."""
    port: int | None = None
    """Start Serve's HTTP proxy on this port if Serve is not running yet (default proxy: 8000)."""
    max_body_bytes: int = RequestLimits.max_body_bytes
    max_media: int = RequestLimits.max_media
    allow_remote_urls: bool = False
    remote_hosts: list[str] = Field(default_factory=list)
    cache_bytes: int = 512 * MiB
    """Encoder-feature cache per model replica; 0 disables it. A tiny-preset 30 s clip is ~0.4 MB of
    features, a SigLIP-384 image ~2 MB: thousands of items either way."""
    prefix_cache_bytes: int = 256 * MiB
    """KV of computed prompts kept per model replica for reuse by later requests that start the same
    way (each turn of a chat re-sends the history); 0 disables it. The tiny preset's KV is 3 KiB a
    token (an MMDU-sized 18k-token chat: 55 MB); a 7B LM's is 0.5 MiB a token in fp32."""
    max_batch_size: int = 16
    """Concurrent requests encoded and decoded together; generation steps cost nearly the same for
    1 or 16 rows on small models, so this is where throughput comes from."""
    batch_wait_timeout_s: float = 0.0
    """How long a lone request waits for company. Every request pays it when traffic is light, and the
    scheduler already merges requests that arrive while a batch runs into it at the next decode step
    (prepared and prefilled together), so none is needed."""
    use_gpu: bool | None = None
    """Ask Ray for one GPU per model replica; None: when torch sees CUDA where the app is built. The
    replica runs on the GPU exactly when Ray gave it one (so a deploy YAML's num_gpus decides)."""
    model_num_cpus: float = 1.0
    """CPUs per model replica (fractions let tests fit on 2 cores)."""
    ingress_num_cpus: float = 0.25
    """The ingress mostly waits on the model; a fraction of a CPU is enough."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 16
    """Autoscale when a model replica holds more than one full batch of requests."""

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_body_bytes=self.max_body_bytes,
            max_media=self.max_media,
            allow_remote=self.allow_remote_urls,
            remote_hosts=tuple(h.lower() for h in self.remote_hosts),
        )
