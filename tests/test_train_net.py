"""train_net.py and the training recipe: configs, overfitting a few shapes images, two-process CPU training
through Detectron2's launch (gloo), parameter counts and the FLOP tool."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from hierseg_d2.config import add_hierseg_config
from hierseg_d2.utils.smoke import train_iterations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "configs/shapes/hcformer_R18_shapes.yaml")
COCO_PAN = os.path.join(ROOT, "configs/coco/panoptic-segmentation")


def _cfg(path, opts=()):
    cfg = get_cfg()
    add_hierseg_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def _own_configs():
    """The HCFormer R50 / Swin-S configs of every task (other backbone families test theirs)."""
    tasks = ["coco/panoptic-segmentation", "coco/instance-segmentation", "ade20k/semantic-segmentation",
             "cityscapes/semantic-segmentation"]
    files = []
    for t in tasks:
        files += glob.glob(os.path.join(ROOT, "configs", t, "hcformer*_R50_*.yaml"))
        files += glob.glob(os.path.join(ROOT, "configs", t, "swin", "*.yaml"))
    # the Swin-L configs copy the release's recipes (200 queries, its steps); tests/modeling/backbone/test_swin.py
    return sorted(f for f in files if "swin_large" not in f)


def test_configs_follow_the_paper_recipes():
    files = _own_configs()
    assert len(files) == 16
    for f in files:
        cfg = _cfg(f)
        s, name = cfg.SOLVER, os.path.relpath(f, ROOT)
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER, s.OPTIMIZER) == \
            (16, 1e-4, 0.05, 0.1, "ADAMW"), name
        assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model", name
        plus = "plus" in os.path.basename(f)
        assert cfg.MODEL.MASK_FORMER.ENC_LAYERS == (6 if plus else 0), name
        assert (cfg.MODEL.MASK_FORMER.DEC_LAYERS, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES) == (8, 100), name
        assert cfg.MODEL.HCFORMER.LEVELS == 3, name
        assert cfg.MODEL.BACKBONE.NAME == ("D2SwinTransformer" if "swin" in f else "build_hcformer_resnet_backbone")
        if "/coco/" in f:
            assert s.MAX_ITER == (737500 if plus else 368750), name  # 100 / 50 epochs at batch 16
            assert s.LR_SCHEDULER_NAME == "WarmupMultiStepLR"
            assert [round(x / s.MAX_ITER, 3) for x in s.STEPS] == [0.9, 0.95], name
        else:
            ade = "/ade20k/" in f
            base_iters = 160000 if ade else 90000
            assert s.MAX_ITER == base_iters * (2 if plus else 1), name
            assert s.LR_SCHEDULER_NAME == "WarmupPolyLR", name
            assert tuple(cfg.INPUT.CROP.SIZE) == ((512, 512) if ade else (512, 1024)), name


def test_small_hcformer_overfits_a_few_shapes_images(shapes_root):
    """30 AdamW steps on 4 training images (96 px, 2 decoder layers): the loss falls clearly (measured: from
    ~36 to ~18)."""
    cfg = _cfg(SHAPES, ["DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4", "SEED", "1",
                        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.CROP.ENABLED", "False",
                        "MODEL.MASK_FORMER.DEC_LAYERS", "2", "SOLVER.BASE_LR", "0.001"])
    cfg.DATASETS.TRAIN = ("shapes_overfit",)
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if "shapes_overfit" not in DatasetCatalog.list():
        DatasetCatalog.register("shapes_overfit", lambda: DatasetCatalog.get("shapes_train_panoptic")[:4])
        meta = MetadataCatalog.get("shapes_train_panoptic").as_dict()
        MetadataCatalog.get("shapes_overfit").set(**{k: v for k, v in meta.items() if k != "name"})
    losses = train_iterations(cfg, 30)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 30
    assert last < 0.7 * first, losses


_WORKER = textwrap.dedent('''
    """Runs train_net.main in every process started by Detectron2's launch and saves each rank's weights."""
    import os, sys
    import torch
    sys.path.insert(0, {root!r})
    from detectron2.engine import default_argument_parser, launch
    from detectron2.utils import comm
    import train_net

    OUT = {out!r}

    class SavingTrainer(train_net.Trainer):
        def train(self):
            model = getattr(self.model, "module", self.model)
            before = {{k: v.detach().clone() for k, v in model.named_parameters()}}
            super().train()
            after = {{k: v.detach().clone() for k, v in model.named_parameters()}}
            torch.save({{"before": before, "after": after, "world_size": comm.get_world_size(),
                        "ddp": model is not self.model}}, os.path.join(OUT, f"rank{{comm.get_rank()}}.pth"))

    def worker(args):
        train_net.Trainer = SavingTrainer
        train_net.main(args)

    if __name__ == "__main__":
        args = default_argument_parser().parse_args(sys.argv[1:])
        launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
''')


def test_two_cpu_processes_train_with_gloo_and_agree(shapes_root, tmp_path):
    """`--num-gpus 2` without GPUs: two processes (gloo), each one step on its own images, and after the
    step both hold the same parameters (gradients were all-reduced) that differ from the initial ones."""
    script = tmp_path / "launch_train_net.py"
    script.write_text(_WORKER.format(root=ROOT, out=str(tmp_path)))
    env = dict(os.environ, DETECTRON2_DATASETS=shapes_root, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(script), "--num-gpus", "2", "--config-file", SHAPES, "--dist-url", "auto",
           "OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2",
           "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "SEED", "-1",
           "MODEL.MASK_FORMER.DEC_LAYERS", "1", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "5"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["ddp"] for r in ranks)
    assert os.path.exists(tmp_path / "out" / "log.txt.rank1")
    moved = 0
    for name, w0 in ranks[0]["after"].items():
        torch.testing.assert_close(ranks[1]["after"][name], w0, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(ranks[0]["before"][name], w0)
    assert moved > 0.5 * len(ranks[0]["after"])


@pytest.mark.parametrize("config,paper_millions", [("hcformer_R50_bs16_50ep.yaml", 38),
                                                   ("hcformer_plus_R50_bs16_100ep.yaml", 46)])
def test_coco_panoptic_parameter_count_matches_the_paper(config, paper_millions):
    """HCFormer Table 1 rounds to whole millions; we allow 1.5% around the paper's figure."""
    model = build_model(_cfg(os.path.join(COCO_PAN, config), ["MODEL.DEVICE", "cpu"]))
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - paper_millions) <= 0.015 * paper_millions, n


def test_analyze_model_counts_flops_including_dcn_and_decoding(shapes_root):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import analyze_model

    def flops(*opts):
        return analyze_model.main(["--config-file", SHAPES, "--tasks", "flop", "--height", "64", "--width", "96",
                                   *opts])["flops"]

    full = flops()
    assert full > flops("MODEL.HCFORMER.DCN_DOWNSAMPLING", "False")  # deform_conv2d is counted
    assert full > flops("MODEL.HCFORMER.LEVELS", "0")  # clustering + hierarchical decoding cost something
    params = analyze_model.main(["--config-file", SHAPES, "--tasks", "parameter"])["params"]
    assert params == sum(p.numel() for p in build_model(_cfg(SHAPES)).parameters())
