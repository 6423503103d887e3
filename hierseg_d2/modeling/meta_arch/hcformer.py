"""HCFormer meta-architecture: backbone -> HCFormerHead -> hierarchical decoding (eq. 5) -> losses or
MaskFormer post-processing (App. E) for semantic, panoptic and instance segmentation.

Masks are decoded as logits: the head's stride-32 mask logits (eq. 4 before the sigmoid) are carried
down through A^(4), A^(3), A^(2) (``MODEL.HCFORMER.LEVELS`` of them) and the sigmoid is taken at the end.
Each decoding step is a convex combination over a pixel's parents, so a hard (one-hot) assignment
copies the parent's value exactly as in the paper's probability form, and the losses can use
numerically stable BCE-with-logits and Mask2Former's logit-based point uncertainty.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from ..backbone.hierarchy import get_clustering_pairs
from ..clustering import decode_hierarchy
from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from .postprocessing import postprocess_image, semantic_inference

__all__ = ["HCFormer"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class HCFormer(nn.Module):
    """Unified segmentation by hierarchical clustering (Suzuki, HCFormer).

    Args:
        backbone: a Detectron2 backbone; its clustering pairs come from ``get_clustering_pairs``.
        sem_seg_head: :class:`HCFormerHead`.
        criterion: :class:`SetCriterion`.
        num_queries, object_mask_threshold, overlap_threshold: panoptic post-processing.
        metadata: dataset metadata (thing ids for panoptic/instance inference).
        size_divisibility: pad inputs to a multiple of this (< 0: the backbone's).
        sem_seg_postprocess_before_inference: resize masks to the output size before inference.
        pixel_mean, pixel_std: input normalisation.
        semantic_on, panoptic_on, instance_on: which outputs to produce.
        test_topk_per_image: instances kept per image.
        deep_supervision: also decode and supervise the predictions of the earlier decoder layers.
        return_assignments: add the "hierarchy" output (soft assignments) at inference.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, sem_seg_head: nn.Module, criterion: nn.Module, num_queries: int,
                 object_mask_threshold: float, overlap_threshold: float, metadata, size_divisibility: int,
                 sem_seg_postprocess_before_inference: bool, pixel_mean: Tuple[float], pixel_std: Tuple[float],
                 semantic_on: bool, panoptic_on: bool, instance_on: bool, test_topk_per_image: int,
                 deep_supervision: bool = True, return_assignments: bool = False):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        self.size_divisibility = backbone.size_divisibility if size_divisibility < 0 else size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.test_topk_per_image = test_topk_per_image
        self.deep_supervision = deep_supervision
        self.return_assignments = return_assignments
        if not semantic_on and not sem_seg_postprocess_before_inference:
            raise ValueError("HCFormer: panoptic/instance inference needs masks resized before inference")

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(
            cfg, backbone.output_shape(), clustering_pairs=get_clustering_pairs(backbone))
        mf = cfg.MODEL.MASK_FORMER
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if len(cfg.DATASETS.TRAIN) else None
        if mf.TEST.PANOPTIC_ON and not hasattr(metadata, "thing_dataset_id_to_contiguous_id"):
            logger.warning("HCFormer: the metadata of DATASETS.TRAIN[0] has no thing_dataset_id_to_contiguous_id; "
                           "panoptic inference treats every class as a thing")
        matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
                                   num_points=mf.TRAIN_NUM_POINTS)
        weight_dict = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
        if mf.DEEP_SUPERVISION:
            # one prediction from the initial queries plus one per layer; the last is the main output
            weight_dict.update({f"{k}_{i}": v for i in range(mf.DEC_LAYERS) for k, v in list(weight_dict.items())})
        weight_dict["loss_scale"] = cfg.MODEL.HCFORMER.SCALE_WEIGHT
        criterion = SetCriterion(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher=matcher, weight_dict=weight_dict,
                                 eos_coef=mf.NO_OBJECT_WEIGHT, losses=["labels", "masks", "scale"],
                                 num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
                                 importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
                                 scale_loss=cfg.MODEL.HCFORMER.SCALE_LOSS)
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                                                     or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "return_assignments": cfg.MODEL.HCFORMER.CLUSTERING_EVAL,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """Detectron2 interface: a dict of losses in training, a list of per-image result dicts at inference
        ("sem_seg", "panoptic_seg", "instances" per MODEL.MASK_FORMER.TEST.*_ON, and "hierarchy" when
        ``return_assignments``)."""
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images.tensor)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise KeyError("HCFormer: training inputs need 'instances' (gt_classes, gt_masks), as the "
                               "MaskFormer-style dataset mappers (INPUT.DATASET_MAPPER_NAME) produce")
            targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
            losses = self.criterion(outputs, targets)
            for k in list(losses):
                if k in self.criterion.weight_dict:
                    losses[k] = losses[k] * self.criterion.weight_dict[k]
                else:  # a loss without weight is not trained (Mask2Former convention)
                    losses.pop(k)
            return losses
        return self.inference(outputs, batched_inputs, images)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalised images padded to ``size_divisibility`` (shared with the exported runner,
        :mod:`hierseg_d2.export`)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def predict(self, images: torch.Tensor) -> Dict:
        """Normalised, padded (B, 3, Hp, Wp) images -> the head's outputs with every "pred_masks" decoded
        through the hierarchy. This is the network that :mod:`hierseg_d2.export` exports; ``inference``
        turns its outputs into Detectron2's format."""
        outputs = self.sem_seg_head(self.backbone(images))
        # aux predictions are only needed for deep supervision in training
        if not (self.training and self.deep_supervision):
            outputs.pop("aux_outputs", None)
        return self.decode_outputs(outputs)

    @staticmethod
    def decode_outputs(outputs: Dict) -> Dict:
        """Replace every "pred_masks" (stride 32) by its decoding through the hierarchy (eq. 5)."""
        assignments = outputs["assignments"]
        outputs["pred_masks"] = decode_hierarchy(outputs["pred_masks"], assignments)
        for aux in outputs.get("aux_outputs", []):
            aux["pred_masks"] = decode_hierarchy(aux["pred_masks"], assignments)
        return outputs

    @staticmethod
    def prepare_targets(instances: List[Instances], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Per image {"labels", "masks"} with the masks zero-padded to the padded batch size."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for inst in instances:
            masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
            padded[:, :masks.shape[1], :masks.shape[2]] = masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for b, (mask_cls, mask_logits, inputs, image_size) in enumerate(
                zip(outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes)):
            height, width = inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
            if self.sem_seg_postprocess_before_inference:
                # masks streamed over bands of output rows: no (Q, H, W) stack, equal to resizing all of
                # them first (see postprocess_image)
                result = retry_if_cuda_oom(postprocess_image)(
                    mask_cls, mask_logits, padded_size, tuple(image_size), (height, width),
                    semantic_on=self.semantic_on, panoptic_on=self.panoptic_on, instance_on=self.instance_on,
                    # stuff classes are never instances (Mask2Former: only with PANOPTIC_ON)
                    thing_ids=self._thing_ids(), object_mask_threshold=self.object_mask_threshold,
                    overlap_threshold=self.overlap_threshold, topk=self.test_topk_per_image)
            else:  # semantic only, scores at the padded size then resized (MaskFormer's option)
                mask_pred = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear",
                                          align_corners=False)[0]
                sem_seg = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
                result = {"sem_seg": retry_if_cuda_oom(sem_seg_postprocess)(sem_seg, image_size, height, width)}
            if self.return_assignments:
                result["hierarchy"] = {"assignments": [a[b] for a in outputs["assignments"]],
                                       "image_size": tuple(image_size), "padded_size": padded_size}
            results.append(result)
        return results

    def _thing_ids(self) -> Optional[set]:
        """Contiguous ids of thing classes from the metadata (all classes are things if unknown)."""
        mapping = getattr(self.metadata, "thing_dataset_id_to_contiguous_id", None) if self.metadata else None
        return None if mapping is None else set(mapping.values())
