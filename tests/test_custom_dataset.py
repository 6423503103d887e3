"""Your own dataset end to end (docs/custom_datasets.md): a generated COCO-panoptic dataset whose category ids
are non-contiguous and interleaved (1 stuff, 7 thing, 42 thing, 200 stuff), with grayscale, RGB PNG and JPEG
images, extreme aspect ratios (96x900, 600x96) and an image without things, registered through the documented
calls in a --register file; oracle evaluation (all three evaluators at 100), training with train_net.py on two
processes, evaluation (PQ, AP, mIoU) and the demo in every TEST.*_ON combination."""
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")

# json order: stuff, thing, thing, stuff -- contiguous ids put things first: box 0, disc 1, sky 2, grass 3
CATEGORIES = [
    {"id": 1, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 7, "name": "box", "isthing": 1, "color": [220, 20, 60]},
    {"id": 42, "name": "disc", "isthing": 1, "color": [0, 0, 230]},
    {"id": 200, "name": "grass", "isthing": 0, "color": [107, 142, 35]},
]
CONTIGUOUS = {7: 0, 42: 1, 1: 2, 200: 3}
# (file name, height, width, grayscale, things)
IMAGES = [("wide.png", 96, 900, False, True), ("grey.png", 200, 150, True, True),
          ("empty.jpg", 128, 160, False, False), ("tall.png", 600, 96, False, True)]


def _script(rel):
    spec = importlib.util.spec_from_file_location(os.path.basename(rel)[:-3], os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_toy_panoptic(folder):
    """Write images/, panoptic/ and panoptic.json (COCO panoptic format) under ``folder``; per image: sky on
    top, grass below, a VOID row, and (unless it is the empty image) a box and a disc."""
    from panopticapi.utils import id2rgb

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "panoptic"), exist_ok=True)
    colour = {c["id"]: c["color"] for c in CATEGORIES}
    images, annotations = [], []
    for image_id, (name, h, w, grey, things) in enumerate(IMAGES, start=1):
        ids = np.zeros((h, w), np.int32)
        segments = []

        def add(mask, category_id, seg_id):
            ids[mask] = seg_id
            ys, xs = np.nonzero(mask)
            segments.append({"id": seg_id, "category_id": category_id, "iscrowd": 0, "area": int(mask.sum()),
                             "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})

        yy, xx = np.mgrid[:h, :w]
        add(yy < h // 2, 1, 11)
        add(yy > h // 2, 200, 12)  # row h // 2 stays VOID
        if things:
            s = min(h, w)
            add((yy >= s // 8) & (yy < s // 8 + s // 3) & (xx >= s // 8) & (xx < s // 8 + s // 3), 7, 21)
            cy, cx, r = h - s // 3, w - s // 3, s // 5
            add((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, 42, 22)
            add((yy - cy) ** 2 + (xx - s // 2) ** 2 <= (r // 2) ** 2, 42, 23)
        segments = [sg for sg in segments if (ids == sg["id"]).any()]
        for sg in segments:  # areas after overlaps
            sg["area"] = int((ids == sg["id"]).sum())
        rgb = np.zeros((h, w, 3), np.uint8)
        for sg in segments:
            rgb[ids == sg["id"]] = colour[sg["category_id"]]
        rgb = np.clip(rgb.astype(int) + np.random.default_rng(image_id).integers(-20, 20, rgb.shape), 0, 255)
        path = os.path.join(folder, "images", name)
        if grey:
            Image.fromarray(rgb.mean(-1).astype(np.uint8), mode="L").save(path)
        else:
            Image.fromarray(rgb.astype(np.uint8)).save(path, quality=95)
        stem = os.path.splitext(name)[0]
        Image.fromarray(id2rgb(ids)).save(os.path.join(folder, "panoptic", stem + ".png"))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments})
    with open(os.path.join(folder, "panoptic.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return folder


REGISTER_FILE = '''\
"""The --register file of the test: exactly what docs/custom_datasets.md shows."""
import os

from hierseg_d2.data.datasets import (register_custom_coco_instances, register_custom_coco_panoptic,
                                      register_custom_semantic)

TOY = {toy!r}
for split in ("train", "val"):  # one folder serves as both splits here
    register_custom_coco_panoptic(
        f"toy_{{split}}",
        image_root=os.path.join(TOY, "images"),
        panoptic_root=os.path.join(TOY, "panoptic"),
        panoptic_json=os.path.join(TOY, "panoptic.json"),
        sem_seg_root=os.path.join(TOY, "semantic"),
        instances_json=os.path.join(TOY, "instances.json"),
    )
register_custom_coco_instances("toyinst_val", os.path.join(TOY, "images"), os.path.join(TOY, "instances.json"))
# label PNGs holding the dataset ids (1, 7, 42, 200; 255 = ignore), classes in an order of our choosing
register_custom_semantic("toysem_val", os.path.join(TOY, "images"), os.path.join(TOY, "raw_labels"),
                         classes=[{{"id": 200, "name": "grass"}}, {{"id": 42, "name": "disc"}},
                                  {{"id": 1, "name": "sky"}}, {{"id": 7, "name": "box"}}])
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy dataset, its semantic labels and instances json made by the prepare script, raw-id label PNGs
    for the semantic format, and the --register file."""
    base = tmp_path_factory.mktemp("custom")
    folder = make_toy_panoptic(str(base / "toy"))
    _script("datasets/prepare_coco_semantic_annos_from_panoptic.py").main([
        "--panoptic-json", os.path.join(folder, "panoptic.json"), "--panoptic-root", os.path.join(folder, "panoptic"),
        "--sem-seg-root", os.path.join(folder, "semantic"), "--instances-json", os.path.join(folder, "instances.json"),
        "--workers", "0"])
    # raw labels: contiguous -> dataset id (ignore stays 255)
    inverse = np.full(256, 255, np.uint8)
    for dataset_id, c in CONTIGUOUS.items():
        inverse[c] = dataset_id
    os.makedirs(os.path.join(folder, "raw_labels"))
    for f in os.listdir(os.path.join(folder, "semantic")):
        sem = np.asarray(Image.open(os.path.join(folder, "semantic", f)))
        Image.fromarray(inverse[sem]).save(os.path.join(folder, "raw_labels", f))
    register = base / "my_datasets.py"
    register.write_text(REGISTER_FILE.format(toy=folder))
    from hierseg_d2.data.datasets import import_registrations

    import_registrations([str(register)])
    return {"folder": folder, "register": str(register), "base": base}


def test_metadata_puts_things_first_whatever_the_json_order(toy):
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from hierseg_d2.data.datasets import panoptic_metadata

    m = MetadataCatalog.get("toy_val_panoptic_with_sem_seg")
    assert m.thing_classes == ["box", "disc"] and m.stuff_classes == ["box", "disc", "sky", "grass"]
    assert m.thing_dataset_id_to_contiguous_id == {7: 0, 42: 1}
    assert m.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
    by_id = {c["id"]: c for c in CATEGORIES}
    for dataset_id, c in CONTIGUOUS.items():  # names and colours follow the ids
        assert m.stuff_classes[c] == by_id[dataset_id]["name"]
        assert m.stuff_colors[c] == by_id[dataset_id]["color"]
    for dataset_id, c in m.thing_dataset_id_to_contiguous_id.items():
        assert m.thing_classes[c] == by_id[dataset_id]["name"] and m.thing_colors[c] == by_id[dataset_id]["color"]
    assert (m.evaluator_type, m.ignore_label, m.image_root) == (
        "coco_panoptic_seg", 255, os.path.join(toy["folder"], "images"))
    assert m.panoptic_json.endswith("panoptic.json") and m.json_file.endswith("instances.json")
    inst = MetadataCatalog.get("toy_val_instance")
    assert inst.thing_classes == ["box", "disc"] and inst.evaluator_type == "coco"
    sem = MetadataCatalog.get("toysem_val_sem_seg")
    assert sem.stuff_classes == ["grass", "disc", "sky", "box"] and sem.evaluator_type == "sem_seg"
    # COCO lists things first: its contiguous ids are the file order, as before
    coco = panoptic_metadata(COCO_CATEGORIES)
    assert coco["stuff_dataset_id_to_contiguous_id"] == {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
    with pytest.raises(ValueError, match="id 7 is used twice"):
        panoptic_metadata(CATEGORIES + [{"id": 7, "name": "crate", "isthing": 1}])
    with pytest.raises(KeyError, match="has no isthing"):
        panoptic_metadata([{"id": 3, "name": "x"}])


def test_every_registered_name_loads_every_image(toy):
    from detectron2.data import DatasetCatalog

    names = {os.path.basename(n) for n, *_ in IMAGES}
    for dataset_name in ("toy_train_panoptic", "toy_val_panoptic_with_sem_seg", "toy_val_sem_seg",
                         "toy_val_instance", "toyinst_val_instance", "toysem_val_sem_seg"):
        records = DatasetCatalog.get(dataset_name)
        # the .jpg image is there too (Detectron2's register_coco_panoptic assumes .jpg for every image)
        assert {os.path.basename(r["file_name"]) for r in records} == names, dataset_name
    panoptic = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("toy_val_panoptic")}
    assert [s["category_id"] for s in panoptic["empty.jpg"]["segments_info"]] == [2, 3]
    assert {(s["category_id"], s["isthing"]) for s in panoptic["wide.png"]["segments_info"]} == {
        (0, True), (1, True), (2, False), (3, False)}
    inst = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("toy_val_instance")}
    assert inst["empty.jpg"]["annotations"] == []
    assert sorted(a["category_id"] for a in inst["wide.png"]["annotations"]) == [0, 1, 1]
    # the semantic format: raw ids rewritten once with its own contiguous order (grass 0, disc 1, sky 2, box 3)
    sem = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("toysem_val_sem_seg")}
    raw = np.asarray(Image.open(os.path.join(toy["folder"], "raw_labels", "wide.png")))
    conv = np.asarray(Image.open(sem["wide.png"]["sem_seg_file_name"]))
    lut = {200: 0, 42: 1, 1: 2, 7: 3, 255: 255}
    assert set(np.unique(raw)) == set(lut) and all((conv[raw == k] == v).all() for k, v in lut.items())


def test_oracle_scores_100_with_all_three_evaluators(toy, capsys):
    """Ground truth as predictions through the project's evaluators on the custom names: any id or order
    mistake (thing ids vs thing_classes, COCOEvaluator's contiguous-id check) would cost points or raise."""
    tool = _script("tools/oracle_eval.py")
    res = tool.main(["--register", toy["register"], "--dataset", "toy_val_panoptic_with_sem_seg"])
    gt, bad = res["ground truth"], res["shifted by 3 px"]
    assert gt["panoptic_seg"]["PQ"] == pytest.approx(100.0) and gt["panoptic_seg"]["PQ_th"] == pytest.approx(100.0)
    assert gt["segm"]["AP"] == pytest.approx(100.0) and gt["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert bad["panoptic_seg"]["PQ"] < 100.0 and bad["segm"]["AP"] < 100.0 and bad["sem_seg"]["mIoU"] < 100.0
    assert f"images in {os.path.join(toy['folder'], 'images')}" in capsys.readouterr().out
    for dataset_name, task, metric in (("toyinst_val_instance", "segm", "AP"),
                                       ("toysem_val_sem_seg", "sem_seg", "mIoU")):
        res = tool.main(["--dataset", dataset_name, "--no-corrupted"])
        assert res["ground truth"][task][metric] == pytest.approx(100.0), dataset_name


def _recorded_texts(monkeypatch):
    from detectron2.utils.visualizer import Visualizer

    texts = []
    original = Visualizer.draw_text

    def draw_text(self, text, *args, **kwargs):
        texts.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Visualizer, "draw_text", draw_text)
    return texts


def test_visualizer_names_and_colours_follow_the_contiguous_ids(toy, monkeypatch):
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Instances

    from hierseg_d2.utils.hierarchy_vis import draw_predictions

    meta = MetadataCatalog.get("toy_val_panoptic_with_sem_seg")
    texts = _recorded_texts(monkeypatch)
    h, w = 60, 80
    pan = torch.zeros((h, w), dtype=torch.int32)
    pan[:30], pan[30:], pan[5:20, 5:20] = 1, 2, 3
    segments = [{"id": 1, "category_id": 2, "isthing": False}, {"id": 2, "category_id": 3, "isthing": False},
                {"id": 3, "category_id": 1, "isthing": True}]
    black = np.zeros((h, w, 3), np.uint8)
    draw_predictions(black, {"panoptic_seg": (pan, segments)}, meta)
    assert sorted(texts) == ["disc", "grass", "sky"]
    # PANOPTIC_ON False: instances of a stuff class (grass, id 3) are named, not an IndexError
    texts.clear()
    inst = Instances((h, w))
    inst.pred_masks = torch.zeros((2, h, w), dtype=torch.bool)
    inst.pred_masks[0, 5:20, 5:20] = inst.pred_masks[1, 30:, :] = True
    inst.scores, inst.pred_classes = torch.tensor([0.9, 0.8]), torch.tensor([0, 3])
    draw_predictions(black, {"instances": inst}, meta)
    assert sorted(t.split()[0] for t in texts) == ["box", "grass"]
    # semantic: the stuff colour of each contiguous id (sky = 2 on top, grass = 3 below), Visualizer alpha 0.8
    sem = torch.zeros((4, h, w))
    sem[2, :30], sem[3, 30:] = 1, 1
    vis = draw_predictions(black, {"sem_seg": sem}, meta)
    palette = {c["name"]: 0.8 * np.array(c["color"]) for c in CATEGORIES}
    for (y, x), name in (((10, 6), "sky"), ((h - 10, 6), "grass")):
        nearest = min(palette, key=lambda k: np.abs(vis[y, x] - palette[k]).sum())
        assert nearest == name and np.abs(vis[y, x] - palette[name]).max() <= 12, (name, vis[y, x])


class _Recorder(logging.Handler):
    """Collects messages of a logger directly (Detectron2's setup_logger turns propagation off)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_num_classes_mismatch_names_both_numbers(toy):
    from hierseg_d2.config import load_config

    opts = ["DATASETS.TRAIN", "('toy_train_panoptic',)", "DATASETS.TEST", "('toy_val_panoptic_with_sem_seg',)"]
    with pytest.raises(ValueError, match=r"NUM_CLASSES = 3 but dataset 'toy_train_panoptic' has 4 classes"):
        load_config(SHAPES, opts + ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"], register=[toy["register"]])
    with pytest.raises(ValueError, match=r"NUM_CLASSES = 12 but dataset 'toy_val_panoptic_with_sem_seg' has 4"):
        load_config(SHAPES, opts, register=[toy["register"]])
    # more classes than a training set has: a warning only
    records = _Recorder()
    logger = logging.getLogger("hierseg_d2.data.datasets.register_custom")
    logger.addHandler(records)
    try:
        load_config(SHAPES, ["DATASETS.TRAIN", "('toy_train_panoptic',)", "DATASETS.TEST", "()"])
    finally:
        logger.removeHandler(records)
    assert any("NUM_CLASSES = 12 but dataset 'toy_train_panoptic' has 4 classes" in m for m in records.messages)
    with pytest.raises(FileNotFoundError, match="no Python file 'nowhere/my_datasets.py'"):
        load_config(SHAPES, register=["nowhere/my_datasets.py"])
    with pytest.raises(ModuleNotFoundError, match="cannot import module 'no_such_module_xyz'"):
        load_config(SHAPES, ["DATASETS.REGISTER", "['no_such_module_xyz']"])


def test_semantic_labels_with_unknown_values_are_named(tmp_path):
    from detectron2.data import DatasetCatalog

    from hierseg_d2.data.datasets import register_custom_semantic

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "a.jpeg")
    Image.fromarray(np.array([[5, 9]], np.uint8)).save(tmp_path / "lab" / "a.png")
    register_custom_semantic("badsem", str(tmp_path / "img"), str(tmp_path / "lab"),
                             classes=[{"id": 5, "name": "x"}, {"id": 6, "name": "y"}])
    with pytest.raises(ValueError, match=r"a.png: label value\(s\) \[9\]"):
        DatasetCatalog.get("badsem_sem_seg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "lab" / "b.png")
    register_custom_semantic("badsem", str(tmp_path / "img"), str(tmp_path / "lab"), classes=["x", "y"])
    with pytest.raises(FileNotFoundError, match="have no image"):
        DatasetCatalog.get("badsem_sem_seg")


TINY = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "MODEL.MASK_FORMER.DEC_LAYERS", "1",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "6", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
        "MODEL.HCFORMER.CLUSTER_DIM", "16", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MAX_SIZE_TEST", "256",
        "INPUT.CROP.SIZE", "(96,96)", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"]


def _failure(proc) -> str:
    """What a failed run printed that says why: every error-like line of either stream (a worker's abort
    message is otherwise lost behind the model printout), then the end of stderr."""
    keys = ("error", "exception", "terminate", "abort", "signal", "killed", "traceback")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if any(k in ln.lower() for k in keys)]
    return "\n".join(lines[-60:]) + "\n--- end of stderr ---\n" + proc.stderr[-3000:]


def test_train_evaluate_and_demo_on_the_custom_dataset(toy):
    """train_net.py --register on two processes (the spawned workers import the file too), 3 iterations;
    train_net.py --eval-only --register (PQ, mask AP, mIoU all computed); demo.py with the trained weights in
    every TEST.*_ON combination; instance predictions restricted to thing classes."""
    out = toy["base"] / "train"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    data = ["DATASETS.TRAIN", "('toy_train_panoptic',)", "DATASETS.TEST", "('toy_val_panoptic_with_sem_seg',)"]
    train_net = [sys.executable, os.path.join(ROOT, "train_net.py"), "--register", toy["register"],
                 "--config-file", SHAPES]
    # evaluation in a separate single process: panopticapi's pool would re-import everything in spawned workers
    proc = subprocess.run(train_net + ["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", str(out),
                                       "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", *data, *TINY,
                                       "DATASETS.TEST", "()"],
                          env=env, cwd=str(toy["base"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _failure(proc)
    assert os.path.exists(out / "log.txt.rank1")
    weights = str(out / "model_final.pth")
    proc = subprocess.run(train_net + ["--eval-only", "OUTPUT_DIR", str(toy["base"] / "eval"), "MODEL.WEIGHTS",
                                       weights, *data, *TINY],
                          env=env, cwd=str(toy["base"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _failure(proc)
    log = (toy["base"] / "eval" / "log.txt").read_text()
    for task, keys in (("panoptic_seg", "PQ,SQ,RQ"), ("segm", "AP,AP50"), ("sem_seg", "mIoU,fwIoU")):
        m = re.search(rf"copypaste: Task: {task}\n.*copypaste: {keys}.*\n.*copypaste: ([-\d.,nan]+)", log)
        assert m, (task, log[-3000:])
        # the headline number (PQ, AP, mIoU); AP_small etc. are NaN when no object has that size
        assert math.isfinite(float(m.group(1).split(",")[0])), (task, m.group(1))

    demo = _script("demo/demo.py")
    images = [os.path.join(toy["folder"], "images", f) for f in ("wide.png", "empty.jpg")]
    records = _Recorder()
    logging.getLogger("detectron2").addHandler(records)
    try:
        for sem_on, inst_on, pan_on in [(s, i, p) for s in (0, 1) for i in (0, 1) for p in (0, 1) if s or i or p]:
            flags = ["MODEL.MASK_FORMER.TEST.SEMANTIC_ON", str(bool(sem_on)), "MODEL.MASK_FORMER.TEST.INSTANCE_ON",
                     str(bool(inst_on)), "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", str(bool(pan_on))]
            dst = toy["base"] / f"demo{sem_on}{inst_on}{pan_on}"
            written = demo.main(["--register", toy["register"], "--config-file", SHAPES, "--input", *images,
                                 "--output", str(dst), "--confidence-threshold", "0.0", "--opts", *TINY, *flags,
                                 "MODEL.WEIGHTS", weights, "DATASETS.TRAIN", "('toy_train_panoptic',)",
                                 "DATASETS.TEST", "('toy_val_panoptic_with_sem_seg',)",
                                 "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "1.0"])
            assert len(written) == len(images), flags
            for path in written:
                assert cv2.imread(path) is not None, path
    finally:
        logging.getLogger("detectron2").removeHandler(records)
    # OBJECT_MASK_THRESHOLD 1.0 keeps no panoptic segment: said in the log for every image
    empty = [m for m in records.messages if "no panoptic segment above MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD"
             in m]
    assert len(empty) == 4 * len(images), records.messages[-10:]

    # instance inference on a panoptic dataset never predicts stuff classes, without PANOPTIC_ON too
    from hierseg_d2.config import load_config

    for pan_on in ("False",):
        cfg = load_config(SHAPES, TINY + ["MODEL.WEIGHTS", weights, "DATASETS.TRAIN", "('toy_train_panoptic',)",
                                          "DATASETS.TEST", "('toy_val_panoptic_with_sem_seg',)",
                                          "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
                                          "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", pan_on],
                          register=[toy["register"]])
        cfg.freeze()
        sys.path.insert(0, os.path.join(ROOT, "demo"))
        from predictor import VisualizationDemo

        predictions, _, _ = VisualizationDemo(cfg).run_on_image(cv2.imread(os.path.join(toy["folder"], "images",
                                                                                        "wide.png")))
        classes = predictions["instances"].pred_classes
        assert len(classes) > 0 and set(classes.tolist()) <= {0, 1}, (pan_on, classes)


def test_prepare_scripts_convert_present_splits_and_name_missing_ones(tmp_path, capsys):
    root = tmp_path / "datasets"
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True)
    toy = make_toy_panoptic(str(tmp_path / "toy"))
    os.rename(os.path.join(toy, "panoptic"), coco / "panoptic_val2017")
    os.rename(os.path.join(toy, "panoptic.json"), coco / "annotations" / "panoptic_val2017.json")
    prep = _script("datasets/prepare_coco_semantic_annos_from_panoptic.py")
    prep.main(["--root", str(root), "--workers", "0"])
    out = capsys.readouterr().out
    assert "val2017: 4 semantic label maps" in out and "skipped train2017 (no " in out
    assert "panoptic_train2017.json" in out
    assert len(os.listdir(coco / "panoptic_semseg_val2017")) == 4
    with pytest.raises(SystemExit, match="no COCO panoptic split found"):
        prep.main(["--root", str(tmp_path / "nothing")])

    ade = _script("datasets/prepare_ade20k_sem_seg.py")
    val = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation"
    val.mkdir(parents=True)
    Image.fromarray(np.array([[0, 1, 150]], np.uint8)).save(val / "x.png")
    ade.main(["--root", str(tmp_path / "ade")])
    out = capsys.readouterr().out
    assert "validation: 1 label maps converted" in out and "annotations/training: not found" in out
    converted = np.asarray(Image.open(tmp_path / "ade" / "ADEChallengeData2016" / "annotations_detectron2" /
                                      "validation" / "x.png"))
    assert converted.tolist() == [[255, 0, 149]]
    with pytest.raises(SystemExit, match="no ADE20K split found"):
        ade.main(["--root", str(tmp_path / "none")])


def test_demo_empty_prediction_message():
    from detectron2.config import CfgNode
    from detectron2.structures import Instances

    demo = _script("demo/demo.py")
    cfg = CfgNode({"MODEL": {"MASK_FORMER": {"TEST": {"OBJECT_MASK_THRESHOLD": 0.8}}}})
    assert "OBJECT_MASK_THRESHOLD = 0.8" in demo.empty_prediction_message(
        {"panoptic_seg": (torch.zeros(2, 2), [])}, cfg, 0.5)
    assert demo.empty_prediction_message({"panoptic_seg": (torch.ones(2, 2), [{"id": 1}])}, cfg, 0.5) == ""
    inst = Instances((2, 2))
    inst.scores = torch.tensor([0.3])
    assert "--confidence-threshold 0.5 (best: 0.300" in demo.empty_prediction_message({"instances": inst}, cfg, 0.5)
    assert demo.empty_prediction_message({"instances": inst}, cfg, 0.2) == ""
