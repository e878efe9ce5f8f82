"""Every benchmark result the README cites is committed: each name it gives (in full, as
`2026-12-04-NVIDIA_H200-attention.*`, or shortened as `...-decode_profile-pipelined{,-16k}.*`)
matches at least one file under benchmarks/results/, so a reader can open what a table or
figure came from."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CITED = re.compile(r"(?:\.\.\.-|\b20\d\d-\d\d-\d\d-)[A-Za-z0-9_{},.*\-]+")


def alternatives(name: str) -> list[str]:
    """`a{b,c}d{,e}` as every name it stands for: abd, abde, acd, acde."""
    brace = re.search(r"\{([^{}]*)\}", name)
    if brace is None:
        return [name]
    return [spelled for choice in brace.group(1).split(",")
            for spelled in alternatives(name[:brace.start()] + choice + name[brace.end():])]


def as_pattern(name: str) -> str:
    """A cited name as a glob over the results' file names (`...` stands for what it leaves out: the
    date and device, or the device alone)."""
    return name.rstrip(".,;:)").replace("...", "*")


def test_every_result_the_readme_cites_is_committed():
    text = (ROOT / "README.md").read_text()
    committed = [p.name for p in RESULTS.iterdir()]
    cited = CITED.findall(text)
    assert len(cited) > 50, "the README cites its results as `<date>-<device>-<benchmark>...`"
    missing = sorted({name for ref in cited for name in alternatives(ref)
                      if not fnmatch.filter(committed, as_pattern(name))})
    assert not missing, f"the README cites results that benchmarks/results/ does not hold: {missing}"


def test_a_misspelled_citation_is_caught():
    committed = ["2026-12-04-NVIDIA_H200-attention.csv", "2026-12-04-NVIDIA_H200-attention.json"]
    assert fnmatch.filter(committed, as_pattern("2026-12-04-NVIDIA_H200-attention.*"))
    assert fnmatch.filter(committed, as_pattern("...-attention.*"))
    assert fnmatch.filter(committed, as_pattern("2026-12-04-...-attention.*"))
    assert not fnmatch.filter(committed, as_pattern("...-attentoin.*"))
    assert not fnmatch.filter(committed, as_pattern("2026-12-05-...-attention.*"))
    assert alternatives("...-x{,-before}-{1,2}.*") == ["...-x-1.*", "...-x-2.*", "...-x-before-1.*",
                                                      "...-x-before-2.*"]
