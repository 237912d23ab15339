import os
import sys
from pathlib import Path

import pytest

# The checkout root on sys.path: the tests import each other as the package "tests".
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    from hypothesis import HealthCheck, settings

    # ci: the same examples every run (a red CI must mean a change, not a lucky draw);
    # long: fresh random examples, thousands per test (benchmarks/run_fuzz.py records one).
    settings.register_profile(
        "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile(
        "long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass

# DeepSeek EPLB README example (vLLM's tests assert it too).
DEEPSEEK_README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]


@pytest.fixture
def readme_weight():
    import torch

    return torch.tensor(DEEPSEEK_README_WEIGHT)
