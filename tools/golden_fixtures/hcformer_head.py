#!/usr/bin/env python
"""Golden fixtures of the HCFormer release's head: clustering, decoder, HCFormer+ encoder, losses, post-processing.

    HCFORMER_RELEASE=/path/to/DensoITLab+HCFormer .venv/bin/python tools/golden_fixtures/hcformer_head.py

Builds the release's own classes (github.com/DensoITLab/HCFormer: ``Clustering`` and ``TransformerEnc`` of
modeling/backbone/utils.py, ``HCTransformerDecoder``, ``SetCriterion``, ``HungarianMatcher`` and the
``HCFormer`` meta-architecture's post-processing methods) at small sizes with random weights (fixed
seeds), fed with injected backbone features: random maps with the channels and strides of a small
ResNet, res2..res5 plus the release's "after" maps, the output of the first block of the next stage
(d_x1, d_x2, d_x3 of HCResNet.forward; ds3, ds4, ds5 in our naming). Two heads ("plain": decoder on
res5; "plus": HCFormer+, TransformerEnc on res5 first), each at one square and one non-square input.

Writes tests/fixtures/golden/hcformer_head.pt:
  heads.<variant>.state_dict   weights under the release's full-model names (backbone.clustering_layers.*,
                               backbone.aux.*, sem_seg_head.predictor.*, criterion.empty_weight)
  heads.<variant>.runs.<size>  features, assignments (release order: coarsest level first), decoded masks
                               and class logits of every prediction (deep supervision: the release's
                               training-mode forward decodes all), the three post-processed outputs of
                               image 0, and every loss term (unweighted, seed ``loss_seed``)
and tests/fixtures/golden/hcformer_head_keys.pt: names and shapes of the release's full model
state dicts for its COCO panoptic R50, R50+ (HCFormer+) and Swin-L+ configs (built with build_model and
random weights; torchvision's ImageNet download is shimmed away), for the converter's key test.
"""
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import release_checkout, release_commit, save_fixture  # noqa: E402

REPO = "DensoITLab/HCFormer"
# a small ResNet: stage widths and the "after" map (first block of the next stage) of each level
CHANNELS = {"res2": 16, "res3": 24, "res4": 32, "res5": 40}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
SIZES = {"square": (64, 64), "nonsquare": (64, 128)}
# image sizes inside the padded batch and output sizes, for the post-processing (image 0)
IMAGE_SIZE = {"square": (60, 62), "nonsquare": (60, 120)}
OUTPUT_SIZE = {"square": (36, 40), "nonsquare": (30, 62)}
SIZES_OF = dict(num_classes=4, hidden_dim=32, num_queries=8, nheads=4, dim_feedforward=64, dec_layers=2,
                emb_dim=16, enc_layers=2)
TEMPS = (0.07, 0.1, -0.05)  # s of clustering_layers 0, 1, 2 (levels 4, 3, 2); negative: |.| matters
THING_IDS = (0, 1)  # contiguous ids of the thing classes; 2, 3 are stuff
OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD, TOPK = 0.4, 0.3, 12
LOSS = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, eos_coef=0.1, num_points=200,
            oversample_ratio=3.0, importance_sample_ratio=0.75, loss_seed=1234)
RELEASE_CONFIGS = {
    "r50": "configs/coco/panoptic-segmentation/hcformer_R50_bs16_50ep.yaml",
    "r50_plus": "configs/coco/panoptic-segmentation/hcformer+_R50_bs16_100ep.yaml",
    "swin_large_plus": "configs/coco/panoptic-segmentation/swin/hcformer+_swin_large_IN21k_384_bs16_200ep.yaml",
}


def _shim_torchvision():
    # HCResNet asks torchvision for ImageNet weights (a download); random weights are all we need
    import torchvision.models as M

    for depth in (18, 34, 50, 101, 152):
        name = f"resnet{depth}"
        orig = getattr(M, name)
        M.__dict__[name] = (lambda orig: lambda pretrained=False, **kw: orig(weights=None))(orig)


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    # default inits leave norms at 1/0 and some biases at 0: perturb every vector so that all of them matter
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def build_heads(rel, variant: str, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    s = SIZES_OF
    # clustering_layers as HCResNet: built for levels 2, 3, 4 then reversed (index 0 = level 4)
    layers = []
    for fine, coarse in (("res2", "res3"), ("res3", "res4"), ("res4", "res5")):
        layers.append(rel.Clustering(CHANNELS[fine], CHANNELS[coarse], s["emb_dim"], 0.1))
    clustering = torch.nn.ModuleList(reversed(layers))
    aux = None
    in_channels = CHANNELS["res5"]
    if variant == "plus":
        aux = rel.TransformerEnc(CHANNELS["res5"], s["hidden_dim"], s["nheads"], s["enc_layers"], s["dim_feedforward"])
        in_channels = s["hidden_dim"]
    decoder = rel.HCTransformerDecoder(
        in_channels, True, num_classes=s["num_classes"], hidden_dim=s["hidden_dim"], num_queries=s["num_queries"],
        nheads=s["nheads"], dim_feedforward=s["dim_feedforward"], dec_layers=s["dec_layers"], pre_norm=False,
        mask_dim=s["hidden_dim"], enforce_input_project=False)
    for m in (clustering, decoder) + ((aux,) if aux is not None else ()):
        _perturb(m, g)
    with torch.no_grad():
        # confident queries, so that panoptic/instance post-processing keeps segments
        decoder.class_embed.weight.mul_(8.0)
        decoder.mask_embed.layers[-1].weight.mul_(3.0)
        for m, t in zip(clustering, TEMPS):
            m.temp.fill_(t)
    return clustering, aux, decoder


def release_state_dict(clustering, aux, decoder, criterion):
    out = {f"backbone.clustering_layers.{k}": v for k, v in clustering.state_dict().items()}
    if aux is not None:
        out.update({f"backbone.aux.{k}": v for k, v in aux.state_dict().items()})
    out.update({f"sem_seg_head.predictor.{k}": v for k, v in decoder.state_dict().items()})
    out.update({f"criterion.{k}": v for k, v in criterion.state_dict().items()})
    return {k: v.detach().clone() for k, v in out.items()}


def features_for(size, generator):
    h, w = size
    b = 2
    feats = {}
    for name, c in CHANNELS.items():
        st = STRIDES[name]
        feats[name] = F.relu(torch.randn(b, c, h // st, w // st, generator=generator))
    # the after maps: the first block's output of res3, res4, res5 (its channels and stride)
    for k in (3, 4, 5):
        st = STRIDES[f"res{k}"]
        feats[f"ds{k}"] = F.relu(torch.randn(b, CHANNELS[f"res{k}"], h // st, w // st, generator=generator))
    return feats


def targets_for(size, generator):
    h, w = size
    targets = []
    for labels in ([0, 2, 1], [3, 1]):
        masks = torch.zeros(len(labels), h, w)
        for j in range(len(labels)):
            y0, x0 = [int(torch.randint(0, n // 2, (1,), generator=generator)) for n in (h, w)]
            y1, x1 = [int(torch.randint(n // 2 + 4, n, (1,), generator=generator)) for n in (h, w)]
            masks[j, y0:y1, x0:x1] = 1
        targets.append({"labels": torch.tensor(labels), "masks": masks.bool()})  # bool: a small fixture
    return targets


def run(rel, clustering, aux, decoder, criterion, size_name, seed):
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    g = torch.Generator().manual_seed(seed)
    size = SIZES[size_name]
    feats = features_for(size, g)
    targets = targets_for(size, g)
    assigns = [m(feats[fine], feats[down]) for m, (fine, down) in
               zip(clustering, (("res4", "ds5"), ("res3", "ds4"), ("res2", "ds3")))]
    x = feats["res5"]
    if aux is not None:
        aux.eval()  # dropout off (the fixture is deterministic); the release trains it with dropout 0.1
        x = aux(x)
    decoder.train()  # training mode: the release decodes every prediction (deep supervision)
    out = decoder(x, x, assigns)
    temperature = sum(m.temp for m in clustering).abs().sum()
    torch.manual_seed(LOSS["loss_seed"])
    # the release's targets are the dataset's bool masks, padded (HCFormer.prepare_targets)
    losses = criterion(out, targets, temperature)

    # post-processing of image 0 as HCFormer.forward at inference (panoptic + instance on: resize first)
    fake = SimpleNamespace(sem_seg_head=SimpleNamespace(num_classes=SIZES_OF["num_classes"]),
                           object_mask_threshold=OBJECT_MASK_THRESHOLD, overlap_threshold=OVERLAP_THRESHOLD,
                           metadata=SimpleNamespace(thing_dataset_id_to_contiguous_id={i: i for i in THING_IDS}),
                           num_queries=SIZES_OF["num_queries"], test_topk_per_image=TOPK, panoptic_on=True,
                           device=torch.device("cpu"))
    with torch.no_grad():
        mask_pred = F.interpolate(out["pred_masks"], size=size, mode="bilinear", align_corners=False)[0]
        mask_pred = sem_seg_postprocess(mask_pred, IMAGE_SIZE[size_name], *OUTPUT_SIZE[size_name])
        mask_cls = out["pred_logits"][0]
        sem_seg = rel.HCFormer.semantic_inference(fake, mask_cls, mask_pred)
        panoptic_seg, segments_info = rel.HCFormer.panoptic_inference(fake, mask_cls, mask_pred)
        instances = rel.HCFormer.instance_inference(fake, mask_cls, mask_pred)
    print(f"  {size_name}: {len(segments_info)} panoptic segments, losses "
          + ", ".join(f"{k}={v.item():.4f}" for k, v in sorted(losses.items()) if "_" not in k[5:]))
    d = lambda t: t.detach().clone()
    return {
        "features": feats,
        "targets": targets,
        "assignments": [d(a) for a in assigns],
        "pred_logits": d(out["pred_logits"]),
        "pred_masks": d(out["pred_masks"]),
        "aux_outputs": [{"pred_logits": d(a["pred_logits"]), "pred_masks": d(a["pred_masks"])}
                        for a in out["aux_outputs"]],
        "image_size": list(IMAGE_SIZE[size_name]),
        "output_size": list(OUTPUT_SIZE[size_name]),
        "sem_seg": d(sem_seg),
        "panoptic_seg": d(panoptic_seg),
        "segments_info": [dict(s) for s in segments_info],
        "instances": {"scores": d(instances.scores), "pred_masks": d(instances.pred_masks).bool(),
                      "pred_classes": d(instances.pred_classes)},
        "losses": {k: d(v) for k, v in losses.items()},
    }


def release_key_lists(root):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    import hcformer

    out = {}
    for name, path in RELEASE_CONFIGS.items():
        cfg = get_cfg()
        add_deeplab_config(cfg)
        hcformer.add_maskformer2_config(cfg)
        hcformer.add_hcformer_config(cfg)
        cfg.merge_from_file(os.path.join(root, path))
        cfg.MODEL.DEVICE = "cpu"
        state = build_model(cfg).state_dict()
        out[name] = {"config": path, "names": list(state), "shapes": [list(v.shape) for v in state.values()],
                     "dtypes": [str(v.dtype).replace("torch.", "") for v in state.values()]}
        print(f"  {name}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values")
        del state
    return out


def main():
    root = release_checkout("HCFORMER_RELEASE", REPO)
    commit = release_commit(root)
    _shim_torchvision()
    import hcformer  # noqa: F401  (registers the release's classes)
    from hcformer.hcformer_model import HCFormer
    from hcformer.modeling.backbone.utils import Clustering, TransformerEnc
    from hcformer.modeling.criterion import SetCriterion
    from hcformer.modeling.matcher import HungarianMatcher
    from hcformer.modeling.transformer_decoder.hcformer_decoder import HCTransformerDecoder

    rel = SimpleNamespace(Clustering=Clustering, TransformerEnc=TransformerEnc, HCFormer=HCFormer,
                          HCTransformerDecoder=HCTransformerDecoder)
    torch.set_grad_enabled(True)
    heads = {}
    for v, variant in enumerate(("plain", "plus")):
        print(f"head {variant}")
        clustering, aux, decoder = build_heads(rel, variant, seed=10 + v)
        matcher = HungarianMatcher(cost_class=LOSS["class_weight"], cost_mask=LOSS["mask_weight"],
                                   cost_dice=LOSS["dice_weight"], num_points=LOSS["num_points"])
        weight_dict = {"loss_ce": LOSS["class_weight"], "loss_mask": LOSS["mask_weight"],
                       "loss_dice": LOSS["dice_weight"], "loss_l1": 0.1}
        criterion = SetCriterion(SIZES_OF["num_classes"], matcher=matcher, weight_dict=weight_dict,
                                 eos_coef=LOSS["eos_coef"], losses=["labels", "masks"],
                                 num_points=LOSS["num_points"], oversample_ratio=LOSS["oversample_ratio"],
                                 importance_sample_ratio=LOSS["importance_sample_ratio"])
        state = release_state_dict(clustering, aux, decoder, criterion)
        runs = {name: run(rel, clustering, aux, decoder, criterion, name, seed=100 * v + i)
                for i, name in enumerate(SIZES)}
        heads[variant] = {"state_dict": state, "runs": runs}
    content = {
        "heads": heads,
        "channels": dict(CHANNELS),
        "sizes": {k: list(v) for k, v in SIZES.items()},
        "config": dict(SIZES_OF, thing_ids=list(THING_IDS), object_mask_threshold=OBJECT_MASK_THRESHOLD,
                       overlap_threshold=OVERLAP_THRESHOLD, topk=TOPK, **LOSS),
    }
    save_fixture("hcformer_head", content, REPO, commit)
    print("release key lists")
    save_fixture("hcformer_head_keys", {"models": release_key_lists(root)}, REPO, commit)


if __name__ == "__main__":
    main()
