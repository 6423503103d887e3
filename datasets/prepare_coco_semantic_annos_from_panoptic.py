#!/usr/bin/env python
"""Derive semantic labels (and, on request, an instances json) from COCO-format panoptic annotations.

COCO 2017 (the ``coco_2017_{train,val}_panoptic_with_sem_seg`` datasets): every pixel gets the
contiguous id of its segment's category over all 133 panoptic categories in Detectron2's
``COCO_CATEGORIES`` order (80 things then 53 stuff: 0..132), written to
``coco/panoptic_semseg_{train,val}2017/<same name>.png``. The splits that are present are converted,
the missing ones are named (an error if none is present).

Your own COCO-panoptic dataset (docs/custom_datasets.md): ``--panoptic-json`` with ``--panoptic-root``
and ``--sem-seg-root``; contiguous ids are those of
:func:`hierseg_d2.data.datasets.panoptic_metadata` (things first, then stuff, each in the json's
order, whatever the ids). ``--instances-json FILE`` also writes the thing segments as a COCO instances
json (RLE masks) for mask AP / instance training.

Crowd segments keep their category (a crowd of people is still "person" for semantic segmentation);
pixels of no segment (VOID) get 255 = ignore.

Usage:
    python datasets/prepare_coco_semantic_annos_from_panoptic.py [--root $DETECTRON2_DATASETS] [--workers 4]
    python datasets/prepare_coco_semantic_annos_from_panoptic.py --panoptic-json my/panoptic_train.json \
        --panoptic-root my/panoptic_train --sem-seg-root my/panoptic_train_semseg \
        [--instances-json my/instances_train.json]
"""

import argparse
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hierseg_d2 from a checkout

__all__ = ["contiguous_id_map", "panoptic_to_semantic_png", "convert_panoptic_json", "panoptic_to_instances_json",
           "main"]

IGNORE_LABEL = 255


def contiguous_id_map(categories: Optional[List[dict]] = None) -> Dict[int, int]:
    """Category id -> contiguous id, things first (:func:`panoptic_metadata`, the ids the registrations
    and models use); default: Detectron2's COCO_CATEGORIES (already things first: list order)."""
    from hierseg_d2.data.datasets.register_coco_panoptic_annos_semseg import panoptic_metadata

    if categories is None:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES as categories
    return panoptic_metadata(categories)["stuff_dataset_id_to_contiguous_id"]


def panoptic_to_semantic_png(segments_info, pan_file: str, out_file: str, id_map: Dict[int, int]) -> None:
    """Write the semantic label PNG of one panoptic annotation."""
    from panopticapi.utils import rgb2id

    pan = rgb2id(np.asarray(Image.open(pan_file).convert("RGB"), dtype=np.uint32))
    sem = np.full(pan.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        if seg["category_id"] not in id_map:
            raise KeyError(f"{pan_file}: segment {seg['id']} has category_id {seg['category_id']} unknown to the map")
        sem[pan == seg["id"]] = id_map[seg["category_id"]]
    Image.fromarray(sem).save(out_file)


def _convert_one(ann, panoptic_root, sem_seg_root, id_map):
    panoptic_to_semantic_png(
        ann["segments_info"],
        os.path.join(panoptic_root, ann["file_name"]),
        os.path.join(sem_seg_root, ann["file_name"]),
        id_map,
    )


def convert_panoptic_json(
    panoptic_json: str, panoptic_root: str, sem_seg_root: str, categories=None, workers: int = 0
) -> int:
    """Convert every annotation of ``panoptic_json``; returns the number of PNGs written.
    ``categories`` default: the json's own (COCO's, if it has none)."""
    from tqdm import tqdm

    for p in (panoptic_json, panoptic_root):
        if not os.path.exists(p):
            raise FileNotFoundError(f"COCO panoptic input not found: {p}")
    with open(panoptic_json) as f:
        info = json.load(f)
    annotations = info["annotations"]
    os.makedirs(sem_seg_root, exist_ok=True)
    fn = functools.partial(
        _convert_one, panoptic_root=panoptic_root, sem_seg_root=sem_seg_root,
        id_map=contiguous_id_map(categories if categories is not None else info.get("categories")),
    )
    if workers > 1:
        with mp.Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(fn, annotations, chunksize=64), total=len(annotations)):
                pass
    else:
        for ann in tqdm(annotations, desc=os.path.basename(sem_seg_root)):
            fn(ann)
    return len(annotations)


def panoptic_to_instances_json(panoptic_json: str, panoptic_root: str, instances_json: str) -> int:
    """Write the thing segments of ``panoptic_json`` as a COCO instances json (RLE masks, the panoptic
    json's images and thing categories, ``iscrowd`` kept); returns the number of instances."""
    from panopticapi.utils import rgb2id
    from pycocotools import mask as mask_util

    with open(panoptic_json) as f:
        info = json.load(f)
    things = {c["id"] for c in info["categories"] if c["isthing"]}
    annotations = []
    for ann in info["annotations"]:
        pan_file = os.path.join(panoptic_root, ann["file_name"])
        if not os.path.exists(pan_file):
            raise FileNotFoundError(f"{panoptic_json}: panoptic PNG {pan_file} not found")
        pan = rgb2id(np.asarray(Image.open(pan_file).convert("RGB"), dtype=np.uint32))
        for seg in ann["segments_info"]:
            if seg["category_id"] not in things:
                continue
            mask = np.asfortranarray(pan == seg["id"], dtype=np.uint8)
            if not mask.any():
                continue
            rle = mask_util.encode(mask)
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1, "image_id": ann["image_id"], "category_id": seg["category_id"],
                "segmentation": rle, "area": int(mask.sum()), "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": int(seg.get("iscrowd", 0)),
            })
    out = {"images": info["images"], "annotations": annotations,
           "categories": [c for c in info["categories"] if c["isthing"]]}
    os.makedirs(os.path.dirname(os.path.abspath(instances_json)), exist_ok=True)
    with open(instances_json, "w") as f:
        json.dump(out, f)
    return len(annotations)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                        help="COCO 2017 mode: the directory holding coco/")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--panoptic-json", help="your own dataset: its COCO panoptic json")
    parser.add_argument("--panoptic-root", help="your own dataset: the directory of its panoptic PNGs")
    parser.add_argument("--sem-seg-root", help="your own dataset: where to write the semantic label PNGs")
    parser.add_argument("--instances-json", help="your own dataset: also write a COCO instances json here")
    args = parser.parse_args(argv)
    if args.panoptic_json:
        if not args.panoptic_root or not (args.sem_seg_root or args.instances_json):
            parser.error("--panoptic-json needs --panoptic-root and --sem-seg-root and/or --instances-json")
        if args.sem_seg_root:
            n = convert_panoptic_json(args.panoptic_json, args.panoptic_root, args.sem_seg_root, workers=args.workers)
            print(f"{n} semantic label maps in {args.sem_seg_root}")
        if args.instances_json:
            n = panoptic_to_instances_json(args.panoptic_json, args.panoptic_root, args.instances_json)
            print(f"{n} instances in {args.instances_json}")
        return
    coco = os.path.join(args.root, "coco")
    done, missing = [], []
    for split in ("val2017", "train2017"):
        pan_json = os.path.join(coco, "annotations", f"panoptic_{split}.json")
        pan_root = os.path.join(coco, f"panoptic_{split}")
        absent = [p for p in (pan_json, pan_root) if not os.path.exists(p)]
        if absent:
            missing.append(f"{split} (no {', '.join(absent)})")
            continue
        start = time.perf_counter()
        n = convert_panoptic_json(pan_json, pan_root, os.path.join(coco, f"panoptic_semseg_{split}"),
                                  workers=args.workers)
        done.append(split)
        print(f"{split}: {n} semantic label maps in {time.perf_counter() - start:.0f} s")
    for m in missing:
        print(f"skipped {m}")
    if not done:
        raise SystemExit(f"no COCO panoptic split found under {coco}: " + "; ".join(missing))


if __name__ == "__main__":
    main()
