"""A stage on a dask.distributed LocalCluster of 2 worker processes writes exactly what the
local scheduler writes."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.params import DataParams, Params
from pipeline.stages.plan import run_plan
from pipeline.stages.prepare import run_prepare


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_local_cluster_output_equals_local_run(tmp_path, isaid_root):
    from distributed import LocalCluster

    params = Params(data=DataParams(root=str(isaid_root), splits=["val", "train"]))
    run_prepare(params, tmp_path / "local" / "tiles")
    run_plan(params, tmp_path / "local" / "tiles", tmp_path / "local" / "plan")

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        run_prepare(params, tmp_path / "dist" / "tiles", scheduler=address)
        run_plan(params, tmp_path / "dist" / "tiles", tmp_path / "dist" / "plan",
                 scheduler=address)

    local, dist = _files(tmp_path / "local"), _files(tmp_path / "dist")
    assert any(name.startswith("tiles/val-") for name in local)
    assert any(name.startswith("plan/requests/instance/") for name in local)
    assert local.keys() == dist.keys()
    for name in local:
        assert local[name] == dist[name], name
