"""Evaluation: :func:`build_evaluator` picks Detectron2's evaluators by the dataset's evaluator_type."""
from .build import build_evaluator  # noqa: F401
from .coco_mask_evaluation import MaskOnlyCOCOEvaluator  # noqa: F401
from .boundary import BoundaryCOCOeval, boundary_iou, evaluate_boundary_ap, mask_to_boundary  # noqa: F401
from .boundary_evaluator import BoundaryCOCOEvaluator  # noqa: F401
