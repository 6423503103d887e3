"""Boundary AP next to mask AP during evaluation (Cheng et al. 2021; see :mod:`.boundary`)."""
import copy
import itertools

from .boundary import evaluate_boundary_ap
from .coco_mask_evaluation import MaskOnlyCOCOEvaluator

__all__ = ["BoundaryCOCOEvaluator"]


class BoundaryCOCOEvaluator(MaskOnlyCOCOEvaluator):
    """Mask-only COCOEvaluator (tasks "segm") that also reports Boundary AP, under "boundary_segm"
    (AP, AP50, AP75, APs, APm, APl, AP-<class>), from the same predictions and ground truth.

    Args:
        dataset_name: a COCO-format instance (or panoptic with ``json_file``) dataset.
        dilation_ratio: boundary width as a fraction of the image diagonal (Cheng et al.: 0.02).
        other arguments: those of Detectron2's COCOEvaluator.
    """

    def __init__(self, dataset_name, *args, dilation_ratio: float = 0.02, **kwargs):
        kwargs.setdefault("tasks", ("segm",))
        super().__init__(dataset_name, *args, **kwargs)
        self._dilation_ratio = dilation_ratio

    def _eval_predictions(self, predictions, img_ids=None):
        # the parent maps category ids in place: take a copy of the results in the dataset's ids first
        results = copy.deepcopy(list(itertools.chain(*[x["instances"] for x in predictions])))
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping is not None:
            reverse = {v: k for k, v in mapping.items()}
            for r in results:
                r["category_id"] = reverse[r["category_id"]]
        super()._eval_predictions(predictions, img_ids)
        if not getattr(self, "_do_evaluation", True):
            return
        self._logger.info(f"Evaluating Boundary AP (dilation ratio {self._dilation_ratio}) ...")
        self._results["boundary_segm"] = evaluate_boundary_ap(self._coco_api, results, self._dilation_ratio,
                                                              verbose=False, img_ids=img_ids)
