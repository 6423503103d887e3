"""tools/evaluate_pq_for_semantic_segmentation.py: PQ of semantic predictions from a SemSegEvaluator json."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image
from tests.scripts import load_script



def load_tool():
    return load_script("tools/evaluate_pq_for_semantic_segmentation.py")


def write_predictions(dataset_name, labels_by_file, out_dir):
    """Run Detectron2's SemSegEvaluator on label maps (as one-hot scores) so that the json is its own."""
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    evaluator = SemSegEvaluator(dataset_name, distributed=False, output_dir=str(out_dir))
    evaluator.reset()
    for file_name, labels in labels_by_file.items():
        scores = torch.nn.functional.one_hot(torch.as_tensor(labels), num_classes).permute(2, 0, 1).float()
        evaluator.process([{"file_name": file_name}], [{"sem_seg": scores}])
    evaluator.evaluate()
    return str(out_dir / "sem_seg_predictions.json")


def test_ground_truth_gives_pq_100(shapes_root, tmp_path):
    records = DatasetCatalog.get("shapes_val_sem_seg")
    labels = {}
    for r in records:
        gt = np.array(Image.open(r["sem_seg_file_name"]), dtype=np.int64)
        labels[r["file_name"]] = np.where(gt == 255, 0, gt)  # ignored pixels: any class
    path = write_predictions("shapes_val_sem_seg", labels, tmp_path)
    res = load_tool().main(["--dataset-name", "shapes_val_sem_seg", "--json-file", path])
    assert res["num_images"] == len(records)
    assert res["All"]["PQ"] == pytest.approx(100.0) and res["All"]["RQ"] == pytest.approx(100.0)
    assert res["Stuff"] == res["All"] and res["mIoU"] == pytest.approx(100.0)
    assert res["All"]["N"] >= 2


@pytest.fixture
def tiny_dataset(tmp_path):
    """Three label maps (255 = ignore) chosen so that PQ can be computed by hand."""
    gts = [np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 1, 1]]),
           np.full((2, 4), 2),
           np.full((2, 2), 1)]
    records = []
    for i, gt in enumerate(gts):
        png = tmp_path / f"gt{i}.png"
        Image.fromarray(gt.astype(np.uint8)).save(png)
        records.append({"file_name": str(tmp_path / f"img{i}.jpg"), "sem_seg_file_name": str(png),
                        "height": gt.shape[0], "width": gt.shape[1]})
    name = "pq_tool_test_sem_seg"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255, evaluator_type="sem_seg")
    yield name, records
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_known_perturbation_against_hand_computation(tiny_dataset, tmp_path):
    name, records = tiny_dataset
    preds = [np.array([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]),
             np.array([[2, 2, 2, 0], [2, 2, 2, 0]]),
             np.full((2, 2), 2)]
    path = write_predictions(name, {r["file_name"]: p for r, p in zip(records, preds)}, tmp_path)
    res = load_tool().main(["--dataset-name", name, "--json-file", path])
    # image 0: class a: |pred| 10 (2 on ignore), |gt| 6, inter 6 -> IoU 6 / (10 + 6 - 6 - 2) = 0.75, TP;
    #          class b: |pred| 6, |gt| 8, inter 6 -> 6 / 8 = 0.75, TP
    # image 1: class c: 6 / 8 = 0.75 TP; class a predicted on 2 pixels of c -> FP
    # image 2: class b missed -> FN; class c predicted -> FP
    # a: PQ = 0.75 / (1 + 0.5) = 0.5; b: 0.75 / 1.5 = 0.5; c: 0.75 / 1.5 = 0.5; SQ 0.75, RQ 2/3 each
    assert res["All"]["N"] == 3
    assert res["All"]["PQ"] == pytest.approx(50.0)
    assert res["All"]["SQ"] == pytest.approx(75.0)
    assert res["All"]["RQ"] == pytest.approx(200 / 3)
    assert res["per_class"]["a"]["PQ"] == pytest.approx(50.0)
    # mIoU over non-ignored pixels: a 6 / 10, b 6 / 12, c 6 / 12
    assert res["mIoU"] == pytest.approx(100 * (0.6 + 0.5 + 0.5) / 3)


def test_bad_input(tiny_dataset, shapes_root, tmp_path):
    name, records = tiny_dataset
    tool = load_tool()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tool.main(["--dataset-name", name, "--json-file", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        tool.main(["--dataset-name", name, "--json-file", str(bad)])
    bad.write_text(json.dumps([{"file_name": "x.jpg"}]))
    with pytest.raises(ValueError, match="entry 0"):
        tool.main(["--dataset-name", name, "--json-file", str(bad)])
    good = write_predictions(name, {records[2]["file_name"]: np.zeros((2, 2), int)}, tmp_path)
    with pytest.raises(KeyError, match="not a registered dataset"):
        tool.main(["--dataset-name", "no_such_dataset", "--json-file", good])
    with pytest.raises(KeyError, match="not in dataset"):
        tool.main(["--dataset-name", "shapes_val_sem_seg", "--json-file", good])
    entries = json.load(open(good))
    entries[0]["category_id"] = 7
    bad.write_text(json.dumps(entries))
    with pytest.raises(KeyError, match="category_id 7"):
        tool.main(["--dataset-name", name, "--json-file", str(bad)])
