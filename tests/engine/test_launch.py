"""up2.engine.launch: two gloo processes on a CPU-only machine all-reduce a tensor."""
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import up2
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm
    from up2.engine import launch

    def worker(out_dir):
        rank = comm.get_rank()
        value = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
        dist.all_reduce(value)
        record = {"rank": rank, "world_size": comm.get_world_size(), "local_rank": comm.get_local_rank(),
                  "backend": dist.get_backend(), "sum": value.tolist(), "pid": os.getpid()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)

    if __name__ == "__main__":
        launch(worker, 2, dist_url="auto", args=(sys.argv[1],))
""")


def test_two_gloo_processes_all_reduce(run_two_ranks):
    records = run_two_ranks(SCRIPT)
    assert [r["rank"] for r in records] == [0, 1]
    assert [r["local_rank"] for r in records] == [0, 1]
    for record in records:
        assert record["world_size"] == 2
        assert record["backend"] == "gloo"
        assert record["sum"] == [3.0, 30.0]
    assert records[0]["pid"] != records[1]["pid"]


def test_release_drops_every_reference_to_the_process_groups(tmp_path):
    """Groups that outlive the worker are destroyed at interpreter shutdown, where gloo's threads abort."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from up2.engine.launch import _release_process_groups

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        comm._LOCAL_PROCESS_GROUP = dist.new_group([0])
        assert comm._get_global_gloo_group() is not None  # cached by Detectron2
        assert comm._get_global_gloo_group.cache_info().currsize == 1
    finally:
        _release_process_groups()
    assert not dist.is_initialized()
    assert comm._LOCAL_PROCESS_GROUP is None
    assert comm._get_global_gloo_group.cache_info().currsize == 0
