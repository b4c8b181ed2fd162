"""The command line end to end on digits: trains, finds the features, writes the JSON."""
import json
import subprocess
import sys

from classfilters import InfluentialFeatures
from classfilters.cli import main


def test_cli_on_digits(tmp_path):
    out = tmp_path / "digits.json"
    assert main(["--model", "resnet8", "--dataset", "digits", "--train-epochs", "3", "--k", "5", "--k-prime", "0.8",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == [str(c) for c in range(10)]
    assert len(result["indices"]) == 10 and result["k_prime"] == 0.8
    test = result["test"]
    assert 0.5 < test["acc_full"] <= 1 and 0 < test["acc_decomposed"] <= 1
    assert abs(test["relative"] - test["acc_decomposed"] / test["acc_full"]) < 1e-9
    assert test["multiply_adds_full"] == 640 and test["multiply_adds_decomposed"] == sum(map(len, result["indices"]))
    assert InfluentialFeatures.from_dict(result).num_features == 64


def test_cli_reports_bad_k():
    proc = subprocess.run([sys.executable, "-m", "classfilters", "--model", "resnet8", "--dataset", "digits",
                           "--k", "abc"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "neither a count" in proc.stderr
