"""Retrieval negatives gathered across 2 gloo processes: the mean of the per-rank losses equals the loss
of one process on the concatenated batch, and the gradient reaches the embeddings of both ranks
(differentiable all-gather)."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from up2.modeling.tasks.retrieval import contrastive_loss

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.nn.functional as F
    import up2
    from detectron2.utils import comm
    from up2.engine import launch
    from up2.modeling.tasks.retrieval import contrastive_loss

    def worker(out_dir):
        rank = comm.get_rank()
        g = torch.Generator().manual_seed(0)
        images, texts = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
        rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal local batches: 2 and 4
        img = images[rows].clone().requires_grad_(True)
        txt = texts[rows].clone().requires_grad_(True)
        loss = contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0),
                                gather=True, label_smoothing=0.1)
        loss.backward()
        local = contrastive_loss(F.normalize(images[rows], dim=-1), F.normalize(texts[rows], dim=-1),
                                 torch.tensor(10.0), gather=False, label_smoothing=0.1)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"loss": float(loss), "local_loss": float(local), "image_grad": img.grad.tolist(),
                       "text_grad": txt.grad.tolist()}, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


def reference():
    """One process, whole batch: per-row losses and their gradients."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    texts = torch.randn(6, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    img, txt = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    logits = 10.0 * img @ txt.T
    labels = torch.arange(6)
    per_row = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
                     + F.cross_entropy(logits.T, labels, label_smoothing=0.1, reduction="none"))
    # each rank averages its own rows: rank 0 rows 0-1, rank 1 rows 2-5; DDP then averages the ranks
    rank_losses = [per_row[:2].mean(), per_row[2:].mean()]
    (rank_losses[0] + rank_losses[1]).backward()  # gradient each rank receives (before DDP's 1/2)
    return rank_losses, images.grad, texts.grad


@pytest.mark.slow  # two spawned processes importing torch + Detectron2
def test_gathered_negatives_match_single_process_and_gradients_reach_both_ranks(run_two_ranks):
    rank0, rank1 = run_two_ranks(SCRIPT)
    rank_losses, image_grad, text_grad = reference()
    assert rank0["loss"] == pytest.approx(float(rank_losses[0]), rel=1e-12)
    assert rank1["loss"] == pytest.approx(float(rank_losses[1]), rel=1e-12)
    # without gathering a rank sees only its own negatives: a different (smaller) problem
    assert rank0["local_loss"] != pytest.approx(rank0["loss"], rel=1e-3)
    got_image = torch.tensor(rank0["image_grad"] + rank1["image_grad"], dtype=torch.float64)
    got_text = torch.tensor(rank0["text_grad"] + rank1["text_grad"], dtype=torch.float64)
    assert torch.allclose(got_image, image_grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_text, text_grad, rtol=1e-10, atol=1e-12)
    assert float(got_image[:2].abs().sum()) > 0 and float(got_image[2:].abs().sum()) > 0


def test_single_process_is_plain_symmetric_infonce():
    g = torch.Generator().manual_seed(1)
    img, txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    loss = contrastive_loss(img, txt, torch.tensor(5.0), gather=True)
    logits = 5.0 * img @ txt.T
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert torch.allclose(loss, expected, atol=1e-6)
