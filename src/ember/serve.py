"""`make serve`: build what is missing, start Triton and the gateway, wait until both are ready,
print and write the settings that point the official fal clients here.

    python -m ember.serve            # foreground; Ctrl-C / SIGTERM stops both processes in order

The same `Stack` starts the server for the end-to-end tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from ember.settings import Settings, get_settings
from ember.triton import start_triton

log = logging.getLogger("ember.serve")

# (family, variant) of every Triton model in the repository, built before Triton starts.
SERVED_MODELS = {
    "lcm": ("lcm", "sdv1-5"),
    "sote_diffusion": ("sote_diffusion", "wuerstchen3"),
    "pixart_sigma": ("pixart_sigma", "xl-2-1024-ms"),
    # its ControlNet is a family of its own, built with SHARED_STAGES
    "illusion_diffusion": ("illusion_diffusion", "sdv1-5"),
}


# (family, variant) of shared stages that several Triton models load (ember.pipeline.safety), built too.
SHARED_STAGES = [
    ("safety_checker", "sd"),
    # The QR-code-monster ControlNet (illusion_diffusion; ember.pipeline.controlnet stages).
    ("controlnet", "qrcode-monster-sd15"),
    # The inpaint ControlNet (lcm controlnet_inpaint; its runners are created on first use).
    ("controlnet", "inpaint-sd15"),
    # fal-ai/lcm model="sdxl" (ember.pipeline.lcm_models: the lcm model loads it on its first request).
    ("lcm", "sdxl"),
]


class StartupError(RuntimeError):
    pass


def build_artifacts(settings: Settings, progress: bool = True) -> None:
    """Demo weights (when EMBER_WEIGHTS=demo) and ONNX exports; instant when they exist."""
    from ember.specs.artifacts import ensure_artifacts  # torch: only the launcher needs it

    for family, variant in [*SERVED_MODELS.values(), *SHARED_STAGES]:
        path = ensure_artifacts(settings, family=family, variant=variant, progress=progress)
        if settings.model_runtime(family, variant) == "tensorrt":  # engines for this GPU, cached
            _build_engines(settings, family, variant, path, progress)


def _build_engines(settings: Settings, family: str, variant: str, path: Path, progress: bool) -> None:
    from ember.runtime import engine_options
    from ember.runtime.tensorrt_build import build_engines
    from ember.specs.artifacts import family_spec, read_artifacts

    networks = list(family_spec(family, variant).load_networks())
    device = settings.device if settings.device.startswith("cuda") else "cuda"
    options = engine_options(settings, family, variant)
    build_engines(read_artifacts(path), networks, options, settings.export_dir, progress=progress, device=device)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Stack:
    """Triton + gateway as child processes, started in order and stopped in reverse."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.logs_dir = settings.var_dir / "logs"
        self.triton: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def triton_log(self) -> Path:
        return self.logs_dir / "triton.log"

    @property
    def gateway_log(self) -> Path:
        return self.logs_dir / "gateway.log"

    def start(self, timeout: float = 300.0) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log.info("starting tritonserver (log: %s)", self.triton_log)
        self.triton = start_triton(self.settings, self.triton_log, self.env)
        log.info("starting gateway (log: %s)", self.gateway_log)
        with open(self.gateway_log, "ab") as out:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "ember.gateway"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(started + timeout)
        log.info("ready in %.1f s", time.monotonic() - started)

    def _wait_ready(self, deadline: float) -> None:
        triton_url = f"http://127.0.0.1:{self.settings.triton_http_port}/v2/health/ready"
        gateway_url = f"https://127.0.0.1:{self.settings.run_port}/health"
        ready = {"triton": False, "gateway": False}
        while not all(ready.values()):
            for name, proc, path in (("triton", self.triton, self.triton_log),
                                     ("gateway", self.gateway, self.gateway_log)):
                if proc is not None and proc.poll() is not None:
                    self.stop()
                    raise StartupError(f"{name} exited with code {proc.returncode}; its log:\n{_tail(path)}")
            if time.monotonic() > deadline:
                self.stop()
                waiting = [k for k, v in ready.items() if not v]
                raise StartupError(f"not ready in time: {waiting}; triton log:\n{_tail(self.triton_log)}")
            ready["triton"] = ready["triton"] or _http_ok(triton_url)
            ready["gateway"] = ready["gateway"] or _http_ok(gateway_url, self.cafile)
            time.sleep(0.25)

    @property
    def cafile(self) -> Path:
        return self.settings.var_dir / "tls" / "bundle.pem"

    def api_key(self) -> str:
        if self.settings.api_key:
            return self.settings.api_key
        return (self.settings.var_dir / "keys" / "dev-key").read_text().strip()

    def client_env(self) -> dict[str, str]:
        """What the official clients need: fal-protocol.md §1 and §13."""
        s = self.settings
        return {
            "FAL_RUN_HOST": f"{s.public_host}:{s.run_port}",
            "FAL_QUEUE_RUN_HOST": f"{s.public_host}:{s.queue_port}",
            "SSL_CERT_FILE": str(self.cafile.resolve()),
            "NODE_EXTRA_CA_CERTS": str(self.cafile.resolve()),
            "FAL_KEY": self.api_key(),
            "EMBER_PROXY_URL": f"http://{s.public_host}:{s.http_port}/api/fal/proxy",
            # fal's hard-coded REST (rest.fal.ai) and CDN (v3.fal.media) hosts, served here: Python clients
            # set fal_client.client.REST_URL and CDN_URL to it (README "Storage and realtime tokens").
            "EMBER_REST_URL": f"https://{s.public_host}:{s.rest_port}",
            # The realtime websocket host for the JS client's WebSocket shim (client/js/realtime.mjs).
            "EMBER_REALTIME_URL": f"wss://{s.public_host}:{s.run_port}",
            "NO_PROXY": f"{s.public_host},127.0.0.1,localhost",
        }

    def write_client_env(self, path: Path) -> None:
        lines = ["# Point unmodified fal clients at this server: `source var/client.env`"]
        lines += [f"export {k}='{v}'" for k, v in self.client_env().items()]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)  # it holds the API key

    def stop(self, timeout: float = 30.0) -> None:
        """Gateway first (it stops taking work and drains), then Triton."""
        for proc in (self.gateway, self.triton):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def poll(self) -> str | None:
        """The name of a child that has exited, if any."""
        for name, proc in (("triton", self.triton), ("gateway", self.gateway)):
            if proc is not None and proc.poll() is not None:
                return name
        return None


def _http_ok(url: str, cafile: Path | None = None) -> bool:
    try:
        context = None
        if url.startswith("https"):
            if cafile is None or not cafile.is_file():
                return False
            context = ssl.create_default_context(cafile=str(cafile))
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start Triton + the gateway (make serve).")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build demo weights and exports, then exit (the Triton container's entrypoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    log.info("weights=%s runtime=%s var=%s", settings.weights, settings.runtime, settings.var_dir.resolve())
    build_artifacts(settings)
    if args.prepare_only:
        return 0
    stack = Stack(settings)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    env_path = settings.var_dir / "client.env"
    stack.write_client_env(env_path)
    env = stack.client_env()
    print(
        "\nember is serving. Point the official fal clients here:\n"
        f"  source {env_path}\n"
        f"  Python fal-client: FAL_RUN_HOST={env['FAL_RUN_HOST']} FAL_QUEUE_RUN_HOST={env['FAL_QUEUE_RUN_HOST']}\n"
        f"                     SSL_CERT_FILE={env['SSL_CERT_FILE']}\n"
        f"  JS @fal-ai/client: fal.config({{ proxyUrl: {{ url: '{env['EMBER_PROXY_URL']}', when: 'always' }} }})\n"
        f"  Storage / realtime tokens (Python): fal_client.client.REST_URL = fal_client.client.CDN_URL = "
        f"'{env['EMBER_REST_URL']}'\n"
        f"  API key (FAL_KEY) is in {env_path}\n"
        "  e.g. python -c \"import fal_client; print(fal_client.subscribe('fal-ai/lcm', "
        "arguments={'prompt': 'a black cat with glowing eyes'}))\"\n"
        "Ctrl-C stops.\n",
        flush=True,
    )
    try:
        while not stopping:
            dead = stack.poll()
            if dead:
                log.error("%s exited unexpectedly; stopping", dead)
                stack.stop()
                return 1
            time.sleep(0.5)
    finally:
        log.info("stopping")
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
