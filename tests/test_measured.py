"""Every number the README's Measured table and docs/measured.md's tables publish is a field of the JSON the row
cites: a table row's last cell names one or more files under bench/results/, and each number in its result
cells must equal (at the precision shown, in the unit shown) a number somewhere in those files."""

import json
import re

import pytest

from tests.test_readme import DOCS, ROOT

PAGES = [ROOT / "README.md", DOCS / "measured.md", DOCS / "block-attention.md", DOCS / "strategies.md", DOCS / "synth.md"]
SOURCE = re.compile(r"bench/results/[\w./-]+\.json")
# a number as written in a table: 83.0k, 3.26x, 1,546, 0.01, 3.3 GiB, 7.8 ms, 257 s, 2.6e-3
NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e-?\d+)?)(k|x| ?GiB| ?MiB| ?MB| ?ms| ?s\b|%)?"
)
SCALE = {"k": 1e3, "GiB": 2**30, "MiB": 2**20, "MB": 1e6, "%": 0.01}


def table_rows(path):
    """(line number, result cells, cited JSON paths) of every table row whose last cell cites a JSON."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 3 and (sources := SOURCE.findall(cells[-1])):
            yield number, cells[1:-1], sources  # cells[0] says what was measured: settings, not results


def json_numbers(paths) -> list[float]:
    out: list[float] = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, int | float):
            out.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for p in paths:
        walk(json.loads((ROOT / p).read_text()))
    return out


def shown_numbers(text: str):
    """(the number as written, its value, half a unit of its last digit, its unit's scale)"""
    for m in NUMBER.finditer(text.replace("`", "")):
        digits, unit = m.group(1), (m.group(2) or "").strip()
        plain = digits.replace(",", "")
        mantissa, _, exponent = plain.partition("e")
        decimals = len(mantissa.partition(".")[2])
        half = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
        yield m.group(0), float(plain), half, SCALE.get(unit, 1.0)


def matches(value: float, half: float, scale: float, numbers: list[float]) -> bool:
    return any(abs(n / scale - value) <= half * (1 + 1e-9) for n in numbers)


def cited_rows():
    for page in PAGES:
        for number, cells, sources in table_rows(page):
            yield pytest.param(page, number, cells, sources, id=f"{page.name}:{number}")


def test_the_pages_cite_their_json():
    rows = [r for page in PAGES for r in table_rows(page)]
    assert len([r for r in table_rows(ROOT / "README.md")]) >= 4 and len(rows) >= 15
    for page in PAGES:
        for _, _, sources in table_rows(page):
            for s in sources:
                assert (ROOT / s).is_file(), f"{page.name} cites {s}, which does not exist"


@pytest.mark.parametrize("page, line, cells, sources", list(cited_rows()))
def test_every_published_number_is_in_its_json(page, line, cells, sources):
    numbers = json_numbers(sources)
    missing = [
        shown
        for cell in cells
        for shown, v, half, scale in shown_numbers(cell)
        if not matches(v, half, scale, numbers)
    ]
    assert not missing, f"{page.name} line {line}: {missing} not in {sources}"


def test_the_check_catches_a_number_that_is_not_in_the_json():
    numbers = [83010.2, 3.258, 3518437376.0, 0.9]
    assert matches(83.0, 0.05, 1e3, numbers) and matches(3.26, 0.005, 1, numbers)
    assert matches(3.3, 0.05, 2**30, numbers) and matches(0.90, 0.005, 1, numbers)
    assert not matches(3.27, 0.005, 1, numbers) and not matches(84.0, 0.05, 1e3, numbers)
    assert [s for s, *_ in shown_numbers("83.0k vs 25.5k tok/s (3.26x), 3.3 GiB, 1,546 tokens, 1,337.9 s")] == [
        "83.0k", "25.5k", "3.26x", "3.3 GiB", "1,546", "1,337.9 s",
    ]  # fmt: skip
