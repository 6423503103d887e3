#!/usr/bin/env python
"""Derive COCO semantic labels from the COCO 2017 panoptic annotations (for the
``coco_2017_{train,val}_panoptic_with_sem_seg`` datasets).

Every pixel gets the contiguous id of its segment's category over all 133 panoptic categories in
Detectron2's ``COCO_CATEGORIES`` order (80 things then 53 stuff: 0..132). Crowd segments keep their
category (a crowd of people is still "person" for semantic segmentation); pixels of no segment (VOID)
get 255 = ignore.
Written to ``coco/panoptic_semseg_{train,val}2017/<same name>.png``.

Usage:
    python datasets/prepare_coco_semantic_annos_from_panoptic.py [--root $DETECTRON2_DATASETS] [--workers 4]
"""

import argparse
import functools
import json
import multiprocessing as mp
import os
import time
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

__all__ = ["contiguous_id_map", "panoptic_to_semantic_png", "convert_panoptic_json", "main"]

IGNORE_LABEL = 255


def contiguous_id_map(categories: Optional[List[dict]] = None) -> Dict[int, int]:
    """COCO category id -> contiguous id (list order); default: Detectron2's COCO_CATEGORIES."""
    if categories is None:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES as categories
    return {c["id"]: i for i, c in enumerate(categories)}


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
    """Convert every annotation of ``panoptic_json``; returns the number of PNGs written."""
    from tqdm import tqdm

    for p in (panoptic_json, panoptic_root):
        if not os.path.exists(p):
            raise FileNotFoundError(f"COCO panoptic input not found: {p}")
    with open(panoptic_json) as f:
        annotations = json.load(f)["annotations"]
    os.makedirs(sem_seg_root, exist_ok=True)
    fn = functools.partial(
        _convert_one, panoptic_root=panoptic_root, sem_seg_root=sem_seg_root, id_map=contiguous_id_map(categories)
    )
    if workers > 1:
        with mp.Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(fn, annotations, chunksize=64), total=len(annotations)):
                pass
    else:
        for ann in tqdm(annotations, desc=os.path.basename(sem_seg_root)):
            fn(ann)
    return len(annotations)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    coco = os.path.join(args.root, "coco")
    for split in ("val2017", "train2017"):
        start = time.perf_counter()
        n = convert_panoptic_json(
            os.path.join(coco, "annotations", f"panoptic_{split}.json"),
            os.path.join(coco, f"panoptic_{split}"),
            os.path.join(coco, f"panoptic_semseg_{split}"),
            workers=args.workers,
        )
        print(f"{split}: {n} semantic label maps in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
