"""Which webhook URLs the server will call: syntax, no credentials, and public addresses only.

A URL is checked when the job is submitted and again before every attempt; `checked_address` returns
the address it checked, so the dispatcher connects to that address and a later DNS answer never
reaches the socket (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

WEBHOOK_HEADER = "X-OctoFlux-Webhook-Url"
MAX_URL_LENGTH = 2048
# Addresses that hand out cloud credentials. The link-local and ULA ones are refused anyway; Alibaba's
# sits in 100.64/10 (shared address space), listed so the reason says what it is.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookUrlError(ValueError):
    """A webhook URL the server will not call; the message names the header it came from."""

    def __init__(self, reason: str):
        super().__init__(f"{WEBHOOK_HEADER}: {reason}")


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the host resolves to, in the resolver's order (blocking: call off the event loop)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _refusal(ip: IPAddress) -> str | None:
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "private", "unspecified", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4 or Teredo address carries (Teredo's client), or None."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def address_refusal(address: str) -> str | None:
    """Why a webhook may not be sent to this address, or None for a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4-mapped and NAT64 addresses are the IPv4 address itself, so only it is judged.
        if ip.ipv4_mapped is not None:
            return _refusal(ip.ipv4_mapped)
        if ip in NAT64_PREFIX:
            return _refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        # A 6to4 or Teredo relay delivers to the IPv4 address inside: refused if that one is.
        tunnelled = _tunnelled_ipv4(ip)
        if tunnelled is not None and (reason := _refusal(tunnelled)):
            return reason
    return _refusal(ip)


def _valid_hostname(host: str) -> bool:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(HOST_LABEL.match(label) for label in labels)


def parse_webhook_url(url: str) -> tuple[str, str, int]:
    """Syntax and scheme only: (scheme, host, port). Raises WebhookUrlError."""
    if not url or len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"must be an http or https URL of at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookUrlError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookUrlError("must be an http or https URL")
    if "@" in parts.netloc:
        # The URL is stored with the job and logged with every attempt: a password would be too.
        raise WebhookUrlError(
            "credentials are not allowed in the URL (user:password@); receivers check webhook-signature"
        )
    host = parts.hostname or ""
    if not host:
        raise WebhookUrlError("has no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _valid_hostname(host):
            raise WebhookUrlError(f"host {host!r} is not a valid host name") from None
    return scheme, host, port or (443 if scheme == "https" else 80)


def checked_address(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """Resolve the URL's host once and return the address to connect to.

    Raises WebhookUrlError for a bad URL or a refused address, OSError when the host does not resolve.
    """
    _, host, port = parse_webhook_url(url)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise OSError(f"{host} resolved to no address")
    if not allow_private:
        # Every record counts: a name answering one public and one private address is refused.
        for address in addresses:
            reason = address_refusal(address)
            if reason:
                raise WebhookUrlError(
                    f"host {host!r} resolves to {address}, {reason}; "
                    "private targets need --webhook-allow-private"
                )
    return addresses[0]


def check_webhook_url(url: str, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """Submit-time check (blocking DNS: call it off the event loop); returns the URL to store."""
    url = url.strip()
    try:
        checked_address(url, allow_private, resolve)
    except OSError:
        host = urlsplit(url).hostname
        raise WebhookUrlError(f"host {host!r} does not resolve") from None
    return url
