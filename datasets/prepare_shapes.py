#!/usr/bin/env python
"""Generate the embedded "shapes" dataset into $DETECTRON2_DATASETS/shapes (default ./datasets/shapes).

Usage:
    python datasets/prepare_shapes.py [--root DIR] [--num-train 300] [--num-val 50] [--seed 0] [--force]

The generator itself lives in the package (``hierseg_d2.data.datasets.shapes_generator``) because
registering/using the ``shapes_*`` datasets generates them on first use; this script is the explicit
entry point and re-exports the generator so it can be imported from here as well.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from hierseg_d2.data.datasets.shapes_generator import (  # noqa: E402
    DEFAULT_NUM_IMAGES,
    DEFAULT_SEED,
    SHAPES_CATEGORIES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    render_image,
)

__all__ = ["SHAPES_CATEGORIES", "generate_shapes_dataset", "ensure_shapes_dataset", "render_image", "main"]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_IMAGES["train"])
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_IMAGES["val"])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    args = parser.parse_args(argv)
    num = {"train": args.num_train, "val": args.num_val}
    start = time.perf_counter()
    if args.force:
        out = generate_shapes_dataset(args.root, num, args.seed)
    else:
        out = ensure_shapes_dataset(args.root, num, args.seed)
    print(f"shapes dataset ready in {out} ({time.perf_counter() - start:.1f} s)")
    return out


if __name__ == "__main__":
    main()
