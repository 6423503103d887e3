"""Clustering (eq. 3) and decoding (eq. 5) against explicit-loop references."""
import math

import pytest
import torch

from hierseg_d2.modeling import clustering
from hierseg_d2.modeling.clustering import (
    OFFSETS,
    ClusteringModule,
    compose_hard_assignments,
    decode,
    decode_hierarchy,
    local_clustering,
)


def naive_clustering(feat, down, scale):
    """Dense softmax over the 9 parents of every pixel, with explicit loops; missing parents get 0."""
    b, _, height, width = feat.shape
    h, w = down.shape[-2:]
    out = torch.zeros(b, 9, height, width, dtype=feat.dtype)
    for n in range(b):
        for y in range(height):
            for x in range(width):
                logits = []
                for dy, dx in OFFSETS:
                    py, px = y // 2 + dy, x // 2 + dx
                    inside = 0 <= py < h and 0 <= px < w
                    logits.append(float(feat[n, :, y, x] @ down[n, :, py, px]) / (1e-8 + abs(scale)) if inside else None)
                top = max(v for v in logits if v is not None)
                exps = [math.exp(v - top) if v is not None else 0.0 for v in logits]
                for k, e in enumerate(exps):
                    out[n, k, y, x] = e / sum(exps)
    return out


def naive_decode(x, assign):
    b, q, h, w = x.shape
    height, width = assign.shape[-2:]
    out = torch.zeros(b, q, height, width, dtype=x.dtype)
    for y in range(height):
        for xx in range(width):
            for k, (dy, dx) in enumerate(OFFSETS):
                py, px = y // 2 + dy, xx // 2 + dx
                if 0 <= py < h and 0 <= px < w:
                    out[:, :, y, xx] += assign[:, k, y, xx, None] * x[:, :, py, px]
    return out


@pytest.mark.parametrize("before,after",
                         [((25, 25), (13, 13)), ((25, 25), (12, 12)), ((8, 7), (4, 3)), ((6, 5), (3, 3))])
def test_local_clustering_matches_dense_loops(before, after):
    torch.manual_seed(0)
    feat = torch.nn.functional.normalize(torch.randn(2, 5, *before, dtype=torch.float64), dim=1)
    down = torch.nn.functional.normalize(torch.randn(2, 5, *after, dtype=torch.float64), dim=1)
    scale = torch.tensor(-0.3, dtype=torch.float64)  # used as |s|
    assign = local_clustering(feat, down, scale)
    ref = naive_clustering(feat, down, -0.3)
    assert assign.shape == (2, 9, *before)
    torch.testing.assert_close(assign, ref)
    torch.testing.assert_close(assign.sum(1), torch.ones(2, *before, dtype=torch.float64))
    # corner pixel (0, 0): its upper and left candidates do not exist and must get exactly 0
    assert torch.all(assign[:, [0, 1, 2, 3, 6], 0, 0] == 0)
    # with a floor-sized after map the last odd row has no parent row below or at y // 2
    if after[0] * 2 < before[0]:
        assert torch.all(assign[:, 3:, -1, :] == 0)


@pytest.mark.parametrize("before,after", [((25, 25), (13, 13)), ((25, 25), (12, 12)), ((9, 6), (5, 3))])
def test_decode_matches_loops(before, after):
    torch.manual_seed(1)
    assign = torch.randn(2, 9, *before, dtype=torch.float64).softmax(1)
    x = torch.randn(2, 3, *after, dtype=torch.float64)
    torch.testing.assert_close(decode(x, assign), naive_decode(x, assign))


def test_small_scale_gives_one_hot_and_copies_parent():
    torch.manual_seed(2)
    feat = torch.nn.functional.normalize(torch.randn(1, 8, 13, 11), dim=1)
    down = torch.nn.functional.normalize(torch.randn(1, 8, 7, 6), dim=1)
    assign = local_clustering(feat, down, torch.tensor(1e-6))
    one_hot = torch.nn.functional.one_hot(assign.argmax(1), 9).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(assign, one_hot, rtol=0, atol=1e-4)
    values = torch.randn(1, 4, 7, 6)
    decoded = decode(values, assign)
    k = assign.argmax(1)[0]
    for y in range(13):
        for x in range(11):
            dy, dx = OFFSETS[int(k[y, x])]
            torch.testing.assert_close(decoded[0, :, y, x], values[0, :, y // 2 + dy, x // 2 + dx],
                                       rtol=0, atol=1e-3)


def test_zero_scale_gives_one_hot_without_nan():
    # the release's temperature 1e-8 + |s|: s = 0 is a hard assignment, with finite gradients
    torch.manual_seed(4)
    feat = torch.nn.functional.normalize(torch.randn(1, 8, 10, 12, requires_grad=True), dim=1)
    down = torch.nn.functional.normalize(torch.randn(1, 8, 5, 6), dim=1)
    scale = torch.tensor(0.0, requires_grad=True)
    assign = local_clustering(feat, down, scale)
    assert torch.isfinite(assign).all()
    one_hot = torch.nn.functional.one_hot(assign.argmax(1), 9).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(assign, one_hot, rtol=0, atol=0)
    (assign * torch.randn_like(assign)).sum().backward()
    assert torch.isfinite(scale.grad)


def test_border_candidates_get_zero_and_match_the_release_rule():
    # outside candidates: exactly 0 probability, and the row sums stay 1 at every border pixel
    torch.manual_seed(5)
    feat = torch.nn.functional.normalize(torch.randn(2, 6, 8, 10), dim=1)
    down = torch.nn.functional.normalize(torch.randn(2, 6, 4, 5), dim=1)
    assign = local_clustering(feat, down, torch.tensor(0.5))
    torch.testing.assert_close(assign.sum(1), torch.ones(2, 8, 10))
    assert (assign[:, :3, :2] == 0).all() and (assign[:, 6:, -2:] == 0).all()  # dy = -1 at the top, +1 at the bottom
    assert (assign[:, 0::3, :, :2] == 0).all() and (assign[:, 2::3, :, -2:] == 0).all()
    assert (assign[:, :, 2:-2, 2:-2] > 0).all()


def test_decoding_a_constant_gives_the_constant():
    torch.manual_seed(3)
    assigns = [torch.randn(1, 9, 25, 25).softmax(1), torch.randn(1, 9, 13, 13).softmax(1),
               torch.randn(1, 9, 7, 7).softmax(1)]
    # probabilities of missing candidates are 0 in real assignments: mimic that for the borders
    for a in assigns:
        a[:, :, :, :] = local_clustering(torch.randn(1, 4, *a.shape[-2:]),
                                         torch.randn(1, 4, *[math.ceil(n / 2) for n in a.shape[-2:]]),
                                         torch.tensor(1.0))
    masks = torch.full((1, 3, 4, 4), 0.37)
    out = decode_hierarchy(masks, assigns)
    assert out.shape == (1, 3, 25, 25)
    torch.testing.assert_close(out, torch.full_like(out, 0.37))


def test_gradients_reach_scale_and_features():
    torch.manual_seed(4)
    module = ClusteringModule(6, 10, cluster_dim=8)
    feat = torch.randn(1, 6, 9, 9, requires_grad=True)
    down = torch.randn(1, 10, 5, 5, requires_grad=True)
    masks = torch.randn(1, 2, 5, 5)
    decode(masks, module(feat, down)).square().sum().backward()
    for t in (module.scale, feat, down, module.proj.weight, module.down_proj.weight):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_bad_sizes_raise_clear_error():
    with pytest.raises(ValueError, match="after map of height 5"):
        local_clustering(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 5, 4), torch.tensor(0.1))


def test_compose_hard_assignments_against_loops():
    torch.manual_seed(5)
    sizes = [(13, 11), (7, 6), (4, 3)]
    assigns = [local_clustering(torch.randn(2, 4, *s), torch.randn(2, 4, *[math.ceil(n / 2) for n in s]),
                                torch.tensor(0.5)) for s in sizes]
    ids = compose_hard_assignments(assigns)
    assert [tuple(i.shape) for i in ids] == [(2, 13, 11)] * 3 and all(i.dtype == torch.long for i in ids)
    for n in range(2):
        for y in range(13):
            for x in range(11):
                cy, cx = y, x
                for level, a in enumerate(assigns):
                    dy, dx = OFFSETS[int(a[n, :, cy, cx].argmax())]
                    cy, cx = cy // 2 + dy, cx // 2 + dx
                    w_after = sizes[level + 1][1] if level + 1 < len(sizes) else math.ceil(sizes[-1][1] / 2)
                    assert int(ids[level][n, y, x]) == cy * w_after + cx
    # unbatched input (as in the "hierarchy" outputs) gives unbatched ids
    single = compose_hard_assignments([a[1] for a in assigns])
    assert all(torch.equal(s, i[1]) for s, i in zip(single, ids))


# ------------------------------------------------------------------ the F.unfold form (the previous eager
# implementation, now run while tracing) against the strided form: same results to float rounding, forward
# and backward; and a trace at one size that holds at others.
old_local_clustering = clustering._unfold_local_clustering
old_decode = clustering._unfold_decode


def old_module_forward(module, feat, down_feat):
    return old_local_clustering(clustering._unfold_embed(feat, module.norm, module.proj),
                                clustering._unfold_embed(down_feat, module.down_norm, module.down_proj), module.scale)


SIZES = [((2, 8, 12), (4, 6)), ((2, 25, 23), (13, 12)), ((1, 25, 25), (12, 12)), ((3, 9, 6), (5, 3)),
         ((1, 2, 2), (1, 1)), ((2, 3, 1), (2, 1)), ((1, 7, 3), (3, 1))]


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    torch.manual_seed(7)  # randn, not randn_like: the latter follows the output's strides, which may differ
    (out * torch.randn(out.shape, dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("before,after", SIZES)
def test_local_clustering_and_decode_equal_the_previous_batched_form(before, after):
    (b, height, width), after = before, after
    torch.manual_seed(8)
    feat = torch.nn.functional.normalize(torch.randn(b, 16, height, width, dtype=torch.float64), dim=1)
    down = torch.nn.functional.normalize(torch.randn(b, 16, *after, dtype=torch.float64), dim=1)
    scale = torch.tensor(0.2, dtype=torch.float64)
    new, new_grads = _grads(local_clustering, [feat, down, scale])
    old, old_grads = _grads(old_local_clustering, [feat, down, scale])
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-10)
    # decoding: random (not masked) assignments, so that the border and wrapped candidates matter
    assign = torch.randn(b, 9, height, width, dtype=torch.float64).softmax(1)
    x = torch.randn(b, 5, *after, dtype=torch.float64)
    new, new_grads = _grads(decode, [x, assign])
    old, old_grads = _grads(old_decode, [x, assign])
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the forward-only path (no autograd Function) gives the same values
        torch.testing.assert_close(decode(x, assign), new, rtol=0, atol=0)


@pytest.mark.parametrize("before,after", [((2, 20, 16), (10, 8)), ((1, 13, 11), (7, 5))])
def test_clustering_module_equals_the_previous_batched_form(before, after):
    (b, height, width), after = before, after
    torch.manual_seed(9)
    module = ClusteringModule(12, 20, cluster_dim=8).double()
    with torch.no_grad():  # a trained-looking LayerNorm (the init is the identity)
        for norm in (module.norm, module.down_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.3)
    feat = torch.randn(b, 12, height, width, dtype=torch.float64) + 0.5
    down = torch.randn(b, 20, *after, dtype=torch.float64)
    params = list(module.parameters())

    def run(forward):
        module.zero_grad()
        out, grads = _grads(lambda f, d: forward(f, d), [feat, down])
        return out, grads + [p.grad.clone() for p in params]
    new, new_grads = run(module)
    old, old_grads = run(lambda f, d: old_module_forward(module, f, d))
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    assert len(new_grads) == 2 + 7  # inputs, LayerNorm weights and biases, projections, s
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(module(feat, down), new, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sizes", [[(16, 24), (8, 12), (4, 6), (2, 3)], [(25, 23), (13, 12), (7, 6), (4, 3)],
                                   [(25, 25), (12, 12), (6, 6), (3, 3)], [(9, 5), (4, 2)]])
def test_decode_hierarchy_equals_the_previous_level_by_level_form(sizes):
    # the intermediate masks stay channels-last between levels: same values and gradients as decoding and
    # going back to (B, Q, H, W) at every level
    torch.manual_seed(10)
    assigns = [torch.randn(2, 9, *s, dtype=torch.float64).softmax(1) for s in sizes[:-1]]
    masks = torch.randn(2, 4, *sizes[-1], dtype=torch.float64)

    def old_hierarchy(m, *a):
        for assign in reversed(a):
            m = old_decode(m, assign)
        return m
    new, new_grads = _grads(lambda m, *a: decode_hierarchy(m, a), [masks, *assigns])
    old, old_grads = _grads(old_hierarchy, [masks, *assigns])
    assert new.shape == (2, 4, *sizes[0])
    torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    for g_new, g_old in zip(new_grads, old_grads):
        torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(decode_hierarchy(masks, assigns), new, rtol=0, atol=0)
    assert decode_hierarchy(masks, []) is masks


def test_a_trace_uses_the_unfold_form_and_holds_at_other_sizes():
    """torch.jit.trace (export, FLOP counts) of the module + decoding at one size runs at even, odd, ceil and
    floor sizes and equals eager execution there: no size of the sample is baked into the graph."""
    class Run(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = ClusteringModule(6, 5, cluster_dim=4, scale_init=0.3)

        def forward(self, feat, down, masks):
            assign = self.module(feat, down)
            return assign, decode_hierarchy(masks, [assign])

    torch.manual_seed(0)
    run = Run().eval()
    sample = (torch.randn(1, 6, 8, 10), torch.randn(1, 5, 4, 5), torch.randn(1, 3, 4, 5))
    with torch.no_grad():
        traced = torch.jit.trace(run, sample, check_trace=False)
        for before, after in [((2, 8, 10), (4, 5)), ((1, 12, 6), (6, 3)), ((2, 7, 9), (4, 5)), ((1, 7, 9), (3, 4)),
                              ((1, 1, 3), (1, 2))]:
            feat, down = torch.randn(before[0], 6, *before[1:]), torch.randn(before[0], 5, *after)
            masks = torch.randn(before[0], 3, *after)
            for got, want in zip(traced(feat, down, masks), run(feat, down, masks)):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
