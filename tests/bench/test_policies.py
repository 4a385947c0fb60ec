"""``kvtier bench policies`` end to end on a small synthetic regime: every output it promises, in parallel."""

from __future__ import annotations

import json

import pytest

from kvtier.bench import policies as bench
from kvtier.cli import OneLineParser
from kvtier.errors import UsageError
from kvtier.sim.synthetic import SyntheticSpec


def test_bench_policies_writes_tables_json_and_png_per_trace(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.REGIMES, "tiny", SyntheticSpec(sessions=16, slots=6, mean_calls=8))
    parser = OneLineParser(prog="kvtier bench policies")
    bench.add_arguments(parser)
    args = parser.parse_args(["--skip-weka", "--mooncake", "--regimes", "tiny", "--fracs", "0.02,0.5",
                              "--policies", "lirs", "--admission", "min-hits-1,ghost", "--jobs", "2",
                              "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"),
                              "--no-progress"])
    assert bench.run(args) == 0
    report = json.loads((tmp_path / "p-synthetic-tiny.json").read_text())
    assert (tmp_path / "p-synthetic-tiny.png").stat().st_size > 0
    assert {r["policy"] for r in report["rows"]} == {"agent", "lru", "lirs", "belady"}
    assert len(report["rows"]) == 4 * 2
    assert set(report["targets"]) == {"cliff_0.8_of_belady", "cliff_beats_every_online", "never_below_lru"}
    tiers = report["tiers"]
    assert {r["admission"] for r in tiers if r["admission"]} == {"min-hits-1", "ghost"}
    assert all(set(r["writes"]) == {"G1", "G2", "G3"} for r in tiers)
    assert "tiny" in json.loads((tmp_path / "p.json").read_text())["traces"]["synthetic-tiny"]["trace"]
    out = capsys.readouterr().out
    assert "x leaf-first LRU, x Belady" in out and "targets:" in out

    def never(job):
        raise AssertionError(f"{job} was replayed again")

    monkeypatch.setattr(bench, "run_job", never)  # a rerun with the same --json resumes: nothing left to replay
    assert bench.run(args) == 0
    again = json.loads((tmp_path / "p-synthetic-tiny.json").read_text())

    def figures(rows):
        return sorted((r["policy"], r["frac"], r["hit_rate"]) for r in rows)

    assert figures(again["rows"]) == figures(report["rows"]) and len(again["tiers"]) == len(tiers)


def test_bench_policies_names_a_missing_trace_in_one_line(tmp_path):
    parser = OneLineParser(prog="kvtier bench policies")
    bench.add_arguments(parser)
    args = parser.parse_args(["--skip-weka", "--weka-more", str(tmp_path / "v6"), "--mooncake", "--regimes", ""])
    with pytest.raises(UsageError, match="trace not found: .*v6"):
        bench.run(args)
