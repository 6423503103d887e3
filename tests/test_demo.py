"""demo/demo.py, the `make demo` hierarchy report and --eval-only clustering numbers on tiny randomly
initialised HCFormers (ResNet-18)."""
import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from hierseg_d2 import add_hierseg_config
from hierseg_d2.data.datasets import datasets_root, register_all_shapes
from hierseg_d2.utils.hierarchy_vis import HEADER_H, GAP, display_scale, write_hierarchy_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml")
SHAPES_CONFIG = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")
# the user-facing COCO config made CPU-test sized: random ResNet-18, 1 decoder layer, 10 queries
TINY = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.MASK_FORMER.DEC_LAYERS", "1", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
        "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.HCFORMER.CLUSTER_DIM", "16",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256", "MODEL.DEVICE", "cpu",
        "DATALOADER.NUM_WORKERS", "0"]


def load_demo():
    spec = importlib.util.spec_from_file_location("hierseg_demo", os.path.join(ROOT, "demo", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_images(folder, sizes=((96, 128), (120, 100))):
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), (40, 120, 200), np.uint8)
        cv2.rectangle(img, (10, 10), (w // 2, h // 2), (220, 60, 40), -1)
        cv2.circle(img, (3 * w // 4, 3 * h // 4), min(h, w) // 5, (30, 200, 60), -1)
        paths.append(os.path.join(folder, f"img{i}.jpg"))
        cv2.imwrite(paths[-1], img)
    return paths


def test_demo_panoptic_with_hierarchy(tmp_path):
    paths = make_images(str(tmp_path))
    out = tmp_path / "out"
    torch.manual_seed(0)
    written = load_demo().main(["--config-file", CONFIG, "--input", str(tmp_path / "*.jpg"), "--output", str(out),
                                "--hierarchy", "--opts", *TINY,
                                "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0"])
    assert sorted(os.path.basename(p) for p in written) == [
        "img0.png", "img0_hierarchy.png", "img1.png", "img1_hierarchy.png"]
    for path in paths:
        h, w = cv2.imread(path).shape[:2]
        k = display_scale(h, w)
        name = os.path.splitext(os.path.basename(path))[0]
        vis = cv2.imread(str(out / f"{name}.png"))
        assert vis.shape[:2] == (h * k, w * k)
        strip = cv2.imread(str(out / f"{name}_hierarchy.png"))
        # one row: A(2), A(3), A(4) cluster boundaries + the prediction
        assert strip.shape[:2] == (HEADER_H + h * k, 4 * w * k + 3 * GAP)
        first = strip[HEADER_H:, :w * k]
        assert (first.min(axis=2) > 240).any(), "no cluster boundary drawn"


def test_demo_semantic_to_one_file(tmp_path):
    path = make_images(str(tmp_path), sizes=((300, 260),))[0]
    target = tmp_path / "drawn.png"
    written = load_demo().main(["--config-file", CONFIG, "--input", path, "--output", str(target), "--opts", *TINY,
                                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
                                "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"])
    assert written == [str(target)]
    assert cv2.imread(str(target)).shape[:2] == (300, 260)  # large enough: drawn at its own size
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load_demo().main(["--config-file", CONFIG, "--input", str(tmp_path / "*.png.missing"), "--opts", *TINY])


@pytest.fixture
def shapes(tmp_path):
    register_all_shapes(str(tmp_path / "datasets"), num_images={"train": 2, "val": 3}, progress=False)
    yield
    register_all_shapes(datasets_root())  # back to the default root (registration only, lazy)


def shapes_cfg(*opts):
    """The demo's shapes model (random weights), one decoder layer."""
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(SHAPES_CONFIG)
    cfg.merge_from_list(["MODEL.MASK_FORMER.DEC_LAYERS", "1", "DATALOADER.NUM_WORKERS", "0", *opts])
    return cfg


def test_hierarchy_report_on_shapes(shapes, tmp_path):
    cfg = shapes_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    out = tmp_path / "report"
    res = write_hierarchy_report(cfg, model, "shapes_val_panoptic", str(out), num_images=2)
    records = DatasetCatalog.get("shapes_val_panoptic")[:2]
    names = [os.path.splitext(os.path.basename(r["file_name"]))[0] for r in records]
    assert sorted(os.listdir(out)) == sorted(f"{n}_hierarchy.png" for n in names)
    h, w = cv2.imread(records[0]["file_name"]).shape[:2]
    k = display_scale(h, w)
    strip = cv2.imread(str(out / f"{names[0]}_hierarchy.png"))
    # two rows of 4 panels: boundaries per level + GT, then leaks per level + prediction
    assert strip.shape[:2] == (2 * (HEADER_H + h * k) + GAP, 4 * w * k + 3 * GAP)
    leaks = strip[2 * HEADER_H + h * k + GAP:, :3 * w * k + 2 * GAP]  # BGR
    assert ((leaks[..., 2] > 150) & (leaks[..., 1] < 80)).any(), "a random model leaks: red expected"
    strides = [4, 8, 16, 32]
    assert sorted(res) == sorted(f"{m}@stride{s}" for s in strides for m in ("UE", "ASA", "clusters"))
    for s in strides:
        assert 0.0 <= res[f"UE@stride{s}"] <= 100.0 and 0.0 < res[f"ASA@stride{s}"] <= 100.0
    # composed hard clusters are nested (each coarse cluster is a union of finer ones): purity can only
    # drop and the number of clusters only shrink from one level to the next
    for fine, coarse in zip(strides, strides[1:]):
        assert res[f"ASA@stride{coarse}"] <= res[f"ASA@stride{fine}"] + 1e-9
        assert res[f"clusters@stride{coarse}"] <= res[f"clusters@stride{fine}"]
    # the model is handed back as it came
    assert model.training and model.return_assignments is False


def test_eval_only_reports_clustering_next_to_pq(shapes, tmp_path):
    """train_net.py --eval-only path: with CLUSTERING_EVAL the results hold "clustering" beside PQ/AP/mIoU,
    with the same numbers as the report."""
    from hierseg_d2.engine import Trainer

    cfg = shapes_cfg("MODEL.HCFORMER.CLUSTERING_EVAL", "True", "OUTPUT_DIR", str(tmp_path / "eval"))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.return_assignments
    res = Trainer.test(cfg, model)
    assert {"panoptic_seg", "segm", "sem_seg", "clustering"} <= set(res)
    report = write_hierarchy_report(cfg, model, "shapes_val_panoptic_with_sem_seg", str(tmp_path / "r"), num_images=1)
    assert res["clustering"] == pytest.approx(report)


def make_video(path, num_frames=5, size=(96, 128), fps=10.0):
    """A short generated video: a square moving over a coloured background (mp4v, which this OpenCV writes)."""
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), True)
    assert writer.isOpened()
    for i in range(num_frames):
        img = np.full((h, w, 3), (40, 120, 200), np.uint8)
        cv2.rectangle(img, (5 + 8 * i, 10), (35 + 8 * i, 40), (220, 60, 40), -1)
        writer.write(img)
    writer.release()


def video_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    return frames


def test_demo_video_input_writes_the_drawn_video(tmp_path, capsys):
    src = tmp_path / "clip.mp4"
    make_video(src, num_frames=5)
    demo = load_demo()
    codec, ext = demo.video_codec()
    assert (codec, ext) in (("x264", ".mkv"), ("mp4v", ".mp4"))
    torch.manual_seed(0)
    written = demo.main(["--config-file", CONFIG, "--video-input", str(src), "--output", str(tmp_path / "out"),
                         "--hierarchy", "--opts", *TINY, "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0"])
    out = tmp_path / "out" / f"clip{ext}"
    assert written == [str(out), str(tmp_path / "out" / f"clip_hierarchy{ext}")]
    k = display_scale(96, 128)
    frames = video_frames(out)
    assert len(frames) == 5 and frames[0].shape[:2] == (96 * k, 128 * k)
    strips = video_frames(written[1])
    assert len(strips) == 5 and strips[0].shape[:2] == (HEADER_H + 96 * k, 4 * 128 * k + 3 * GAP)
    # frames are drawn predictions over the moving square, not copies of one frame
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1.0
    assert "frame" in capsys.readouterr().err  # tqdm's progress bar counts frames (frame/s)


def test_demo_video_to_a_file_and_max_frames(tmp_path):
    src = tmp_path / "clip.mp4"
    make_video(src, num_frames=6, size=(300, 260))
    target = tmp_path / "drawn.mp4"
    written = load_demo().main(["--config-file", CONFIG, "--video-input", str(src), "--output", str(target),
                                "--max-frames", "2", "--opts", *TINY,
                                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
                                "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"])
    assert written == [str(target)]
    frames = video_frames(target)
    assert len(frames) == 2 and frames[0].shape[:2] == (300, 260)


def test_demo_video_and_webcam_bad_input(tmp_path, monkeypatch):
    demo = load_demo()
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        demo.main(["--config-file", CONFIG, "--video-input", str(tmp_path / "nothere.mp4"), "--opts", *TINY])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        demo.main(["--config-file", CONFIG, "--video-input", str(junk), "--opts", *TINY])
    with pytest.raises(SystemExit):  # exactly one input source
        demo.main(["--config-file", CONFIG, "--opts", *TINY])

    class NoCamera:  # what cv2.VideoCapture(0) gives on a machine without a camera
        def __init__(self, index):
            self.index = index

        def isOpened(self):
            return False

    monkeypatch.setattr(demo.cv2, "VideoCapture", NoCamera)
    with pytest.raises(RuntimeError, match="no camera could be opened"):
        demo.main(["--config-file", CONFIG, "--webcam", "--opts", *TINY])


def test_demo_processes_every_readable_input_and_names_the_unreadable(tmp_path):
    """A truncated JPEG and a text file among good images: both named in warnings, the good ones drawn;
    only when no input can be read does the demo exit non-zero."""
    import logging

    good = make_images(str(tmp_path))
    cut = tmp_path / "img2_cut.jpg"
    cut.write_bytes(open(good[0], "rb").read()[:400])
    text = tmp_path / "img3_text.jpg"
    text.write_text("not an image")
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("detectron2").addHandler(handler)
    try:
        written = load_demo().main(["--config-file", CONFIG, "--input", str(tmp_path / "*.jpg"),
                                    "--output", str(tmp_path / "out"), "--opts", *TINY])
    finally:
        logging.getLogger("detectron2").removeHandler(handler)
    assert sorted(os.path.basename(p) for p in written) == ["img0.png", "img1.png"]
    warned = "\n".join(messages)
    assert f"skipping unreadable input {cut}" in warned and f"skipping unreadable input {text}" in warned
    assert "2 of 4 inputs could not be read" in warned
    with pytest.raises(SystemExit) as info:
        load_demo().main(["--config-file", CONFIG, "--input", str(cut), str(text), "--output", str(tmp_path / "o2"),
                          "--opts", *TINY])
    assert info.value.code != 0 and str(cut) in str(info.value.code)
