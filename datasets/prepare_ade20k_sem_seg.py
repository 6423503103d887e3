#!/usr/bin/env python
"""Convert ADE20K-150 (SceneParsing, ADEChallengeData2016) labels to Detectron2's convention.

The released annotations store 0 = "other/unlabeled" and 1..150 = the classes. Detectron2's
``ade20k_sem_seg_{train,val}`` expect 0..149 with 255 = ignore, written to
``ADEChallengeData2016/annotations_detectron2/{training,validation}``. The splits that are present are
converted and the missing ones named (an error if none is present).

Usage:
    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]
"""

import argparse
import os

import numpy as np
from PIL import Image

__all__ = ["convert_label", "convert_split", "main"]


def convert_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignore), k -> k - 1: uint8 arithmetic wraps 0 - 1 to 255."""
    return (label.astype(np.uint8) - 1).astype(np.uint8)


def convert_split(src_dir: str, dst_dir: str) -> int:
    """Convert every PNG of ``src_dir`` into ``dst_dir``; returns the number of files written."""
    from tqdm import tqdm

    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"ADE20K annotation directory not found: {src_dir}")
    os.makedirs(dst_dir, exist_ok=True)
    files = sorted(f for f in os.listdir(src_dir) if f.endswith(".png"))
    for f in tqdm(files, desc=os.path.basename(src_dir)):
        label = np.asarray(Image.open(os.path.join(src_dir, f)))
        if label.ndim != 2:
            raise ValueError(f"{os.path.join(src_dir, f)}: expected a single-channel label PNG, got {label.shape}")
        Image.fromarray(convert_label(label)).save(os.path.join(dst_dir, f))
    return len(files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    done, missing = [], []
    for split in ("training", "validation"):
        src = os.path.join(base, "annotations", split)
        if not os.path.isdir(src):
            missing.append(src)
            continue
        n = convert_split(src, os.path.join(base, "annotations_detectron2", split))
        done.append(split)
        print(f"{split}: {n} label maps converted")
    for m in missing:
        print(f"skipped {m}: not found")
    if not done:
        raise SystemExit(f"no ADE20K split found: {', '.join(missing)}")


if __name__ == "__main__":
    main()
