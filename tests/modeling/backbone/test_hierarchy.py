"""HierarchicalBackbone: the output bookkeeping every family shares (shapes, selection, pairs, errors)."""
import pytest
import torch

from hierseg_d2.modeling.backbone.hierarchy import HierarchicalBackbone, get_clustering_pairs


class ToyBackbone(HierarchicalBackbone):
    """res_k = average pooling of the input by 2^k, tiled to the stage width; ds_k = the same map."""

    family = "Toy"
    config_node = "MODEL.TOY"

    def __init__(self, channels=(2, 3, 4, 5), **kwargs):
        super().__init__()
        self.channels = channels
        self.init_outputs(channels, **kwargs)

    def forward(self, x):
        self.check_input(x)
        outputs = {}
        for i, c in enumerate(self.channels):
            m = torch.nn.functional.avg_pool2d(x[:, :1], 2 ** (i + 2), ceil_mode=True).expand(-1, c, -1, -1)
            outputs[f"res{i + 2}"] = m
            if i > 0:
                outputs[f"ds{i + 2}"] = m
        return self.select_outputs(outputs)


def test_shapes_selection_and_pairs():
    model = ToyBackbone()
    shapes = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res2": (2, 4), "res3": (3, 8), "res4": (4, 16), "res5": (5, 32), "ds3": (3, 8), "ds4": (4, 16),
        "ds5": (5, 32)}
    assert get_clustering_pairs(model) == {2: ("res2", "ds3"), 3: ("res3", "ds4"), 4: ("res4", "ds5")}
    assert model.size_divisibility == 32
    assert set(model(torch.randn(1, 3, 64, 64))) == set(shapes)

    chosen = ToyBackbone(out_features=["res3", "ds4"])
    assert set(chosen.output_shape()) == set(chosen(torch.randn(1, 3, 64, 64))) == {"res3", "ds4"}


def test_always_returned_maps_and_fewer_stages():
    model = ToyBackbone(out_features=["res5"], always_return_ds=True)
    assert list(model.output_shape()) == ["res5", "ds3", "ds4", "ds5"]
    three = ToyBackbone(channels=(2, 3, 4))  # e.g. an HRViT whose last module has three branches
    assert three.clustering_pairs() == {2: ("res2", "ds3"), 3: ("res3", "ds4")}


def test_errors_name_the_config_key():
    with pytest.raises(ValueError, match=r"MODEL\.TOY\.OUT_FEATURES.*'res6'"):
        ToyBackbone(out_features=["res6"])
    with pytest.raises(ValueError, match=r"always returned"):
        ToyBackbone(out_features=["ds3"], always_return_ds=True)
    with pytest.raises(ValueError, match="Toy takes"):
        ToyBackbone()(torch.randn(3, 64, 64))


def test_hcformer_out_features_drops_stages_after_the_head_input():
    from detectron2.config import get_cfg

    from hierseg_d2.config import add_hierseg_config
    from hierseg_d2.modeling.backbone.hierarchy import hcformer_out_features

    cfg = get_cfg()
    add_hierseg_config(cfg)
    stages = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res4"
    assert hcformer_out_features(cfg, stages, "X") == stages  # not HCFormer: unchanged
    cfg.MODEL.META_ARCHITECTURE = "HCFormer"
    assert hcformer_out_features(cfg, stages, "X") == ["res2", "res3", "res4"]
    assert hcformer_out_features(cfg, ["res5"], "X") == ["res4"]  # the head's input is always built
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    assert hcformer_out_features(cfg, stages, "X") == stages
