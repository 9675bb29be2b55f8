"""InsightFace face analysis on ONNX Runtime, for IP-Adapter FaceID (ember.pipeline.ip_adapter): what
diffusers' FaceID recipe gets from `insightface.app.FaceAnalysis(name="buffalo_l").prepare(ctx_id=0,
det_size=(640, 640))` + `app.get(image)` -> `faces[i].normed_embedding`, and for FaceID Plus
`insightface.utils.face_align.norm_crop(image, faces[i].kps, 224)`.

The same maths as insightface's python package (model_zoo/scrfd.py, model_zoo/arcface_onnx.py,
utils/face_align.py, read, not copied), in numpy + onnxruntime, without insightface itself (it pulls
numpy 2 and OpenCV):

- Model pack: a directory (buffalo_l, antelopev2, ...) of .onnx files; each is classified by its ONNX
  input/output signature as insightface's model_zoo router does: >= 5 outputs -> the SCRFD detector;
  a square input of side >= 112 divisible by 16 (not 192: landmarks) with one output -> the ArcFace
  recognizer (buffalo_l's 192x192 landmark and 96x96 gender/age models are not needed and are skipped).
- SCRFD: the image letterboxed into 640x640 (resized keeping its aspect ratio with OpenCV's INTER_LINEAR
  sampling, top-left aligned, zero padded), RGB, (x - 127.5) / 128; per stride 8/16/32 the network's
  scores (N, 1), distances (N, 4) and keypoint offsets (N, 10) over a grid with 2 anchors per cell,
  multiplied by the stride; distance2bbox / distance2kps around the anchor centres; score >= 0.5; NMS at
  IoU 0.4 (insightface's "+1" pixel areas); back to image pixels by the letterbox scale.
- The face used: the largest detected box (InstantID's choice; diffusers' recipe takes faces[0], the
  highest score; they agree when one face is in the picture).
- Alignment: the 5 keypoints mapped to ArcFace's 112x112 template (x2 for the 224 Plus crop) by the
  least-squares similarity transform (Umeyama, as skimage's SimilarityTransform.estimate), the image
  warped as cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0) does, in float64 numpy rounded to uint8.
  OpenCV quantizes its bilinear weights to 1/32 pixel, so a crop may differ from insightface's by about
  1 uint8 level at some pixels (measured nothing larger on smooth images; not checkable here, no cv2).
- ArcFace: the 112 crop (resized to the model's input if that is larger), RGB, (x - 127.5) / 127.5 (or 0 / 1 when the graph normalises itself: its first
  nodes are Sub and Mul, insightface's test) -> (1, 512) -> L2-normalised.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DET_SIZE = 640  # diffusers' FaceID recipe: app.prepare(ctx_id=0, det_size=(640, 640))
DET_THRESHOLD = 0.5  # insightface FaceAnalysis det_thresh
NMS_THRESHOLD = 0.4  # SCRFD nms_thresh
# ArcFace's 5-point template on the 112x112 crop: eyes, nose tip, mouth corners (x, y)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


class NoFaceError(ValueError):
    """The image has no face the detector scores >= DET_THRESHOLD."""


@dataclass(frozen=True)
class Face:
    bbox: np.ndarray  # (4,) x1, y1, x2, y2 in image pixels (float32)
    score: float
    kps: np.ndarray  # (5, 2) keypoints (x, y) in image pixels (float32)


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, 2) anchor centres, (N, 4) left/top/right/bottom distances -> (N, 4) x1, y1, x2, y2."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, 2) anchor centres, (N, 10) keypoint offsets (x0, y0, x1, ...) -> (N, 10) keypoints."""
    return distance + np.tile(points, distance.shape[1] // 2)


def nms(dets: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy NMS over (N, 5) [x1, y1, x2, y2, score] rows; indices kept, best score first."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= threshold)[0] + 1]
    return keep


def _bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, clamp: bool) -> np.ndarray:
    """Sample (H, W, C) uint8 at float source coordinates (pixel centres at integers) -> uint8, rounded.
    `clamp`: replicate the edge (cv2.resize); else pixels outside count as 0 (BORDER_CONSTANT 0)."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(xs), np.floor(ys)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    src = image.astype(np.float64)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        if clamp:
            return src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        return np.where(inside, src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    out = top * (1 - fy) + bottom * fy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(image, (width, height)) with INTER_LINEAR: half-pixel centres, no antialiasing."""
    h, w = image.shape[:2]
    xs = np.clip((np.arange(width) + 0.5) * (w / width) - 0.5, 0, None)
    ys = np.clip((np.arange(height) + 0.5) * (h / height) - 0.5, 0, None)
    gx, gy = np.meshgrid(xs, ys)
    return _bilinear(image, gx, gy, clamp=True)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine(image, matrix, (size, size)) (INTER_LINEAR, BORDER_CONSTANT 0): output pixel p takes
    the input at matrix^-1 p. (H, W, 3) uint8 -> (size, size, 3) uint8."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]
    gx, gy = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    xs = inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2]
    ys = inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2]
    return _bilinear(image, xs, ys, clamp=False)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) least-squares similarity (rotation, uniform scale, translation) taking src (N, 2) to
    dst (N, 2): Umeyama's closed form, as skimage.transform.SimilarityTransform.estimate."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    a = dst_c.T @ src_c / n
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(a)
    if np.linalg.matrix_rank(a) == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        rotation = u @ vt  # degenerate (collinear points): skimage's choice
    elif np.linalg.matrix_rank(a) == dim - 1:
        rotation = u @ np.diag([*d[:-1], -1.0]) @ vt
    else:
        rotation = u @ np.diag(d) @ vt
    scale = (s @ d) / src_c.var(0).sum()
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def estimate_norm(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface face_align.estimate_norm (mode "arcface"): the (2, 3) matrix taking the 5 keypoints
    onto the ArcFace template scaled to `size` (a multiple of 112 or of 128, the latter shifted 8 px)."""
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    else:
        raise ValueError(f"the aligned crop size must be a multiple of 112 or 128, not {size}")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += shift
    return similarity_transform(kps, dst)


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """insightface face_align.norm_crop: the face aligned to the template, (size, size, 3) uint8."""
    return warp_affine(image, estimate_norm(kps, size), size)


def _session(path: Path):
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as errors  # none of them is a ValueError

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (errors.Fail, errors.InvalidArgument, errors.InvalidGraph, errors.InvalidProtobuf) as exc:
        raise ValueError(
            f"{path.name} in the InsightFace model pack is not a loadable ONNX model: {exc}"
        ) from exc


def _self_normalising(path: Path) -> bool:
    """insightface ArcFaceONNX: a graph whose first 8 nodes include Sub and Mul normalises its input."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
    mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
    return sub and mul


class FaceAnalysis:
    """One InsightFace model pack: the SCRFD detector and the ArcFace recognizer it holds."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.detector = self.recognizer = None
        for path in sorted(self.directory.rglob("*.onnx")):
            session = _session(path)
            inputs, outputs = session.get_inputs(), session.get_outputs()
            shape = inputs[0].shape
            if len(outputs) >= 5:
                if self.detector is None:
                    self.detector = session
            elif (
                len(inputs) == 1
                and len(outputs) == 1
                and isinstance(shape[2], int)
                and shape[2] != 192  # insightface routes 192x192 inputs to its landmark models first
                and shape[2] == shape[3]
                and shape[2] >= 112
                and shape[2] % 16 == 0
                and self.recognizer is None
            ):
                self.recognizer, self.recognizer_size = session, int(shape[2])
                self.recognizer_mean, self.recognizer_std = (
                    (0.0, 1.0) if _self_normalising(path) else (127.5, 127.5)
                )
        if self.detector is None or self.recognizer is None:
            raise ValueError(
                f"{self.directory} is not an InsightFace model pack: it needs a SCRFD detector (det_*.onnx) "
                "and an ArcFace recognizer (w600k_r50.onnx / glintr100.onnx), as buffalo_l / antelopev2 have"
            )
        outputs = self.detector.get_outputs()
        if len(outputs) not in (6, 9, 10, 15) or len(outputs) in (6, 10):
            raise ValueError(
                f"{self.directory}: the SCRFD detector must predict keypoints (9 or 15 outputs), it has "
                f"{len(outputs)}"
            )
        self.strides = (8, 16, 32) if len(outputs) == 9 else (8, 16, 32, 64, 128)
        self.anchors = 2 if len(outputs) == 9 else 1
        self.output_names = [o.name for o in outputs]
        self.input_name = self.detector.get_inputs()[0].name

    def detect(self, image: np.ndarray, size: int = DET_SIZE) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, as SCRFD.detect (insightface order: best score first)."""
        h, w = image.shape[:2]
        if h / w > 1.0:
            new_h = size
            new_w = int(new_h / (h / w))
        else:
            new_w = size
            new_h = int(new_w * (h / w))
        scale = new_h / h
        canvas = np.zeros((size, size, 3), dtype=np.uint8)  # the letterbox, image at the top left
        canvas[:new_h, :new_w] = resize_linear(image, new_w, new_h)
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # (1, 3, S, S)
        outs = self.detector.run(self.output_names, {self.input_name: blob})
        fmc = len(self.strides)
        scores_all, boxes_all, kps_all = [], [], []
        for i, stride in enumerate(self.strides):
            scores = outs[i].reshape(-1)  # (N,), N = (S / stride)^2 * anchors
            boxes = outs[i + fmc].reshape(-1, 4) * stride
            kps = outs[i + 2 * fmc].reshape(-1, 10) * stride
            cells = size // stride
            centres = np.stack(np.mgrid[:cells, :cells][::-1], axis=-1).astype(np.float32)  # (y, x, (x, y))
            centres = np.repeat((centres * stride).reshape(-1, 2), self.anchors, axis=0)
            keep = np.where(scores >= DET_THRESHOLD)[0]
            scores_all.append(scores[keep])
            boxes_all.append(distance2bbox(centres, boxes)[keep])
            kps_all.append(distance2kps(centres, kps)[keep].reshape(-1, 5, 2))
        scores = np.concatenate(scores_all)
        order = scores.argsort()[::-1]
        dets = np.hstack([np.concatenate(boxes_all) / scale, scores[:, None]]).astype(np.float32)[order]
        kpss = (np.concatenate(kps_all) / scale).astype(np.float32)[order]
        kept = nms(dets)
        return [Face(dets[k, :4], float(dets[k, 4]), kpss[k]) for k in kept]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """ArcFace's (512,) L2-normalised embedding of `face` (insightface's `normed_embedding`)."""
        crop = norm_crop(image, face.kps, 112)  # insightface aligns at 112 whatever the input size, then
        if self.recognizer_size != 112:  # blobFromImages resizes (INTER_LINEAR) to it
            crop = resize_linear(crop, self.recognizer_size, self.recognizer_size)
        blob = (crop.astype(np.float32) - self.recognizer_mean) / self.recognizer_std
        blob = blob.transpose(2, 0, 1)[None]  # (1, 3, 112, 112)
        name = self.recognizer.get_inputs()[0].name
        embedding = self.recognizer.run(None, {name: blob})[0].reshape(-1).astype(np.float32)
        return embedding / np.linalg.norm(embedding)

    def largest(self, image: np.ndarray) -> Face:
        faces = self.detect(image)
        if not faces:
            raise NoFaceError("no face found in the image (SCRFD score >= 0.5): give a picture with a face")
        areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
        return faces[int(np.argmax(areas))]


def unpack(pack: bytes | Path, cache: Path) -> Path:
    """A .zip model pack (as insightface's buffalo_l.zip: its bytes, or its file in the checkpoint store,
    named `<sha256>.zip`) unpacked once under `cache`/<sha256>: its path."""
    if isinstance(pack, Path):
        stem = pack.stem
        digest = stem if re.fullmatch(r"[0-9a-f]{64}", stem) else _file_digest(pack)
    else:
        digest = hashlib.sha256(pack).hexdigest()
    target = cache / digest
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache))  # this process's own
        with zipfile.ZipFile(io.BytesIO(pack) if isinstance(pack, bytes) else pack) as archive:
            for member in archive.namelist():
                # only the .onnx files, flattened: no path from the archive reaches the file system
                if member.endswith(".onnx"):
                    with archive.open(member) as src, open(tmp / Path(member).name, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 22)
        try:
            tmp.rename(target)
        except OSError:  # another process unpacked the same pack first
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class FacePacks:
    """Loaded model packs by directory, least recently used leaving first."""

    def __init__(self, capacity: int = 2):
        self._packs: OrderedDict[str, FaceAnalysis] = OrderedDict()
        self._capacity = capacity

    def get(self, directory: str) -> FaceAnalysis:
        if directory not in self._packs:
            self._packs[directory] = FaceAnalysis(Path(directory))
            while len(self._packs) > self._capacity:
                self._packs.popitem(last=False)
        self._packs.move_to_end(directory)
        return self._packs[directory]


PACKS = FacePacks()
