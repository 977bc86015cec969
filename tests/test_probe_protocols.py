"""Probe protocols: the paper's settings ("When Are Concepts Erased?", its code's defaults) and the quick ones, and
a probe run shared out over two accelerate processes giving the one-process report."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import erasure
from erasure.evaluation.generate import Settings
from erasure.evaluation.probes import PROBES, Judge, run_probes
from erasure.evaluation.probes.protocols import PROTOCOLS, get_protocol
from erasure.evaluation.scoring import load_clip_scorer

ROOT = Path(__file__).resolve().parent.parent
RUN = Settings(steps=3, guidance=7.5, height=64, width=64, scheduler="pndm")


def test_the_paper_protocol_has_the_papers_settings():
    paper = PROTOCOLS["paper"]
    for name in PROBES:
        settings = paper.settings_for(name, RUN)
        assert settings.steps == 50 and settings.guidance == RUN.guidance and settings.width == RUN.width
        # DDIM where the paper's code samples with DDIM; the model's own sampler for the others
        assert settings.scheduler == ("ddim" if name in ("completion", "noise", "guidance") else "pndm"), name
    assert paper.options_for("completion") == {"ks": (1, 2, 3, 5)}  # the paper's 1, 2, 3 base steps, and 5
    noise = paper.options_for("noise")
    assert noise["etas"] == (1.0, 1.17, 1.34, 1.51, 1.68, 1.85) and noise["multipliers"] == (1.0, 1.02, 1.03, 1.04)
    scales = paper.options_for("guidance")["scales"]
    assert len(scales) == 25 and scales[0] == 25 and scales[-1] == 193 and all(25 <= s <= 193 for s in scales)


def test_the_quick_protocol_keeps_the_runs_steps_and_sampler():
    quick = get_protocol("quick")
    assert all(quick.settings_for(name, RUN) == RUN for name in PROBES)
    assert quick.options_for("noise") == {"etas": (1.0, 1.34, 1.68), "multipliers": (1.0, 1.03)}
    with pytest.raises(ValueError, match="unknown probe protocol 'fast'; choose from paper, quick"):
        get_protocol("fast")


def test_under_the_paper_protocol_the_noise_probe_renders_its_24_variants_at_50_steps(pipe, untouched):
    edit = erasure.erase(pipe, "uce", ["cat"], [""], ["dog"])
    judge = Judge(pipe, edit, "object", scorer=load_clip_scorer("tiny"))
    report, rendered = run_probes(pipe, edit, ["noise"], ["a photo of a cat"], [0], RUN, judge)  # paper by default
    noise = report["probes"]["noise"]
    assert report["protocol"] == "paper" and report["steps"] == 50
    assert noise["N"] == 24 and noise["images"] == 24 and noise["settings"]["steps"] == 50
    assert len(set(rendered[0].variants)) == 24


def probe_command(out: Path, edit: Path) -> list[str]:
    return ["-m", "erasure", "probe", "--model", "tiny", "--device", "cpu", "--edit", str(edit), "--protocol",
            "quick", "--probes", "standard", "completion", "noise", "adversarial", "interference", "diagnostic",
            "--prompt", "a photo of a cat", "a photo of a kitten", "--seeds", "0", "1", "2", "--steps", "3",
            "--out", str(out)]


@pytest.mark.slow
def test_two_accelerate_processes_write_the_single_process_probe_report(tmp_path):
    edit = tmp_path / "uce.safetensors"
    erasure.erase(erasure.load_pipeline("tiny", device="cpu"), "uce", ["cat"], [""], ["dog"]).save(edit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run([sys.executable, *probe_command(tmp_path / "single", edit)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(port)]
    sharded = subprocess.run([*launch, *probe_command(tmp_path / "sharded", edit)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "probes.json").read_text())
    two = json.loads((tmp_path / "sharded" / "probes.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert {k: v for k, v in one.items() if k != "processes"} == {k: v for k, v in two.items() if k != "processes"}
    assert one["probes"]["noise"]["images"] == 2 * 3 * 6 and "baseline_rate" in one["probes"]["adversarial"]
    assert (tmp_path / "sharded" / "probes.png").is_file() and not (tmp_path / "sharded" / ".shards").exists()
    assert "protocol: quick" in sharded.stdout
