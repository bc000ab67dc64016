"""Two gloo processes on CPU train the tiny UniPerceiverV2 for 20 multi-task iterations: both ranks run
the same task every step, hold bitwise identical parameters after every step (DDP with unused parameters
in text-only steps), and the retrieval loss contrasts the pairs of both ranks."""
import json
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import up2
    import torch
    from detectron2.config import get_cfg
    from detectron2.engine import HookBase
    import up2.modeling
    import up2.modeling.tasks.retrieval as retrieval
    from up2.config import add_up2_config
    from up2.data.datasets import register_all_shapes
    from up2.engine import UP2Trainer, launch

    class RecordStep(HookBase):
        def __init__(self):
            self.steps = []

        def after_step(self):
            digest = hashlib.sha256()
            for p in self.trainer.model.parameters():
                digest.update(p.detach().numpy().tobytes())
            self.steps.append({"iter": self.trainer.iter, "task": self.trainer.current_task.name,
                               "params": digest.hexdigest()})

    def worker(out_dir):
        torch.set_num_threads(1)
        cfg = get_cfg()
        add_up2_config(cfg)
        cfg.merge_from_file(os.path.join(out_dir, "config.yaml"))
        with open(os.path.join(out_dir, "shapes.json")) as f:
            register_all_shapes(**json.load(f))
        gathers = []
        gather = retrieval.all_gather_with_grad

        def recording_gather(tensor, *args, **kwargs):
            out = gather(tensor, *args, **kwargs)
            gathers.append([tensor.shape[0], out.shape[0]])
            return out

        retrieval.all_gather_with_grad = recording_gather
        trainer = UP2Trainer(cfg)
        record = RecordStep()
        trainer.register_hooks([record])
        trainer.train()
        rank = torch.distributed.get_rank()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"model": type(trainer.model).__name__, "steps": record.steps, "gathers": gathers}, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


@pytest.mark.slow
def test_two_ranks_train_the_same_tasks_and_parameters_and_gather_retrieval_negatives(
        run_two_ranks, tiny_multitask_cfg, engine_shapes, tmp_path):
    cfg = tiny_multitask_cfg(tmp_path / "output", tasks=("detection", "retrieval", "mlm"), max_iter=20)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    (tmp_path / "shapes.json").write_text(json.dumps(dict(zip(("root", "prefix"), engine_shapes))))
    records = run_two_ranks(SCRIPT, timeout=900)

    assert [r["model"] for r in records] == ["DistributedDataParallel"] * 2
    steps = [r["steps"] for r in records]
    assert [s["iter"] for s in steps[0]] == list(range(20))
    assert [s["task"] for s in steps[0]] == [s["task"] for s in steps[1]]
    assert {s["task"] for s in steps[0]} == {"detection", "retrieval", "mlm"}
    assert [s["params"] for s in steps[0]] == [s["params"] for s in steps[1]]
    assert len({s["params"] for s in steps[0]}) == 20  # every step changed the parameters
    # every retrieval step gathers images and texts: 2 local pairs per rank, 4 in the contrastive loss
    num_retrieval_steps = sum(s["task"] == "retrieval" for s in steps[0])
    for record in records:
        assert record["gathers"] == [[2, 4]] * (2 * num_retrieval_steps)
