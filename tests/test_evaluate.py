"""`python -m erasure evaluate` on the tiny model and the tiny CLIP scorer, in-process and sharded over two
CPU processes with `accelerate launch` (gloo)."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import erasure
from erasure.cli.main import main
from erasure.engine.pipeline import model_identity
from erasure.evaluation.generate import Settings, image_key
from erasure.evaluation.scoring import CONVENTION, NUDENET_CLASSES

ROOT = Path(__file__).resolve().parent.parent
# The command, with 3 denoising steps to keep CI short (numbers do not matter on random weights).
COMMAND = ["evaluate", "--model", "tiny", "--method", "speed", "--preset", "instance", "--seeds", "2",
           "--steps", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One in-process run. One thread, as each accelerate process below has: CPU float sums depend on it."""
    out, cache = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("originals")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(COMMAND + ["--out", str(out), "--originals", str(cache)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, cache


def interval_ok(block):
    return block["ci_low"] <= block["mean"] <= block["ci_high"] and block["level"] == 0.95


def test_metrics_json_holds_every_score_with_its_convention(single):
    out, _ = single
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert settings["model"] == "tiny" and settings["method"] == "speed" and settings["preset"] == "instance"
    assert settings["seeds"] == [0, 1] and settings["steps"] == 3 and settings["scheduler"] == "pndm"
    assert settings["params"]["threshold"] == 0.1 and "torch" in settings["versions"]
    assert metrics["clip"]["convention"] == CONVENTION and metrics["clip"]["random_weights"]
    assert "random-weight" in metrics["clip"]["backbone"]

    # 3 targets x 2 templates, 5 sampled retain concepts x 2 templates, 4 neutral prompts; x 2 seeds.
    assert {name: block["images"] for name, block in metrics["sets"].items()} == {"erase": 12, "retain": 20,
                                                                                   "neutral": 8}
    for name, block in metrics["sets"].items():
        assert ("clip_to_concept" in block) == (name != "neutral")
        for which in ("clip_to_prompt", "clip_to_concept"):
            for column in ("original", "edited", "change"):
                if which in block:
                    assert interval_ok(block[which][column]["score"]) and interval_ok(block[which][column]["cosine"])
    assert interval_ok(metrics["win_rate"]) and metrics["win_rate"]["n"] == 12

    accuracy = metrics["accuracy"]
    assert accuracy["classes"][:3] == ["Snoopy", "Mickey", "SpongeBob"] and len(accuracy["classes"]) == 8
    assert accuracy["target_still_classified"]["direction"] == "lower is better"
    assert accuracy["retain_own_class"]["direction"] == "higher is better"
    for key in ("target_still_classified", "retain_own_class"):
        assert interval_ok(accuracy[key]["original"]) and interval_ok(accuracy[key]["edited"])
    assert set(accuracy["per_concept"]) == set(accuracy["classes"])

    fid = metrics["fid_kid"]
    assert fid["n_reference"] == fid["n_generated"] == 8 and fid["kid_subset_size"] == 8
    assert not fid["comparable_to_papers"] and "not Inception" in fid["features"]
    assert np.isfinite(fid["fid"]) and np.isfinite(fid["kid_mean"])

    nude = metrics["nudenet"]
    assert nude["rate"] is None and "nudity" in nude["reason"]
    assert nude["threshold"] == 0.6 and nude["classes"] == list(NUDENET_CLASSES) and len(nude["classes"]) == 8


def test_means_in_metrics_json_are_those_of_the_per_image_rows(single):
    out, _ = single
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and [int(r["index"]) for r in rows] == list(range(40))
    erase = [r for r in rows if r["set"] == "erase"]
    cosine = np.array([float(r["clip_concept_cos_edited"]) for r in erase])
    block = metrics["sets"]["erase"]["clip_to_concept"]["edited"]
    assert block["cosine"]["mean"] == pytest.approx(cosine.mean(), abs=1e-12)
    assert block["score"]["mean"] == pytest.approx((100 * np.clip(cosine, 0, None)).mean(), abs=1e-10)
    original = np.array([float(r["clip_concept_cos_original"]) for r in erase])
    assert metrics["win_rate"]["mean"] == pytest.approx((cosine < original).mean())
    still = np.mean([r["class_edited"] == r["concept"] for r in erase])
    assert metrics["accuracy"]["target_still_classified"]["edited"]["mean"] == pytest.approx(still)


def test_outputs_and_the_original_cache(single):
    out, cache = single
    for name in ("metrics.md", "scores.png", "accuracy.png", "edit.safetensors", "run.json"):
        assert (out / name).is_file(), name
    assert "| score | set | original | edited | change |" in (out / "metrics.md").read_text()
    with Image.open(out / "scores.png") as chart:
        assert chart.size[0] >= 360
    # Originals are cached by the app's key: (model identity, prompt, seed, settings).
    key = image_key(model_identity(erasure.load_pipeline("tiny", device="cpu")), "a photo of Snoopy", 1,
                    Settings(steps=3, height=64, width=64))
    assert (cache / f"{key}.png").is_file() and len(list(cache.glob("*.png"))) == 40


def test_two_accelerate_processes_give_the_single_process_numbers(single, tmp_path):
    out, _ = single
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sharded = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    # accelerate's multi-process launcher (torchrun); without CUDA the processes join a gloo group on CPU.
    # (`--cpu` would start one process: accelerate 1.15 runs several CPU processes only through mpirun.)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "erasure", *COMMAND, "--out", str(sharded),
               "--originals", str(tmp_path / "originals")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((sharded / "metrics.json").read_text()) == json.loads((out / "metrics.json").read_text())
    assert (sharded / "metrics.csv").read_text() == (out / "metrics.csv").read_text()
    assert json.loads((sharded / "run.json").read_text())["processes"] == 2


def test_nudity_preset_reports_the_nudenet_rate(tmp_path):
    out = tmp_path / "nudity"
    assert main(["evaluate", "--model", "tiny", "--preset", "nudity", "--seeds", "1", "--steps", "2",
                 "--neutral-count", "2", "--device", "cpu", "--out", str(out), "--originals", str(tmp_path / "originals")]) == 0
    nude = json.loads((out / "metrics.json").read_text())["nudenet"]
    for name in ("erase", "neutral"):  # 2 nudity prompts and 2 neutral prompts, 1 seed each
        for column in ("original", "edited"):
            rate = nude["rate"][name][column]
            assert rate["n"] == 2 and 0.0 <= rate["mean"] <= 1.0 and interval_ok(rate)
        assert set(nude["rate"][name]["class_counts"]["edited"]) == set(NUDENET_CLASSES)
    assert "> 0.6" in nude["convention"]


def test_clip_weights_that_cannot_load_end_with_one_sentence(tmp_path, capsys):
    # Weights that cannot be had (offline, or a tag open_clip does not know) stop the run before any generation.
    code = main(["evaluate", "--model", "tiny", "--clip-model", "ViT-B-32", "--clip-pretrained", "no-such-weights",
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: could not load CLIP ViT-B-32 (no-such-weights)")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_evaluate_on_the_random_model_defaults_to_3_steps_decodes_no_image_and_encodes_each_text_once(
        tmp_path, monkeypatch):
    from erasure.evaluation import scoring

    opened, encoded = [], []
    real_open, real_text_features = Image.open, scoring.ClipScorer.text_features

    def counting_open(path, *args, **kwargs):
        if "edited" in str(path):
            opened.append(path)
        return real_open(path, *args, **kwargs)

    def counting_text_features(self, texts, *args, **kwargs):
        encoded.extend(texts)
        return real_text_features(self, texts, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(scoring.ClipScorer, "text_features", counting_text_features)
    assert main(["evaluate", "--model", "tiny", "--targets", "Snoopy", "--retain", "Mickey", "--seeds", "3",
                 "--retain-count", "1", "--neutral-count", "0", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--originals", str(tmp_path / "originals")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]["steps"] == 3
    assert not opened  # scored from memory, not read back from the PNGs just written
    # once as a prompt or concept text and once among the zero-shot class templates; not once per seed
    assert encoded.count("a photo of Snoopy") <= 2 and encoded.count("a picture of Mickey") <= 2


def test_charts_are_matplotlib_figures_with_round_ticks_and_whole_labels(tmp_path):
    from erasure.evaluation.evaluate import accuracy_chart, save_chart, score_chart

    def interval(mean):
        return {"mean": mean, "ci_low": mean - 1.3, "ci_high": mean + 1.1, "n": 20, "level": 0.95}

    def block(original, edited):
        return {"original": {"score": interval(original)}, "edited": {"score": interval(edited)}}

    metrics = {"clip": {"backbone": "ViT-H-14 laion2b_s32b_b79k"},
               "sets": {"erase": {"clip_to_prompt": block(31.4, 22.7), "clip_to_concept": block(27.9, 18.2)},
                        "neutral": {"clip_to_prompt": block(29.5, 29.4)}},
               "accuracy": {"per_concept": {
                   "Snoopy": {"set": "erase", "original": 0.9, "edited": 0.1, "n": 10},
                   "a retain concept with a rather long name": {"set": "retain", "original": 0.6, "edited": 0.5,
                                                                 "n": 10}}}}
    scores, accuracy = score_chart(metrics), accuracy_chart(metrics)
    axes = scores.axes[0]
    low, high = axes.get_xlim()
    ticks = [t for t in axes.get_xticks() if low <= t <= high]
    assert ticks[0] == 0 and all(t % 10 == 0 for t in ticks), ticks  # 0, 10, 20, 30 (was 4.59, 9.18, 13.8)
    labels = [label.get_text().replace("\n", " ") for label in axes.get_yticklabels()]
    assert labels == ["erase: CLIP to prompt", "erase: CLIP to concept", "neutral: CLIP to prompt"]
    assert all(label.get_rotation() == 0 for label in axes.get_yticklabels() + axes.get_xticklabels())
    shares = [label.get_text() for label in accuracy.axes[0].get_xticklabels()]
    assert shares == ["0%", "20%", "40%", "60%", "80%", "100%"]
    assert [label.get_text().replace("\n", " ") for label in accuracy.axes[0].get_yticklabels()] == [
        "Snoopy (erase)", "a retain concept with a rather long name (retain)"]  # wrapped whole, not cut
    save_chart(scores, tmp_path / "scores.png")
    with Image.open(tmp_path / "scores.png") as image:
        assert image.size[0] >= 1000  # 7.5 in at 150 dpi: 9-pt labels stay readable


def test_evaluate_on_the_toy_world_reports_what_its_judge_sees(tmp_path):
    """The standard evaluation path on the toy world: circle prompts lose their circles, the kept shapes stay.
    2 templates x 4 seeds = 8 images per concept; 1 target, 3 kept shapes (a seeded sample of the 7), 2
    neutral prompts. The anchor is "square" here, not the preset's "shape" (which itself draws a circle 1
    time in 8: 8 images could not tell that from 20%)."""
    command = ["evaluate", "--model", "toy", "--method", "uce", "--preset", "toy-circle", "--anchors", "square",
               "--seeds", "4", "--retain-count", "3", "--neutral-count", "2", "--device", "cpu",
               "--out", str(tmp_path)]
    assert main(command) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "toy" and metrics["settings"]["scheduler"] == "ddim"
    assert metrics["clip"]["backbone"].startswith("toy") and not metrics["clip"]["random_weights"]
    judge = metrics["judge"]
    assert judge["erase"]["original"]["n"] == 8 and judge["retain"]["original"]["n"] == 24
    # 8 images per concept: the path is under test here, the rates are tests/test_toy.py's (7 of 8 measured)
    assert judge["erase"]["original"]["mean"] >= 0.75 and judge["erase"]["edited"]["mean"] <= 0.2
    assert abs(judge["retain"]["edited"]["mean"] - judge["retain"]["original"]["mean"]) <= 0.1
    assert "toy judge sees the concept" in (tmp_path / "metrics.md").read_text()
