"""SetCriterion: loss terms, weights of no-object and scale, deep supervision, and that it trains."""
import pytest
import torch
import torch.nn.functional as F

from hierseg_d2.modeling.criterion import SetCriterion
from hierseg_d2.modeling.matcher import HungarianMatcher


def _criterion(losses=("labels", "masks", "scale"), scale_loss="release"):
    return SetCriterion(3, HungarianMatcher(2.0, 5.0, 5.0, num_points=256), weight_dict={}, eos_coef=0.1,
                        losses=losses, num_points=256, oversample_ratio=3.0, importance_sample_ratio=0.75,
                        scale_loss=scale_loss)


def _targets():
    masks = torch.zeros(2, 32, 32)
    masks[0, :16] = 1
    masks[1, 16:, 8:24] = 1
    return [{"labels": torch.tensor([2, 0]), "masks": masks}]


def test_classification_loss_weights_no_object():
    crit = _criterion(("labels",))
    logits = torch.randn(1, 4, 4)
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1]))]
    loss = crit.loss_labels({"pred_logits": logits}, _targets(), indices, 2.0)["loss_ce"]
    target = torch.tensor([3, 0, 3, 2])  # unmatched queries -> no-object class 3
    per_query = F.cross_entropy(logits[0], target, reduction="none")
    weights = torch.tensor([0.1, 1.0, 0.1, 1.0])
    torch.testing.assert_close(loss, (per_query * weights).sum() / weights.sum())


@pytest.mark.parametrize("scale_loss,value,grads", [("paper", 0.5, (-1, 1)),  # sum_i |s_i|
                                                    ("release", 0.1, (1, 1))])  # |sum_i s_i|
def test_scale_loss_and_deep_supervision_keys(scale_loss, value, grads):
    scales = [torch.tensor(-0.2, requires_grad=True), torch.tensor(0.3, requires_grad=True)]
    outputs = {"pred_logits": torch.randn(1, 4, 4), "pred_masks": torch.randn(1, 4, 8, 8), "cluster_scales": scales,
               "aux_outputs": [{"pred_logits": torch.randn(1, 4, 4), "pred_masks": torch.randn(1, 4, 8, 8)}]}
    losses = _criterion(scale_loss=scale_loss)(outputs, _targets())
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0", "loss_scale"}
    torch.testing.assert_close(losses["loss_scale"], torch.tensor(value))
    losses["loss_scale"].backward()
    assert (scales[0].grad, scales[1].grad) == grads


def test_unknown_scale_loss_is_rejected():
    with pytest.raises(ValueError, match="SCALE_LOSS"):
        _criterion(scale_loss="l2")


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="boxes"):
        _criterion(("labels", "boxes"))


def test_loss_decreases_on_a_toy_target():
    torch.manual_seed(0)
    logits = torch.zeros(1, 5, 4, requires_grad=True)
    masks = torch.zeros(1, 5, 8, 8, requires_grad=True)  # coarser than the targets, as decoded masks are
    crit = _criterion(("labels", "masks"))
    opt = torch.optim.Adam([logits, masks], lr=0.2)
    history = []
    for _ in range(25):
        losses = crit({"pred_logits": logits, "pred_masks": masks}, _targets())
        total = 2 * losses["loss_ce"] + 5 * losses["loss_mask"] + 5 * losses["loss_dice"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total))
    assert history[-1] < 0.3 * history[0], history


def test_images_without_targets():
    pred_masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    outputs = {"pred_logits": torch.randn(2, 4, 4, requires_grad=True), "pred_masks": pred_masks}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32)}
    losses = _criterion(("labels", "masks"))(outputs, [empty, empty])
    assert float(losses["loss_mask"]) == 0 and float(losses["loss_dice"]) == 0
    # every query is trained towards "no object"
    target = torch.full((8,), 3)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(outputs["pred_logits"].reshape(8, 4), target))
    sum(losses.values()).backward()  # the graph stays connected
    mixed = _criterion(("labels", "masks"))(outputs, [empty, _targets()[0]])
    assert float(mixed["loss_mask"]) > 0
