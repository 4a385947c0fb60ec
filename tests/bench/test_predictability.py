"""``benchmarks/bench_predictability.py``: the noisy oracle reads the right future, the spreads are what they
say, and a run writes its table, JSON and PNG."""

from __future__ import annotations

import json
import math

from benchmarks import bench_predictability as bench
from kvtier.sim.synthetic import REGIMES, SyntheticSpec, generate
from tests.sim.test_sim import weka_tar


def test_oracle_without_noise_predicts_each_sessions_next_call():
    trace = generate(SyntheticSpec(sessions=6, slots=3, mean_calls=5), 0, "tiny")
    oracle = bench.noisy_oracle(trace, sigma=0.0)(capacity=100)
    sessions, times = trace.sessions.tolist(), trace.times.tolist()
    for i, (s, t) in enumerate(zip(sessions, times)):
        oracle.begin_request(s, t)
        later = [times[j] for j in range(i + 1, len(times)) if sessions[j] == s]
        assert oracle.predicted_next_call(oracle._sessions[s], t) == (later[0] if later else math.inf)


def test_fitted_spread_never_exceeds_the_gaps_own_spread():
    spreads = bench.gap_spreads(generate(REGIMES["agentic"], 0, "agentic"))
    assert spreads["gaps"] > 100
    assert 0 <= spreads["fit_sd"] <= spreads["gap_sd"]   # least squares with an intercept
    assert spreads["agent_ema_sd"] > 0


def test_run_writes_table_json_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_CACHE", str(tmp_path / "cache"))
    path = weka_tar(tmp_path)
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    assert bench.main(["--halves", "", "--weka-more", str(path), "--fracs", "0.3,1", "--sigmas", "0,1",
                       "--jobs", "2", "--json", str(out_json), "--plot", str(out_png), "--no-progress"]) == 0
    report = json.loads(out_json.read_text())
    (name, data), = report["traces"].items()
    assert {(r["policy"], r["sigma"]) for r in data["rows"]} >= {("lru", None), ("agent", None), ("belady", None),
                                                                 ("agent-oracle", 0.0), ("agent-oracle", 1.0)}
    assert all(r["vs_belady"] <= 1 + 1e-9 for r in data["rows"] if r["frac"] == 1)
    assert data["spreads"]["gaps"] == 1
    assert out_png.stat().st_size > 0
    assert "hit rate (x Belady)" in capsys.readouterr().out
