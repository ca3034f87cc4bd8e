"""``lipsdp robustness`` on N local processes and on a real Dask cluster (lipsdp.parallel).

A ``dask scheduler`` and a ``dask worker`` (two worker processes, one thread each) are started on
localhost inside the test; the pairwise run sent to them, and the one on two spawned local processes,
must give exactly (bit for bit) the serial results, and stream every unit to ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from digits_classifier import digits_classifier, save_model_and_data

from lipsdp.cli import main
from lipsdp.dataset import check_data
from lipsdp.errors import LipSDPError
from lipsdp.io import network_from_module
from lipsdp.parallel import DaskExecutor, evaluate_dataset, make_executor

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    model, x, y, _ = digits_classifier()
    network = network_from_module(model).validate()
    xf, yf = check_data(x, y, (64,), 5)
    model_path, data_path = save_model_and_data(tmp_path_factory.mktemp("digits"))
    return {"network": network, "x": xf, "y": yf, "model": model_path, "data": data_path,
            "result": evaluate_dataset(network, xf, yf, method="pairwise", norm="l2", chunk=100)}


def _same_as_serial(report: dict, result) -> None:
    assert report["radii"] == result.radii.tolist() and report["predictions"] == result.predictions.tolist()
    assert [b["bound"] for b in report["bounds"]] == [b["bound"] for b in result.bounds]
    assert report["units"] == {"computed": 14, "reused": 0} and report["verified"]


def _run_cli(serial, tmp_path, capsys, *extra) -> dict:
    out = tmp_path / "units.jsonl"
    code = main(["robustness", str(serial["model"]), "--data", str(serial["data"]), "--trust-pickle", "--json",
                 "--chunk", "100", "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["format"] == "lipsdp-robustness/1" and len(lines) == 1 + 14  # 10 pairs, 4 chunks
    return json.loads(captured.out)


def test_local_processes_match_serial(serial, tmp_path, capsys):
    _same_as_serial(_run_cli(serial, tmp_path, capsys, "--workers", "2"), serial["result"])


@pytest.fixture
def dask_cluster(tmp_path):
    if not DASK.exists():
        pytest.skip("dask.distributed is not installed (pip install 'lipsdp[distributed]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    file = tmp_path / "scheduler.json"
    common = dict(env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(file)], **common)]
    try:
        deadline = time.monotonic() + 60
        while not (file.exists() and file.read_text().strip()):
            assert time.monotonic() < deadline and procs[0].poll() is None, "the dask scheduler did not start"
            time.sleep(0.2)
        procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(file), "--nworkers", "2",
                                       "--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path)],
                                      **common))
        address = json.loads(file.read_text())["address"]
        import distributed

        with distributed.Client(address, timeout=60, set_as_default=False) as client:  # a loaded machine is slow
            client.wait_for_workers(2, timeout=120)                                   # to start them
        yield address
    finally:
        for proc in reversed(procs):  # only the processes this fixture started, by their handles
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_dask_cluster_matches_serial(serial, dask_cluster, tmp_path, capsys):
    report = _run_cli(serial, tmp_path, capsys, "--scheduler", dask_cluster)
    _same_as_serial(report, serial["result"])


def test_scheduler_errors(serial, monkeypatch):
    with pytest.raises(LipSDPError, match="cannot reach the Dask scheduler"):
        DaskExecutor(serial["network"], "tcp://127.0.0.1:9", timeout=1)
    with pytest.raises(LipSDPError, match="not both"):
        make_executor(serial["network"], workers=2, scheduler="tcp://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    with pytest.raises(LipSDPError, match=r"pip install 'lipsdp\[distributed\]'"):
        make_executor(serial["network"], scheduler="tcp://127.0.0.1:9")



@pytest.mark.slow
def test_ctrl_c_with_workers_then_resume(tmp_path):
    """A real SIGINT to ``lipsdp robustness --workers 2``: exit 130, no worker left, and the rerun resumes."""
    import signal

    out = tmp_path / "units.jsonl"
    cmd = [sys.executable, "-m", "lipsdp", "robustness", str(REPO / "examples" / "digits_mlp.pt"), "--data",
           str(tmp_path / "test.npz"), "--workers", "2", "--out", str(out), "--json", "--chunk", "10"]
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # 45 pair SDPs and 180 chunks of 10: still running at the interrupt
    np.savez(tmp_path / "test.npz", x=x / 16.0, y=y)
    total = 45 + -(-len(y) // 10)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and len(out.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    children = subprocess.run(["ps", "--ppid", str(proc.pid), "-o", "pid="], capture_output=True,
                              text=True).stdout.split()
    assert proc.poll() is None, "the run ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("lipsdp: interrupted"), err
    time.sleep(2)
    assert not [c for c in children if Path(f"/proc/{c}").exists()], "worker processes outlived the command"
    done = out.read_text().count("\n") - 1  # whole lines: a line torn by the exit is dropped on resume
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    units = json.loads(rerun.stdout)["units"]
    assert rerun.returncode == 0 and units == {"computed": total - done, "reused": done}


def test_scheduler_without_workers(serial, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(LipSDPError, match="no Dask worker joined"):
            DaskExecutor(serial["network"], cluster.scheduler_address, timeout=1)
