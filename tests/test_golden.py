"""Every call in ``tests/golden.py``'s matrix returns what it returned when
``tests/golden.json`` was written (plans, bounds, statuses, events, migration and
metadata; wall-clock time left out).  A restructuring keeps them all; a change meant
to alter plans rewrites the file (``python -m tests.golden --write``) and says why."""

import json

from tests import golden


def test_golden_outputs_unchanged():
    want = json.loads(golden.GOLDEN.read_text())
    got = golden.compute()
    assert sorted(got) == sorted(want), "the case matrix changed: rewrite tests/golden.json"
    differ = {name: [k for k in got[name] if want[name].get(k) != got[name][k]] for name in got}
    differ = {n: d for n, d in differ.items() if d}
    assert not differ, f"{len(differ)} golden case(s) changed: {differ}"


def test_fingerprint_sees_a_changed_plan():
    import eplb_opt
    import numpy as np

    w = np.arange(1.0, 17.0)[None]
    a = golden.fingerprint(eplb_opt.solve(w, num_replicas=24, num_gpus=4))
    b = golden.fingerprint(eplb_opt.solve(w[:, ::-1].copy(), num_replicas=24, num_gpus=4))
    assert a["plan"] != b["plan"]
