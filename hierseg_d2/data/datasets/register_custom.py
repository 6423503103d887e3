"""Your own dataset in one call per format (docs/custom_datasets.md), and the ``--register`` import.

* :func:`register_custom_coco_panoptic` -- COCO panoptic json + PNGs: ``<name>_panoptic``,
  ``<name>_panoptic_with_sem_seg``, ``<name>_sem_seg`` and, with an instances json, ``<name>_instance``;
* :func:`register_custom_coco_instances` -- COCO instances json: ``<name>_instance``;
* :func:`register_custom_semantic` -- an image folder and a label-PNG folder: ``<name>_sem_seg``.

Images are matched by the json's ``file_name`` or, for label folders, by file stem, whatever their
extension. Category ids may be any integers in any order: contiguous ids put the things first (see
:func:`panoptic_metadata`), so that Detectron2's Visualizer and evaluators index the right class.

:func:`import_registrations` imports the files / modules named by ``--register`` and
``DATASETS.REGISTER`` (train_net.py, demo/demo.py, tools/*.py) before the config is used.
"""

import importlib
import importlib.util
import json
import logging
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.utils.file_io import PathManager

from .register_coco_panoptic_annos_semseg import panoptic_metadata, register_coco_panoptic_annos_sem_seg
from .utils import images_by_stem, register_dataset, with_required_paths

__all__ = [
    "register_custom_coco_panoptic",
    "register_custom_coco_instances",
    "register_custom_semantic",
    "load_semantic_folder",
    "import_registrations",
    "add_register_argument",
    "dataset_num_classes",
    "check_num_classes",
    "setup_datasets",
    "convert_semantic_labels",
]

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
_PREPARE = "datasets/prepare_coco_semantic_annos_from_panoptic.py"


def _json_categories(json_file: str) -> List[dict]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO json not found: {json_file}")
    with PathManager.open(json_file) as f:
        categories = json.load(f).get("categories")
    if not categories:
        raise ValueError(f"{json_file} has no 'categories' list")
    return categories


# ---------------------------------------------------------------------------------------------------------------
# COCO panoptic
# ---------------------------------------------------------------------------------------------------------------
def register_custom_coco_panoptic(
    name: str,
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str] = None,
    instances_json: Optional[str] = None,
    categories: Optional[List[dict]] = None,
) -> List[str]:
    """Register a COCO-panoptic-format split under the names the panoptic, semantic and instance configs use.

    Args:
        name: prefix, e.g. ``"mydata_train"`` -> ``mydata_train_panoptic``, ...
        image_root: the images (any extension; named by the json's ``images[].file_name``).
        panoptic_root, panoptic_json: the panoptic PNGs and their json (``categories`` with ``id``,
            ``name``, ``isthing`` and optionally ``color``; ids in any order, not necessarily contiguous).
        sem_seg_root: semantic label PNGs (contiguous ids of :func:`panoptic_metadata`, 255 = ignore);
            default ``<panoptic_root>_semseg``, written by ``datasets/prepare_coco_semantic_annos_from_panoptic.py
            --panoptic-json ...``.
        instances_json: COCO instances json of the thing segments (the same prepare script writes one with
            ``--instances-json``); without it no ``<name>_instance`` and no mask AP.
        categories: overrides the json's category list.

    Returns the registered names. Nothing but the json's categories is read now; missing files are
    reported (with the command that creates them) when a dataset is first loaded.
    """
    categories = categories if categories is not None else _json_categories(panoptic_json)
    meta = panoptic_metadata(categories)
    if sem_seg_root is None:
        sem_seg_root = panoptic_root.rstrip("/\\") + "_semseg"
    hint = (f"Derive the semantic labels (and an instances json) with `python {_PREPARE} --panoptic-json "
            f"{panoptic_json} --panoptic-root {panoptic_root} --sem-seg-root {sem_seg_root} "
            f"[--instances-json FILE]`")
    register_coco_panoptic_annos_sem_seg(name + "_panoptic", meta, image_root, panoptic_root, panoptic_json,
                                         sem_seg_root, instances_json, how_to_prepare=hint)
    names = [name + "_panoptic", name + "_panoptic_with_sem_seg"]
    _register_semantic(name + "_sem_seg", image_root, sem_seg_root, meta, IGNORE_LABEL, hint)
    names.append(name + "_sem_seg")
    if instances_json is not None:
        thing_meta = {k: meta[k] for k in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")}
        _register_instances(name + "_instance", image_root, instances_json, thing_meta)
        names.append(name + "_instance")
    logger.info(f"registered {', '.join(names)}: {len(meta['thing_classes'])} thing and "
                f"{len(meta['stuff_classes']) - len(meta['thing_classes'])} stuff classes")
    return names


# ---------------------------------------------------------------------------------------------------------------
# COCO instances
# ---------------------------------------------------------------------------------------------------------------
def register_custom_coco_instances(
    name: str, image_root: str, json_file: str, categories: Optional[List[dict]] = None
) -> List[str]:
    """Register a COCO-instances json (polygons or RLE masks) as ``<name>_instance``.

    Every category is a thing; contiguous ids follow the json's category order (ids may be any
    integers). Images are named by ``images[].file_name`` (any extension).
    """
    categories = categories if categories is not None else _json_categories(json_file)
    meta = panoptic_metadata([dict(c, isthing=1) for c in categories])
    thing_meta = {k: meta[k] for k in ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")}
    _register_instances(name + "_instance", image_root, json_file, thing_meta)
    return [name + "_instance"]


def _register_instances(dataset_name: str, image_root: str, json_file: str, thing_meta: Dict) -> None:
    id_map = thing_meta["thing_dataset_id_to_contiguous_id"]

    def load():
        # no dataset_name: Detectron2 would otherwise set (sorted-id) metadata of its own
        records = load_coco_json(json_file, image_root, None)
        unknown = 0
        for r in records:
            anns = []
            for a in r.get("annotations", []):
                if a["category_id"] in id_map:
                    anns.append(dict(a, category_id=id_map[a["category_id"]]))
                else:
                    unknown += 1
            r["annotations"] = anns
        if unknown:
            logger.warning(f"{json_file}: dropped {unknown} annotation(s) whose category_id is not in 'categories'")
        return records

    register_dataset(
        dataset_name,
        with_required_paths(dataset_name, load, [json_file, image_root], "Check the paths given at registration"),
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        **thing_meta,
    )


# ---------------------------------------------------------------------------------------------------------------
# semantic (image folder + label PNG folder)
# ---------------------------------------------------------------------------------------------------------------
def load_semantic_folder(image_root: str, sem_seg_root: str, gt_ext: str = ".png") -> List[dict]:
    """Records ``{file_name, sem_seg_file_name}`` pairing every label file of ``sem_seg_root`` with the
    image of the same relative stem under ``image_root`` (any image extension).

    Detectron2's ``load_sem_seg`` needs one image extension; here a label without an image is an error
    naming it (a silently smaller dataset is worse), images without labels are counted in a warning.
    """
    images = images_by_stem(image_root)
    labels = images_by_stem(sem_seg_root, extensions=(gt_ext,))
    missing = sorted(set(labels) - set(images))
    if missing:
        raise FileNotFoundError(f"{len(missing)} label file(s) of {sem_seg_root} have no image in {image_root}, "
                                f"e.g. {[labels[m] for m in missing[:3]]}")
    if not labels:
        raise FileNotFoundError(f"no {gt_ext} label file under {sem_seg_root}")
    unlabelled = len(images) - len(labels)
    if unlabelled:
        logger.warning(f"{image_root}: {unlabelled} image(s) without a label file in {sem_seg_root} are not used")
    return [{"file_name": images[s], "sem_seg_file_name": labels[s]} for s in sorted(labels)]


def _register_semantic(dataset_name, image_root, sem_seg_root, meta, ignore_label, hint, loader=None):
    paths = [image_root, sem_seg_root]
    register_dataset(
        dataset_name,
        with_required_paths(dataset_name, loader or (lambda: load_semantic_folder(image_root, sem_seg_root)),
                            paths, hint),
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type="sem_seg",
        ignore_label=ignore_label,
        stuff_classes=meta["stuff_classes"],
        stuff_colors=meta["stuff_colors"],
        stuff_dataset_id_to_contiguous_id=meta["stuff_dataset_id_to_contiguous_id"],
    )


def _atomic_save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)  # concurrent workers converting the same file never leave a half-written PNG


def convert_semantic_labels(records: List[dict], sem_seg_root: str, out_root: str, value_to_contiguous: Dict[int, int],
                            ignore_label: int = IGNORE_LABEL) -> List[dict]:
    """Rewrite the label PNGs of ``records`` with contiguous ids into ``out_root`` (same relative paths);
    skipped when an up-to-date output exists. A value that is neither a class nor ``ignore_label`` is a
    ValueError naming the file and the values."""
    from PIL import Image

    lut = np.full(256 if max(value_to_contiguous, default=0) < 256 else 65536, ignore_label, np.uint8)
    for v, c in value_to_contiguous.items():
        lut[v] = c
    known = set(value_to_contiguous) | {ignore_label}
    out = []
    for r in records:
        src = r["sem_seg_file_name"]
        dst = os.path.join(out_root, os.path.relpath(src, sem_seg_root))
        if not (os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src)):
            label = np.asarray(Image.open(src))
            if label.ndim != 2:
                raise ValueError(f"{src}: expected a single-channel label PNG, got shape {label.shape}")
            bad = sorted(set(np.unique(label).tolist()) - known)
            if bad:
                raise ValueError(f"{src}: label value(s) {bad[:10]} are neither a class id "
                                 f"({sorted(value_to_contiguous)[:10]}...) nor ignore_label {ignore_label}")
            _atomic_save_png(lut[label], dst)
        out.append(dict(r, sem_seg_file_name=dst))
    return out


def register_custom_semantic(
    name: str,
    image_root: str,
    sem_seg_root: str,
    classes: Sequence[Union[str, dict]],
    colors: Optional[Sequence[Sequence[int]]] = None,
    ignore_label: int = IGNORE_LABEL,
    converted_root: Optional[str] = None,
) -> List[str]:
    """Register an image folder + label-PNG folder (same relative stems) as ``<name>_sem_seg``.

    Args:
        classes: class names, the label PNGs holding 0..C-1 (Detectron2's convention); or COCO-style
            dicts ``{"id": value in the PNGs, "name": ..., "color": optional}`` in the order you want, ids
            in any order and not necessarily contiguous -- then the labels are rewritten once (on first
            load) with contiguous ids into ``converted_root`` (default ``<sem_seg_root>_contiguous``).
        colors: one RGB colour per class (default: the dicts' ``color`` or distinct generated colours).
        ignore_label: the label value that is not evaluated or trained (default 255).
    """
    if not classes:
        raise ValueError(f"register_custom_semantic({name!r}): empty class list")
    cats = [c if isinstance(c, dict) else {"id": i, "name": c} for i, c in enumerate(classes)]
    if colors is not None:
        if len(colors) != len(cats):
            raise ValueError(f"register_custom_semantic({name!r}): {len(colors)} colours for {len(cats)} classes")
        cats = [dict(c, color=list(col)) for c, col in zip(cats, colors)]
    meta = panoptic_metadata([dict(c, isthing=0) for c in cats])
    if ignore_label in meta["stuff_dataset_id_to_contiguous_id"]:
        raise ValueError(f"register_custom_semantic({name!r}): ignore_label {ignore_label} is also a class id")
    value_map = meta["stuff_dataset_id_to_contiguous_id"]
    loader = None
    if any(v != c for v, c in value_map.items()):
        out_root = converted_root or sem_seg_root.rstrip("/\\") + "_contiguous"

        def loader():
            return convert_semantic_labels(load_semantic_folder(image_root, sem_seg_root), sem_seg_root, out_root,
                                           value_map, ignore_label)

    _register_semantic(name + "_sem_seg", image_root, sem_seg_root, meta, ignore_label,
                       "Check the paths given to register_custom_semantic", loader)
    return [name + "_sem_seg"]


# ---------------------------------------------------------------------------------------------------------------
# --register / DATASETS.REGISTER
# ---------------------------------------------------------------------------------------------------------------
_IMPORTED: Dict[str, object] = {}


def import_registrations(specs: Iterable[str]) -> List[object]:
    """Import every ``spec``: a Python file (``path/to/my_datasets.py``) or a module name
    (``my_package.datasets``) whose import registers datasets. Each is imported once per process
    (Detectron2's launch starts fresh processes, which call this again from their setup)."""
    modules = []
    for spec in specs or ():
        if not spec:
            continue
        is_file = spec.endswith(".py") or os.sep in spec or "/" in spec
        key = os.path.abspath(os.path.expanduser(spec)) if is_file else spec
        if key in _IMPORTED:
            modules.append(_IMPORTED[key])
            continue
        if is_file:
            if not os.path.isfile(key):
                raise FileNotFoundError(f"--register / DATASETS.REGISTER: no Python file {spec!r} (resolved to {key})")
            mod_name = "hierseg_user_registration_" + os.path.splitext(os.path.basename(key))[0].replace("-", "_")
            module_spec = importlib.util.spec_from_file_location(mod_name, key)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(spec)
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(f"--register / DATASETS.REGISTER: cannot import module {spec!r} ({e}); "
                                          "give a .py file or a module on PYTHONPATH") from e
        logger.info(f"imported dataset registrations from {spec}")
        _IMPORTED[key] = module
        modules.append(module)
    return modules


def add_register_argument(parser):
    """Add ``--register FILE_OR_MODULE`` (repeatable) to an argparse parser; returns the parser."""
    parser.add_argument(
        "--register", action="append", default=[], metavar="FILE_OR_MODULE",
        help="a Python file or module that registers your datasets (e.g. with hierseg_d2.data.datasets."
             "register_custom_coco_panoptic); imported before the config is used. Repeatable. "
             "The config key DATASETS.REGISTER does the same from a config file.")
    return parser


def setup_datasets(cfg, register: Iterable[str] = ()) -> None:
    """Import ``register`` (the ``--register`` values) and ``cfg.DATASETS.REGISTER``, then check
    MODEL.SEM_SEG_HEAD.NUM_CLASSES against the datasets (:func:`check_num_classes`). Called by every
    entry point after the config is merged and before it is used."""
    specs = list(register or [])
    specs += [s for s in cfg.DATASETS.get("REGISTER", ()) if s not in specs]
    import_registrations(specs)
    check_num_classes(cfg)


# ---------------------------------------------------------------------------------------------------------------
# NUM_CLASSES against the datasets
# ---------------------------------------------------------------------------------------------------------------
def dataset_num_classes(dataset_name: str) -> Optional[int]:
    """Classes a model predicts for ``dataset_name``: all of ``stuff_classes`` (panoptic and semantic
    datasets list every class there), else ``thing_classes`` (instance datasets); None if unknown."""
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("stuff_classes", None) or meta.get("thing_classes", None)
    return None if classes is None else len(classes)


def check_num_classes(cfg) -> None:
    """``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` against every dataset of DATASETS.TRAIN / TEST.

    Fewer classes than a dataset has is a ValueError naming both numbers (labels >= NUM_CLASSES would be
    trained as "no object"). More than a DATASETS.TEST dataset has is an error too: SemSegEvaluator,
    COCOEvaluator and the Visualizer index the dataset's class lists with the predicted ids. More than
    a training set has is only a warning (legitimate, e.g. a head kept for a larger label set).
    """
    if "SEM_SEG_HEAD" not in cfg.MODEL or "MASK_FORMER" not in cfg.MODEL:
        return
    num = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    test = set(cfg.DATASETS.TEST)
    for dataset_name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        n = dataset_num_classes(dataset_name) if dataset_name in MetadataCatalog.list() else None
        if n is None or n == num:
            continue
        msg = (f"MODEL.SEM_SEG_HEAD.NUM_CLASSES = {num} but dataset '{dataset_name}' has {n} classes "
               f"(set MODEL.SEM_SEG_HEAD.NUM_CLASSES {n}")
        if num < n:
            raise ValueError(msg + ")")
        if dataset_name in test:
            raise ValueError(msg + "; the evaluators and the Visualizer cannot name predicted classes >= "
                             f"{n})")
        logger.warning(msg + f" unless intended: classes {n}..{num - 1} have no training data)")
