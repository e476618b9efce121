"""The README's measured figures come from reports the code wrote and that are committed beside it.

The same holds for reports/README.md, the history of the speedrun's cards. A block of either that quotes a report opens with `<!-- figures: reports/PATH [reports/PATH ...] -->`
and ends with `<!-- /figures -->`. Every figure in it — a percentage, a decimal, a number with thousands
separators — must be in one of those reports, exactly or rounded from a figure there with more digits
(a JSON report's fractions count as percentages too, and a large number may be quoted in thousands,
millions, ...: 4,096,000 as 4.1M). Plain integers (steps, sizes, counts) are not checked, nor the
figures a block cites from papers, listed in its marker: `<!-- figures: reports/PATH cited: 43.8 -->`.
So a measured figure is copied from its report, never typed, and cannot drift from it.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- figures: (.+?) -->(.*?)<!-- /figures -->", re.S)
# 38.8 | 94% | 8,853 | 1,060 | 0.59 ; not a digit inside a word (d20, SmolLM2) or a version (2.13.0)
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+\.\d+|\d+(?=%))(%?)(?!\d|\.\d)")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


DOCUMENTS = ("README.md", "reports/README.md")


def blocks() -> list[tuple[str, list[str], str]]:
    """(document, the reports a block quotes, the block's text) for every block of every document."""
    return [(doc, paths.split(), body) for doc in DOCUMENTS for paths, body in BLOCK.findall((ROOT / doc).read_text())]


def report_values(path: Path) -> set[float]:
    text = path.read_text()
    values = {abs(float(n.replace(",", ""))) for n in NUMBER.findall(text)}
    if path.suffix == ".json":  # fractions stored raw are quoted as percentages
        values |= {v * 100 for v in values if v <= 1}
    return values | {v / 10 ** e for v in values if v >= 1000 for e in (3, 6, 9, 12)}


def block_values(paths: list[str]) -> set[float]:
    """What a block may quote: its reports' figures, and the figures it cites (after "cited:")."""
    reports, _, cited = " ".join(paths).partition("cited:")
    return set().union(*(report_values(ROOT / p) for p in reports.split()), {float(c) for c in cited.split()})


def quoted(figure: str, values: set[float]) -> bool:
    """The figure as written (its number of decimals) equals a report value rounded the same way."""
    digits = len(figure.split(".")[1]) if "." in figure else 0
    x = float(figure.replace(",", ""))
    return any(abs(round(v, digits) - x) < 1e-9 or abs(v - x) < 1e-9 for v in values)


def test_the_readme_quotes_committed_reports():
    found = blocks()
    assert len(found) >= 3, "the README's measured sections are marked with <!-- figures: ... -->"
    for doc, paths, _ in found:
        for p in " ".join(paths).partition("cited:")[0].split():
            assert (ROOT / p).is_file(), f"{doc} quotes {p}, which is not committed"


@pytest.mark.parametrize("doc,paths,body", blocks(), ids=[f"{doc}:{paths[0]}" for doc, paths, _ in blocks()])
def test_every_figure_is_in_its_report(doc, paths, body):
    values = block_values(paths)
    missing = [m.group(0) for m in FIGURE.finditer(body) if not quoted(m.group(1), values)]
    assert not missing, f"figures in {doc} that {', '.join(paths)} do not hold: {missing}"


def test_the_checker_catches_a_figure_typed_by_hand(tmp_path):
    report = tmp_path / "r.md"
    report.write_text("| head facts | 93.8% ±6% | 1.216 | 8,853 tok/s | 4,096,000 tokens | slope -0.074 |")
    values = report_values(report)
    assert quoted("94", values) and quoted("93.8", values) and quoted("1.22", values) and quoted("8,853", values)
    assert quoted("4.1", values) and quoted("0.074", values)
    assert not quoted("98.5", values) and not quoted("95", values)
    body = "head facts 94%, loss 1.22, 2-core, SmolLM2, torch 2.13.0, 98.5% by hand"
    assert [m.group(0) for m in FIGURE.finditer(body) if not quoted(m.group(1), values)] == ["98.5%"]
