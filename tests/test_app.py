"""The Gradio app through its API: a real server on 127.0.0.1 (in this process, on the shared tiny
pipeline) driven by real gradio_client Clients. Images are 64 px with 2 denoising steps."""

import json
import math
import re
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import assert_untouched
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from safetensors.torch import save_file

import app
import erasure
from erasure.engine.apply import edited_weights
from erasure.engine.limits import Limits
from erasure.evaluation.generate import Settings, generate_images
from erasure.evaluation.probes import PROBE_TITLES, PROBES
from erasure.evaluation.scoring import load_clip_scorer
from erasure.studio.reports import axis_end

SETTINGS = Settings(steps=2, guidance=7.5, height=64, width=64)
CAPTION_NUMBERS = re.compile(r"CLIP to prompt (\d+\.\d) · to target (\d+\.\d)")


@pytest.fixture(scope="module")
def server(pipe):
    # Four generations may run at once (the deployed default is one): the engine's lock, not the
    # queue, must then keep each edit to its own request.
    studio = app.Studio(pipe, load_clip_scorer("tiny"), Limits(max_images=8))
    demo = app.build_demo(studio, gpu_concurrency=4)
    _, url, _ = app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None)
    try:
        yield studio, url
    finally:
        demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)


def erase(client, targets, method="uce", retain="Mickey", anchors="", **params):
    """/erase -> the labels of the session's edits (the value of the "edits to compare" update)."""
    compared, report, _, edit_file, *_ = client.predict(targets, anchors, retain, method, **params, api_name="/erase")
    return compared["value"], report, edit_file


def generate(client, erase_prompts, keep_prompts, compared, seeds="0", targets="", steps=SETTINGS.steps):
    return client.predict(erase_prompts, keep_prompts, seeds, steps, SETTINGS.guidance, SETTINGS.height,
                          SETTINGS.scheduler, compared, "object", targets, api_name="/generate")


def gallery_items(update) -> list[dict]:
    return update["value"] if isinstance(update, dict) else update


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB"))


def wait_until(condition, timeout: float) -> None:
    """Poll `condition` until it holds or `timeout` seconds pass (the assertion after it says which)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def count_unet_calls(pipe):
    calls = []
    return calls, pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_every_event_has_an_api_name(server):
    demo = app.build_demo(server[0])
    names = [fn.api_name for fn in demo.fns.values()]
    assert names and all(names), names
    assert {"erase", "generate", "cancel", "upload_edit", "clear_edits", "load_preset", "suggest_prompts"} <= set(names)


def test_the_latest_edit_exports_as_a_lora_diffusers_loads(pipe, client, untouched):
    with pytest.raises(AppError, match="No edit to export yet"):
        client.predict("LoRA, diffusers/PEFT keys", 0, api_name="/export_edit")
    erase(client, "Snoopy")
    erase(client, "Mickey, Pikachu", retain="Garfield")
    path, note = client.predict("LoRA, diffusers/PEFT keys", 0, api_name="/export_edit")
    assert "#2 UCE: Mickey, Pikachu" in note and "rank 2 (exact)" in note
    fresh = erasure.load_pipeline("tiny", device="cpu")
    fresh.load_lora_weights(path)
    fresh.fuse_lora()
    reference = erasure.erase(pipe, "uce", ["Mickey", "Pikachu"], [""], ["Garfield"])
    modules = dict(fresh.unet.named_modules())
    for name, weight in edited_weights(pipe, reference).items():
        assert torch.allclose(modules[name].weight, weight, rtol=0, atol=1e-6)
    path, note = client.predict("LoRA, kohya keys", 1, api_name="/export_edit")
    assert "rank 1 (exact rank 2)" in note and float(re.search(r"‖ΔW‖ = ([0-9]+\.[0-9]+)", note)[1]) > 0.01
    with pytest.raises(AppError, match="a rank applies to LoRA exports only"):
        client.predict("Edited weights (state dict)", 2, api_name="/export_edit")


def test_erase_then_generate_gives_a_captioned_same_seed_grid_and_run_record(pipe, client, untouched):
    compared, report, edit_file = erase(client, "Snoopy")
    assert compared == ["#1 UCE: Snoopy"] and "modules changed" in report
    # The downloaded edit is the engine's file, bitwise the edit the library computes for these concepts.
    downloaded, reference = erasure.Edit.load(edit_file), erasure.erase(pipe, "uce", ["Snoopy"], [""], ["Mickey"])
    assert all(torch.equal(downloaded.patches[k].value, p.value) for k, p in reference.patches.items())

    erased, kept, summary, _, run_file, status = generate(client, "a photo of Snoopy", "a photo of Mickey",
                                                          compared, seeds="0, 1", targets="Snoopy")
    erased, kept = gallery_items(erased), gallery_items(kept)
    # 1 prompt x 2 seeds per group, columns original | edited, row by row.
    assert len(erased) == len(kept) == 4
    assert [i["caption"].split(" · ")[0] for i in erased] == ["original", "#1 UCE: Snoopy"] * 2
    assert all(CAPTION_NUMBERS.search(i["caption"]) for i in erased + kept)
    assert "seed 1" in erased[2]["caption"] and "a photo of Mickey" in kept[0]["caption"]
    # Same seed, same prompt: the edit changes the target's image (UCE moves every key/value a little).
    assert np.abs(pixels(erased[0]).astype(int) - pixels(erased[1])).max() > 0

    rows = summary["data"]
    assert [r[:3] for r in rows] == [["should be erased", "original", 2], ["should be erased", "#1 UCE: Snoopy", 2],
                                     ["should be kept", "original", 2], ["should be kept", "#1 UCE: Snoopy", 2]]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for r in rows for v in (r[3], r[5], r[6]))
    assert rows[0][5] == 0 and abs(rows[1][5] - (rows[1][3] - rows[0][3])) <= 0.011  # change = edited - original

    record = json.loads(open(run_file, encoding="utf-8").read())
    assert record["model"] == "tiny" and record["seeds"] == [0, 1]
    assert record["settings"] == {"steps": 2, "guidance": 7.5, "height": 64, "width": 64, "scheduler": "pndm"}
    assert record["edits"]["#1 UCE: Snoopy"]["method"] == "uce"
    assert record["edits"]["#1 UCE: Snoopy"]["params"] == reference.params
    assert record["prompts"] == {"erase": ["a photo of Snoopy"], "keep": ["a photo of Mickey"]}
    assert record["clip"]["random_weights"] and {"torch", "diffusers", "gradio"} <= set(record["versions"])
    # Captions round to 0.1; the record keeps full precision.
    first = CAPTION_NUMBERS.search(erased[0]["caption"])
    assert abs(float(first[1]) - record["images"][0]["original"]["clip_to_prompt"]) <= 0.05
    assert "random-weight demo" in status


def test_eight_concurrent_clients_each_get_exactly_their_own_edit(pipe, server, untouched):
    concepts = ["Snoopy", "Garfield", "Pikachu", "Shrek", "Elmo", "Totoro", "Batman", "Bambi"]
    results, errors = {}, []

    def session(concept, method):
        try:
            client = Client(server[1], verbose=False)
            compared, _, _ = erase(client, concept, method=method, retain="a cat")
            erased, _, _, _, _, _ = generate(client, f"a photo of {concept}", "", compared, targets=concept)
            results[concept] = gallery_items(erased)
        except Exception as error:  # reported below; a thread's exception would otherwise be lost
            errors.append((concept, error))

    threads = [threading.Thread(target=session, args=(c, "uce" if i % 2 else "speed"))
               for i, c in enumerate(concepts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors

    for i, concept in enumerate(concepts):
        original, mine = results[concept]
        assert mine["caption"].startswith(f"#1 {'UCE' if i % 2 else 'SPEED'}: {concept}")
        # Oracle: the same edit computed and rendered alone, through the library. The tiny model on
        # CPU is deterministic and PNG is lossless, so equality is exact.
        alone = erasure.erase(pipe, "uce" if i % 2 else "speed", [concept], [""], ["a cat"])
        expected = generate_images(pipe, [f"a photo of {concept}"], [0], SETTINGS, alone)[0]
        assert np.array_equal(pixels(mine), np.asarray(expected)), concept
        base = generate_images(pipe, [f"a photo of {concept}"], [0], SETTINGS)[0]  # originals too, serially
        assert np.array_equal(pixels(original), np.asarray(base)), concept
        assert not np.array_equal(pixels(mine), pixels(original))


def test_failure_mid_generation_restores_weights_and_the_next_request_works(pipe, client, untouched):
    compared, _, _ = erase(client, "Snoopy", method="speed")
    calls = []

    def fail_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:  # inside the edited column's denoising loop (originals: calls 1-2)
            raise RuntimeError("injected failure")

    hook = pipe.unet.register_forward_pre_hook(fail_on_third_call)
    try:
        with pytest.raises(AppError):
            generate(client, "a photo of a failing robot", "", compared, targets="Snoopy")
    finally:
        hook.remove()
    assert len(calls) == 3
    assert_untouched(pipe, untouched)  # bitwise, and no edit still marked as applied
    erased, *_ = generate(client, "a photo of a failing robot", "", compared, targets="Snoopy")
    assert len(gallery_items(erased)) == 2


def test_second_generate_with_another_edit_does_not_recompute_originals(pipe, client, untouched):
    prompts = ("a photo of a lighthouse", "a bowl of soup")
    first_edit, _, _ = erase(client, "Snoopy", method="uce")
    calls, hook = count_unet_calls(pipe)
    try:
        generate(client, *prompts, first_edit, targets="Snoopy")
        first = len(calls)
        both, _, _ = erase(client, "Garfield", method="speed")
        second_edit = [label for label in both if label not in first_edit]
        generate(client, *prompts, second_edit, targets="Garfield")
    finally:
        hook.remove()
    # One batch (2 prompts x 1 seed) per column, so both columns cost the same number of UNet calls.
    assert first > 0 and first % 2 == 0  # original + edited
    assert len(calls) - first == first // 2  # edited only: the originals came from the cache


def test_cancel_stops_a_running_generation_and_restores_weights(pipe, client, untouched):
    compared, _, _ = erase(client, "Snoopy")
    started = threading.Event()
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: started.set())
    try:
        job = client.submit("a photo of a slow clock", "", "0", 50, SETTINGS.guidance, SETTINGS.height,
                            SETTINGS.scheduler, compared, "object", "Snoopy", api_name="/generate")
        assert started.wait(timeout=60)
        assert client.predict(api_name="/cancel").startswith("Cancelling")
        *_, status = job.result(timeout=120)
    finally:
        hook.remove()
    assert "cancelled" in status
    assert client.predict(api_name="/cancel") == "Nothing is running in this session."


@pytest.mark.parametrize("call,message", [
    (dict(targets=""), "no target concept given"),
    (dict(targets="Snoopy, Mickey, Elmo", anchors="cat, dog"), "got 2 anchors for 3 targets"),
    (dict(method="uce", uce_lamb=-1.0), "'lamb' must be >= 0.0"),
    (dict(method="uce", uce_erase_scale=None), "'erase_scale' must be a number, got None"),  # a cleared field
    (dict(method="speed", speed_threshold=-0.5), "'threshold' must be >= 0.0"),
])
def test_bad_erase_input_is_refused_with_a_specific_message(pipe, client, untouched, call, message):
    with pytest.raises(AppError, match=re.escape(message)):
        erase(client, **({"targets": "Snoopy"} | call))


def test_nan_parameter_is_refused_by_the_erase_handler(pipe, server, untouched):
    # JSON clients cannot send NaN, but a Python caller of the handler can.
    with pytest.raises(gr.Error, match="'erase_scale' must be a finite number"):
        server[0].erase("Snoopy", "", "", "uce", [], uce_erase_scale=float("nan"))


def test_generation_caps_and_bad_seeds_are_refused_with_a_specific_message(pipe, client, untouched):
    compared, _, _ = erase(client, "Snoopy")
    with pytest.raises(AppError, match="5 prompts x 2 seeds = 10 images per column exceed this app's cap of 8"):
        generate(client, "a\nb\nc", "d\ne", compared, seeds="0, 1")
    with pytest.raises(AppError, match="seed 'x' is not a whole number"):
        generate(client, "a", "", compared, seeds="0, x")
    with pytest.raises(AppError, match="no comparison prompt given"):
        generate(client, "", "  ", compared)
    with pytest.raises(AppError, match=r"'#9 UCE: Elmo' .* is not in the list of choices: \['#1 UCE: Snoopy'\]"):
        generate(client, "a", "", ["#9 UCE: Elmo"])


def test_unknown_preset_is_refused_and_a_known_one_fills_concepts_and_parameters(client):
    with pytest.raises(AppError, match=r"unknown preset 'snoopy-only'; choose from \["):
        client.predict("snoopy-only", api_name="/load_preset")
    targets, anchors, retain, kind, *params = client.predict("style", api_name="/load_preset")
    preset = erasure.load_preset("style")
    assert (targets, anchors, kind) == ("Van Gogh", "art", "style")
    assert retain.splitlines() == list(preset.retain)
    speed_params = dict(zip([p for m, p, _ in app.PARAM_KEYS if m == "speed"],
                            [v for (m, _, _), v in zip(app.PARAM_KEYS, params) if m == "speed"]))
    assert speed_params.items() >= preset.method_params("speed").items()
    erase_prompts, keep_prompts = client.predict("style", targets, "Monet", api_name="/suggest_prompts")
    assert erase_prompts.splitlines()[0] == "a painting in the style of Van Gogh"
    assert keep_prompts.splitlines()[0] == "a painting in the style of Monet"


def test_uploaded_edit_joins_the_session_and_bad_uploads_are_refused(pipe, server, client, tmp_path, untouched):
    _, _, edit_file = erase(client, "Snoopy", method="speed")
    fresh = Client(client.src, verbose=False)
    compared, report, _ = fresh.predict(handle_file(edit_file), api_name="/upload_edit")
    assert compared["value"] == ["#1 SPEED: Snoopy"] and "Loaded" in report
    held = len(server[0].edits)
    assert fresh.predict(api_name="/clear_edits")[0]["choices"] == []
    assert len(server[0].edits) == held - 1  # forgetting frees the server-side tensors

    pickle_file = tmp_path / "edit.pt"
    pickle_file.write_bytes(b"not a pickle")
    with pytest.raises(AppError, match=re.escape("Invalid file type. Please upload a file that is one of these "
                                                 "formats: ['.safetensors']")):
        fresh.predict(handle_file(str(pickle_file)), api_name="/upload_edit")
    plain = tmp_path / "weights.safetensors"
    save_file({"unet.conv.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(AppError, match="is a safetensors file but not an Erasure Studio edit"):
        fresh.predict(handle_file(str(plain)), api_name="/upload_edit")
    foreign = erasure.Edit.load(edit_file)
    foreign.fingerprint = "0" * 64  # as if made from other base weights
    with pytest.raises(AppError, match="made for another base model"):
        fresh.predict(handle_file(str(foreign.save(tmp_path / "foreign.safetensors"))), api_name="/upload_edit")


def test_a_session_that_disconnects_stops_its_generation_and_frees_its_edits_at_once(pipe, server, monkeypatch,
                                                                                      untouched):
    import httpx

    studio, url = server
    client = Client(url, verbose=False)
    compared, _, _ = erase(client, "Snoopy")
    assert client.session_hash in studio.edits.owners()
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # how soon the server notices a closed connection
    calls, hook = count_unet_calls(pipe)
    try:
        with httpx.stream("GET", f"{url.rstrip('/')}/gradio_api/heartbeat/{client.session_hash}", timeout=10) as beat:
            next(beat.iter_lines())  # the session is alive, as a browser tab's would be
            client.submit("a\nb\nc\nd", "e\nf\ng\nh", "0", 50, SETTINGS.guidance, SETTINGS.height,
                          SETTINGS.scheduler, compared, "object", "Snoopy", api_name="/generate")
            wait_until(lambda: len(calls) >= 2, timeout=60)
        # the tab closed mid-generation
        wait_until(lambda: client.session_hash not in studio.edits.owners(), timeout=20)
        with erasure.applied(pipe, None):  # the lock comes free: the generation stopped
            settled = len(calls)
        time.sleep(1.0)
    finally:
        hook.remove()
    assert client.session_hash not in studio.edits.owners()  # not an hour later, as Gradio's state would
    assert len(calls) == settled and settled < 8 * 51  # far short of the 8 images x 51 passes of a full run


def test_a_clients_job_cancel_stops_the_server_at_the_next_step_and_frees_the_lock(pipe, client, untouched):
    compared, _, _ = erase(client, "Snoopy")
    calls, hook = count_unet_calls(pipe)
    try:
        job = client.submit("a\nb\nc\nd", "e\nf\ng\nh", "0", 50, SETTINGS.guidance, SETTINGS.height,
                            SETTINGS.scheduler, compared, "object", "Snoopy", api_name="/generate")
        wait_until(lambda: len(calls) >= 2, timeout=60)
        job.cancel()
        cancelled = time.monotonic()
        with erasure.applied(pipe, None):  # the engine's lock: held by the generation until it stops
            waited = time.monotonic() - cancelled
        settled = len(calls)
        time.sleep(1.0)
    finally:
        hook.remove()
    assert len(calls) == settled  # nothing runs on in the background
    assert settled < 8 * 51 and waited < 5  # far short of the 8 images x 51 UNet passes a full run takes


def test_cancel_takes_a_waiting_generation_off_the_queue(pipe, untouched):
    # One queue lane, as deployed: a second session's generation waits behind the first.
    studio = app.Studio(pipe, load_clip_scorer("tiny"), Limits(max_images=8))
    demo = app.build_demo(studio, gpu_concurrency=1)
    _, url, _ = app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None)
    try:
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        compared, _, _ = erase(first, "Snoopy")
        calls, hook = count_unet_calls(pipe)
        try:
            running = first.submit("a\nb\nc\nd", "e\nf\ng\nh", "0", 20, SETTINGS.guidance, SETTINGS.height,
                                   SETTINGS.scheduler, compared, "object", "Snoopy", api_name="/generate")
            wait_until(lambda: calls, timeout=60)
            waiting = second.submit("a photo of a cat", "", "0", 20, SETTINGS.guidance, SETTINGS.height,
                                    SETTINGS.scheduler, [], "object", "cat", api_name="/generate")
            time.sleep(0.5)  # let it join the queue
            assert second.predict(api_name="/cancel").startswith("Removed 1 waiting generation")
            with pytest.raises(AppError, match="cancelled before it started"):
                waiting.result(timeout=120)
            running.result(timeout=300)
        finally:
            hook.remove()
        # only the first session's work ran: 2 batches x (original + edited) x 21 PNDM passes; the second
        # session's original would have been a fifth batch
        assert len(calls) == 4 * 21
    finally:
        demo.close()


# -- the issue "What a researcher hits in the first hour" (UI) ------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(steps=0), "steps must be between 1 and 1000, got 0"),  # the library's check, reached (a slider clamped)
    (dict(steps=10_000), "10000 steps exceed this app's cap of 50"),  # the app's cap, named
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),  # refused, not rounded
    (dict(steps=None), "steps is empty; enter a whole number"),  # a cleared field
    (dict(size=100), "height and width must be multiples of 8 (>= 8), got 100x100"),
    (dict(size=10_000), "10000x10000 px exceeds this app's cap of 768 px per side"),
    (dict(guidance=-1), "guidance must be a number >= 0, got -1.0"),
])
def test_out_of_range_settings_are_refused_with_their_range_not_clamped(client, settings, message):
    values = {"steps": SETTINGS.steps, "guidance": SETTINGS.guidance, "size": SETTINGS.height} | settings
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict("a photo of Snoopy", "", "0", values["steps"], values["guidance"], values["size"],
                       SETTINGS.scheduler, [], "object", "Snoopy", api_name="/generate")


def test_user_errors_print_no_traceback_but_bugs_still_do(pipe, client, capfd, untouched):
    capfd.readouterr()
    with pytest.raises(AppError, match="seed 'x' is not a whole number"):
        generate(client, "a", "", [], seeds="0, x", targets="Snoopy")
    with pytest.raises(AppError, match="no target concept given"):
        erase(client, "")
    assert "Traceback" not in capfd.readouterr().err  # a user's mistake is not a server problem

    def bug(module, args):
        raise RuntimeError("injected bug")

    hook = pipe.unet.register_forward_pre_hook(bug)
    try:
        with pytest.raises(AppError):
            generate(client, "a photo of a bug", "", [], targets="Snoopy")
    finally:
        hook.remove()
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: injected bug" in err  # a real bug keeps its traceback


def test_layer_table_names_each_module_shortly_and_fits_its_numbers(client):
    _, _, layers, *_ = client.predict("Snoopy", "", "Mickey", "uce", api_name="/erase")
    assert layers["headers"] == ["layer", "relative change", "target residual", "retain drift"]
    names = [row[0] for row in layers["data"]]
    # UCE edits keys and values: the two rows of one attention layer must be told apart at a glance.
    assert names == ["down 1.0 · attn2.to_k", "down 1.0 · attn2.to_v", "up 0.0 · attn2.to_k", "up 0.0 · attn2.to_v",
                     "up 0.1 · attn2.to_k", "up 0.1 · attn2.to_v", "mid 0 · attn2.to_k", "mid 0 · attn2.to_v"]
    numbers = [value for row in layers["data"] for value in row[1:]]
    assert all(isinstance(v, float) and 0 < v < 1 and len(f"{v:g}") <= 7 for v in numbers), numbers  # 3 digits


def test_empty_tables_show_their_column_names_and_cancel_starts_greyed_out(server):
    demo = app.build_demo(server[0])
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert by_id["summary"].value["headers"] == ["prompts", "column", "n", "CLIP to prompt", "95% CI",
                                                 "Δ vs original", "CLIP to target"]  # were "1 2 3"
    assert by_id["layers"].value["headers"] == ["layer", "relative change", "target residual", "retain drift"]
    assert by_id["cancel"].variant == "secondary" and by_id["cancel"].interactive is False
    assert by_id["generate"].variant == "primary"
    assert not any(isinstance(block, gr.Slider) for block in demo.blocks.values())  # sliders clamp typed values


def test_summary_plot_labels_are_short_and_its_axis_ends_on_a_round_number(client):
    compared, _, _ = erase(client, "Snoopy")
    *_, plot, _, _ = generate(client, "a photo of Snoopy", "a photo of Mickey", compared, targets="Snoopy")
    labels = [row[0] for row in plot["value"]["data"]]
    assert labels == ["erase: original", "erase: #1", "keep: original", "keep: #1"]  # level, no cut-off
    assert [row[1] for row in plot["value"]["data"]] == ["original", "#1 UCE: Snoopy"] * 2  # the legend: in full
    top = plot["y_lim"][1]
    assert plot["y_lim"][0] == 0 and top >= max(row[2] for row in plot["value"]["data"])
    assert top == axis_end(top) and axis_end(9.02) == 10 and axis_end(33.1) == 40


def test_an_edit_file_is_written_once_where_gradio_serves_it(server, client):
    studio, _ = server
    concept = f"Zebra-{time.time_ns()}"  # a name no earlier run left in the shared cache folder
    _, _, edit_file = erase(client, concept, method="speed")
    staged = list(studio.files.glob(f"speed-{concept}-*.safetensors"))
    assert len(staged) == 1 and Path(edit_file).read_bytes() == staged[0].read_bytes()
    # Gradio serves a file already in its cache folder in place instead of copying it there. (The client,
    # on this same machine, downloads into that folder too.)
    copies = [p for p in Path(get_upload_folder()).rglob(f"speed-{concept}-*.safetensors")
              if p not in (staged[0], Path(edit_file))]
    assert copies == []


ESD_FAST = {"esd-x_iterations": 6, "esd-x_trajectories": 2, "esd-x_sample_steps": 3, "esd-x_train_size": 32}


def poll_until_finished(client, timeout=180):
    """/poll_job until the job has finished: (compared update, report, job status line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        compared, report, _, _, status, _ = client.predict(api_name="/poll_job")
        if isinstance(status, str) and status and not re.search(r"step \d+ of|starting|waiting", status):
            return compared, report, status
        time.sleep(0.3)
    raise AssertionError("the training job did not finish")


def test_a_training_job_runs_in_the_background_and_its_edit_joins_the_session(client, untouched):
    compared, _, _ = erase(client, "Snoopy", method="speed")
    _, report, _, _, status, _ = client.predict("cat", "", "", "esd-x", **ESD_FAST, api_name="/erase")
    assert "Training **ESD-X: cat** in the background" in report and "starting" in status
    updated, report, status = poll_until_finished(client)
    assert re.fullmatch(r"\*\*ESD-X: cat\*\*: done in \d+ s \(final loss [-+.e\d]+\)\.", status), status
    assert updated["value"] == [*compared, "#2 ESD-X: cat"] and "esd-x" in report.lower()


def test_a_cancelled_training_job_leaves_no_edit(client, untouched):
    compared, _, _ = erase(client, "Snoopy", method="speed")
    with pytest.raises(AppError, match="5000 training iterations exceed this app's cap of 1000"):
        client.predict("cat", "", "", "esd-x", **{**ESD_FAST, "esd-x_iterations": 5000}, api_name="/erase")
    client.predict("cat", "", "", "esd-x", **{**ESD_FAST, "esd-x_iterations": 1000}, api_name="/erase")
    deadline = time.monotonic() + 120
    while "step" not in client.predict(api_name="/poll_job")[4] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.predict(api_name="/cancel_training").startswith("Cancelling the training job")
    updated, _, status = poll_until_finished(client)
    assert status == "**ESD-X: cat**: cancelled; nothing was kept." and updated == {"__type__": "update"}  # skipped
    assert client.predict(api_name="/cancel_training") == "No training job is running in this session."
    assert len([e for e in erase(client, "Mickey", method="speed")[0]]) == len(compared) + 1


def test_a_session_runs_one_training_job_at_a_time(client, untouched):
    client.predict("cat", "", "", "esd-x", **{**ESD_FAST, "esd-x_iterations": 1000}, api_name="/erase")
    with pytest.raises(AppError, match="still training ESD-X: cat"):
        client.predict("dog", "", "", "esd-x", **ESD_FAST, api_name="/erase")
    assert client.predict(api_name="/cancel_training").startswith("Cancelling the training job")
    assert poll_until_finished(client)[2] == "**ESD-X: cat**: cancelled; nothing was kept."


# -- the Probe tab (issue 11) ------------------------------------------------------------------------------------

CHEAP_PROBES = ["standard", "noise"]  # 1 + 6 images per prompt and seed; completion's k = 5 needs 5+ steps


def probe_edits(client) -> list[str]:
    """/probe_edit_choices: the session's edits as the Probe tab lists them (the page calls it on every change)."""
    return [value for _, value in client.predict([], api_name="/probe_edit_choices")["choices"]]


def poll_probes_until_finished(client, timeout=180):
    """/poll_probes until the run has finished: (status, table, sheets, note, file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, table, sheets, note, probe_file = client.predict(api_name="/poll_probes")
        if isinstance(status, str) and re.search(r"done in|cancelled|failed", status):
            return status, table, sheets, note, probe_file
        time.sleep(0.3)
    raise AssertionError("the probe run did not finish")


def test_probes_run_in_the_background_with_a_row_per_edit_and_a_column_per_probe(client, untouched):
    erase(client, "Snoopy", method="uce")
    erase(client, "Garfield", method="speed")
    edits = probe_edits(client)
    assert edits == ["#1 UCE: Snoopy", "#2 SPEED: Garfield"]
    suggested = client.predict(edits, "object", api_name="/suggest_probe_prompts")
    assert suggested.splitlines() == ["a photo of Snoopy", "a picture of Snoopy"]  # the first picked edit's target

    status, _ = client.predict(edits, CHEAP_PROBES, "", "0", "object", api_name="/start_probes")  # "" = suggested
    assert "starting" in status
    status, table, sheets, note, probe_file = poll_probes_until_finished(client)
    assert re.fullmatch(r"\*\*Probes\*\*: done in \d+ s \(2 edit\(s\) × 2 probe\(s\)\)\.", status), status

    assert table["column_widths"] == ["12%", "44.00%", "44.00%"]  # probe columns share the width
    table = table["value"]
    assert table["headers"] == ["edit", "standard prompt", "noise-based"]
    assert [row[0] for row in table["data"]] == edits
    # 2 prompts x 1 seed: 2 standard images, 12 noise-based ones (N = 6 per prompt and seed)
    assert all(re.fullmatch(r"\d+% of 2", row[1]) and re.fullmatch(r"\d+% \(best of 6: \d+%\) of 12", row[2])
               for row in table["data"]), table["data"]
    # A sheet per edit and probe; noise-based has a column per (η, v) variant.
    assert [item["caption"] for item in gallery_items(sheets)] == [f"{label} · {probe}" for label in edits
                                                                  for probe in ("standard", "noise-based")]
    standard, noise = (Image.open(item["image"]).size[0] for item in gallery_items(sheets)[:2])
    assert noise - standard == 5 * 128  # 6 variant columns of 128 px instead of 1
    assert "**Judge**: CLIP tiny" in note and "N = 6" in note and "2 prompt(s) × 1 seed(s) (0); 3 steps" in note
    assert note.startswith("**Protocol**: quick (for a CPU")  # a CPU server starts the tab on the quick protocol

    record = json.loads(Path(probe_file).read_text("utf-8"))
    assert record["model"] == "tiny" and record["settings"]["steps"] == 3
    assert [e["label"] for e in record["edits"]] == edits and [e["method"] for e in record["edits"]] == ["uce", "speed"]
    first = record["edits"][0]
    assert first["prompts"] == suggested.splitlines() and first["seeds"] == [0]
    assert f"{first['probes']['standard']['recovery_rate']:.0%} of 2" == table["data"][0][1]


def test_a_session_runs_one_job_at_a_time_probes_or_training_and_cancelled_probes_keep_nothing(
        pipe, server, client, untouched):
    erase(client, "Snoopy")
    edits = probe_edits(client)
    started, release = threading.Event(), threading.Event()

    def hold(module, args):  # the probe run waits inside its first UNet pass until the checks below are done
        started.set()
        release.wait(timeout=60)

    hook = pipe.unet.register_forward_pre_hook(hold)
    try:
        client.predict(edits, CHEAP_PROBES, "a photo of Snoopy", "0", "object", api_name="/start_probes")
        assert started.wait(timeout=60)
        with pytest.raises(AppError, match=re.escape("this session is still running probes of #1 UCE: Snoopy")):
            client.predict(edits, CHEAP_PROBES, "a photo of Snoopy", "0", "object", api_name="/start_probes")
        with pytest.raises(AppError, match="still running probes of #1 UCE: Snoopy"):  # training shares the job
            client.predict("cat", "", "", "esd-x", **ESD_FAST, api_name="/erase")
        # Each tab's poll and Cancel touch only their own kind of job.
        assert client.predict(api_name="/cancel_training") == "No training job is running in this session."
        assert client.predict(api_name="/poll_job")[4] == {"__type__": "update"}  # skipped: not training
        assert client.predict(api_name="/cancel_probes").startswith("Cancelling the probes")
    finally:
        release.set()
        hook.remove()
    status, table, sheets, note, probe_file = poll_probes_until_finished(client)
    assert status == "**Probes**: cancelled; nothing was kept."
    assert [table, sheets, note, probe_file] == [{"__type__": "update"}] * 4  # the last results stay as they were
    assert server[0].jobs.get(client.session_hash) is None
    assert client.predict(api_name="/cancel_probes") == "No probe run is in progress in this session."

    client.predict("cat", "", "", "esd-x", **{**ESD_FAST, "esd-x_iterations": 1000}, api_name="/erase")
    with pytest.raises(AppError, match="this session is still training ESD-X: cat"):
        client.predict(edits, CHEAP_PROBES, "a photo of Snoopy", "0", "object", api_name="/start_probes")
    assert client.predict(api_name="/cancel_probes") == "No probe run is in progress in this session."
    assert client.predict(api_name="/cancel_training").startswith("Cancelling the training job")
    assert poll_until_finished(client)[2] == "**ESD-X: cat**: cancelled; nothing was kept."


def test_bad_probe_requests_are_refused_with_a_specific_message_and_start_nothing(server, client):
    with pytest.raises(AppError, match="this session has no edits yet: erase a concept on the first tab"):
        client.predict([], CHEAP_PROBES, "", "0", "object", api_name="/start_probes")
    erase(client, "Snoopy")
    edits = probe_edits(client)
    for picked, names, prompts, seeds, message in [
        ([], CHEAP_PROBES, "", "0", "no edit picked: tick one or more of this session's edits to probe"),
        (edits, [], "", "0", "no probe picked: tick one or more probes"),
        (edits, CHEAP_PROBES, "", "0, x", "seed 'x' is not a whole number"),
        (edits, CHEAP_PROBES, "", "", "no seed given"),
        (edits, CHEAP_PROBES, "a", "0 1 2 3 4 5 6 7 8", "9 probe seeds exceed this app's cap of 8"),
        (edits, CHEAP_PROBES, "\n".join("abcdefghi"), "0", "9 probe prompts exceed this app's cap of 8"),
        (edits, CHEAP_PROBES, "a\nb\nc", "0 1 2", "3 prompts x 3 seeds = 9 images per probe variant exceed this "
                                                  "app's cap of 8"),
    ]:
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(picked, names, prompts, seeds, "object", api_name="/start_probes")
        assert server[0].jobs.get(client.session_hash) is None, message
    with pytest.raises(AppError, match=r"'mind-reading' .* is not in the list of choices"):
        client.predict(edits, ["mind-reading"], "", "0", "object", api_name="/start_probes")


def test_the_probe_table_names_every_probe_before_any_run(server):
    demo = app.build_demo(server[0])
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    titles = [PROBE_TITLES[name] for name in PROBES]
    assert by_id["probe-table"].value["headers"] == ["edit", *titles]
    tables = [block for block in demo.blocks.values() if isinstance(block, gr.Dataframe)]
    assert [table.elem_id for table in tables] == ["layers", "summary", "probe-table"]  # no stray copy on the page
    assert [value for _, value in by_id["probe-names"].choices] == list(PROBES)
    assert by_id["probe-names"].value == list(PROBES)  # all ticked
    assert by_id["cancel-probes"].interactive is False


def test_a_probe_run_waits_while_another_session_trains(server, client, untouched):
    # Searches and inversions copy the denoiser as training does: one such copy server-wide.
    trainer = Client(server[1], verbose=False)
    trainer.predict("cat", "", "", "esd-x", **{**ESD_FAST, "esd-x_iterations": 1000}, api_name="/erase")
    erase(client, "Snoopy")
    client.predict(probe_edits(client), ["standard"], "a photo of Snoopy", "0", "object", api_name="/start_probes")
    time.sleep(1.0)
    assert "waiting for another session's background job" in client.predict(api_name="/poll_probes")[0]
    assert trainer.predict(api_name="/cancel_training").startswith("Cancelling the training job")
    assert poll_until_finished(trainer)[2] == "**ESD-X: cat**: cancelled; nothing was kept."
    assert "done in" in poll_probes_until_finished(client)[0]


def test_choosing_a_method_shows_exactly_its_parameter_group(server):
    """The visibility updates follow the page's groups (sorted by name), not the registry's order: with esd-u
    registered after esd-x the two orders differ, and choosing ESD-x showed another method's fields."""
    studio, _ = server
    for method in erasure.METHODS:
        _, *updates = studio.describe_method(method)
        assert [name for name, update in zip(sorted(erasure.METHODS), updates) if update["visible"]] == [method]
