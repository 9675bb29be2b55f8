"""The export cache: what a runtime loads, built once per (model, precision, toolchain, spec) and reused.

Layout of one artifact directory, `<export_dir>/<family>-<variant>/<key>/`:

    manifest.json         the key fields, the source, component configs, and per network its file and io
    tokenizer/            copied from the source (CLIPTokenizer.save_pretrained)
    scheduler/            scheduler_config.json copied from the source
    <network>.onnx        one per spec (absent with the torch runtime, which loads the source directly)
    <network>.refit.json  state-dict name -> ONNX initializer (ember.runtime.refit_map): LoRA refit by name

The manifest is written last (atomically), so its presence means the directory is complete. A second call
only stats files and reads the manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.settings import Settings

MANIFEST = "manifest.json"
PRECISION = "fp32"  # ONNX exports are fp32; engines choose their own precision when built from them
OPSET = 17  # ONNX opset of every export
# Layout of `<network>.refit.json` (ember.runtime.refit_map), written with each export; part of the key, so
# artifact directories from before (or of an older layout) are rebuilt rather than served without a map.
REFIT_MAP_VERSION = 1


@dataclass(frozen=True)
class ModelFamily:
    """What one (family, variant) of models.toml exports and how its demo stand-in is built.

    Only names here, resolved on use: the fast path of ensure_artifacts must not import torch or diffusers.
    """

    networks: str  # "module:attribute" of the tuple of NetworkSpec, in the order they run
    # Each network's spec version, part of the cache key. Must equal NetworkSpec.version (checked on load).
    spec_versions: dict[str, int]
    scheduler_class: str | None  # diffusers class name, e.g. "LCMScheduler"; None: no scheduler
    build_demo: str  # "module:function" building the tiny stand-in into a directory
    demo_version: int  # bump when the tiny architecture changes: exports of older builds are then redone
    # What else travels with the exports: the CLIP tokenizer (text models), an image processor config from
    # this subfolder ("" = the source's root; e.g. the safety checker's CLIPImageProcessor).
    tokenizer: bool = True
    # More tokenizer subfolders copied beside it (SDXL's second CLIP tokenizer: "tokenizer_2").
    extra_tokenizers: tuple[str, ...] = ()
    feature_extractor: str | None = None
    # The file whose presence says the demo stand-in is built (a pipeline's model_index.json by default).
    demo_marker: str = "model_index.json"

    def load_networks(self) -> tuple[Any, ...]:
        networks = _resolve(self.networks)
        declared = {net.name: net.version for net in networks}
        if declared != self.spec_versions:
            raise RuntimeError(
                f"{self.networks} declares versions {declared}, the family registry {self.spec_versions}"
            )
        return tuple(networks)

    def build_demo_model(self, directory: Path) -> Path:
        return Path(_resolve(self.build_demo)(directory))


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


FAMILIES: dict[tuple[str, str], ModelFamily] = {
    # PixArt-Σ: T5 encoder + DiT + VAE; the SA-Solver scheduler is built from the same (DPM-Solver) config.
    ("pixart_sigma", "xl-2-1024-ms"): ModelFamily(
        networks="ember.specs.pixart_sigma:PIXART_SIGMA_NETWORKS",
        spec_versions={"text_encoder": 1, "transformer": 1, "vae_decoder": 1},
        scheduler_class="DPMSolverMultistepScheduler",
        build_demo="ember.specs.demo_pixart_sigma:build_tiny_pixart_sigma",
        demo_version=1,
    ),
    # controlled_unet: the same UNet taking ControlNet residuals, for controlnet_inpaint (loaded on first use).
    ("lcm", "sdv1-5"): ModelFamily(
        networks="ember.specs.controlnet:SD15_LCM_CONTROLLABLE_NETWORKS",
        spec_versions={"text_encoder": 1, "unet": 1, "vae_decoder": 1, "vae_encoder": 1, "controlled_unet": 1},
        scheduler_class="LCMScheduler",
        build_demo="ember.specs.demo_models:build_tiny_lcm_sd15",
        demo_version=2,  # 2: layers_per_block 2, SD1.5's layout (ControlNet residuals)
    ),
    # SDXL with the LCM-distilled UNet (fal-ai/lcm model="sdxl"): two CLIP text encoders + tokenizers; the
    # LCM scheduler is built from the base's (Euler) scheduler config, as lcm-sdxl's model card does.
    ("lcm", "sdxl"): ModelFamily(
        networks="ember.specs.sdxl:SDXL_LCM_NETWORKS",
        spec_versions={"text_encoder": 1, "text_encoder_2": 1, "unet": 1, "vae_decoder": 1, "vae_encoder": 1},
        scheduler_class="LCMScheduler",
        build_demo="ember.specs.demo_sdxl:build_tiny_lcm_sdxl",
        demo_version=1,
        extra_tokenizers=("tokenizer_2",),
    ),
    # Stable Cascade / Würstchen v3 (fal-ai/stable-cascade/sote-diffusion): text encoder, prior (stage C),
    # decoder (stage B), VQGAN (stage A); both stages share the text encoder and DDPMWuerstchenScheduler.
    ("sote_diffusion", "wuerstchen3"): ModelFamily(
        networks="ember.specs.stable_cascade:STABLE_CASCADE_NETWORKS",
        spec_versions={"text_encoder": 1, "prior": 1, "decoder": 1, "vqgan_decoder": 1},
        scheduler_class="DDPMWuerstchenScheduler",
        build_demo="ember.specs.demo_stable_cascade:build_tiny_stable_cascade",
        demo_version=1,
    ),
    # fal-ai/illusion-diffusion: a plain SD1.5 base whose UNet takes ControlNet residuals (ember.specs.controlnet).
    ("illusion_diffusion", "sdv1-5"): ModelFamily(
        networks="ember.specs.controlnet:SD15_CONTROLLED_NETWORKS",
        spec_versions={"text_encoder": 1, "unet": 1, "vae_decoder": 1},
        scheduler_class="PNDMScheduler",  # the base's own; fal's Euler / DPM++ SDE are built from its config
        build_demo="ember.specs.demo_controlnet:build_tiny_sd15_base",
        demo_version=1,
    ),
    # An SD1.5 ControlNet, its own repository (config.json at the root): the illusion QR-code monster.
    ("controlnet", "qrcode-monster-sd15"): ModelFamily(
        networks="ember.specs.controlnet:CONTROLNET_NETWORKS",
        spec_versions={"controlnet": 1},
        scheduler_class=None,
        build_demo="ember.specs.demo_controlnet:build_tiny_controlnet",
        demo_version=1,
        tokenizer=False,
        demo_marker="config.json",
    ),
    # fal-ai/lcm's controlnet_inpaint: lllyasviel/control_v11p_sd15_inpaint (config.json at the root).
    ("controlnet", "inpaint-sd15"): ModelFamily(
        networks="ember.specs.controlnet:CONTROLNET_NETWORKS",
        spec_versions={"controlnet": 1},
        scheduler_class=None,
        build_demo="ember.specs.demo_controlnet:build_tiny_inpaint_controlnet",
        demo_version=1,
        tokenizer=False,
        demo_marker="config.json",
    ),
    # fal-ai/lora base models (named per request; ember.pipeline.base_models exports each on first use
    # with its variant / custom UNet bound). The scheduler config is read from each model's own source.
    ("lora", "sdv1-5"): ModelFamily(
        networks="ember.specs.lora:SD15_LORA_NETWORKS",
        spec_versions={"text_encoder": 1, "unet": 2, "vae_decoder": 1},  # unet 2: long weighted prompts
        scheduler_class=None,
        build_demo="ember.specs.demo_lora:build_tiny_sd15",
        demo_version=1,
    ),
    # fal-ai/lora SDXL base models on onnxruntime (ember.pipeline.lora_xl through base_models): the two
    # clip-skip encoders, the plain SDXL UNet, the VAE decoder; bound per request like ("lora", "sdv1-5").
    ("lora", "sdxl"): ModelFamily(
        networks="ember.specs.lora_xl:NETWORKS",
        spec_versions={"text_encoder": 1, "text_encoder_2": 1, "unet": 2, "vae_decoder": 1},  # unet 2: ditto
        scheduler_class=None,
        build_demo="ember.specs.demo_sdxl:build_tiny_sdxl",
        demo_version=1,
        extra_tokenizers=("tokenizer_2",),
    ),
    # The Stable Diffusion safety checker, shared by every endpoint (ember.pipeline.safety).
    ("safety_checker", "sd"): ModelFamily(
        networks="ember.specs.safety:SAFETY_NETWORKS",
        spec_versions={"safety_checker": 1},
        scheduler_class=None,
        build_demo="ember.specs.safety:build_tiny_safety_checker",
        demo_version=1,
        tokenizer=False,
        feature_extractor="",
        demo_marker="config.json",
    ),
}


def family_spec(family: str, variant: str) -> ModelFamily:
    try:
        return FAMILIES[(family, variant)]
    except KeyError as exc:
        raise ValueError(f"no network specs for {family}/{variant}") from exc


@dataclass(frozen=True)
class Artifacts:
    """A complete artifact directory, read back."""

    path: Path
    manifest: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.manifest["source"])

    @property
    def revision(self) -> str | None:
        return self.manifest.get("revision")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def scheduler_dir(self) -> Path:
        return self.path / "scheduler"

    @property
    def feature_extractor_dir(self) -> Path:
        return self.path / "feature_extractor"

    def config(self, component: str) -> dict[str, Any]:
        """The diffusers/transformers config of a component: "text_encoder", "unet", "vae"."""
        return dict(self.manifest["components"][component])

    def onnx_path(self, network: str) -> Path:
        entry = self.manifest["networks"].get(network)
        if entry is None:
            raise FileNotFoundError(
                f"{self.path} has no ONNX export of {network!r} (built for the torch runtime?)"
            )
        return self.path / entry["file"]


def read_artifacts(path: Path) -> Artifacts:
    return Artifacts(path=path, manifest=json.loads((path / MANIFEST).read_text(encoding="utf-8")))


def _source_fingerprint(source: str) -> str | None:
    """Local directories: a digest of file names, sizes and mtimes (cheap; a rebuilt model changes it).
    Hub ids: None, the revision stands for the content."""
    root = Path(source)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _installed(package: str) -> str | None:
    """A package's version from its metadata (no import: torch alone takes seconds to import)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_key(settings: Settings, family: str, variant: str) -> dict[str, Any]:
    """Everything an export depends on. Changing any field gives a new artifact directory."""
    spec = family_spec(family, variant)
    source = settings.model_source(family, variant)
    return {
        "family": family,
        "variant": variant,
        "source": source,
        "revision": settings.model_entry(family, variant).get("revision"),
        "source_fingerprint": _source_fingerprint(source),
        "demo_version": spec.demo_version if settings.weights == "demo" else None,
        "precision": PRECISION,
        "opset": OPSET,
        "torch": _installed("torch"),
        "onnx": _installed("onnx"),
        "specs": dict(spec.spec_versions),
        "refit_map": REFIT_MAP_VERSION,
        **_components_key(settings, family, variant),
    }


def _components_key(settings: Settings, family: str, variant: str) -> dict[str, Any]:
    """Components from other repositories (ember.specs.composite) are part of a real model's key; absent
    otherwise, so the keys of single-source models stay as they were."""
    components = settings.model_entry(family, variant).get("components")
    return {"components": dict(components)} if components and settings.weights == "real" else {}


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One exporter per artifact family at a time across processes (the launcher and Triton may race)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(path: Path, needs_onnx: bool, network_names: list[str]) -> bool:
    if not (path / MANIFEST).is_file():
        return False
    if not needs_onnx:
        return True
    networks = read_artifacts(path).manifest.get("networks", {})
    return all(name in networks and (path / networks[name]["file"]).is_file() for name in network_names)


def ensure_artifacts(
    settings: Settings, family: str = "lcm", variant: str = "sdv1-5", progress: bool = True
) -> Path:
    """Return the artifact directory of `family`/`variant`, building whatever is missing first.

    With EMBER_WEIGHTS=demo the tiny stand-in model is built into settings.models_dir if absent. ONNX files
    are exported (and verified against torch) unless the runtime is torch, which loads the source directly.
    A call that finds everything in place only stats files and reads the manifest.
    """
    spec = family_spec(family, variant)
    source = settings.model_source(family, variant)
    if settings.weights == "demo" and not (Path(source) / spec.demo_marker).is_file():
        _note(progress, f"building the tiny demo model {family}/{variant} into {source}")
        spec.build_demo_model(Path(source))
    entry = settings.model_entry(family, variant)
    if settings.weights == "real" and entry.get("components"):
        from ember.specs.composite import assemble, is_assembled

        if not is_assembled(Path(source), entry):
            _note(progress, f"assembling {family}/{variant} from {entry['source']} + {entry['components']}")
            assemble(Path(source), entry)

    key = cache_key(settings, family, variant)
    path = settings.export_dir / f"{family}-{variant}" / _key_hash(key)
    needs_onnx = settings.model_runtime(family, variant) != "torch"  # models.toml `runtime`, else EMBER_RUNTIME
    names = list(spec.spec_versions)
    if _complete(path, needs_onnx, names):
        return path
    with _exclusive(settings.export_dir / f"{family}-{variant}.lock"):
        if not _complete(path, needs_onnx, names):  # another process may have finished while we waited
            _build(path, key, spec, needs_onnx, progress)
    return path


def _note(progress: bool, message: str) -> None:
    if progress:
        print(f"[ember] {message}", file=sys.stderr, flush=True)


def _read_config(source: str, subfolder: str, revision: str | None) -> dict[str, Any]:
    config = Path(source) / subfolder / "config.json"
    if not config.is_file():  # a hub id: the file comes through the HF cache
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(source, "config.json", subfolder=subfolder, revision=revision))
    return dict(json.loads(config.read_text(encoding="utf-8")))


def _build(
    path: Path,
    key: dict[str, Any],
    spec: ModelFamily,
    needs_onnx: bool,
    progress: bool,
    networks: tuple[Any, ...] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """`networks`: the family's specs with `load` bound otherwise (fal-ai/lora: a request's variant and
    custom UNet); `log`: progress lines for a caller that shows them elsewhere (a request's status logs)."""
    import diffusers
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ember.runtime.refit_map import write_refit_map
    from ember.specs.onnx_export import export_onnx

    source, revision = key["source"], key["revision"]
    path.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = (
        read_artifacts(path).manifest
        if (path / MANIFEST).is_file()
        else {"key": key, "source": source, "revision": revision, "components": {}, "networks": {}}
    )

    # 1. Tokenizer and scheduler config travel with the exports: the pipeline needs nothing else.
    if spec.tokenizer:
        AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision).save_pretrained(
            path / "tokenizer"
        )
    for name in spec.extra_tokenizers:
        AutoTokenizer.from_pretrained(source, subfolder=name, revision=revision).save_pretrained(path / name)
    if spec.scheduler_class is not None:
        scheduler_class = getattr(diffusers, spec.scheduler_class)
        scheduler_class.from_pretrained(source, subfolder="scheduler", revision=revision).save_pretrained(
            path / "scheduler"
        )
    if spec.feature_extractor is not None:
        from transformers import CLIPImageProcessor

        CLIPImageProcessor.from_pretrained(
            source, subfolder=spec.feature_extractor, revision=revision
        ).save_pretrained(path / "feature_extractor")

    # 2. The component configs (read, not loaded): the pipeline and the engine profiles size tensors from them.
    networks = networks or spec.load_networks()
    for net in networks:
        manifest["components"][net.subfolder] = _read_config(source, net.subfolder, revision)

    # 3. Each network not exported yet: load in fp32, export, verify against torch (skipped for the
    #    torch runtime, which loads the source itself).
    todo = [net for net in networks if needs_onnx and net.name not in manifest["networks"]]
    bar = tqdm(todo, desc=f"export {key['family']}/{key['variant']}", disable=not progress, unit="net")
    for net in bar:
        bar.set_postfix_str(net.name)
        if log is not None:
            log(f"exporting {net.name} to ONNX ({todo.index(net) + 1}/{len(todo)})")
        module = net.load(source, revision, torch.float32)
        report = export_onnx(net, module, manifest["components"][net.subfolder], path / f"{net.name}.onnx")
        # The refit map needs the module just exported (content matching); serving then never loads it.
        refit_path, unmatched = write_refit_map(report.path, module)
        manifest["networks"][net.name] = {
            "file": report.path.name,
            "inputs": {t.name: {"dtype": str(t.dtype), "axes": list(t.axes)} for t in net.inputs},
            "outputs": {t.name: {"dtype": str(t.dtype), "axes": list(t.axes)} for t in net.outputs},
            "verified_max_abs_diff": report.max_abs_diff,
            "verified_shape": list(report.verify_shape),
            "refit_map": refit_path.name,
            "refit_unmatched": len(unmatched),
        }
        if progress:
            bar.write(
                f"[ember] {net.name}.onnx verified: max |onnxruntime - torch| = {report.max_abs_diff:.2e}"
            )
        if log is not None:
            log(f"{net.name}.onnx verified: max |onnxruntime - torch| = {report.max_abs_diff:.2e}")
        del module
    bar.close()

    # 4. The manifest last: its presence marks the directory complete.
    _write_json_atomic(path / MANIFEST, manifest)
