"""Smoke tests of MAF training (`flowops train maf`): a few steps, the reference-op twin, bad options."""
import json

import pytest
import torch

from flowops import train

sklearn = pytest.importorskip("sklearn", reason="scikit-learn provides the breast-cancer data")


@pytest.mark.parametrize("data", ["moons", "breast_cancer"])
def test_cli_trains_and_matches_reference_twin(tmp_path, data, capsys):
    out = tmp_path / "m.json"
    rc = train.main(["maf", "--data", data, "--steps", "25", "--batch", "64", "--transforms", "2",
                     "--hidden", "32", "--compare", "--quiet", "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["features"] == (2 if data == "moons" else 30)
    assert abs(m["nll_diff"]) < 0.02  # same weights, same batches, same math
    assert m["sample_rel_diff"] < 1e-4  # one-pass sampling equals the D-pass reference
    assert "held-out NLL" in capsys.readouterr().out


def test_training_lowers_heldout_nll():
    x_train, x_test = train.load_breast_cancer_split(0.2, seed=1)
    from flowops.models import MAF

    torch.manual_seed(0)
    flow = MAF(30, transforms=2, hidden=(32, 32))
    before = train.evaluate_nll(flow, x_test)
    g = torch.Generator().manual_seed(0)
    train.train_flow(flow, lambda n: x_train[torch.randint(0, x_train.shape[0], (n,), generator=g)], steps=60,
                     batch=64, lr=3e-3, progress=False)
    after = train.evaluate_nll(flow, x_test)
    assert after < before - 1.0


def test_breast_cancer_split_is_standardized():
    x_train, x_test = train.load_breast_cancer_split(0.25, seed=0)
    assert x_train.shape[1] == x_test.shape[1] == 30
    assert x_train.shape[0] + x_test.shape[0] == 569
    torch.testing.assert_close(x_train.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0), torch.ones(30), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="test_fraction"):
        train.load_breast_cancer_split(1.5)


@pytest.mark.parametrize("argv", [["--steps", "-1"], ["--lr", "0"], ["--hidden", "8", "--data", "breast_cancer"],
                                  ["--data", "mnist"]])
def test_bad_options(argv):
    assert train.main(["maf", *argv, "--quiet"]) == 2
