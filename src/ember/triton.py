"""Start `tritonserver` as an internal service: the binary inside the `nvidia-pytriton` wheel here, or
the NGC container's own binary (docker/), with the Python backend that runs our endpoint models.

Two traps, both handled here (DESIGN.md "Facts checked here"):
- the Python backend stub links libpython3.11 and finds the system one first, which may be older
  than the venv interpreter's: LD_LIBRARY_PATH starts with this interpreter's own LIBDIR;
- the stub's Python must see the venv's packages (numpy < 2, torch, ember): PYTHONPATH carries
  this interpreter's site-packages and the `ember` sources.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import ember
from ember.settings import Settings


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends_dir: Path  # contains python/{libtriton_python.so, triton_python_backend_stub, ...}
    libs_dir: Path | None


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton(settings: Settings) -> TritonInstall:
    """The NGC image's /opt/tritonserver when present, else the nvidia-pytriton wheel's binary with
    the matching stub copied next to the python backend (under var/triton)."""
    ngc = Path("/opt/tritonserver")
    if (ngc / "bin" / "tritonserver").is_file():
        return TritonInstall(ngc / "bin" / "tritonserver", ngc / "backends", None)
    try:
        import pytriton
    except ImportError as exc:
        raise RuntimeError(
            "tritonserver not found: install the [triton] extra (nvidia-pytriton) or run in the NGC image"
        ) from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    backends = settings.var_dir / "triton" / "backends"
    python_dir = backends / "python"
    stub = root / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not (python_dir / "triton_python_backend_stub").is_file():
        python_dir.mkdir(parents=True, exist_ok=True)
        for item in (root / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python_dir / item.name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(root / "bin" / "tritonserver", backends, libs if libs.is_dir() else None)


def triton_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    lib_dirs = [sysconfig.get_config_var("LIBDIR")]
    if install.libs_dir:
        lib_dirs.append(str(install.libs_dir))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    # `ember` may be an editable install (a .pth hook that PYTHONPATH does not run): add its sources.
    src_dir = str(Path(ember.__file__).resolve().parent.parent)
    paths = [src_dir, *site.getsitepackages()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(paths)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # Inference threads: the model instances use the cores, not the stub's OpenMP defaults.
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def triton_command(settings: Settings, install: TritonInstall) -> list[str]:
    """Loopback-only ports, model control off (DESIGN.md "Security defaults")."""
    return [
        str(install.binary),
        f"--model-repository={settings.model_repository.resolve()}",
        f"--backend-directory={install.backends_dir.resolve()}",
        "--http-address=127.0.0.1",
        f"--http-port={settings.triton_http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={settings.triton_grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={settings.triton_metrics_port}",
        "--allow-metrics=true",
        "--model-control-mode=none",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--log-verbose=0",
        # Triton 2.51 sometimes waits on a cancellation that never completes when a client closes its
        # stream right after the final response (fixed upstream later): don't hang shutdown 30 s on it.
        "--exit-timeout-secs=5",
    ]


def start_triton(
    settings: Settings, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`env`: the environment the stub sees (EMBER_* settings included); default os.environ."""
    install = find_triton(settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(
        triton_command(settings, install),
        env=triton_env(install, env),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in the terminal reaches the launcher, which stops it in order
    )
