"""The self-signed certificate: SANs, reuse, renewal, the client bundle, and a real TLS handshake
with the gateway's listeners, verified the way httpx (the Python fal client) verifies."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import httpx
from cryptography import x509

from ember.gateway.server import serve
from ember.gateway.tls import SYSTEM_CA_FILE, certificate_hosts, ensure_tls
from tests.gateway.conftest import AUTH, dead_port, down_backend, make_settings


def test_certificate_covers_loopback_localhost_and_public_host(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path, "gw.example.com")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert {"127.0.0.1", "localhost", "gw.example.com"} <= certificate_hosts(cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}  # an IP SAN, not DNS
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


def test_public_ip_goes_in_as_an_ip_san(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path, "10.1.2.3")
    san = x509.load_pem_x509_certificate(files.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}


def test_reused_when_present_renewed_when_the_host_changes(tmp_path: Path) -> None:
    first = ensure_tls(tmp_path, "127.0.0.1")
    pem = first.cert.read_bytes()
    assert ensure_tls(tmp_path, "127.0.0.1").cert.read_bytes() == pem
    renewed = ensure_tls(tmp_path, "gw.example.com")
    assert renewed.cert.read_bytes() != pem
    assert renewed.bundle.read_bytes().endswith(renewed.cert.read_bytes())


def test_bundle_is_system_cas_plus_ours(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path, "127.0.0.1")
    bundle = files.bundle.read_bytes()
    assert bundle.endswith(files.cert.read_bytes())
    if SYSTEM_CA_FILE.is_file():
        assert bundle.startswith(SYSTEM_CA_FILE.read_bytes().rstrip(b"\n"))
        assert bundle.count(b"BEGIN CERTIFICATE") > 1


async def test_listeners_serve_tls_that_clients_verify(tmp_path: Path) -> None:
    run, queue, http = dead_port(), dead_port(), dead_port()
    settings = make_settings(tmp_path / "var", EMBER_RUN_PORT=str(run), EMBER_QUEUE_PORT=str(queue),
                             EMBER_HTTP_PORT=str(http))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, down_backend(), stop=stop, drain_timeout=1.0))
    bundle = settings.var_dir / "tls" / "bundle.pem"
    try:
        for _ in range(100):
            if bundle.is_file() or task.done():
                break
            await asyncio.sleep(0.05)
        strict = ssl.create_default_context(cafile=str(bundle))
        strict.verify_flags |= ssl.VERIFY_X509_STRICT  # Python >= 3.13's default
        for host in ("127.0.0.1", "localhost"):
            async with httpx.AsyncClient(verify=strict) as c:
                for _ in range(100):
                    try:
                        r = await c.get(f"https://{host}:{run}/health")
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.05)
                assert r.status_code == 200
                r = await c.post(f"https://{host}:{queue}/fal-ai/lcm", json={"prompt": "x"}, headers=AUTH)
                assert r.status_code == 200
                assert r.json()["status_url"].startswith(f"https://127.0.0.1:{queue}/")
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{http}/health")).status_code == 200
        async with httpx.AsyncClient(verify=ssl.create_default_context()) as c:  # without our bundle
            try:
                await c.get(f"https://127.0.0.1:{run}/health")
            except httpx.ConnectError as exc:
                assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
            else:
                raise AssertionError("a client without the bundle must not trust the certificate")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
