"""The documentation stands alone and agrees with the data it describes.

* README, docs/ and the experiments' READMEs point only inside the repository, and every relative link (and
  #anchor) resolves;
* every "docs/method.md §N" citation in the code, configs and docs names a section that exists;
* the tables of docs/paper_numbers.md are the values of experiments/paper_numbers.json, and its parameter counts
  are those of docs/method.md §5;
* CITATION.cff and CITATION.bib name the same paper.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAPER_NUMBERS = json.loads((ROOT / "experiments" / "paper_numbers.json").read_text())
MARKDOWN = sorted([ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "experiments").glob("*.md"),
                   *(ROOT / "experiments").glob("*/README.md")])
ARXIV_ID = "2604.02338"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", path.read_text(), re.MULTILINE)}


def section_table(path: Path, heading: str) -> str:
    """The text of one section: from its heading to the next heading of the same or a higher level."""
    text = path.read_text()
    start = text.index(heading)
    level = heading.split(" ")[0]
    end = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE).search(text, start + len(heading))
    return text[start:end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return [row for row in rows[2:] if row]  # skip the header and its rule


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_documents_point_only_inside_the_repository(path):
    text = path.read_text()
    outside = [word for word in ("SPEC.md", "PAPER_NUMBERS.md", "DESIGN.md") if word in text]
    # any parent-relative path (in a link or in prose) must stay inside the repository
    outside += [p for p in re.findall(r"(?:\.\./)+[\w.-]+", text) if ROOT not in (path.parent / p).resolve().parents]
    assert not outside, f"{rel(path)} mentions files that are not in the repository: {outside}"


@pytest.mark.parametrize("path", MARKDOWN, ids=rel)
def test_relative_links_and_anchors_resolve(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{rel(path)}: links that do not resolve: {broken}"


def test_method_sections_are_numbered_for_citation():
    numbered = dict(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+)$", (DOCS / "method.md").read_text(), re.MULTILINE))
    assert [numbered[str(n)] for n in range(1, 8)] == [
        "The LiME layer", "Routing", "Balance losses", "Baselines", "Parameter counts",
        "Data: MMT-47 and evaluation", "Experiments and the training recipe"]
    assert numbered["1.1"] == "Prompt tuning"
    assert {"2.1", "2.2", "2.3"} <= set(numbered)


def test_every_method_md_citation_names_a_section():
    text = (DOCS / "method.md").read_text()
    sections = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))
    cited = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *(ROOT / "lime").rglob("*.py"),
                 *(ROOT / "scripts").glob("*"), *(ROOT / "tests").glob("*.py"), *(ROOT / "configs").rglob("*.yaml"),
                 *MARKDOWN]:
        if path.is_file():
            for number in re.findall(r"docs/method\.md,? §(\d+(?:\.\d+)?)", path.read_text(errors="replace")):
                cited.setdefault(number, rel(path))
    missing = {number: where for number, where in cited.items() if number not in sections}
    assert not missing, f"citations of docs/method.md sections that do not exist: {missing}"


def test_paper_numbers_table2_is_the_json():
    table = PAPER_NUMBERS["table2"]
    rows = table_rows(section_table(DOCS / "paper_numbers.md", "## 1. Table 2"))
    assert [row[0] for row in rows] == list(table["methods"])
    for name, peft, ttp, *cells in rows:
        method = table["methods"][name]
        assert ttp == method["ttp"]
        assert peft == (f"`{method['peft']}`" if method["peft"] != "more" else "not reproduced")
        for category, cell in zip(table["categories"], cells, strict=True):
            mean, std = (float(x) for x in cell.strip("*_").split("±"))
            assert {"mean": mean, "std": std} == method["scores"][category], (name, category)
            marked = {"**": table["bold_best"], "_": table["underlined_second"]}
            for mark, best in marked.items():
                assert (cell.startswith(mark) and not cell.startswith("**" if mark == "_" else "***")) == (
                    best.get(category) == name), (name, category, mark)


def test_paper_numbers_figure2_is_the_json():
    methods = PAPER_NUMBERS["figure2"]["methods"]
    rows = table_rows(section_table(DOCS / "paper_numbers.md", "## 3. Figure 2"))
    assert [row[0] for row in rows] == list(methods)
    reference = methods["MoEDoRA"]
    fields = ("train_time_min", "throughput", "peak_memory_gb", "trainable_params_m")
    for name, peft, *cells in rows:
        method = methods[name]
        assert peft == f"`{method['peft']}`"
        values, ratios = [float(c) for c in cells[:4]], [float(c) for c in cells[4:]]
        assert values == [method[f] for f in fields], name
        assert ratios == pytest.approx([method[f] / reference[f] for f in fields], abs=0.005), name


def test_parameter_counts_agree_between_method_and_paper_numbers():
    def counts(text: str, column: int) -> dict[str, int]:
        out = {}
        for row in table_rows(text):
            if re.fullmatch(r"[\d,]+", row[column]):
                out[row[0]] = int(row[column].replace(",", ""))
        return out

    in_method = counts(section_table(DOCS / "method.md", "## 5. Parameter counts"), 1)
    in_paper_numbers = counts(section_table(DOCS / "paper_numbers.md", "## 2. Trainable-parameter counts"), 1)
    assert len(in_method) == 13
    assert {name: in_paper_numbers[name] for name in in_method} == in_method
    assert in_method["LiME-LoRA"] == 3_486_936 and in_method["MoEDoRA"] == 12_185_600


def test_citation_files_name_the_same_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    bib = (ROOT / "CITATION.bib").read_text()
    paper = cff["preferred-citation"]
    assert cff["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert ARXIV_ID in paper["url"] and f"eprint        = {{{ARXIV_ID}}}" in bib
    assert paper["title"] == re.search(r"title\s*=\s*\{(.+)\},", bib).group(1).replace("{LiME}", "LiME")
    bib_authors = re.split(r"\s+and\s+", re.search(r"author\s*=\s*\{(.+?)\},", bib, re.DOTALL).group(1))
    assert [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]] == bib_authors
    assert f"arxiv.org/abs/{ARXIV_ID}" in (ROOT / "README.md").read_text()
