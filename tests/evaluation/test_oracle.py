"""Evaluation wiring proven with an oracle: ground truth fed as predictions through build_evaluator
(Detectron2's own evaluators) scores 100; a corrupted copy scores strictly less."""

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator

from hierseg_d2 import add_hierseg_config
from hierseg_d2.evaluation import MaskOnlyCOCOEvaluator, build_evaluator
from hierseg_d2.evaluation.clustering_evaluator import ClusteringEvaluator
from hierseg_d2.evaluation.oracle import OracleModel, run_oracle_evaluation


def _cfg(panoptic=True, instance=True, semantic=True):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    t = cfg.MODEL.MASK_FORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = panoptic, instance, semantic
    return cfg


def test_oracle_is_100_and_corrupted_oracle_less(shapes_root):
    cfg = _cfg()
    good = run_oracle_evaluation(cfg, "shapes_val_panoptic_with_sem_seg")
    assert good["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert good["panoptic_seg"]["PQ_th"] == pytest.approx(100.0)
    assert good["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert good["segm"]["AP"] == pytest.approx(100.0, abs=0.5)
    assert good["sem_seg"]["mIoU"] == pytest.approx(100.0)

    bad = run_oracle_evaluation(cfg, "shapes_val_panoptic_with_sem_seg", corrupt=True)
    assert bad["panoptic_seg"]["PQ"] < good["panoptic_seg"]["PQ"] - 1
    assert bad["segm"]["AP"] < good["segm"]["AP"] - 1
    assert bad["sem_seg"]["mIoU"] < good["sem_seg"]["mIoU"] - 1


@pytest.mark.parametrize(
    "name,key,metric", [("shapes_val_instance", "segm", "AP"), ("shapes_val_sem_seg", "sem_seg", "mIoU")]
)
def test_oracle_per_task_datasets(shapes_root, name, key, metric):
    cfg = _cfg()
    assert run_oracle_evaluation(cfg, name)[key][metric] == pytest.approx(100.0, abs=0.5)
    assert run_oracle_evaluation(cfg, name, corrupt=True)[key][metric] < 99.0


def test_oracle_predictions_are_mask_only(shapes_root):
    rec = DatasetCatalog.get("shapes_val_panoptic_with_sem_seg")[0]
    out = OracleModel("shapes_val_panoptic_with_sem_seg")([rec])[0]
    assert set(out) == {"panoptic_seg", "instances", "sem_seg"}
    assert not out["instances"].has("pred_boxes")  # COCOEvaluator alone would need them
    assert out["sem_seg"].shape == (12, rec["height"], rec["width"])


def test_build_evaluator_selection(shapes_root):
    ev = build_evaluator(_cfg(), "shapes_val_panoptic_with_sem_seg")
    assert isinstance(ev, DatasetEvaluators)
    assert [type(e) for e in ev._evaluators] == [COCOPanopticEvaluator, MaskOnlyCOCOEvaluator, SemSegEvaluator]
    only_pq = build_evaluator(_cfg(instance=False, semantic=False), "shapes_val_panoptic_with_sem_seg")
    assert type(only_pq) is COCOPanopticEvaluator
    # without semantic labels, the panoptic name gets no SemSegEvaluator
    ev = build_evaluator(_cfg(), "shapes_val_panoptic")
    assert [type(e) for e in ev._evaluators] == [COCOPanopticEvaluator, MaskOnlyCOCOEvaluator]
    inst = build_evaluator(_cfg(), "shapes_val_instance")
    assert isinstance(inst, COCOEvaluator) and inst._tasks == ("segm",)
    assert type(build_evaluator(_cfg(), "shapes_val_sem_seg")) is SemSegEvaluator


def test_clustering_evaluator_is_added_by_config(shapes_root):
    cfg = _cfg()
    cfg.MODEL.HCFORMER.CLUSTERING_EVAL = True
    ev = build_evaluator(cfg, "shapes_val_sem_seg")
    assert isinstance(ev, DatasetEvaluators)
    assert [type(e) for e in ev._evaluators] == [SemSegEvaluator, ClusteringEvaluator]


def test_plain_coco_evaluator_needs_boxes(shapes_root):
    """Why MaskOnlyCOCOEvaluator exists: Detectron2's COCOEvaluator reads pred_boxes even for segm."""
    rec = DatasetCatalog.get("shapes_val_instance")[0]
    out = OracleModel("shapes_val_instance")([rec])
    plain, mask_only = (cls("shapes_val_instance", tasks=("segm",)) for cls in (COCOEvaluator, MaskOnlyCOCOEvaluator))
    plain.reset()
    with pytest.raises(AttributeError, match="pred_boxes"):
        plain.process([rec], out)
    mask_only.reset()
    mask_only.process([rec], out)
    assert len(mask_only._predictions[0]["instances"]) == len(rec["annotations"])
