"""The toy world's training script in its --quick mode (about a minute on 2 CPU cores): every stage's loss
falls, and what it writes loads through the same paths as the shipped weights."""

import json

import torch

from erasure.worlds.toy import load_judge, toy_pipeline
from erasure.worlds.toy.train import main


def test_quick_training_lowers_every_loss_and_writes_loadable_weights(tmp_path):
    main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    card = json.loads((tmp_path / "toy.json").read_text())
    assert set(card["stages"]) == {"vae", "unet", "judge", "clip"}
    for stage, record in card["stages"].items():
        assert record["last_loss"] < record["first_loss"], (stage, record)
    total = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert total <= 25 * 2**20  # what is committed must fit the budget

    pipe = toy_pipeline(tmp_path)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert len(load_judge(tmp_path)([image]).main("shape")) == 1
