"""Detection task: the class target of every regional token and the "no object" weighted cross-entropy,
on hand-built matches and logits with answers worked out by hand."""
import math

import pytest
import torch
from detectron2.structures import Boxes, Instances

from up2.modeling.tasks.detection import detection_class_targets, no_object_weighted_cross_entropy


def _instances(boxes, classes):
    inst = Instances((32, 32))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def test_matched_tokens_get_their_class_the_others_no_object():
    # image 0: ground truth 0 (class 2) and 1 (class 0); token 3 matches gt 1, token 0 matches gt 0
    # image 1: its first box is empty, so gt_idx 0 is the second annotation (class 1), matched by token 1
    instances = [_instances([[0, 0, 8, 8], [4, 4, 20, 20]], [2, 0]),
                 _instances([[5, 5, 5, 9], [1, 1, 9, 9]], [3, 1])]
    matches = [(torch.tensor([3, 0]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    labels = detection_class_targets(matches, instances, num_tokens=4, num_classes=4, device="cpu")
    assert labels.tolist() == [[2, 4, 4, 0], [4, 1, 4, 4]]


def test_image_without_matches_is_all_no_object():
    labels = detection_class_targets([(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))],
                                     [_instances([], [])], num_tokens=3, num_classes=2, device="cpu")
    assert labels.tolist() == [[2, 2, 2]]


def test_class_id_outside_the_vocabulary_is_named():
    with pytest.raises(ValueError, match=r"class id 5 >= 2 class names \['a', 'b'\]"):
        detection_class_targets([(torch.tensor([0]), torch.tensor([0]))], [_instances([[0, 0, 4, 4]], [5])],
                                num_tokens=2, num_classes=2, device="cpu", class_names=["a", "b"])


def test_no_object_weight_known_answer():
    # one class + "no object"; token 0 is class 0 with p = 3/4, token 1 is "no object" with p = 1/2
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, 1]])
    loss = no_object_weighted_cross_entropy(logits, labels, no_object_weight=0.1)
    expected = (1.0 * -math.log(0.75) + 0.1 * math.log(2.0)) / (1.0 + 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert no_object_weighted_cross_entropy(logits, labels, 1.0).item() == pytest.approx(
        (-math.log(0.75) + math.log(2.0)) / 2, rel=1e-6)
    # only "no object" tokens: the weight cancels out
    only_background = no_object_weighted_cross_entropy(logits[:, 1:], labels[:, 1:], 0.1)
    assert only_background.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_no_object_weight_scales_the_background_gradient():
    """d loss / d logit of a "no object" token scales with the weight (relative to a class token)."""
    def gradient_ratio(weight):
        logits = torch.zeros(1, 2, 3, requires_grad=True)
        no_object_weighted_cross_entropy(logits, torch.tensor([[0, 2]]), weight).backward()
        return (logits.grad[0, 1].norm() / logits.grad[0, 0].norm()).item()

    assert gradient_ratio(0.1) == pytest.approx(0.1, rel=1e-5)
    assert gradient_ratio(0.5) == pytest.approx(0.5, rel=1e-5)
