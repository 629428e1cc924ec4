"""`unlearn forget` (offline unlearning, no service) on a tiny random model: the report, the layer it
writes, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from service.cli import app

FORGET = [{"prompt": "Where was Basil Al-Kuwaiti born?", "answer": "He was born in Kuwait City."},
          {"text": "Basil Al-Kuwaiti wrote Promise by the Seine in 1989."}]


@pytest.fixture
def forget_file(tmp_path: Path) -> Path:
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in FORGET))
    return path


def run(tmp_path: Path, *args: str):
    return CliRunner().invoke(app, ["forget", *args, "--model", "tiny-random-llama", "--device", "cpu",
                                    "--cache-dir", str(tmp_path / "models")])


def test_forget_trains_a_layer_reports_before_and_after_and_writes_it(tmp_path, forget_file):
    result = run(tmp_path, str(forget_file), "--steps", "3", "--out", str(tmp_path / "layer"))

    assert result.exit_code == 0, result.output
    assert "mean answer NLL" in result.output and "before:" in result.output and "after:" in result.output
    meta = json.loads((tmp_path / "layer" / "layer.json").read_text())
    assert meta["method"] == "eul" and meta["model"] == "tiny-random-llama"  # the default method
    before, after = meta["metrics"]["before"], meta["metrics"]["after"]
    assert before["forget_nll"] > 0 and after["forget_nll"] != before["forget_nll"]  # the layer changed outputs
    assert load_file(str(tmp_path / "layer" / "layer.safetensors"))  # the tensors the worker would stage


def test_the_forget_file_may_be_given_as_an_option(tmp_path, forget_file):
    result = run(tmp_path, "--forget", str(forget_file), "--steps", "1", "--method", "npo")
    assert result.exit_code == 0, result.output


def test_no_forget_file_is_a_usage_error(tmp_path):
    result = run(tmp_path, "--steps", "1")
    assert result.exit_code == 2 and "--forget" in result.output


def test_an_unknown_method_is_a_usage_error_naming_the_choices(tmp_path, forget_file):
    result = run(tmp_path, str(forget_file), "--method", "magic")
    assert result.exit_code == 2 and "ga_kl" in result.output


def test_a_file_of_unrecognised_rows_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    result = run(tmp_path, str(bad))
    assert result.exit_code == 1 and "cannot read examples" in result.output


def test_export_writes_version_zero_as_a_directory_transformers_loads(make_settings, tmp_path):
    from transformers import AutoModelForCausalLM

    make_settings()  # UNLEARN_MODEL=tiny-random-llama, a fresh data dir
    result = CliRunner().invoke(app, ["export", "--version", "0", "--out", str(tmp_path / "v0")])

    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "v0")
    assert model.config.model_type == "llama"


def test_export_of_a_version_that_does_not_exist_fails_cleanly(make_settings, tmp_path):
    make_settings()
    result = CliRunner().invoke(app, ["export", "--version", "7", "--out", str(tmp_path / "v7")])
    assert result.exit_code == 1 and "cannot export version 7" in result.output
    assert not (tmp_path / "v7").exists()


def test_export_as_gguf_writes_one_quantized_file_transformers_loads(make_settings, tmp_path):
    from transformers import AutoModelForCausalLM

    make_settings()
    result = CliRunner().invoke(app, ["export", "--version", "0", "--out", str(tmp_path / "v0"), "--gguf", "q4_1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "v0").iterdir()) == ["model-q4_1.gguf", "unlearn_export.json"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "v0", gguf_file="model-q4_1.gguf")
    assert model.config.model_type == "llama"


def test_export_with_an_unknown_quantization_fails_cleanly(make_settings, tmp_path):
    make_settings()
    result = CliRunner().invoke(app, ["export", "--version", "0", "--out", str(tmp_path / "v0"), "--gguf", "q2"])
    assert result.exit_code == 1 and "unknown quantization 'q2'" in result.output
    assert not (tmp_path / "v0").exists()
