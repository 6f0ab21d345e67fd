"""Image URLs from clients: ``data:`` URLs decoded in place; http(s) fetched only when enabled,
from allow-listed hosts, and never from private, loopback or link-local addresses.

The host is resolved once, every address it resolves to is checked, and the connection is made
to the checked address (TLS still verifies the host name), so a DNS answer that changes between
the check and the connection (DNS rebinding) cannot reach an internal service. Redirects are
not followed: each hop would need the same checks, and image hosts rarely need them.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
from urllib.parse import quote, urlsplit

from .config import RequestLimits
from .errors import APIError, bad_request


def decode_base64(data: str, param: str, what: str) -> bytes:
    """Strict base64 (whitespace allowed, as some clients wrap lines)."""
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{what} is not valid base64 ({e})", param, "invalid_base64") from None


def parse_data_url(url: str, param: str) -> bytes:
    """``data:image/png;base64,....`` -> bytes; only base64 image payloads are accepted."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request("data URL has no ',' between its header and payload", param, "invalid_image_url")
    media_type, *attrs = header[len("data:"):].split(";")
    if not media_type.lower().startswith("image/"):
        raise bad_request(f"data URL media type {media_type or '(none)'!r} is not image/*", param, "invalid_image_url")
    if "base64" not in (a.lower() for a in attrs):
        raise bad_request("data URL must be base64-encoded (data:image/...;base64,...)", param, "invalid_image_url")
    return decode_base64(payload, param, "image data URL payload")


def _public(ip: ipaddress._BaseAddress) -> bool:
    """Globally routable unicast only: refuses private, loopback, link-local (cloud metadata at
    169.254.169.254), multicast, reserved, unspecified, shared (CGNAT) and IPv4-mapped forms."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private)


def resolve_public(host: str, port: int, param: str, resolver=socket.getaddrinfo) -> str:
    """One public address of ``host``; refuses if ANY address it resolves to is not public."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise bad_request(f"image URL host {host!r} does not resolve ({e})", param, "invalid_image_url") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    bad = [str(a) for a in addrs if not _public(a)]
    if bad or not addrs:
        raise bad_request(
            f"image URL host {host!r} resolves to a private, loopback or link-local address ({', '.join(bad)}); "
            "refused",
            param,
            "private_address",
        )
    return str(addrs[0])


def check_remote_url(url: str, limits: RequestLimits, param: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an allowed remote URL, or the 400 that says why not."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        raise bad_request("file:// URLs are never accepted; send the image as a data: URL", param, "file_url")
    if scheme not in ("http", "https"):
        raise bad_request(f"unsupported image URL scheme {scheme or '(none)'!r}; use data: URLs", param, "invalid_image_url")
    if not limits.allow_remote:
        raise bad_request("remote image URLs are disabled on this server; send a data: URL", param, "remote_url_disabled")
    try:
        host, port = (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise bad_request(f"image URL has an invalid port ({e})", param, "invalid_image_url") from None
    if not host:
        raise bad_request("image URL has no host", param, "invalid_image_url")
    if parts.username or parts.password:
        raise bad_request("image URLs with credentials are refused", param, "invalid_image_url")
    try:  # a literal address is checked even before the allow-list, so the message names it
        if not _public(ipaddress.ip_address(host.strip("[]"))):
            raise bad_request(f"image URL host {host} is a private, loopback or link-local address", param, "private_address")
    except ValueError:
        pass
    if host not in limits.remote_hosts:
        raise bad_request(f"image URL host {host!r} is not on this server's allow-list", param, "host_not_allowed")
    return scheme, host, port


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a pre-checked address, verifying the certificate against the URL's host name."""

    def __init__(self, host: str, ip: str, **kw) -> None:
        super().__init__(host, context=ssl.create_default_context(), **kw)
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, ip: str, **kw) -> None:
        super().__init__(host, **kw)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


def fetch_image(url: str, limits: RequestLimits, param: str, resolver=socket.getaddrinfo) -> bytes:
    """Download an allowed remote image (blocking: run it in a thread), at most the byte limit."""
    scheme, host, port = check_remote_url(url, limits, param)
    ip = resolve_public(host, port, param, resolver)
    parts = urlsplit(url)
    # HTTP's request line is ASCII: a path like /café.png is sent percent-encoded, as browsers do
    path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="/?&=%:@!$'()*+,;~")
    conn_cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = conn_cls(host, ip, port=port, timeout=limits.remote_timeout_s)
    try:
        conn.request("GET", path, headers={"User-Agent": "mmm-serve", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise bad_request(f"image URL answered HTTP {resp.status} (redirects are not followed)", param, "image_fetch_failed")
        data = resp.read(limits.max_remote_bytes + 1)
    except APIError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise bad_request(f"image URL could not be fetched ({type(e).__name__}: {e})", param, "image_fetch_failed") from None
    finally:
        conn.close()
    if len(data) > limits.max_remote_bytes:
        raise APIError(413, f"remote image is larger than {limits.max_remote_bytes} bytes", param, "image_too_large")
    return data
