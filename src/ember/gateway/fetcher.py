"""The one way the gateway fetches a URL a request names (image_url, mask_url, weight files).

Untrusted by default (DESIGN.md "Security defaults"):
- schemes: `http`, `https` and `data:` only;
- every address the host resolves to must be public: loopback, private, link-local (cloud metadata),
  CGNAT, multicast, reserved and unspecified are refused, IPv4-mapped / NAT64 IPv6 unwrapped first;
- the connection goes to the address that was checked (the URL is rewritten to the IP, with the
  Host header and TLS SNI kept on the name), so a DNS answer that changes between check and connect
  (rebinding) cannot reach an internal address;
- redirects are followed by hand, each hop checked again, at most `max_redirects`;
- a byte limit (checked on Content-Length and while streaming) and a total time limit.

`allow` lists hosts or networks that may be private, for private deployments and for tests.

Messages name a URL only without its query and credentials (`shown`): signed URLs carry secrets in
the query, and error messages reach the logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes, urljoin, urlsplit, urlunsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def shown(url: str) -> str:
    """The URL as messages may show it: no query, fragment or credentials; data: URIs as their type."""
    if url.startswith("data:"):
        return url[: min(len(url), url.find(",") if "," in url else 40, 40)] + ",..."
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class FetchError(ValueError):
    """The URL cannot be fetched; `msg` is safe to show to the caller."""

    def __init__(self, msg: str, kind: str = "url_fetch_error") -> None:
        super().__init__(msg)
        self.msg = msg
        self.kind = kind


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str
    url: str  # the final URL after redirects (data: URIs: "data:")
    # HTTP validators of the response, for conditional re-fetches (If-None-Match / If-Modified-Since)
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False  # a conditional GET answered 304: nothing was sent to the sink


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 20.0
    max_redirects: int = 5
    # Hosts ("files.internal") or networks ("10.0.0.0/8", "127.0.0.1/32") exempt from the public-address rule.
    allow: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(init=False, repr=False)
    _hosts: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        networks, hosts = [], set()
        for entry in self.allow:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_hosts", frozenset(hosts))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._hosts

    def address_allowed(self, address: IPAddress) -> bool:
        return any(address in net for net in self._networks if net.version == address.version)


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d) or NAT64 (64:ff9b::a.b.c.d) address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public(address: IPAddress) -> bool:
    address = unwrap(address)
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_private
    )


def parse_data_uri(uri: str, max_bytes: int) -> Fetched:
    """`data:[<mediatype>][;base64],<data>` with the size checked before decoding."""
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise FetchError("malformed data URI: no ',' separator", "invalid_data_uri")
    params = header.split(";")
    content_type = params[0].strip() or "text/plain"
    is_base64 = any(p.strip().lower() == "base64" for p in params[1:])
    # base64 makes 3 bytes of 4 characters: refuse before decoding anything too large.
    if (len(payload) * 3 // 4 if is_base64 else len(payload)) > max_bytes:
        raise FetchError(f"data URI is larger than {max_bytes} bytes", "file_too_large")
    try:
        if is_base64:
            data = base64.b64decode(payload.strip(), validate=False)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(f"malformed data URI: {exc}", "invalid_data_uri") from exc
    return Fetched(data, content_type, "data:")


class Fetcher:
    def __init__(self, policy: FetchPolicy | None = None, user_agent: str = "ember-fetcher/1") -> None:
        self.policy = policy or FetchPolicy()
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, headers={"User-Agent": user_agent}
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, max_bytes: int | None = None) -> Fetched:
        """GET `url` (or decode a data: URI), at most `max_bytes` (default: the policy's)."""
        limit = self.policy.max_bytes if max_bytes is None else max_bytes
        if url.startswith("data:"):
            return parse_data_uri(url, limit)
        return await self._get(url, limit, self.policy.timeout_s, None)

    async def stream(
        self,
        url: str,
        sink: Callable[[bytes], None],
        *,
        max_bytes: int,
        timeout_s: float,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> Fetched:
        """GET `url` (or a data: URI) chunk by chunk into `sink`, never holding it whole (model checkpoints
        of several GB), under the same address rules; `max_bytes` and `timeout_s` replace the policy's.
        `etag` / `last_modified`: the validators of a copy the caller holds, sent as If-None-Match /
        If-Modified-Since; a 304 answer comes back as `not_modified` with nothing sent to the sink.
        The returned Fetched carries no data, and the response's validators."""
        if url.startswith("data:"):
            fetched = parse_data_uri(url, max_bytes)
            sink(fetched.data)
            return Fetched(b"", fetched.content_type, fetched.url)
        conditions = {
            name: value
            for name, value in (("If-None-Match", etag), ("If-Modified-Since", last_modified))
            if value is not None
        }
        return await self._get(url, max_bytes, timeout_s, sink, conditions)

    async def _get(
        self,
        url: str,
        limit: int,
        timeout_s: float,
        sink: Callable[[bytes], None] | None,
        headers: dict[str, str] | None = None,
    ) -> Fetched:
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(self.policy.max_redirects + 1):
                    response = await self._send_once("GET", url, deadline, limit, headers=headers, sink=sink)
                    status, location, content_type, data, validators = response
                    if status in (301, 302, 303, 307, 308) and location:
                        url = urljoin(url, location)
                        continue
                    if status >= 400:
                        raise FetchError(f"fetching {shown(url)} answered HTTP {status}", "url_fetch_error")
                    etag, last_modified = validators
                    return Fetched(data, content_type, url, etag, last_modified, not_modified=status == 304)
        except TimeoutError as exc:
            raise FetchError(
                f"fetching {shown(url)} took longer than {timeout_s:.0f} s", "url_timeout"
            ) from exc
        raise FetchError(
            f"more than {self.policy.max_redirects} redirects from {shown(url)}", "url_fetch_error"
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST `body` to `url` under the same address rules (webhooks); no redirects followed.
        Returns the status code; FetchError when the URL is refused or the request fails."""
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                status, *_ = await self._send_once("POST", url, deadline, 64 * 1024, body, headers)
        except TimeoutError as exc:
            raise FetchError(f"{shown(url)} did not answer within {timeout_s:g} s", "url_timeout") from exc
        return status

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """All addresses of `host`, each checked; refuses the host if any is not public."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
            addresses: list[IPAddress] = [literal]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise FetchError(f"cannot resolve host {host!r}", "url_fetch_error") from exc
            addresses = list(
                dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
            )
        if not addresses:
            raise FetchError(f"cannot resolve host {host!r}", "url_fetch_error")
        if self.policy.host_allowed(host):
            return addresses
        for address in addresses:
            if not (is_public(address) or self.policy.address_allowed(unwrap(address))):
                raise FetchError(
                    f"{host!r} resolves to a non-public address; URLs must point to the public internet",
                    "url_not_allowed",
                )
        return addresses

    async def _send_once(
        self,
        method: str,
        url: str,
        deadline: float,
        max_bytes: int,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        sink: Callable[[bytes], None] | None = None,
    ) -> tuple[int, str | None, str, bytes, tuple[str | None, str | None]]:
        """(status, redirect location, content type, body (empty when streamed to `sink`), (ETag,
        Last-Modified))."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(
                f"URL scheme {parts.scheme!r} is not allowed (http, https or data: only)", "url_not_allowed"
            )
        if not parts.hostname:
            raise FetchError(f"URL {shown(url)!r} has no host", "url_not_allowed")
        if parts.username or parts.password:
            raise FetchError("URLs with credentials are not allowed", "url_not_allowed")
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = (await self.resolve(host, port))[0]
        # Connect to the checked address; keep the name for Host and for TLS (SNI + certificate).
        ip_host = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{ip_host}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        request = self._client.build_request(
            method,
            pinned,
            content=body,
            headers={**(headers or {}), "Host": host_header},
            extensions={
                "sni_hostname": host,
                "timeout": {
                    "connect": 10.0,
                    "read": max(0.1, deadline - time.monotonic()),
                    "write": 10.0,
                    "pool": 10.0,
                },
            },
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise FetchError(
                f"could not fetch {shown(url)}: {type(exc).__name__}", "url_fetch_error"
            ) from exc
        try:
            validators = (response.headers.get("etag"), response.headers.get("last-modified"))
            if response.is_redirect:
                return response.status_code, response.headers.get("location"), "", b"", validators
            if method != "GET" or response.status_code == 304:  # a webhook, or the caller's copy is current
                return response.status_code, None, "", b"", validators
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{shown(url)} is larger than {max_bytes} bytes", "file_too_large")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{shown(url)} is larger than {max_bytes} bytes", "file_too_large")
                if sink is not None and response.status_code < 400:
                    sink(chunk)
                else:
                    chunks.append(chunk)
            content_type = response.headers.get("content-type", "application/octet-stream").split(";")[0]
            return response.status_code, None, content_type.strip(), b"".join(chunks), validators
        except httpx.HTTPError as exc:
            raise FetchError(
                f"could not fetch {shown(url)}: {type(exc).__name__}", "url_fetch_error"
            ) from exc
        finally:
            await response.aclose()
