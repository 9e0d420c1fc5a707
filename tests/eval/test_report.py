"""Tests for finegrain.eval.report: the HTML page from hand-made records (escaping, step labels,
colours, self-containment), the metrics JSON and plots, and the page rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from finegrain.eval.report import SampleRecord, json_safe, render_html, score_colour, write_report

EVIL = "<script>alert('x')</script>"


def records():
    """Two samples of one problem and one of another; the first is token-scored."""
    r0 = SampleRecord(problem=0, sample=0, prompt="Q: 7 +5 " + EVIL, reference="12", response="7+5=13\nA: 13 & <b>",
                      correct=False, answer="13", n_tokens=17, step_spans=[(0, 7), (7, 18)], step_labels=[0, -1],
                      first_error=0, outcome_scores={"verifier": 0.0, "implicit_prm": -0.3},
                      step_scores={"verifier": [0.0, 0.0], "implicit_prm": [-0.2, 0.1]},
                      token_spans=[(i, i + 1) for i in range(18)],
                      token_scores={"implicit_prm": [0.01 * (i - 9) for i in range(18)]})
    r1 = SampleRecord(problem=0, sample=1, prompt=r0.prompt, reference="12", response="7+5=12\nA: 12", correct=True,
                      answer="12", n_tokens=12, step_spans=[(0, 7), (7, 12)], step_labels=[1, 1], first_error=None,
                      outcome_scores={"verifier": 1.0, "implicit_prm": 0.4},
                      step_scores={"verifier": [1.0, 1.0], "implicit_prm": [0.3, 0.1]})
    r2 = SampleRecord(problem=1, sample=0, prompt="Q: 1 +1", reference="2", response="", correct=False,
                      outcome_scores={"verifier": 0.0, "implicit_prm": 0.0},
                      step_scores={"verifier": [], "implicit_prm": []})
    return [r0, r1, r2]


METRICS = {"meta": {"task": "arith", "note": EVIL}, "accuracy": {"mean": 1 / 3, "lo": 0.06, "hi": 0.79, "n": 3},
           "curves": {"Ns": [1, 2], "bon": {"verifier": [1 / 3, 0.5], "implicit_prm": [1 / 3, 0.5]},
                      "majority_vote": [1 / 3, 0.5], "random_expected": [1 / 3, 1 / 3], "pass_at": [1 / 3, 0.5],
                      "weighted_vote": {"implicit_prm": [1 / 3, 0.5]},
                      "bon_by_aggregation": {"implicit_prm": {"min": [1 / 3, 0.5], "sum": [1 / 3, 0.25]}}},
           "process": {"scorers": {"implicit_prm": {"step_auroc": float("nan")}}, "error_free_frac": 0.5,
                       "miracle_step_rate": {"among_correct": 0.0}},
           "search": {"scorer": "implicit_prm", "n_problems": 2,
                      "runs": [{"method": "beam", "n_beams": 4, "beam_width": 2, "tau": None, "accuracy": 0.5,
                                "tokens_per_problem": 60.0, "seconds": 1.0}],
                      "bon_tokens": {"Ns": [1, 2], "accuracy": [1 / 3, 0.5], "tokens": [15.0, 30.0]}}}


def test_score_colour_worked_example():
    # centre 0, scale 0.5: +0.25 → half of the 0.6 maximum opacity, green; −1 → capped at 0.6, red
    assert score_colour(0.25, 0.0, 0.5) == "rgba(46,160,67,0.300)"
    assert score_colour(-1.0, 0.0, 0.5) == "rgba(218,54,51,0.600)"
    assert score_colour(float("nan"), 0.0, 0.5) == "transparent"
    assert score_colour(1.0, 0.0, 0.0) == "transparent"


def test_html_escapes_every_text_and_is_self_contained():
    page = render_html(records(), METRICS)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "A: 13 &amp; &lt;b&gt;" in page  # raw response text, escaped
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_html_shows_labels_beside_steps_and_colours():
    page = render_html(records(), METRICS)
    # labels of r0 (wrong, unparseable) and r1 (correct, correct); r0's step 0 is the first error
    rows = re.findall(r'<tr class="step( first-error)?" data-step="(\d)"><td class="label label-(\w+)" '
                      r'data-label="(\w+)">', page)
    assert [(fe != "", int(k), lab) for fe, k, lab, _ in rows] == [
        (True, 0, "wrong"), (False, 1, "unparseable"), (False, 0, "correct"), (False, 1, "correct")]
    # r0 is coloured per token (18 tokens, newline dropped at the step end → 17 spans), r1 per step
    assert page.count('class="tok"') == 17
    assert 'title="implicit_prm token score -0.0900"' in page  # token 0: 0.01·(0 − 9)
    # r1 step 0 (0.3) is the largest |step score| on the page → full green
    assert '<td class="step-text" style="background:rgba(46,160,67,0.600)">7+5=12</td>' in page
    assert page.count('data-verified="correct"') == 1 and page.count('data-verified="wrong"') == 2
    assert "(no step: empty response)" in page
    assert '<details class="problem" data-problem="1">' in page  # second problem collapsed


def test_html_limits_problems():
    page = render_html(records(), METRICS, max_problems=1)
    assert 'data-problem="1"' not in page and page.count('class="solution ') == 2


def test_json_safe_and_report_files(tmp_path):
    assert json_safe({"a": float("nan"), 1: (2.0, float("inf"))}) == {"a": None, "1": [2.0, None]}
    paths = write_report(tmp_path, records(), METRICS)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["process"]["scorers"]["implicit_prm"]["step_auroc"] is None
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["step_labels"] == [0, -1]
    for name in ("bon_vs_n", "aggregations", "vote_vs_n", "tokens"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (apt-get install chromium) but neither "
                    "'chromium' nor 'chromium-browser' is on PATH")
    pytest.skip("chromium not installed")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    paths = write_report(tmp_path / "report", records(), METRICS)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", paths["html"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and "<html" in dom, proc.stderr[-2000:]
    # the browser parsed the page: solutions, their steps and the label markers are in the DOM
    assert dom.count('class="solution verified-') == 3
    assert dom.count('data-label="correct"') == 2 and dom.count('data-label="wrong"') == 1
    assert 'data-label="unparseable"' in dom
    assert "7+5=12" in dom and "A: 12" in dom
    assert "&lt;script&gt;" in dom and "<script>alert" not in dom  # escaped text stays text
    assert dom.count('class="tok"') == 17
