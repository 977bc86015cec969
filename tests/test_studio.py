"""The studio without a server: startup (model and scorer fallbacks), sessions' edits and downloads, and the
reports the app shows and the CLI prints."""

import gc
import math

import pytest

import erasure
from erasure.engine.pipeline import pipeline_state
from erasure.engine.progress import Progress
from erasure.evaluation.scoring import load_clip_scorer
from erasure.studio import Studio
from erasure.studio.reports import edit_report, job_outcome, probe_result_lines, short_layer_name
from erasure.studio.sessions import Job
from erasure.studio.startup import load_models


def test_unloadable_model_falls_back_to_the_toy_world_with_a_plain_notice():
    pipe, scorer, notice = load_models("nobody/not-a-cached-model", device="cpu")
    assert pipeline_state(pipe).model_id == "toy" and scorer.backbone.startswith("toy") and not scorer.is_random
    assert notice.startswith("could not load model 'nobody/not-a-cached-model'")
    assert "offline toy world instead" in notice


def test_without_a_gpu_and_a_model_the_app_starts_on_the_toy_world_and_says_so():
    pipe, scorer, notice = load_models(None, device="cpu")
    assert pipeline_state(pipe).model_id == "toy" and scorer.backbone.startswith("toy")
    assert notice.startswith("No GPU found, so the app started on the toy world")
    studio = Studio(pipe, scorer, notice=notice)
    assert "toy world" in studio.banner() and notice in studio.banner()
    assert studio.defaults.height == 32 and studio.defaults.scheduler == "ddim"


def test_short_layer_names_cover_mid_and_later_transformer_blocks_and_keep_other_paths_whole():
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == "mid 0 · attn2.to_k"
    assert (short_layer_name("up_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q")
            == "up 2.1 block 3 · attn1.to_q")  # SDXL stacks several transformer blocks per attention
    assert short_layer_name("down_blocks.0.resnets.1.conv1") == "down_blocks.0.resnets.1.conv1"


def test_the_apps_file_folder_is_removed_with_the_studio(pipe):
    studio = Studio(pipe, load_clip_scorer("tiny"))
    folder = studio.files
    (folder / "edit.safetensors").write_bytes(b"x")
    assert studio.remove_files.atexit  # also at interpreter exit, if the studio is still alive then
    del studio
    gc.collect()
    assert not folder.exists()


def test_fallback_notice_keeps_the_loaders_reason_in_whole_words(monkeypatch):
    import diffusers

    reason = ("Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
              "outgoing traffic has been disabled. ") * 4  # 440 characters, longer than the notice keeps

    def unreachable(*args, **kwargs):
        raise OSError(reason)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", unreachable)  # the loader's first hub read
    _, _, notice = load_models("nobody/not-a-cached-model", device="cpu")
    shown = notice[notice.index("(") + 1: notice.index(")")]
    assert shown.endswith(" …") and reason.startswith(shown.removesuffix(" …"))
    assert shown.removesuffix(" …").split()[-1] in reason.split()  # the cut falls between words


def test_session_edits_are_numbered_labelled_and_capped_at_the_latest(pipe):
    studio = Studio(pipe, load_clip_scorer("tiny"), erasure.engine.limits.Limits(max_edits=2))
    session = []
    for target in ("Snoopy", "Garfield", "Pikachu"):
        added = studio.erase_concepts(target, "", "Mickey", "uce", {}, session, owner="a")
        session = added.session
    assert [entry["label"] for entry in session] == ["#2 UCE: Garfield", "#3 UCE: Pikachu"]
    assert "dropped #1 UCE: Snoopy" in added.report and len(studio.edits) == 2
    assert studio.session_edits(session, ["#3 UCE: Pikachu"])["#3 UCE: Pikachu"].targets == ["Pikachu"]
    with pytest.raises(ValueError, match="'#1 UCE: Snoopy' is not in this session"):
        studio.session_edits(session, ["#1 UCE: Snoopy"])
    studio.close_session("a")
    assert len(studio.edits) == 0


def test_a_trained_method_is_checked_before_its_job_starts(pipe):
    studio = Studio(pipe, load_clip_scorer("tiny"))
    with pytest.raises(ValueError, match="iterations"):
        studio.erase_concepts("cat", "", "", "esd-x", {"iterations": 0}, [], owner="b")
    assert studio.jobs.get("b") is None  # nothing started


def test_reports_say_what_an_edit_and_a_finished_job_are(pipe):
    edit = erasure.erase(pipe, "uce", ["Snoopy"], [""], ["Mickey"])
    report = edit_report(edit)
    assert report.startswith("**UCE** maps Snoopy → the empty prompt, keeping 1 retain concept(s);")
    assert "s text encoding +" in report
    assert edit_report(edit, "mine.safetensors").startswith("Loaded `mine.safetensors`: **UCE**")
    job = Job("ESD-X: cat", state="done", loss=0.25)
    job.ended = job.started + 3
    assert job_outcome(job) == "**ESD-X: cat**: done in 3 s (final loss 0.25)."
    assert job_outcome(Job("ESD-X: cat", state="cancelled")) == "**ESD-X: cat**: cancelled; nothing was kept."
    assert job_outcome(Job("x", kind="probes", state="failed", error="boom")) == "**Probes**: failed: boom"


def test_probe_result_lines_name_each_probe_with_its_rate_matrix_or_verdict():
    report = {"probes": {
        "noise": {"recovery_rate": 0.25, "images": 8, "N": 4, "best_of_N_rate": 0.5, "baseline_rate": 0.0},
        "interference": {"matrix": {"cat": {"dog": {"original": 1.0, "edited": 0.5}}}},
        "diagnostic": {"verdict": "avoidance"}}}
    assert probe_result_lines(report) == [
        "noise: recovered in 25% of 8 images (best of N = 4: 50%; the same prompt unprobed: 0%)",
        "interference: cat -> dog 100%->50%", "diagnostic: avoidance"]


def test_progress_is_one_record_for_every_kind_of_work():
    step = Progress(2, 5, "original: denoising")
    assert (step.done, step.total, step.message) == (2, 5, "original: denoising") and math.isnan(step.loss)
    assert erasure.TrainingCancelled is erasure.Cancelled  # one cancellation for generation, training, probes


def test_numbers_are_refused_with_their_rule_not_rounded(pipe):
    studio = Studio(pipe, load_clip_scorer("tiny"))
    with pytest.raises(ValueError, match="'train_size' must be a multiple of 8, got 33"):
        studio.erase_concepts("cat", "", "", "esd-x", {"train_size": 33}, [], owner="c")
    assert studio.jobs.get("c") is None
    session = studio.erase_concepts("Snoopy", "", "Mickey", "uce", {}, [], owner="c").session
    with pytest.raises(ValueError, match="rank must be a whole number >= 1"):
        studio.export_latest(session, "LoRA, diffusers/PEFT keys", 2.5)
    with pytest.raises(ValueError, match=r"rank 1000000000000 is above the highest rank these layers can have"):
        studio.export_latest(session, "LoRA, diffusers/PEFT keys", 10**12)
    path, note = studio.export_latest(session, "LoRA, diffusers/PEFT keys", 1)
    assert "LoRA of rank 1" in note
