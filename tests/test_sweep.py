"""`sp-serve bench sweep` for real: tiny-model servers at SP=1 and SP=2 started as subprocesses,
benchmarked, stopped; result JSONs, summary.csv and PNGs checked; a rerun skips every run; a
server that cannot start is reported with its log and recorded as failed."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console

from sp_serve.bench import sweep
from sp_serve.bench.config import ServeBenchConfig
from sp_serve.cli import build_parser
from sp_serve.engine.cost_model import CostModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("ttft_vs_prompt_len.png", "itl_cdf_by_scheduler.png", "throughput_vs_rate.png",
         "parallel_efficiency.png")


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def _config(result_dir, server_args, sp_sizes) -> sweep.SweepConfig:
    bench = ServeBenchConfig(num_prompts=3, random_output_len=4, ignore_eos=True, num_warmups=0,
                             request_timeout_s=60)
    return sweep.SweepConfig(result_dir=str(result_dir), sp_sizes=sp_sizes, input_lens=[32],
                             request_rates=[20.0], schedulers=["slo"], server_args=server_args,
                             bench=bench, server_start_timeout_s=120, show_progress=False)


def _summary(result_dir) -> list[dict[str, str]]:
    with open(result_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cost_model_path(tmp_path_factory):
    """A saved calibration, so the servers skip their start-up profile (faster on 2 cores)."""
    path = tmp_path_factory.mktemp("cost") / "cost.json"
    CostModel().save(str(path))
    return path


def test_tiny_sweep_then_resume(tmp_path, tiny_model_dir, cost_model_path, monkeypatch):
    server_args = ["--model", str(tiny_model_dir), "--kv-cache-memory", "16MiB",
                   "--cost-model", str(cost_model_path)]
    config = _config(tmp_path, server_args, [1, 2])
    console, printed = _console()
    outcomes = sweep.run_sweep(config, console)
    assert [(o.run.name, o.status) for o in outcomes] == [
        ("sp1-in32-rate20-slo", "ok"), ("sp2-in32-rate20-slo", "ok")], printed.getvalue()

    for sp in (1, 2):
        result = json.loads((tmp_path / f"sp{sp}-in32-rate20-slo.json").read_text())
        assert result["completed"] == 3 and result["failed"] == 0
        assert result["sp_size"] == sp  # as the server itself reports it
        assert result["scheduler"] == "slo"
        assert result["output_lens"] == [4, 4, 4]
        assert result["sweep"]["server_returncode"] == 0  # stopped cleanly, ranks included
        assert result["sweep"]["server_stop_note"] == ""
        assert (tmp_path / result["sweep"]["server_log"]).is_file()

    rows = _summary(tmp_path)
    assert [(r["run"], r["status"], r["sp_size"], r["completed"]) for r in rows] == [
        ("sp1-in32-rate20-slo", "ok", "1", "3"), ("sp2-in32-rate20-slo", "ok", "2", "3")]
    assert float(rows[1]["median_ttft_ms"]) > 0 and float(rows[1]["output_throughput"]) > 0
    assert rows[0]["throughput_efficiency"] == "1.0"  # SP=1 against itself
    assert float(rows[1]["prefill_efficiency"]) > 0
    for name in PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    # Resumable: every result exists, so nothing starts; summary and plots are rebuilt.
    (tmp_path / "summary.csv").unlink()

    def no_server(*args, **kwargs):
        raise AssertionError("a skipped run started a server")

    monkeypatch.setattr(sweep.Server, "start", no_server)
    outcomes = sweep.run_sweep(config, _console()[0])
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert [r["status"] for r in _summary(tmp_path)] == ["ok", "ok"]


def test_server_that_fails_to_start_is_reported_and_recorded(tmp_path, cost_model_path):
    config = _config(tmp_path, ["--model", str(tmp_path / "no-such-model")], [1])
    console, printed = _console()
    outcomes = sweep.run_sweep(config, console)
    assert [o.status for o in outcomes] == ["failed"]
    text = printed.getvalue()
    assert "run sp1-in32-rate20-slo failed" in text and "exited with code" in text
    assert "no-such-model" in text  # the server log's tail, naming what went wrong
    (row,) = _summary(tmp_path)
    assert row["status"] == "failed" and "exited with code" in row["error"]
    assert row["server_log"] == "logs/sp1-in32-rate20-slo.log"
    assert not (tmp_path / "sp1-in32-rate20-slo.json").exists()  # retried by the next sweep
    assert json.loads((tmp_path / "sp1-in32-rate20-slo.failed.json").read_text())["error"]
    for name in PLOTS:  # still drawn, saying there is no data
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_cli_wiring_and_validation(tmp_path):
    args = build_parser().parse_args(
        ["bench", "sweep", "--result-dir", str(tmp_path), "-sp", "1", "2", "--input-len", "64",
         "128", "--request-rate", "1", "inf", "--scheduler", "slo", "fcfs",
         "--server-args", "--model /m --kv-cache-memory 1GiB"])
    assert args.func is sweep.run
    config = sweep.config_from_args(args)
    assert config.server_args == ["--model", "/m", "--kv-cache-memory", "1GiB"]
    assert len(config.runs) == 16
    assert config.runs[-1].name == "sp2-in128-rateinf-fcfs"
    assert config.bench.ignore_eos and config.bench.random_output_len == 128
    with pytest.raises(ValueError, match="must not set"):
        sweep.SweepConfig(result_dir=str(tmp_path), server_args=["--port", "9"])
    with pytest.raises(ValueError, match="must not set.*--tensor-parallel-size"):
        sweep.SweepConfig(result_dir=str(tmp_path), server_args=["-tp", "2"])
    with pytest.raises(ValueError, match="--tp-size values must be >= 1"):
        sweep.SweepConfig(result_dir=str(tmp_path), tp_sizes=[0])
    with pytest.raises(ValueError, match="--scheduler"):
        sweep.SweepConfig(result_dir=str(tmp_path), schedulers=["lifo"])


def test_tp_grid_names_rows_and_efficiency_per_rank(tmp_path):
    """A TP x SP grid: runs named tpT-spS-... (SP-only names as before, so older result
    directories resume), every row with its tp_size, efficiency against the one-rank run over
    TP x SP ranks. Result files stand in for servers here."""
    args = build_parser().parse_args(
        ["bench", "sweep", "--result-dir", str(tmp_path), "--tensor-parallel-size", "1", "2",
         "-sp", "1", "2", "--input-len", "64", "--request-rate", "inf"])
    config = sweep.config_from_args(args)
    assert [r.name for r in config.runs] == [
        "sp1-in64-rateinf-slo", "sp2-in64-rateinf-slo", "tp2-sp1-in64-rateinf-slo",
        "tp2-sp2-in64-rateinf-slo"]
    assert config.runs[-1].label.startswith("tp=2 sp=2 ")
    throughput = {(1, 1): 100.0, (1, 2): 180.0, (2, 1): 150.0, (2, 2): 300.0}
    for run in config.runs[:3]:  # tp2-sp2 not run; one server said nothing of its TP
        server_tp = None if run.tp_size == 2 else run.tp_size
        (tmp_path / f"{run.name}.json").write_text(json.dumps({
            "completed": 2, "duration": 1.0, "input_lens": [64, 64], "errors": ["", ""],
            "median_ttft_ms": 64.0 / (run.sp_size * run.tp_size), "itls": [[0.01], [0.02]],
            "tp_size": server_tp,
            "sp_size": run.sp_size, "output_throughput": throughput[run.tp_size, run.sp_size],
            "sweep": {"server_start_s": 1.0, "server_log": "x.log"}}))
    rows = {r["run"]: r for r in sweep.write_summary(config)}
    assert [(r["tp_size"], r["sp_size"], r["status"]) for r in rows.values()] == [
        (1, 1, "ok"), (1, 2, "ok"), (2, 1, "ok"), (2, 2, "not-run")]
    assert rows["sp2-in64-rateinf-slo"]["throughput_efficiency"] == pytest.approx(0.9)
    assert rows["tp2-sp1-in64-rateinf-slo"]["throughput_efficiency"] == pytest.approx(0.75)
    assert rows["tp2-sp1-in64-rateinf-slo"]["prefill_efficiency"] == pytest.approx(1.0)
    assert _summary(tmp_path)[2]["tp_size"] == "2"
    plots = sweep.make_plots(tmp_path, list(rows.values()),
                             sweep.load_results(tmp_path, list(rows.values())))
    assert len(plots) == 4 and all(p.read_bytes().startswith(PNG_MAGIC) for p in plots)
