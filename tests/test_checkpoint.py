"""hierseg_d2/checkpoint.py: safe loading through every loading path of the project (a pickle that writes
a file when loaded must never run unless the trusted opt-in is given), the match check, atomic writes and
the damaged-checkpoint fallback of --resume."""
import importlib.util
import os
import pickle
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from hierseg_d2.checkpoint import (CheckpointMismatchError, HierSegCheckpointer, UnsafeCheckpointError,
                                   load_checkpoint_file)
from hierseg_d2.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")
SMALL = ["MODEL.MASK_FORMER.DEC_LAYERS", "1", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5",
         "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2"]


class Payload:
    """Unpickling this object writes ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def tool(name):
    path = os.path.join(ROOT, "tools", name) if not name.startswith("demo/") else os.path.join(ROOT, name)
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").replace("/", "_")[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes_cfg(*opts):
    cfg = load_config(SHAPES, SMALL + list(opts))
    cfg.freeze()
    return cfg


@pytest.fixture
def evil(tmp_path):
    """(marker path, {kind: malicious file}): full-model .pth / d2 .pkl for the shapes R18 model and an
    authors'-style state dict .pth for the converters, each with a payload next to real tensors."""
    marker = tmp_path / "PWNED"
    state = build_model(shapes_cfg()).state_dict()
    files = {}
    files["model.pth"] = tmp_path / "evil_model.pth"
    torch.save({"model": state, "payload": Payload(marker)}, files["model.pth"])
    files["model.pkl"] = tmp_path / "evil_model.pkl"
    with open(files["model.pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "x", "payload": Payload(marker)},
                    f)
    files["authors.pth"] = tmp_path / "evil_authors.pth"
    torch.save({"state_dict": {"patch_embed1.proj.weight": torch.zeros(2, 3, 7, 7)}, "payload": Payload(marker)},
               files["authors.pth"])
    files["authors.pkl"] = tmp_path / "evil_authors.pkl"
    with open(files["authors.pkl"], "wb") as f:
        pickle.dump({"state_dict": {"patch_embed1.proj.weight": np.zeros((2, 3, 7, 7), np.float32)},
                     "payload": Payload(marker)}, f)
    return marker, files


def refused(marker, path, fn, opt_in="MODEL.WEIGHTS_TRUSTED True"):
    with pytest.raises(UnsafeCheckpointError) as info:
        fn()
    assert str(path) in str(info.value) and opt_in in str(info.value), str(info.value)
    assert not marker.exists(), "the payload ran"


def test_the_payload_is_real_and_runs_only_when_trusted(evil):
    marker, files = evil
    for kind in ("model.pth", "model.pkl"):
        refused(marker, files[kind], lambda: load_checkpoint_file(files[kind]))
        load_checkpoint_file(files[kind], trusted=True)
        assert marker.read_text() == "pwned", kind  # the opt-in does what it says: plain pickle
        marker.unlink()


def test_converters_refuse_the_payload(evil, tmp_path):
    from hierseg_d2.modeling.backbone.convert import load_state_dict

    marker, files = evil
    for kind in ("authors.pth", "authors.pkl"):
        refused(marker, files[kind], lambda: load_state_dict(files[kind]), "--trusted")
    out = str(tmp_path / "out.pkl")
    for name in ("convert-mit-to-d2.py", "convert-pvt-to-d2.py", "convert-hat_net-to-d2.py", "convert-hrvit-to-d2.py"):
        main = tool(name).main
        for kind in ("authors.pth", "authors.pkl"):
            refused(marker, files[kind], lambda: main([str(files[kind]), out]), "--trusted")
    # --trusted reaches the loader: the payload runs
    try:
        tool("convert-mit-to-d2.py").main([str(files["authors.pth"]), out, "--trusted"])
    except (KeyError, ValueError):
        pass  # the toy state dict need not convert
    assert marker.exists()


def test_training_eval_and_resume_refuse_the_payload(evil, shapes_root, tmp_path):
    import train_net  # noqa: F401  (ROOT is on sys.path through pytest's rootdir)
    from hierseg_d2.engine import Trainer

    marker, files = evil
    for kind in ("model.pth", "model.pkl"):
        path = files[kind]
        out = tmp_path / f"out_{kind}"
        cfg = shapes_cfg("MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1")
        # MODEL.WEIGHTS in training
        refused(marker, path, lambda: Trainer(cfg).resume_or_load(resume=False))
        # --eval-only
        args = Namespace(config_file=SHAPES, opts=SMALL + ["MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(out)],
                         eval_only=True, resume=False, num_gpus=1)
        refused(marker, path, lambda: train_net.main(args))
    # --resume from a planted last_checkpoint
    out = tmp_path / "planted"
    out.mkdir()
    os.replace(files["model.pth"], out / "model_0000009.pth")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    cfg = shapes_cfg("OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "1")
    refused(marker, out / "model_0000009.pth", lambda: Trainer(cfg).resume_or_load(resume=True))


def test_demo_and_tools_refuse_the_payload(evil, shapes_root, tmp_path):
    import cv2

    marker, files = evil
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 100, np.uint8))
    for kind in ("model.pth", "model.pkl"):
        path = str(files[kind])
        weights = ["MODEL.WEIGHTS", path, *SMALL]
        refused(marker, path, lambda: tool("demo/demo.py").main(
            ["--config-file", SHAPES, "--input", str(image), "--output", str(tmp_path / "d"), "--opts", *weights]))
        refused(marker, path, lambda: tool("visualize_hierarchy.py").main(
            ["--config-file", SHAPES, "--output", str(tmp_path / "h"), "--opts", *weights]))
        refused(marker, path, lambda: tool("analyze_model.py").main(
            ["--config-file", SHAPES, "--tasks", "parameter", "--load", *weights]))
        hila = os.path.join(ROOT, "configs/shapes/hila/hcformer_hila_mit_b0_s3_shapes.yaml")
        refused(marker, path, lambda: tool("visualize_hila_attention.py").main(
            ["--config-file", hila, "--weights", path, "--input", str(image), "--output", str(tmp_path / "a.png")]))
        hafa = os.path.join(ROOT, "configs/shapes/hafa/hcformer_hafa_pvt_v2_b1_shapes.yaml")
        refused(marker, path, lambda: tool("visualize_sia_clusters.py").main(
            ["--config-file", hafa, "--input", str(image), "--output", str(tmp_path / "s"), "--opts", "MODEL.WEIGHTS",
             path]))


def test_trusted_config_key_allows_a_pickled_extra(shapes_root, tmp_path):
    """A harmless non-tensor object (here a numpy array inside a .pth, which weights_only refuses) loads
    with MODEL.WEIGHTS_TRUSTED True."""
    cfg = shapes_cfg()
    model = build_model(cfg)
    path = tmp_path / "extra.pth"
    torch.save({"model": model.state_dict(), "extra": np.arange(3)}, path)
    with pytest.raises(UnsafeCheckpointError, match="MODEL.WEIGHTS_TRUSTED True"):
        HierSegCheckpointer.from_config(cfg, model).load(str(path))
    trusted = shapes_cfg("MODEL.WEIGHTS_TRUSTED", "True")
    extra = HierSegCheckpointer.from_config(trusted, model).load(str(path))
    assert extra["extra"].tolist() == [0, 1, 2]


def test_wrong_architecture_text_and_empty_files_are_errors_naming_the_file(tmp_path):
    cfg = shapes_cfg()
    model = build_model(cfg)
    ck = HierSegCheckpointer.from_config(cfg, model)
    mit = tmp_path / "mit_b0.pkl"  # a converted MiT checkpoint (names of another backbone)
    with open(mit, "wb") as f:
        pickle.dump({"model": {"backbone.block1.0.attn.q.weight": np.zeros((32, 32), np.float32),
                               "backbone.patch_embed1.proj.weight": np.zeros((32, 3, 7, 7), np.float32)},
                     "__author__": "SegFormer", "matching_heuristics": False}, f)
    with pytest.raises(CheckpointMismatchError, match=rf"{mit}: none of its 2 tensors matches the model.*"
                                                      r"backbone.block1.0.attn.q.weight"):
        ck.load(str(mit))
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=rf"{text}: not a readable checkpoint"):
        ck.load(str(text))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{empty}: checkpoint file is empty"):
        ck.load(str(empty))


def test_partial_loads_backbone_only_is_legitimate_a_partial_model_is_not(tmp_path):
    cfg = shapes_cfg()
    torch.manual_seed(1)
    source = build_model(cfg).state_dict()
    model = build_model(cfg)
    ck = HierSegCheckpointer.from_config(cfg, model)
    # ImageNet-style backbone weights in Detectron2's model-zoo .pkl (numpy, no "backbone." prefix, name
    # matching heuristics on): a partial load measured against the backbone
    backbone = {k[len("backbone."):]: v.numpy() for k, v in source.items() if k.startswith("backbone.")}
    pkl = tmp_path / "R-18.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": backbone, "__author__": "imagenet", "matching_heuristics": True}, f)
    ck.load(str(pkl))
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(v, source[k]), k
    # 30% of the model's tensors, not all backbone ones: an error naming the file and missing names
    names = sorted(source)
    part = {k: source[k] for k in names[::3] + [n for n in names if n.startswith("sem_seg_head")][:1]}
    pth = tmp_path / "partial.pth"
    torch.save({"model": part}, pth)
    with pytest.raises(CheckpointMismatchError, match=rf"{pth}: provides only \d+% of the model's {len(names)} "
                                                      r"tensors.*first missing: "):
        ck.load(str(pth))
    # ... unless asked for
    HierSegCheckpointer.from_config(shapes_cfg("MODEL.WEIGHTS_MIN_MATCHED", "0.0"), model).load(str(pth))


def test_atomic_save_keeps_the_previous_file_on_a_failed_write(tmp_path, monkeypatch):
    import hierseg_d2.checkpoint as ckpt_module

    cfg = shapes_cfg()
    model = build_model(cfg)
    ck = HierSegCheckpointer.from_config(cfg, model, save_dir=str(tmp_path))
    ck.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000001")
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temporary left


def test_resume_with_only_damaged_checkpoints_is_an_error(tmp_path):
    cfg = shapes_cfg()
    ck = HierSegCheckpointer.from_config(cfg, build_model(cfg), save_dir=str(tmp_path))
    (tmp_path / "model_0000001.pth").write_bytes(b"\x80\x02truncated")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(ValueError, match=r"--resume: no readable checkpoint .*model_0000001.pth"):
        ck.resume_or_load("", resume=True)


def test_resumed_checkpoints_of_the_trainer_load_with_weights_only(shapes_root, tmp_path):
    """What the Trainer saves (model, optimizer, scheduler, iteration, data stream) is tensors and plain
    containers: readable by the safe default."""
    from hierseg_d2.engine import Trainer

    cfg = shapes_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ck = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert {"model", "trainer", "iteration"} <= set(ck)
    assert {"_trainer", "hooks", "data_stream"} <= set(ck["trainer"])  # optimizer, scheduler, data stream
    assert sys.modules["hierseg_d2.checkpoint"].load_checkpoint_file(tmp_path / "model_final.pth")["iteration"] == 0
