"""``lipsdp robustness`` on a data set (lipsdp.robustness_cli, lipsdp.parallel, lipsdp.dataset).

On a small digits classifier trained here (tests/digits_classifier.py):

* every sample certified at radius r survives a PGD attack at r (l2 and l_inf, torch autograd in float64),
  and the attack does flip labels at larger radii, so it has teeth;
* certified accuracy <= clean accuracy, decreasing in r; pairwise certifies at least as many samples as
  global at every radius;
* the command line reports what the library computes (table, --json, --plot), refuses bad data with one
  line and exit code 2 (``--method local`` is tested in test_local.py), and warns about data outside ``--input-range``;
* an interrupted run resumed from its ``--out`` file gives the same results without recomputing the
  units it had finished (counted), and a file from another run is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from digits_classifier import digits_classifier, save_model_and_data

from lipsdp.certificate import UNVERIFIED, Certificate
from lipsdp.cli import main
from lipsdp.dataset import check_data
from lipsdp.errors import LipSDPError
from lipsdp.io import network_from_module
from lipsdp.parallel import StoppedEarly, evaluate_dataset

torch.set_num_threads(1)
NORMS = ("l2", "linf")
CHUNK = 64  # samples per unit, the same in every run compared bit for bit


@pytest.fixture(scope="module")
def setup():
    model, x, y, raw = digits_classifier()
    network = network_from_module(model).validate()
    xf, yf = check_data(x, y, (64,), 5)
    results = {(method, norm): evaluate_dataset(network, xf, yf, method=method, norm=norm, chunk=CHUNK)
               for method in ("global", "pairwise") for norm in NORMS}
    return {"model": model, "network": network, "x": xf, "y": yf, "raw": raw, "results": results}


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):
    return save_model_and_data(tmp_path_factory.mktemp("digits"))


def _pgd(model, x, y, radius, norm, steps=40, seed=0):
    """Which samples PGD flips within ``||delta|| <= radius`` (margin loss, random start, float64)."""
    model = model.double()
    gen = torch.Generator().manual_seed(seed)
    x0, y0 = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    delta = (torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1) * radius
    if norm == "l2":
        delta = delta * (radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)) * 0.5
    alpha = 2.5 * radius / steps
    flipped = torch.zeros(len(x0), dtype=torch.bool)
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        logits = model(x0 + delta)
        flipped |= logits.argmax(dim=1) != y0
        other = logits.clone()
        other[torch.arange(len(y0)), y0] = -torch.inf
        loss = (other.max(dim=1).values - logits[torch.arange(len(y0)), y0]).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta = (delta + alpha * grad.sign()).clamp(-radius, radius)
            else:
                delta = delta + alpha * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                delta = delta * (radius / delta.norm(dim=1, keepdim=True).clamp_min(radius))
    model.float()
    return flipped.numpy()


@pytest.mark.parametrize("norm", NORMS)
def test_certified_samples_survive_pgd(setup, norm):
    res = setup["results"][("pairwise", norm)]
    positive = res.radii[res.radii > 0]
    for radius in np.quantile(positive, [0.1, 0.5, 0.9]):
        certified = res.radii > radius
        assert certified.any()
        flipped = _pgd(setup["model"], setup["x"][certified], setup["y"][certified], radius, norm)
        assert not flipped.any(), (norm, radius, np.flatnonzero(certified)[flipped])
    # The attack has teeth: well beyond every certified radius it flips labels.
    assert _pgd(setup["model"], setup["x"], setup["y"], 4 * positive.max(), norm).mean() > 0.5


@pytest.mark.parametrize("norm", NORMS)
def test_accuracies_and_pairwise_beats_global(setup, norm):
    pair, glob = setup["results"][("pairwise", norm)], setup["results"][("global", norm)]
    model = setup["model"]
    with torch.no_grad():
        clean = (model(torch.as_tensor(setup["x"], dtype=torch.float32)).argmax(1).numpy() == setup["y"]).mean()
    assert pair.clean_accuracy == pytest.approx(clean) and glob.clean_accuracy == pair.clean_accuracy
    grid = np.linspace(0, pair.radii.max() * 1.1, 60)
    for res in (pair, glob):
        acc = np.array([res.certified_accuracy(r) for r in grid])
        assert np.all(acc <= res.clean_accuracy) and np.all(np.diff(acc) <= 0)
        assert np.all(res.radii[res.predictions != res.labels] == 0)
    assert all(pair.certified_accuracy(r) >= glob.certified_accuracy(r) for r in grid)
    assert pair.certified_accuracy(grid[20]) > glob.certified_accuracy(grid[20])  # strictly better somewhere
    assert pair.verified and glob.verified and len(pair.bounds) == 10 and len(glob.bounds) == 1


def test_cli_json_table_and_plot(setup, files, tmp_path, capsys):
    model_path, data_path = files
    plot = tmp_path / "acc.png"
    args = ["robustness", str(model_path), "--data", str(data_path), "--trust-pickle", "--radii", "0.1,0.3",
            "--chunk", str(CHUNK),
            "--method", "global", "--norm", "2"]
    assert main([*args, "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    res = setup["results"][("global", "l2")]
    assert report["method"] == "global" and report["norm"] == "l2" and report["verified"]
    assert report["radii"] == res.radii.tolist() and report["clean_accuracy"] == res.clean_accuracy
    assert report["certified_accuracy"] == {"0.1": res.certified_accuracy(0.1), "0.3": res.certified_accuracy(0.3)}
    assert report["bound"] == res.bounds[0]["bound"] and report["bounds"][0]["verified"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "certified accuracy at 0.3" in out and "50% quantile" in out


def _bad(tmp_path, capsys, data_args, extra=()):
    model_path = tmp_path / "model.pt"
    if not model_path.exists():
        torch.save(digits_classifier()[0], model_path)
    code = main(["robustness", str(model_path), "--trust-pickle", *data_args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lipsdp: error:"), (code, err)
    return err[0]


def test_bad_data_is_refused_with_one_line(tmp_path, capsys):
    _, x, y, _ = digits_classifier()
    cases = {"shape": dict(x=x[:, :60], y=y), "key": dict(x=x, labels=y), "nan": dict(x=np.where(x == 0.5, np.nan, x), y=y),
             "label": dict(x=x, y=y + 3), "count": dict(x=x, y=y[:-1]), "batch": dict(x=x[0], y=y[:1])}
    expect = {"shape": "the model takes (N, 64)", "key": "no array 'y'", "nan": "NaN or Inf", "label": "5 classes",
              "count": "one per input", "batch": "the model takes"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert expect[name] in _bad(tmp_path, capsys, ["--data", str(tmp_path / f"{name}.npz")]), name
    np.save(tmp_path / "x.npy", x)
    assert "--labels" in _bad(tmp_path, capsys, ["--data", str(tmp_path / "x.npy")])
    assert "no such data file" in _bad(tmp_path, capsys, ["--data", str(tmp_path / "none.npz")])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not a readable" in _bad(tmp_path, capsys, ["--data", str(tmp_path / "junk.npz")])


def test_other_formats_and_range_warning(setup, files, tmp_path, capsys):
    model_path, _ = files
    x, y, raw = setup["x"], setup["y"], setup["raw"]
    ref = setup["results"][("global", "l2")].radii.tolist()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    torch.save({"x": torch.tensor(x), "y": torch.tensor(y)}, tmp_path / "d.pt")
    torch.save((torch.tensor(x), torch.tensor(y)), tmp_path / "t.pt")
    common = [str(model_path), "--trust-pickle", "--method", "global", "--norm", "l2", "--json", "--chunk", str(CHUNK)]
    for data in (["--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")],
                 ["--data", str(tmp_path / "d.pt")], ["--data", str(tmp_path / "t.pt")]):
        assert main(["robustness", *common, *data, "--input-range", "0,1"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["radii"] == ref and captured.err == ""
    # The case: raw digits pixels (0..16) given to a model trained on [0, 1].
    np.savez(tmp_path / "raw.npz", x=raw, y=y)
    assert main(["robustness", *common, "--data", str(tmp_path / "raw.npz"), "--input-range", "0,1"]) == 0
    captured = capsys.readouterr()
    assert "outside --input-range 0,1" in captured.err
    assert any("outside --input-range" in w for w in json.loads(captured.out)["warnings"])


@pytest.mark.parametrize("method", ["pairwise", "global"])
def test_interrupted_run_resumes_without_recomputing(setup, tmp_path, method):
    network, x, y = setup["network"], setup["x"], setup["y"]
    out = str(tmp_path / "run.jsonl")
    ref = setup["results"][(method, "l2")]
    options = dict(method=method, norm="l2", out=out, chunk=CHUNK)
    total = (10 if method == "pairwise" else 1) + 5  # bound units + ceil(301 / 64) sample units
    stop = 4 if method == "pairwise" else 3
    with pytest.raises(StoppedEarly):
        evaluate_dataset(network, x, y, stop_after=stop, **options)
    assert len(open(out).read().splitlines()) == 1 + stop
    with open(out, "a") as fh:  # a kill in the middle of a write leaves a torn last line
        fh.write('{"id": "pair 3')
    res = evaluate_dataset(network, x, y, **options)
    assert (res.computed, res.reused) == (total - stop, stop)
    assert np.array_equal(res.radii, ref.radii) and res.bounds[0]["bound"] == ref.bounds[0]["bound"]
    again = evaluate_dataset(network, x, y, **options)
    assert (again.computed, again.reused) == (0, total) and np.array_equal(again.radii, ref.radii)
    with pytest.raises(LipSDPError, match="norm differ"):
        evaluate_dataset(network, x, y, **{**options, "norm": "linf"})
    with pytest.raises(LipSDPError, match="data differ"):
        evaluate_dataset(network, x[:-1], y[:-1], **options)


def test_unverified_pair_certifies_nothing_and_exits_1(setup, files, monkeypatch, capsys):
    """A pair whose SDP does not verify counts as an infinite bound: its samples get radius 0, exit code 1."""
    import lipsdp.parallel

    real = lipsdp.parallel.pair_certificate

    def flaky(network, y, j, **kw):
        return Certificate(None, UNVERIFIED, message="fake failure") if (y, j) == (0, 1) else real(network, y, j, **kw)

    monkeypatch.setattr(lipsdp.parallel, "pair_certificate", flaky)
    model_path, data_path = files
    assert main(["robustness", str(model_path), "--data", str(data_path), "--trust-pickle", "--json",
                 "--chunk", str(CHUNK)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["verified"] and report["bounds"][0] == {"id": "pair 0 1", "pair": [0, 1], "bound": None,
                                                              "verified": False, "status": UNVERIFIED,
                                                              "solver": ""}
    radii, ref = np.array(report["radii"]), setup["results"][("pairwise", "l2")].radii
    pred = np.array(report["predictions"])
    assert np.all(radii[(pred == 0) | (pred == 1)] == 0) and np.all(radii <= ref)
    assert np.array_equal(radii[pred > 1], ref[pred > 1])


def test_results_file_that_is_not_ours_is_refused(setup, tmp_path):
    network, x, y = setup["network"], setup["x"], setup["y"]
    for name, content in {"text": b"hello", "binary": b"\x80\x02model\nweights", "json": b'{"a": 1}\n'}.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(LipSDPError, match="not a lipsdp robustness results file"):
            evaluate_dataset(network, x, y, method="global", out=str(path))
        assert path.read_bytes() == content, "a file that is not ours must be left alone"
    with pytest.raises(LipSDPError, match="cannot use --out"):
        evaluate_dataset(network, x, y, method="global", out=str(tmp_path / "no" / "such" / "dir.jsonl"))
    good = tmp_path / "good.jsonl"
    evaluate_dataset(network, x, y, method="global", out=str(good))
    good.write_text(good.read_text().replace('"id": "samples 0"', '"di": "samples 0"'))
    with pytest.raises(LipSDPError, match="line 3: not a unit record"):
        evaluate_dataset(network, x, y, method="global", out=str(good))
