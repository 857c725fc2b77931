"""benchmarks/report.py: RESULTS.md is generated from results.json and cannot drift from it (no torch used)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import report

pytestmark = pytest.mark.benchmark  # drives a benchmark script on small inputs

REPO = Path(__file__).resolve().parents[1]

PAGE = REPO / "benchmarks" / "RESULTS.md"
#: words and patterns of a lab notebook, not of a results page
HISTORY = re.compile(r"\bsessions?\b|\bworktrees?\b|\bround of\b|\bre-?ran\b|\bre-?run\b|\bcommit\b|\bissue \d"
                     r"|/tmp/|\bOUT\d|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def results() -> dict:
    return report.load(report.RESULTS)


@pytest.fixture(scope="module")
def page(results) -> str:
    return report.render_results(results)


def test_committed_page_is_generated_from_results_json(page):
    """If this fails, run `python -m benchmarks.report` and commit RESULTS.md with results.json."""
    assert PAGE.read_bytes() == page.encode("utf-8")


def test_page_is_deterministic_short_and_narrow(results, page):
    assert report.render_results(json.loads(json.dumps(results))) == page
    lines = page.splitlines()
    assert len(lines) < 850  # grows with the sections: 580 before the scaling and GPU sections, 773 with two frontiers
    assert [line for line in lines if len(line) > 120] == []


def test_superseded_rows_stay_in_results_json_but_not_on_the_page(results, page):
    old = report.superseded(results)
    assert old, "results.json should keep its superseded rows"
    for name in old:
        assert results[name]["superseded_by"] in results  # points at a row that exists
        assert name not in page
    marked = [n for n in results if not n.startswith("_") and "[" in n]  # "mixed[greedy]", "recommended[min-max]"
    assert set(marked) <= set(old), "a bracketed variant name without superseded_by"
    for name in results:
        if not name.startswith("_") and name not in old:
            assert f"| {name} |" in page


def test_a_row_marked_superseded_leaves_the_page(results):
    marked = json.loads(json.dumps(results))
    marked["CoRa recommended W3"]["superseded_by"] = "CoRa recommended W3 b=0.1"
    page = report.render_results(marked)
    assert "| CoRa recommended W3 |" not in page and "| CoRa recommended W3 b=0.1 |" in page
    assert "CoRa recommended W3" not in report.headline_table(marked).replace("CoRa recommended W3 ", "")


def test_history_detector_catches_notebook_text():
    for text in ("fifth session", "from a worktree of", "re-ran the rows", "a90a6a6", "2814d0d", "--out /tmp/OUT14a"):
        assert HISTORY.search(text), text
    for text in ("CoRa recommended W4 mixed @4.0 b=0.045", "2,022,793 bytes", "deflated", "tiny64"):
        assert not HISTORY.search(text), text


def test_page_and_readme_block_have_no_development_history(results, page):
    assert HISTORY.findall(page) == []
    assert HISTORY.findall(PAGE.read_text(encoding="utf-8")) == []
    assert HISTORY.findall(report.readme_block(results)) == []


def test_headline_table_is_a_markdown_table_with_float_and_the_recommended_rows(results):
    table = report.headline_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| method |") and set(lines[1]) <= set("|-")
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    rows = [line.split(" | ")[0][2:] for line in lines[2:]]
    assert 5 <= len(rows) <= 8
    assert rows[0] == "float" and "CoRa recommended W4" in rows and "CoRa recommended W3" in rows
    assert any(results[name].get("family") == "peer" for name in rows)
    assert f"| float | {report.top1_ci(results['float'])} |" in table


def test_readme_block_is_replaced_between_the_markers(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    before = f"# Title\n\nintro\n\n{report.README_START}\nold table\n{report.README_END}\n\n## Next\n"
    readme.write_text(before)
    page = tmp_path / "RESULTS.md"
    assert report.main([str(report.RESULTS), "--no-plots", "--page", str(page), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith(f"# Title\n\nintro\n\n{report.README_START}\n\n| network | method |")
    assert text.endswith(f"(benchmarks/RESULTS.md).\n\n{report.README_END}\n\n## Next\n")
    headline = report.headline_table(results, report.RESULTS.parent)  # from the frontier files beside results.json
    assert headline in text and "(benchmarks/RESULTS.md)" in text and "`recommended(4)`" in headline
    assert headline in page.read_text()  # the page went to --page, not into the repository
    report.update_readme(readme, results, report.RESULTS.parent)
    assert readme.read_text() == text  # idempotent


@pytest.mark.parametrize("body", [
    "# no markers here\n", f"{report.README_START}\nno end\n", f"{report.README_END}\n{report.README_START}\n",
    f"{report.README_START}\n{report.README_START}\n{report.README_END}\n"])
def test_readme_without_proper_markers_is_a_clear_error(tmp_path, body):
    readme, page = tmp_path / "README.md", tmp_path / "RESULTS.md"
    readme.write_text(body)
    with pytest.raises(SystemExit) as err:
        report.main([str(report.RESULTS), "--no-plots", "--page", str(page), "--readme", str(readme)])
    assert err.value.code != 0 and report.README_START in str(err.value) and str(readme) in str(err.value)
    assert readme.read_text() == body and not page.exists()  # nothing written
    with pytest.raises(ValueError, match="results:start"):
        report.replace_between_markers(body, "table\n")


def test_reproduced_rows_are_compared_with_their_recorded_values():
    results = {"row": {"top1": 78.2857, "tiny_agreement": 55.21, "equivalent_bits": 4.5714},
               "_meta": {"reproduced": [{"row": "row", "version": "0.2.0", "date": "2026-11-30", "torch": "2.14.1",
                                         "command": "python x.py", "top1": 78.2857, "tiny_agreement": 55.21,
                                         "equivalent_bits": 4.5714}]}}
    def text() -> str:
        return " ".join(report.reproduction(results).split())

    assert "gives the same numbers for `row`: top-1 78.29 (on this page 78.29)" in text()
    results["_meta"]["reproduced"][0]["top1"] = 78.0
    assert "gives different numbers for `row`: top-1 78.00 (on this page 78.29)" in text()
    assert report.reproduction({"_meta": {}}) == ""


def test_deployment_targets_are_checked_against_the_rows():
    row = {"top1_lo": 0.0, "top1_hi": 0.0, "tiny_agreement": 60.0, "integer_convs": 0}
    data = {"rows": {"float": {**row, "top1": 80.0, "top1_lo": 77.0, "top1_hi": 83.0, "equivalent_bits": 32.0,
                               "file_bytes": 1000},
                     "ort-static-w8a8-minmax": {**row, "top1": 79.0, "top1_lo": 76.0, "top1_hi": 82.0,
                                                "tiny_agreement": 64.0},
                     "cora-w4a8": {**row, "top1": 79.1, "equivalent_bits": 4.48, "file_bytes": 160,
                                   "integer_convs": 53, "top1_agreement_vs_torch": 99.5}},
            "latency_ms": {"batch1_threads1": {"float": 10.0, "cora-w4a8": 5.5, "cora-w4a32": 11.5}}}
    table = "\n".join(report.deploy_targets(data))
    assert "| W4A8 file <= 15% of float | 16.0% | **no** |" in table
    assert "| 53 | yes |" in table
    assert "| W4A8 top-1 >= float - 1.0 (79.00) | 79.10 | yes |" in table
    assert "best (64.00) | 60.00 | **no** |" in table
    assert "| W4A8 top-1 agreement torch vs onnxruntime >= 99% (700 images) | 99.50% | yes |" in table
    assert "| cora-w4a8 latency <= 0.6x float (batch 1, 1 thread) | 0.55x | yes |" in table
    assert "| cora-w4a32 latency <= 1.1x float (batch 1, 1 thread) | 1.15x | **no** |" in table
    del data["rows"]["cora-w4a8"]
    assert report.deploy_targets(data) == []


def test_frontier_rows_compare_with_the_base_and_check_the_targets(tmp_path):
    def row(family, bits, eq, top1, kl=None):
        r = {"family": family, "target_bits": bits, "equivalent_bits": eq, "top1": top1, "top1_lo": top1 - 3,
             "top1_hi": top1 + 3, "tiny_agreement": 60.0, "tiny_kl": 0.2, "calib_seconds": 10.0, "command": "cmd"}
        return {**r, "vs_base": {"hit": [1.0, -0.5, 1.5], "agree": [1.0, 0.5, 1.5], "kl": kl}} if kl else r
    data = {"float": {"family": "float", "top1": 79.4},
            "joint @3.5": row("joint", 3.5, 3.49, 77.0, [-0.02, -0.03, -0.01]),
            "base @3.5": row("base", 3.5, 3.5, 75.0),
            "joint @2.5": row("joint", 2.5, 2.49, 60.0, [-0.02, -0.05, 0.01]),
            "recon @2.5": row("recon", 2.5, 2.5, 61.0),
            "_meta": {"families": {"base": "no adapters", "joint": "planned jointly"}}}
    assert [k for k, _ in report.frontier_rows(data)] == ["joint @2.5", "recon @2.5", "base @3.5", "joint @3.5"]
    assert [report.recommended_family(n) for n in (2, 3, 4)] == ["recon", "joint", "joint"]  # as the config says
    table = report.frontier_table(data)
    assert "| 3.5 | joint | +1.00 (-0.50, +1.50) | **+1.00 (+0.50, +1.50)** | **-0.020 (-0.030, -0.010)** |" in table
    assert "| 2.5 | joint | +1.00 (-0.50, +1.50) | **+1.00 (+0.50, +1.50)** | -0.020 (-0.050, +0.010) |" in table
    targets = "\n".join(report.frontier_targets(data))
    met = "| joint below base's KL, outside the interval, at every point measured with both | 1 of 2 points | **no** |"
    assert met in targets  # joint @2.5's KL interval reaches +0.01: a tie
    assert ("| recommended(3) at <= 3.5 bits: top-1 >= float - 1.5 (77.90) | 77.00 (joint @3.5, 3.490 bits) "
            "| **no** |") in targets
    assert "| recommended(2) at <= 2.5 bits: top-1 >= float - 10.0 (69.40) | 61.00 (recon @2.5, 2.500" in targets
    other = "\n".join(report.frontier_targets(data, "EfficientNet-Lite0"))
    assert "bits: top-1 >= float - 3.0 (76.40) | 77.00 (joint @3.5, 3.490 bits) | yes |" in other
    assert "| recommended(2) at <= 2.5 bits: measured | 61.00 (18.40 below float) | yes |" in other
    peer = {**row("brevitas", 3.0, 3.6, 70.0), "vs_joint": {"row": "joint @3.5", "hit": [-7.0, -9.0, -5.0],
                                                            "agree": [-1.0, -2.0, 0.5], "kl": [0.1, 0.05, 0.2]}}
    with_peer = report.frontier_table({**data, "brevitas @3.0": peer})
    assert ("| brevitas @3.0 | joint @3.5 | **-7.0 (-9.0, -5.0)** | -1.0 (-2.0, +0.5) | **+0.10 (+0.05, +0.20)** |"
            in with_peer)
    (tmp_path / "frontier.json").write_text(json.dumps(data))
    section = "\n\n".join(report.frontier_section(tmp_path))
    assert "`joint`: planned jointly" in section and "frontier.png" in section
    assert report.frontier_section(tmp_path / "missing") == []
