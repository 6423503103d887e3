"""The export-time clustering / decoding equal the model's own (hierseg_d2.modeling.clustering)."""
import pytest
import torch

from hierseg_d2.export import traceable
from hierseg_d2.modeling import clustering
from hierseg_d2.modeling.meta_arch import hcformer


# (H, W, h, w): even, odd with ceil and with floor after maps, one row
@pytest.mark.parametrize("sizes", [(8, 10, 4, 5), (7, 9, 4, 5), (7, 9, 3, 4), (1, 3, 1, 2)])
def test_clustering_and_decoding_equal_the_model(sizes):
    height, width, h, w = sizes
    torch.manual_seed(0)
    module = clustering.ClusteringModule(6, 5, cluster_dim=4, scale_init=0.3)
    feat, down = torch.randn(2, 6, height, width), torch.randn(2, 5, h, w)
    ref = module(feat, down)
    assign = traceable.clustering_module_forward(module, feat, down)
    assert (assign - ref).abs().max() < 1e-6
    masks = torch.randn(2, 3, h, w)
    assert (traceable.decode(masks, ref) - clustering.decode(masks, ref)).abs().max() < 1e-6


def test_traceable_hierarchy_patches_and_restores():
    forward, decode_hierarchy = clustering.ClusteringModule.forward, hcformer.decode_hierarchy
    with traceable.traceable_hierarchy():
        assert clustering.ClusteringModule.forward is traceable.clustering_module_forward
        assert hcformer.decode_hierarchy is traceable.decode_hierarchy
    assert clustering.ClusteringModule.forward is forward and hcformer.decode_hierarchy is decode_hierarchy
