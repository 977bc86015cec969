"""`python -m erasure erase | generate` on the tiny model, run in-process through cli.main."""

import json
import os
import re

import pytest
from PIL import Image

import erasure
from erasure.cli.main import main
from erasure.evaluation.probes import PROBES


def test_erase_then_generate_grid(tmp_path, capsys):
    edit_path = tmp_path / "edit.safetensors"
    assert main(["erase", "--model", "tiny", "--method", "speed", "--preset", "instance",
                 "--targets", "Snoopy", "--out", str(edit_path)]) == 0
    edit = erasure.Edit.load(edit_path)
    assert edit.targets == ["Snoopy"] and len(edit.retain) > 300  # preset retain pool, target overridden
    assert edit.params["threshold"] == 0.1 and edit.params["params"] == "V"  # the preset's SPEED setting
    assert "erased 1 concept(s)" in capsys.readouterr().out

    grid_path = tmp_path / "grid.png"
    assert main(["generate", "--model", "tiny", "--edit", str(edit_path), "--prompt", "a photo of Snoopy",
                 "a photo of a cat", "--seeds", "0", "1", "--steps", "2", "--out", str(grid_path)]) == 0
    with Image.open(grid_path) as grid:
        # 2 prompts x 2 seeds rows, original | edited columns, 256-px cells beside a 220-px label column
        assert grid.size == (220 + 2 * 256, 24 + 4 * 256)


def test_export_writes_each_format_from_an_edit_file(tmp_path, capsys):
    from safetensors import safe_open

    edit_path = tmp_path / "edit.safetensors"
    assert main(["erase", "--model", "tiny", "--method", "uce", "--targets", "cat, red car", "--retain", "dog",
                 "--out", str(edit_path)]) == 0
    assert main(["export", "--edit", str(edit_path), "--format", "lora", "--rank", "1",  # --model: the edit's own
                 "--out", str(tmp_path / "lora.safetensors")]) == 0
    printed = capsys.readouterr().out
    error = float(re.search(r"LoRA of rank 1 \(exact rank 2\) over 8 layers, relative error ([0-9.e-]+)",
                            printed).group(1))
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["erasure_studio"])["relative_error"] == pytest.approx(error, rel=1e-2)
        assert len(f.keys()) == 16 and all(key.startswith("unet.") for key in f.keys())
    assert main(["export", "--model", "tiny", "--edit", str(edit_path), "--format", "diffusers",
                 "--out", str(tmp_path / "baked")]) == 0
    assert (tmp_path / "baked" / "model_index.json").is_file()
    assert main(["export", "--model", "tiny", "--edit", str(edit_path), "--format", "safetensors-delta",
                 "--out", str(tmp_path / "same.safetensors")]) == 0
    assert erasure.Edit.load(tmp_path / "same.safetensors").patches.keys() == erasure.Edit.load(edit_path).patches.keys()
    assert main(["export", "--model", "tiny", "--edit", str(edit_path), "--format", "diffusers", "--rank", "2",
                 "--out", str(tmp_path / "other")]) == 2
    assert "rank applies to LoRA exports only" in capsys.readouterr().err


def test_method_parameters_override_preset(tmp_path):
    edit_path = tmp_path / "edit.safetensors"
    assert main(["erase", "--model", "tiny", "--method", "uce", "--preset", "style", "--lamb", "0.1",
                 "--out", str(edit_path)]) == 0
    edit = erasure.Edit.load(edit_path)
    assert edit.params["lamb"] == 0.1 and edit.anchors == ["art"]


def test_bad_input_exits_with_one_sentence(tmp_path, capsys):
    code = main(["erase", "--model", "tiny", "--targets", "Snoopy", "--anchors", "a,b", "--out",
                 str(tmp_path / "x.safetensors")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: got 2 anchors for 1 targets") and "Traceback" not in err
    assert main(["generate", "--model", "tiny", "--edit", str(tmp_path / "missing.pt"), "--prompt", "x"]) == 2
    assert "pickle" in capsys.readouterr().err


def test_bench_prints_a_table_and_json(tmp_path, capsys):
    from erasure.cli.bench import run_bench

    results = run_bench(device="cpu", concept_counts=[1, 3], methods=["speed", "uce"], model="tiny", repeats=2,
                        json_path=str(tmp_path / "bench.json"))
    out = capsys.readouterr().out
    assert out.count("| speed ") == 2 and out.count("| uce ") == 2 and "| encode s |" in out
    assert [(r["method"], r["concepts"]) for r in results] == [("speed", 1), ("speed", 3), ("uce", 1), ("uce", 3)]
    assert all(r["solve_s"] > 0 and r["total_s"] >= r["solve_s"] for r in results)
    assert (tmp_path / "bench.json").read_text().startswith("[")


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_generate_refuses_seeds_torch_cannot_take_before_any_work(seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "tiny", "--prompt", "x", "--seeds", seed])
    assert exit_info.value.code == 2
    assert f"seed {seed!r} is not a whole number from 0 to 2**63 - 1" in capsys.readouterr().err


def test_generate_refuses_a_grid_file_name_pillow_cannot_write_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(erasure, "load_pipeline", None)  # any model load would fail loudly: none must happen
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--out", str(tmp_path / "grid.txt")]) == 2
    assert "is not an image file name; use .png or .jpg" in capsys.readouterr().err


def test_every_flag_has_help_and_shared_parameters_show_each_methods_default():
    from erasure.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    lamb = next(a for a in commands["erase"]._actions if a.dest == "lamb").help
    assert "speed: λ" in lamb and "(default 0.0)" in lamb and "uce: ridge λ" in lamb and "(default 0.5)" in lamb


def test_a_trained_method_shows_a_progress_bar_with_its_loss(tmp_path, capsys):
    edit_path = tmp_path / "esd.safetensors"
    assert main(["erase", "--model", "tiny", "--method", "esd-x", "--targets", "cat", "--iterations", "5",
                 "--trajectories", "1", "--sample_steps", "2", "--train_size", "32", "--out", str(edit_path)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"training esd-x: 100%.*5/5.*loss=", err), err[-500:]
    assert re.search(r"esd-x: erased 1 concept\(s\).*trained in [\d.]+ s, loss [-+.e\d]+ -> [-+.e\d]+", out), out
    assert erasure.Edit.load(edit_path).method == "esd-x"


def test_the_trained_bench_counts_each_runs_unet_passes_and_projects_from_their_flops(capsys):
    from erasure.cli.bench import ASSUMED_H100_TFLOPS, run_train_bench

    rows = run_train_bench(device="cpu", model="tiny", size=32)
    out = capsys.readouterr().out
    assert "| frozen forward |" in out and "| masked forward+backward |" in out
    esd, minimalist = rows
    # the reference's defaults: ESD 200 fresh 50-step trajectories (49 rows on average, + 2 frozen ε) at batch 1;
    # Minimalist 80 steps × 4 samples × K = 4 trajectory steps × 2 (guidance)
    assert esd["rows"] == {"frozen forward": 200 * (49 + 2), "ESD-x forward+backward": 200 * 1}
    assert minimalist["rows"]["masked forward+backward"] == 80 * 4 * 4 * 2
    for row in rows:
        assert row["tflop"] > 0 and row["projected_h100_s"] == pytest.approx(row["tflop"] / ASSUMED_H100_TFLOPS)


def test_probe_writes_a_json_report_and_an_image_sheet_on_the_toy_world(tmp_path, capsys):
    edit_path = tmp_path / "uce.safetensors"
    assert main(["erase", "--model", "toy", "--method", "uce", "--preset", "toy-circle", "--out", str(edit_path)]) == 0
    out = tmp_path / "probes"
    assert main(["probe", "--model", "toy", "--edit", str(edit_path), "--probes", "all", "--seeds", "0",
                 "--protocol", "quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "probes.json").read_text())
    assert report["judge"] == "toy judge" and report["seeds"] == [0]
    assert report["prompts"] == ["a circle", "a red circle"]
    assert list(report["probes"]) == list(PROBES)
    noise = report["probes"]["noise"]
    assert noise["N"] == 6 and noise["images"] == 2 * 6 and 0 <= noise["recovery_rate"] <= noise["best_of_N_rate"]
    assert set(report["probes"]["completion"]["by_variant"]) == {"k=1", "k=2", "k=3", "k=5"}
    assert report["probes"]["diagnostic"]["verdict"].startswith(("avoidance", "destruction"))
    guidance = report["probes"]["guidance"]
    assert guidance["N"] == 3 and guidance["settings"]["classifier_held_out_accuracy"]["0"] >= 0.9
    attack = report["probes"]["adversarial"]["settings"]
    assert attack["loss_after"] <= attack["loss_before"] and attack["loss_evaluations"] == 1 + 20 * 9
    assert 0 <= report["probes"]["adversarial"]["baseline_rate"] <= 1
    neighbours = report["probes"]["interference"]["matrix"]["circle"]
    assert len(neighbours) == 4 and "circle" not in neighbours
    assert "noise: recovered in" in printed and "(best of N = 6:" in printed
    sheet = Image.open(out / "probes.png")
    if os.environ.get("PROBE_SHEET_TO"):
        sheet.save(os.environ["PROBE_SHEET_TO"])
    assert sheet.width > 17 * 128  # standard, inpainting, 4 completion, 6 noise, 3 guidance, inversion, attack
