"""`effroll bench` end to end on a tiny checkpoint (no timing assertions: speed lives in experiments/)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from effroll.bench import long_tail_lengths
from effroll.cli import main

from conftest import needs_cxx
from test_cli_generate import save_tiny_checkpoint


def test_long_tail_lengths_have_a_tail():
    xs = long_tail_lengths(2000, cap=512, seed=0)
    assert max(xs) == 512 and min(xs) >= 4
    assert sorted(xs)[len(xs) // 2] < 100  # most are short


def test_bench_json_and_plot(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    png = tmp_path / "t.png"
    res = CliRunner().invoke(main, ["bench", "--model", str(ckpt), "--recipe", "rtn-sym-g32", "--prompts", "6",
                                    "--max-tokens", "24", "--max-batch", "4", "--k", "2,3", "--json", "--plot",
                                    str(png), "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    for mode in ("ar", "sd_k2", "sd_k3", "adaptive"):
        assert {"wall_s", "tokens", "tok_per_s", "acceptance"} <= set(out[mode])
        assert out[mode]["tokens"] == out["ar"]["tokens"] == out["workload"]["tokens"]
    assert out["ar"]["acceptance"] is None and 0 <= out["sd_k2"]["acceptance"] <= 1
    assert out["speedup_adaptive_vs_ar"] > 0
    assert png.exists() and png.stat().st_size > 10_000


def test_bench_bad_k_is_a_user_error(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    res = CliRunner().invoke(main, ["bench", "--model", str(ckpt), "--k", "2,x"])
    assert res.exit_code == 2 and "--k must be a comma-separated list of ints" in res.output


def test_drafter_report_json_with_rollout_calibration(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    res = CliRunner().invoke(main, ["drafter-report", "--model", str(ckpt), "--recipe", "rtn-sym-g32", "--recipe",
                                    "gptq-asym-g64-int4head", "--prompts", "3", "--tokens", "8", "--calib-prompts", "4",
                                    "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.strip().splitlines() if line.startswith("{")]
    assert [r["recipe"] for r in rows] == ["rtn-sym-g32", "gptq-asym-g64-int4head"]
    for r in rows:
        assert {"acceptance", "kl", "refresh_s", "drafter_bytes", "target_bytes", "drafter_step_s",
                "target_step_s"} <= set(r) and 0 < r["acceptance"] <= 1
        assert r["calibration"] == "rollouts of 4 other prompts"
    assert rows[1]["calib_s"] > 0  # GPTQ collected its Hessians on those rollouts


@needs_cxx
def test_bench_and_drafter_report_with_compiled_drafter(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "m", vocab=128)
    res = CliRunner().invoke(main, ["bench", "--model", str(ckpt), "--recipe", "rtn-sym-g32", "--prompts", "4",
                                    "--max-tokens", "16", "--max-batch", "3", "--k", "2", "--json", "--dtype", "fp32",
                                    "--compile-drafter"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["workload"]["drafter_compiled"] is True and out["workload"]["compile_s"] > 0
    assert out["sd_k2"]["tokens"] == out["ar"]["tokens"] and 0 <= out["sd_k2"]["acceptance"] <= 1
    res = CliRunner().invoke(main, ["drafter-report", "--model", str(ckpt), "--recipe", "rtn-sym-g32", "--prompts",
                                    "2", "--tokens", "8", "--compile-drafter", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads([line for line in res.output.splitlines() if line.startswith("{")][0])
    assert row["compiled"] is True and row["drafter_step_s"] > 0 and row["drafter_step_s_eager"] > 0
