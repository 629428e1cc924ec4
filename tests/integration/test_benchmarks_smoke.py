"""Every `unlearn bench` command at smoke size on tiny-random-llama (seconds each), through the CLI, so
the benchmarks cannot rot: each writes its markdown table (with numbers), its JSON and its plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.common import markdown_table, percentile
from benchmarks.tofu_eval import harmonic_mean
from service.cli import app

pytestmark = pytest.mark.integration
TINY = ["--model", "tiny-random-llama"]
NUMBER_ROW = re.compile(r"^\|.*\| -?\d+\.\d+ \|", re.MULTILINE)  # a table row ending in a number


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-models")


def run_bench(args: list[str], out: Path, cache_dir: Path) -> str:
    result = CliRunner().invoke(app, ["bench", *args, *TINY, "--cache-dir", str(cache_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def report_text(out: Path, name: str) -> str:
    text = (out / f"{name}.md").read_text()
    assert text.startswith("# ") and "- command: `" in text and "- machine: " in text and "- date: " in text
    assert NUMBER_ROW.search(text), text
    assert json.loads((out / f"{name}.json").read_text())["data"]
    return text


def test_tofu_bench_writes_table_scatter_and_sequential_curve(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["tofu", "--authors", "3", "--forget-authors", "2", "--steps", "2", "--ft-epochs", "1",
               "--eval-items", "2", "--max-new-tokens", "4"], tmp_path, cache_dir)
    text = report_text(tmp_path, "tofu")
    for row in ("retain model (gold)", "target (no unlearning)", "| eul | lora |", "| eul_seq |", "| npo |",
                "| npo_seq |", "ga_kl", "me_gd", "idk_ap", "undial", "simnpo"):
        assert row in text
    assert "Sequential requests" in text
    assert (tmp_path / "tofu_quality_utility.png").stat().st_size > 0
    assert (tmp_path / "tofu_sequential.png").stat().st_size > 0


def test_tofu_bench_reuses_cached_finetunes(tmp_path: Path, cache_dir: Path) -> None:
    args = ["tofu", "--authors", "2", "--forget-authors", "1", "--steps", "1", "--ft-epochs", "1",
            "--eval-items", "1", "--max-new-tokens", "2", "--methods", "eul", "--layers", "bottleneck"]
    run_bench(args, tmp_path, cache_dir)
    run_bench(args, tmp_path, cache_dir)
    rows = json.loads((tmp_path / "tofu.json").read_text())["data"]["rows"]
    assert [r["seconds"] for r in rows[:2]] == [0.0, 0.0]  # the second run fine-tuned nothing


def test_fusion_bench_reports_time_ratio_and_constant_size(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["fusion", "--counts", "1,2,4", "--tokens", "16", "--repeats", "1"], tmp_path, cache_dir)
    text = report_text(tmp_path, "fusion")
    assert "request 4 / request 2" in text and "fused size constant" in text
    assert (tmp_path / "fusion_time.png").exists()


def test_cost_bench_reports_both_ratios(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["cost", "--authors", "2", "--steps", "2", "--ft-epochs", "1"], tmp_path, cache_dir)
    report_text(tmp_path, "cost")
    data = json.loads((tmp_path / "cost.json").read_text())["data"]
    assert data["ratio"] > 0 and data["ratio_full_tofu"] > data["ratio"]


def test_serving_bench_loads_the_http_api_and_compares_fused_models_with_base(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["serving", "--clients", "1,2", "--tokens", "4", "--repeats", "1", "--batch", "2"], tmp_path, cache_dir)
    text = report_text(tmp_path, "serving")
    assert all(name in text for name in ("fused bottleneck", "fused linear (merged)", "fused LoRA (merged)",
                                         "scoped: prompt in scope", "scoped: prompt out of scope"))
    assert "aggregate tokens/s" in text
    meta = json.loads((tmp_path / "serving.json").read_text())
    assert all(rate > 0 for rate in meta["data"]["decode_tokens_per_s"].values())
    assert all(ratio > 0 for ratio in meta["data"]["decode_vs_base_paired"].values()) and "(paired)" in text
    assert {level: meta["data"]["load"][level]["tokens"] > 0 for level in ("1", "2")} == {"1": True, "2": True}
    assert set(meta["load"]) == {"before", "after", "cores", "noisy"} and "load average (1 min) before" in text


def test_api_bench_measures_a_live_server_per_api_process_count(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["api", "--clients", "4", "--requests", "12", "--duration", "30", "--workers", "1,2"], tmp_path,
              cache_dir)
    report_text(tmp_path, "api")
    data = json.loads((tmp_path / "api.json").read_text())["data"]
    for workers in ("1", "2"):
        assert len(data[workers]["post_ms"]) == 12 and len(data[workers]["get_ms"]) == 12
        assert data[workers]["errors"] == 0


def test_percentile_interpolates_between_order_statistics() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_harmonic_mean_collapses_when_any_part_is_zero() -> None:
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0


def test_markdown_table_formats_numbers() -> None:
    assert markdown_table(["a", "b"], [["x", 0.12345]]).splitlines()[-1] == "| x | 0.123 |"


def test_selectivity_bench_writes_a_row_per_subject_and_arm_and_its_plot(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["selectivity", "--subjects", "2", "--steps", "1", "--max-new-tokens", "2",
               "--arms", "eul:generic,undial:neighbourhood:linear", "--quantized", "q8_0"], tmp_path, cache_dir)
    rows = json.loads((tmp_path / "selectivity.json").read_text())["data"]["rows"]
    arms = ("base (no unlearning)", "eul:generic", "undial:neighbourhood:linear")
    subjects = ("Albert Einstein", "Marie Curie")
    assert [(r["subject"], r["arm"]) for r in rows] == [(s, a) for s in subjects for a in arms]
    assert all(isinstance(r["quantized"]["q8_0"]["forgotten"], bool) for r in rows)
    rows = [r for r in rows if r["arm"] != "base (no unlearning)"]
    assert all(r["n"]["neighbours"] == 40 and r["n"]["forget"] == 5 and r["n"]["held_out"] == 3 for r in rows)
    assert rows[1]["n_retain"] >= rows[0]["n_retain"]  # the neighbourhood only adds (a tiny model answers "")
    assert all(isinstance(r["general_ppl_increase"], float) and isinstance(r["verdict"], bool) for r in rows)
    text = (tmp_path / "selectivity.md").read_text()
    assert "- command: `" in text and "| Albert Einstein | undial:neighbourhood:linear |" in text
    assert "q8_0 forget drop" in text
    assert (tmp_path / "selectivity.png").stat().st_size > 0


def test_selectivity_bench_runs_the_named_subjects(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["selectivity", "--names", "Mount Kilimanjaro", "--steps", "1", "--max-new-tokens", "2",
               "--arms", "eul:neighbourhood"], tmp_path, cache_dir)
    rows = json.loads((tmp_path / "selectivity.json").read_text())["data"]["rows"]
    assert [(r["subject"], r["arm"]) for r in rows] == [("Mount Kilimanjaro", "eul:neighbourhood")]


def test_sequential_bench_scores_every_earlier_request_after_each_one(tmp_path: Path, cache_dir: Path) -> None:
    run_bench(["sequential", "--requests", "2", "--steps", "1", "--max-new-tokens", "2"], tmp_path, cache_dir)
    rows = json.loads((tmp_path / "sequential.json").read_text())["data"]["rows"]
    assert [r["requests"] for r in rows] == [1, 2]
    assert "Mount Kilimanjaro" not in rows[0] and {"Albert Einstein", "Mount Kilimanjaro"} <= set(rows[1])
    # a tiny random model's 2-token answers are mostly empty: drops may be n/a, the verdict still decides
    assert all(isinstance(rows[1][s]["forgotten"], bool) for s in ("Albert Einstein", "Mount Kilimanjaro"))
    assert "- command: `" in (tmp_path / "sequential.md").read_text()
    assert (tmp_path / "sequential.png").stat().st_size > 0
