"""Two gloo processes: every up2 evaluator gathers across ranks and gives the single-process result
on the main process, ``{}`` on the other."""
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import up2
    import torch
    from detectron2.utils import comm
    from up2.engine import launch
    from up2.evaluation import ClassificationEvaluator, MLMEvaluator, RetrievalEvaluator

    def data():
        g = torch.Generator().manual_seed(0)
        items = []
        for i in range(10):
            k = 1 + i % 3
            items.append((
                {"image_id": i, "label": i % 7, "captions": ["c"] * k, "text_id": i},
                {"class_scores": torch.randint(0, 3, (7,), generator=g).float(),
                 "image_embedding": torch.randn(6, generator=g),
                 "text_embeddings": torch.randn(k, 6, generator=g),
                 "mlm_predictions": torch.randint(0, 4, (k,), generator=g),
                 "mlm_targets": torch.randint(0, 4, (k,), generator=g),
                 "mlm_target_log_probs": -torch.rand(k, generator=g)}))
        return items

    def evaluate(evaluator, items):
        evaluator.reset()
        for inp, out in items:
            evaluator.process([inp], [out])
        return evaluator.evaluate()

    def worker(out_dir):
        rank, items = comm.get_rank(), data()
        makers = [ClassificationEvaluator, RetrievalEvaluator, MLMEvaluator]
        record = {"distributed": [evaluate(m(""), items[rank::2]) for m in makers]}
        if rank == 0:
            record["single"] = [evaluate(m("", distributed=False), items) for m in makers]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


@pytest.mark.slow
def test_evaluators_gather_across_two_processes(run_two_ranks):
    main, other = run_two_ranks(SCRIPT, timeout=300)
    assert other["distributed"] == [{}, {}, {}]
    assert [list(r) for r in main["distributed"]] == [["classification"], ["retrieval"], ["mlm"]]
    for got, expected in zip(main["distributed"], main["single"]):
        task = next(iter(expected))
        assert got[task] == pytest.approx(expected[task]), task
