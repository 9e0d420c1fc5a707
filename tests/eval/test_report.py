"""Tests for finegrain.eval.report: the HTML page from hand-made records (escaping, step labels,
colours, self-containment, multi-turn episodes turn by turn), the metrics JSON and plots, and the
page rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from finegrain.eval.report import SampleRecord, json_safe, render_html, score_colour, write_report
from finegrain.eval.turns import TurnRecord

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


def multi_turn_record(problem: int = 2) -> SampleRecord:
    """A tool-use episode: a call whose output is hostile text, a malformed call, the answer.
    Environment turn rewards 1, −1, 0.5; a turn-level scorer gives 1, −1 and not applicable."""
    turns = [("<call>add(3, 4)</call>", {"name": "add", "args": ["3", "4"]}, None, "7 " + EVIL,
              "\n<result>7 " + EVIL + "</result>\n", 1.0, 1.0),
             ("<call>mul(2</call>", None, "malformed", None,
              "\n<result>error: malformed call: expected NAME(ARG, ...) or JSON</result>\n", -1.0, -1.0),
             ("A: 7", None, None, None, "", 0.5, float("-inf"))]
    response, recs = "", []
    for k, (text, call, error, result, obs, env, score) in enumerate(turns):
        a = len(response)
        response += text
        b = len(response)
        response += obs
        recs.append(TurnRecord(turn=k, text=text, span=(a, b), call=call, call_span=(a, b) if k < 2 else None,
                               error=error, result=result, observation=obs,
                               observation_span=(b, len(response)) if obs else None, env_reward=env,
                               scores={"env_turns": score}, steps=[k], n_tokens=len(text),
                               n_observation_tokens=len(obs)))
    return SampleRecord(problem=problem, sample=0, prompt="Q: 3+4", reference="7", response=response, correct=True,
                        answer="7", n_tokens=len(response), step_spans=[t.span for t in recs], step_labels=[1, 0, 1],
                        first_error=1, outcome_scores={"verifier": 1.0}, step_scores={"verifier": [1.0, 1.0, 1.0]},
                        turns=recs)


TURN_METRICS = {"meta": {"task": "calc", "env": "tool_use"},
                "turns": {"episodes": 1, "mean_turns": 3.0, "mean_tool_calls": 1.0, "truncated_frac": 0.0,
                          "error_frac": {"malformed": 1 / 3}}}


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


def test_html_shows_a_multi_turn_episode_turn_by_turn():
    page = render_html(records() + [multi_turn_record()], METRICS)
    assert "<script" not in page.lower() and "7 &lt;script&gt;alert" in page  # tool output escaped too
    # the single-turn records keep their step tables; the episode is shown as turns instead
    assert len(re.findall(r'<tr class="step( first-error)?" data-step', page)) == 4
    assert page.count('data-turns="3"') == 1
    assert re.findall(r'<div class="turn( turn-error)?" data-turn="(\d)"', page) == [
        ("", "0"), (" turn-error", "1"), ("", "2")]
    # observations: grey blocks marked as not trained, one per turn that had one
    assert page.count('<div class="observation" data-trained="false"') == 2
    assert page.count('<span class="untrained">tool output — not trained</span><pre>') == 2
    assert page.count('<div class="model-text" data-trained="true">') == 3
    # the calls, the malformed one marked as an error; the error named
    assert page.count('<span class="tool-call" data-call="add"') == 1
    assert page.count('<span class="tool-call call-error" data-call=""') == 1
    assert '<span class="error-badge" data-error="malformed">⚠ malformed</span>' in page
    # turn rewards on the report's colour scale: scale 1 (95th percentile of |1|, |−1|, |0.5|)
    chips = re.findall(r'<span class="turn-reward" data-source="(\w+)" style="background:([^"]+)"', page)
    assert chips == [("environment", "rgba(46,160,67,0.600)"), ("env_turns", "rgba(46,160,67,0.600)"),
                     ("environment", "rgba(218,54,51,0.600)"), ("env_turns", "rgba(218,54,51,0.600)"),
                     ("environment", "rgba(46,160,67,0.300)"), ("env_turns", "transparent")]
    assert "env_turns –" in page  # not applicable: no value, no colour
    # the exact label of each turn's step, the first error outlined
    assert re.findall(r'<span class="turn-label label-(\w+)" data-label="\w+" data-step="(\d)"( style)?', page) == [
        ("correct", "0", ""), ("wrong", "1", " style"), ("correct", "2", "")]


def test_samples_jsonl_has_turns_only_for_multi_turn_records(tmp_path):
    write_report(tmp_path, records() + [multi_turn_record(problem=2)], TURN_METRICS)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert ["turns" in r for r in lines] == [False, False, False, True]
    turns = lines[3]["turns"]
    assert [(t["call"], t["error"], t["env_reward"], t["scores"]) for t in turns] == [
        ({"name": "add", "args": ["3", "4"]}, None, 1.0, {"env_turns": 1.0}),
        (None, "malformed", -1.0, {"env_turns": -1.0}), (None, None, 0.5, {"env_turns": None})]
    assert turns[0]["observation"].startswith("\n<result>7 <script>") and turns[2]["observation"] == ""
    page = (tmp_path / "report.html").read_text()
    assert "Turns (multi-turn episodes)" in page and "turns with error: malformed" in page


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (apt-get install chromium) but neither "
                    "'chromium' nor 'chromium-browser' is on PATH")
    pytest.skip("chromium not installed")


def _chromium_cmd(exe, tmp_path, *args):
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", *args]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    paths = write_report(tmp_path / "report", records(), METRICS)
    cmd = _chromium_cmd(exe, tmp_path, "--dump-dom", paths["html"].resolve().as_uri())
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


OBSERVATION_GREY = (232, 232, 232)  # .observation background #e8e8e8: nothing else on the page has it


@pytest.mark.browser
def test_multi_turn_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    exe = _chromium()
    recs = [multi_turn_record(problem=0)] + [r for r in records() if r.problem == 1]
    paths = write_report(tmp_path / "report", recs, TURN_METRICS)
    uri = paths["html"].resolve().as_uri()
    proc = subprocess.run(_chromium_cmd(exe, tmp_path, "--dump-dom", uri), capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0 and "<html" in dom, proc.stderr[-2000:]
    # the parsed page holds the turns, the untrained observations with their marker, calls and the error
    assert len(re.findall(r'<div class="turn[ "][^>]*data-turn="\d"', dom)) == 3
    assert dom.count('data-trained="false"') == 2 and dom.count("tool output — not trained") == 3  # + the legend
    assert 'class="tool-call" data-call="add"' in dom and 'data-error="malformed"' in dom
    assert dom.count('class="turn-reward"') == 6
    assert "&lt;script&gt;" in dom and "<script>alert" not in dom
    # the screenshot shows the grey observation blocks
    shot = tmp_path / "shot.png"
    proc = subprocess.run(_chromium_cmd(exe, tmp_path, "--hide-scrollbars", "--window-size=1000,1200",
                                        f"--screenshot={shot}", uri), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file() and shot.stat().st_size > 5000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)  # (H, W, 3)
    assert len({tuple(p) for p in img.reshape(-1, 3)[::97]}) > 20  # not a blank page
    grey = (img == OBSERVATION_GREY).all(axis=-1).sum()
    assert grey > 2 * 5000, f"{grey} pixels of the observation grey"  # two blocks, each ~900 x 40 px
