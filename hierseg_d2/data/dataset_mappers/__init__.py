"""MaskFormer-family dataset mappers and :func:`build_mapper` (chosen by ``INPUT.DATASET_MAPPER_NAME``)."""

from detectron2.data import DatasetMapper

from .coco_instance_new_baseline_dataset_mapper import COCOInstanceNewBaselineDatasetMapper
from .coco_panoptic_new_baseline_dataset_mapper import COCOPanopticNewBaselineDatasetMapper
from .mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper
from .robust import CheckGroundTruthSize, SkipBadSamples

__all__ = [
    "MAPPERS",
    "build_mapper",
    "SkipBadSamples",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
]

# INPUT.DATASET_MAPPER_NAME -> training mapper (Mask2Former's names)
MAPPERS = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
}


def build_mapper(cfg, is_train: bool = True):
    """The mapper for ``build_detection_{train,test}_loader``.

    Training: the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``, wrapped in
    :class:`SkipBadSamples` (bad files are logged and skipped). Inference: Detectron2's
    ``DatasetMapper(cfg, False)`` (resize only; evaluators read ground truth themselves) behind a size
    check of the ground-truth PNGs (:class:`CheckGroundTruthSize`), wrapped so a failure names its file.
    """
    if not is_train:
        return SkipBadSamples(CheckGroundTruthSize(DatasetMapper(cfg, False)), skip=False)
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPERS:
        raise KeyError(f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; choose one of {sorted(MAPPERS)}")
    return SkipBadSamples(MAPPERS[name](cfg, True))
