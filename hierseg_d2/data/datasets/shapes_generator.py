"""Deterministic generator of the embedded "shapes" dataset (COCO panoptic / instances / semantic layout).

Every image is drawn from its own seeded random stream (``seed``, split, index), so a dataset is
bit-identical whatever order or machine it is generated on, and a split of N images is a prefix of a
split of M > N images.

Layout written under ``<root>/shapes`` (``root`` = ``$DETECTRON2_DATASETS``, default ``./datasets``)::

    shapes/
      {train,val}/                    images, 000001.jpg ...
      panoptic_{train,val}/           COCO panoptic PNGs (id = R + 256 G + 256^2 B), 000001.png ...
      panoptic_semseg_{train,val}/    semantic labels, 000001.png ...: contiguous ids, things first
                                      (0-7) then stuff (8-11), 255 = ignore (Mask2Former convention)
      annotations/panoptic_{train,val}.json   COCO panoptic (categories with isthing/color)
      annotations/instances_{train,val}.json  COCO instances (RLE masks, bbox, area, iscrowd=0)
      READY                           written last: json of the generation parameters
      .lock                           file lock serialising first-use generation

Why it is learnable in a CPU demo but not trivial: 8 thing classes are *shapes*, each in its own
colour family (class k: hue 45k degrees +- 12, random saturation and brightness, soft shading), like
real object classes whose appearance correlates with the class; 4 stuff classes are *textures*
(stripes, checker, dots, gradient) in low-saturation colours, so colour says nothing about the stuff
class and things stand out from the background. Masks and instances still need shape: things of one
class overlap and occlude each other (each keeps >= 60 % of its area visible), shapes are large
(radius 14-26 % of the short side, centres at least one radius inside the image) and stuff regions
are a few coherent blobs. Version 1 drew things in random colours too: a from-scratch ResNet-18 could
not learn the classes in 15 CPU-minutes (docs/training.md).
"""

import colorsys
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_VERSION",
    "DEFAULT_NUM_IMAGES",
    "shapes_dir",
    "shapes_paths",
    "is_generated",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "render_image",
]

logger = logging.getLogger(__name__)

SHAPES_VERSION = 2
DEFAULT_SEED = 0
DEFAULT_NUM_IMAGES = {"train": 300, "val": 50}

# COCO-panoptic style category list: things first, then stuff; ids 1..12, contiguous id = id - 1.
# fmt: off
SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 82, 0]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [0, 0, 142]},
    {"id": 4, "name": "star", "isthing": 1, "color": [250, 170, 30]},
    {"id": 5, "name": "ring", "isthing": 1, "color": [106, 0, 228]},
    {"id": 6, "name": "cross", "isthing": 1, "color": [0, 226, 252]},
    {"id": 7, "name": "hexagon", "isthing": 1, "color": [255, 77, 255]},
    {"id": 8, "name": "ellipse", "isthing": 1, "color": [119, 166, 47]},
    {"id": 9, "name": "stripes", "isthing": 0, "color": [128, 64, 128]},
    {"id": 10, "name": "checker", "isthing": 0, "color": [70, 70, 70]},
    {"id": 11, "name": "dots", "isthing": 0, "color": [152, 251, 152]},
    {"id": 12, "name": "gradient", "isthing": 0, "color": [70, 130, 180]},
]
# fmt: on
_THINGS = [c for c in SHAPES_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SHAPES_CATEGORIES if not c["isthing"]]
IGNORE_LABEL = 255

# size ranges (pixels); 96..192 on purpose not restricted to multiples of 32
_MIN_SIDE, _MAX_SIDE = 96, 192
_MIN_VISIBLE_FRACTION = 0.6  # an occluded thing keeps at least this fraction of its own area
_MIN_THING_AREA = 80
_THING_HUE_STEP, _THING_HUE_JITTER = 45.0, 12.0  # degrees: class k's hue is 45 k +- 12 (families do not overlap)
_STUFF_MAX_SATURATION = 0.35  # HSV saturation of texture colours; things have >= 0.65
_CENTRE_MARGIN = 1.0  # thing centres at least this many radii inside the image: shapes are not cut off


# ----------------------------------------------------------------------------- paths
def shapes_dir(root: str) -> str:
    return os.path.join(root, "shapes")


def shapes_paths(root: str, split: str) -> Dict[str, str]:
    """Every path of one split, keyed like Detectron2 metadata (image_root, panoptic_root, ...)."""
    d = shapes_dir(root)
    return {
        "image_root": os.path.join(d, split),
        "panoptic_root": os.path.join(d, f"panoptic_{split}"),
        "sem_seg_root": os.path.join(d, f"panoptic_semseg_{split}"),
        "panoptic_json": os.path.join(d, "annotations", f"panoptic_{split}.json"),
        "instances_json": os.path.join(d, "annotations", f"instances_{split}.json"),
    }


_LOCK_NAME = ".lock"


def _marker(root: str) -> str:
    return os.path.join(shapes_dir(root), "READY")


def _read_marker(root: str) -> Optional[dict]:
    try:
        with open(_marker(root)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_generated(root: str, num_images: Optional[Dict[str, int]] = None, seed: Optional[int] = None) -> bool:
    """True when a complete dataset is on disk (and matches ``num_images``/``seed`` when given)."""
    info = _read_marker(root)
    if info is None or info.get("version") != SHAPES_VERSION:
        return False
    if seed is not None and info.get("seed") != seed:
        return False
    if num_images is not None and any(info["num_images"].get(s) != n for s, n in num_images.items()):
        return False
    return True


# ----------------------------------------------------------------------------- drawing
def _regular_polygon(cx, cy, r, n, angle, radii=None):
    k = np.arange(n)
    a = angle + 2 * np.pi * k / n
    rr = r if radii is None else np.asarray(radii)
    return np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1)


def _cross_polygon(cx, cy, r, angle):
    w = 0.36 * r  # half width of an arm
    pts = np.array(
        [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)],
        dtype=np.float64,
    )
    c, s = np.cos(angle), np.sin(angle)
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + [cx, cy]


def _shape_mask(name: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Binary mask (h, w) of one thing; sub-pixel accurate polygons via cv2's fixed-point shift."""
    m = np.zeros((h, w), np.uint8)
    shift = 4
    sc = 1 << shift

    def poly(p):
        cv2.fillPoly(m, [np.round(np.asarray(p) * sc).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)

    center = (int(round(cx * sc)), int(round(cy * sc)))
    if name == "circle":
        cv2.circle(m, center, int(round(r * sc)), 1, -1, shift=shift)
    elif name == "ring":
        cv2.circle(m, center, int(round(r * sc)), 1, -1, shift=shift)
        cv2.circle(m, center, int(round(0.5 * r * sc)), 0, -1, shift=shift)
    elif name == "ellipse":
        axes = (int(round(r * sc)), int(round(0.5 * r * sc)))
        cv2.ellipse(m, center, axes, float(np.degrees(angle)), 0, 360, 1, -1, shift=shift)
    elif name == "square":
        poly(_regular_polygon(cx, cy, r, 4, angle))
    elif name == "triangle":
        poly(_regular_polygon(cx, cy, 1.15 * r, 3, angle))
    elif name == "hexagon":
        poly(_regular_polygon(cx, cy, r, 6, angle))
    elif name == "star":
        poly(_regular_polygon(cx, cy, 1.1 * r, 10, angle, radii=[1.1 * r, 0.5 * r] * 5))
    elif name == "cross":
        poly(_cross_polygon(cx, cy, r, angle))
    else:
        raise ValueError(f"unknown shape {name!r}")
    return m.astype(bool)


def _hsv(h, s, v) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _stuff_color(rng) -> np.ndarray:
    return _hsv(rng.uniform(), rng.uniform(0, _STUFF_MAX_SATURATION), rng.uniform(0.15, 0.95))


def _thing_color(rng, cat_index: int) -> np.ndarray:
    hue = (_THING_HUE_STEP * cat_index + rng.uniform(-_THING_HUE_JITTER, _THING_HUE_JITTER)) / 360.0
    return _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))


def _contrasting_pair(rng) -> Tuple[np.ndarray, np.ndarray]:
    # two random colours far enough apart that the texture stays visible under noise
    while True:
        a, b = _stuff_color(rng), _stuff_color(rng)
        if np.abs(a - b).sum() > 180:
            return a, b


def _texture(name: str, h: int, w: int, rng) -> np.ndarray:
    """(h, w, 3) float texture of a stuff class; colours are random greyish ones, the pattern is the class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c1, c2 = _contrasting_pair(rng)
    if name == "stripes":
        period = rng.uniform(7, 12)
        ang = rng.uniform(0, np.pi)
        t = (xx * np.cos(ang) + yy * np.sin(ang) + rng.uniform(0, period)) % period < period / 2
    elif name == "checker":
        cell = rng.uniform(6, 10)
        ang = rng.uniform(0, np.pi / 2)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        t = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    elif name == "dots":
        sp = rng.uniform(8, 11)
        rad = rng.uniform(2.0, 2.8)
        ox, oy = rng.uniform(0, sp, 2)
        dx = (xx + ox) % sp - sp / 2
        dy = (yy + oy) % sp - sp / 2
        t = dx * dx + dy * dy < rad * rad
    elif name == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        u = (u - u.min()) / max(u.max() - u.min(), 1.0)
        return (1 - u)[..., None] * c1 + u[..., None] * c2
    else:
        raise ValueError(f"unknown stuff {name!r}")
    return np.where(t[..., None], c1, c2)


def _stuff_layout(h: int, w: int, rng) -> Tuple[np.ndarray, List[int]]:
    """A few coherent regions: warped Voronoi cells of 1-3 seeds; returns (region map, stuff index/region)."""
    k = int(rng.choice([1, 2, 3], p=[0.15, 0.45, 0.4]))
    classes = [int(c) for c in rng.choice(len(_STUFF), size=k, replace=False)]
    if k == 1:
        return np.zeros((h, w), np.int64), classes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    seeds = rng.uniform([0, 0], [w, h], size=(k, 2))
    dist = []
    for sx, sy in seeds:
        # smooth random warp so borders are curved, not straight Voronoi edges
        # (low amplitude and frequency: one blob per seed, no islands)
        fx, fy, ph = rng.uniform(0.004, 0.012), rng.uniform(0.004, 0.012), rng.uniform(0, 2 * np.pi, 2)
        warp = 0.06 * min(h, w) * (np.sin(fx * 2 * np.pi * xx + ph[0]) + np.sin(fy * 2 * np.pi * yy + ph[1]))
        dist.append(np.hypot(xx - sx, yy - sy) + warp)
    regions = np.argmin(np.stack(dist), 0)
    # one connected piece per region: stray islands of the warp go to the nearest main piece
    from scipy import ndimage

    keep = np.zeros((h, w), bool)
    for r in range(k):
        lab, n = ndimage.label(regions == r)
        if n:
            keep |= lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    if not keep.all():
        idx = ndimage.distance_transform_edt(~keep, return_distances=False, return_indices=True)
        regions = regions[idx[0], idx[1]]
    return regions, classes


def render_image(seed: int, split: str, index: int):
    """Draw one sample. Returns (image uint8 HxWx3, semantic uint8 HxW, list of thing dicts, stuff
    dict {dataset id: visible mask}). Thing dicts: {"category_id": dataset id, "mask": visible bool mask,
    "drawn_area": area of the whole shape before later shapes covered it}."""
    split_code = {"train": 1, "val": 2}.get(split, 3 + sum(map(ord, split)))
    rng = np.random.default_rng([seed, split_code, index])
    h, w = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))

    # --- stuff background
    regions, stuff_idx = _stuff_layout(h, w, rng)
    image = np.zeros((h, w, 3), np.float64)
    stuff_masks = {}
    for r, si in enumerate(stuff_idx):
        m = regions == r
        image[m] = _texture(_STUFF[si]["name"], h, w, rng)[m]
        stuff_masks[si] = m

    # --- things, placed so that every earlier thing keeps >= _MIN_VISIBLE_FRACTION of its area visible
    n_target = int(rng.integers(2, 7))
    things: List[dict] = []
    short = min(h, w)
    for _ in range(40):
        if len(things) >= n_target:
            break
        ci = int(rng.integers(len(_THINGS)))
        cat = _THINGS[ci]
        r = rng.uniform(0.14, 0.26) * short
        mg = _CENTRE_MARGIN * r
        cx, cy = rng.uniform(mg, w - mg), rng.uniform(mg, h - mg)
        mask = _shape_mask(cat["name"], h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
        area = int(mask.sum())
        if area < _MIN_THING_AREA:
            continue
        ok = all(
            (t["visible"] & ~mask).sum() >= max(_MIN_VISIBLE_FRACTION * t["area"], _MIN_THING_AREA) for t in things
        )
        if not ok:
            continue
        for t in things:
            t["visible"] &= ~mask
        things.append({"category_id": cat["id"], "visible": mask.copy(), "full": mask, "area": area})
        # the class's colour family with a soft linear shading
        col = _thing_color(rng, ci)
        yy, xx = np.nonzero(mask)
        g = rng.uniform(-1, 1, 2)
        shade = ((xx - cx) * g[0] + (yy - cy) * g[1]) / max(r, 1.0) * 18.0
        image[yy, xx] = np.clip(col[None, :] + shade[:, None], 0, 255)

    image = image + rng.normal(0, 7.0, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # --- labels: contiguous ids, things (0-7) then stuff (8-11)
    semantic = np.full((h, w), IGNORE_LABEL, np.uint8)
    for si, m in stuff_masks.items():
        semantic[m] = len(_THINGS) + si
    for t in things:
        semantic[t["visible"]] = t["category_id"] - 1
    stuff_out = {}
    for si, m in stuff_masks.items():
        vis = m & ~np.any([t["visible"] for t in things], 0) if things else m
        if vis.any():
            stuff_out[_STUFF[si]["id"]] = vis
    thing_out = [{"category_id": t["category_id"], "mask": t["visible"], "drawn_area": t["area"]} for t in things]
    return image, semantic, thing_out, stuff_out


# ----------------------------------------------------------------------------- writing
def _bbox(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _write_split(root: str, split: str, num: int, seed: int, progress: bool) -> None:
    from panopticapi.utils import id2rgb
    from pycocotools import mask as mask_util
    from tqdm import tqdm

    p = shapes_paths(root, split)
    for k in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(p[k], exist_ok=True)
    os.makedirs(os.path.dirname(p["panoptic_json"]), exist_ok=True)

    images, pan_anns, inst_anns = [], [], []
    for i in tqdm(range(num), desc=f"shapes {split}", disable=not progress, unit="img"):
        image_id = i + 1
        stem = f"{image_id:06d}"
        image, semantic, things, stuff = render_image(seed, split, i)
        h, w = semantic.shape
        Image.fromarray(image).save(os.path.join(p["image_root"], stem + ".jpg"), quality=95)
        Image.fromarray(semantic).save(os.path.join(p["sem_seg_root"], stem + ".png"))

        pan = np.zeros((h, w), np.int32)
        segments = []
        for seg_id, (cat_id, mask) in enumerate(
            [(t["category_id"], t["mask"]) for t in things] + sorted(stuff.items()), start=1
        ):
            pan[mask] = seg_id
            segments.append(
                {"id": seg_id, "category_id": int(cat_id), "iscrowd": 0, "area": int(mask.sum()), "bbox": _bbox(mask)}
            )
        Image.fromarray(id2rgb(pan)).save(os.path.join(p["panoptic_root"], stem + ".png"))

        images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments})
        for t in things:
            rle = mask_util.encode(np.asfortranarray(t["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            inst_anns.append(
                {
                    "id": len(inst_anns) + 1,
                    "image_id": image_id,
                    "category_id": t["category_id"],
                    "segmentation": rle,
                    "area": int(t["mask"].sum()),
                    "bbox": _bbox(t["mask"]),
                    "iscrowd": 0,
                }
            )

    info = {"description": f"hierseg_d2 shapes {split}", "version": SHAPES_VERSION, "seed": seed}
    with open(p["panoptic_json"], "w") as f:
        json.dump({"info": info, "images": images, "annotations": pan_anns, "categories": SHAPES_CATEGORIES}, f)
    with open(p["instances_json"], "w") as f:
        json.dump({"info": info, "images": images, "annotations": inst_anns, "categories": _THINGS}, f)


def generate_shapes_dataset(
    root: str,
    num_images: Optional[Dict[str, int]] = None,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> str:
    """Write the dataset to ``<root>/shapes`` (replacing what is there) and return that directory.

    The READY marker is removed first and written last (atomically), so a half-written dataset is
    never taken for a complete one. Everything stays inside ``<root>/shapes`` (one gitignored
    directory), including the lock file of :func:`ensure_shapes_dataset`, which is kept.
    """
    num_images = dict(DEFAULT_NUM_IMAGES if num_images is None else num_images)
    out = shapes_dir(root)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name == _LOCK_NAME:  # other processes may be waiting on it
            continue
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for split, num in num_images.items():
        _write_split(root, split, int(num), seed, progress)
    tmp = f"{_marker(root)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": SHAPES_VERSION, "seed": seed, "num_images": num_images}, f)
    os.replace(tmp, _marker(root))
    return out


def ensure_shapes_dataset(
    root: str,
    num_images: Optional[Dict[str, int]] = None,
    seed: Optional[int] = None,
    progress: bool = True,
) -> str:
    """Generate the dataset unless a complete one is already there (first-use generation).

    A file lock serialises concurrent callers (e.g. two training processes started together): the
    first generates, the others wait and then find the READY marker. ``num_images``/``seed`` of None
    accept whatever complete dataset exists (default sizes when generating).
    """
    if is_generated(root, num_images, seed):
        return shapes_dir(root)
    from filelock import FileLock  # a dependency of torch, hence always present

    os.makedirs(shapes_dir(root), exist_ok=True)
    with FileLock(os.path.join(shapes_dir(root), _LOCK_NAME)):
        if not is_generated(root, num_images, seed):
            logger.info(f"Generating the shapes dataset into {shapes_dir(root)} ...")
            generate_shapes_dataset(root, num_images, DEFAULT_SEED if seed is None else seed, progress=progress)
    return shapes_dir(root)
