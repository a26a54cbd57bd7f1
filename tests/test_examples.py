"""The README's API example runs and prints what the README says it prints."""

import re
import subprocess
import sys
from pathlib import Path


def test_quickstart_example():
    path = Path(__file__).parents[1] / "examples" / "quickstart.py"
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True).stdout
    diff = float(re.search(r"at topk_fraction=1.0: ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-5
    attended, mass = map(float, re.search(r"attended ([0-9.]+)% .* captured ([0-9.]+)%", out).groups())
    assert 0 < attended < 30 and attended < mass <= 100
