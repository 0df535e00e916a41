"""A run that diverges (loss and gradients overflow) stops with one line, from the CLI.

tests/train covers the guard itself (NaN and Inf batches, poisoned data,
in-process); this is what a user sees with a learning rate far too large.
"""

import json
import re

from reliability_helpers import assert_one_line_error, run_cli


def test_diverging_run_stops_after_max_bad_steps_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--model", "mlp", "--limit-train", "320", "--lr", "1e38",
                   "--max-bad-steps", "3", "--out", out)
    assert proc.returncode == 1
    line = assert_one_line_error(
        proc, "3 consecutive steps had a non-finite loss, gradient, parameter or running statistic",
        "start a new run with a lower --lr, or check the data")
    step = int(re.search(r"stopped at step (\d+):", line).group(1))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps[-1]["step"] == step
    assert [(r["finite"], r["bad_steps"]) for r in steps[-3:]] == [
        (False, 1), (False, 2), (False, 3)]
    assert steps[0]["finite"]  # it did start finite: this is divergence, not bad data
    assert not (out / "summary.json").exists()
