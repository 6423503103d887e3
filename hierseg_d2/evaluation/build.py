"""``build_evaluator``: the dataset's ``evaluator_type`` picks Detectron2's own evaluators."""

import logging
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from .clustering_evaluator import ClusteringEvaluator
from .coco_mask_evaluation import MaskOnlyCOCOEvaluator

__all__ = ["build_evaluator"]

logger = logging.getLogger(__name__)

def _mask_former_test_flags(cfg):
    t = cfg.MODEL.MASK_FORMER.TEST if "MASK_FORMER" in cfg.MODEL else None
    if t is None:  # plain Detectron2 config: evaluate every task the dataset supports
        return True, True, True
    return t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON


def _cityscapes_sem_seg(dataset_name, output_folder):
    try:
        import cityscapesscripts  # noqa: F401
    except ImportError:
        # same mIoU over the 19 train ids, from the labelTrainIds PNGs the loader lists
        logger.warning("cityscapesscripts is not installed: evaluating Cityscapes with SemSegEvaluator.")
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    from detectron2.evaluation import CityscapesSemSegEvaluator

    return CityscapesSemSegEvaluator(dataset_name)


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """Evaluators for ``dataset_name`` (Mask2Former's ``Trainer.build_evaluator`` logic).

    * ``sem_seg``          -> SemSegEvaluator (mIoU)
    * ``coco``             -> COCOEvaluator, tasks=("segm",), mask-only predictions accepted
    * ``coco_panoptic_seg`` -> COCOPanopticEvaluator if MODEL.MASK_FORMER.TEST.PANOPTIC_ON,
      + COCOEvaluator (segm) if INSTANCE_ON, + SemSegEvaluator if SEMANTIC_ON and the dataset has
      semantic labels (the ``*_panoptic_with_sem_seg`` names)
    * ``cityscapes_sem_seg`` -> CityscapesSemSegEvaluator (SemSegEvaluator without cityscapesscripts)
    * plus the clustering-quality evaluator (per-level UE / ASA) when ``MODEL.HCFORMER.CLUSTERING_EVAL``.
    """
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type is None:
        raise KeyError(f"Dataset '{dataset_name}' has no evaluator_type in its metadata (is it registered?)")
    # loading once here generates a synthetic dataset if needed and fails clearly on missing files,
    # before an evaluator reads json_file / panoptic_json
    DatasetCatalog.get(dataset_name)
    panoptic_on, instance_on, semantic_on = _mask_former_test_flags(cfg)

    evaluators: List[DatasetEvaluator] = []
    if evaluator_type == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "coco":
        evaluators.append(MaskOnlyCOCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
    elif evaluator_type == "coco_panoptic_seg":
        if panoptic_on:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if instance_on and meta.get("json_file", None):
            evaluators.append(MaskOnlyCOCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder))
        if semantic_on and meta.get("sem_seg_root", None):
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif evaluator_type == "cityscapes_sem_seg":
        evaluators.append(_cityscapes_sem_seg(dataset_name, output_folder))
    else:
        raise NotImplementedError(f"no evaluator for dataset '{dataset_name}' with evaluator_type '{evaluator_type}'")

    if "HCFORMER" in cfg.MODEL and cfg.MODEL.HCFORMER.CLUSTERING_EVAL:
        evaluators.append(ClusteringEvaluator(dataset_name, output_dir=output_folder))

    if not evaluators:
        raise ValueError(
            f"No evaluator selected for '{dataset_name}' ({evaluator_type}): enable one of "
            "MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
