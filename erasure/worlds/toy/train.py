"""Train the toy world's networks: `python -m erasure.worlds.toy.train [--out DIR] [--quick]`.

Stages, in order (each reads what the previous ones wrote to --out):
  vae    a small AutoencoderKL on rendered scenes (32×32 RGB -> 16×16×4 latents)
  unet   the text-conditioned UNet on cached latents and cached embeddings of a frozen random CLIP text
         encoder, ε-prediction on SD-1's noise schedule with offset noise, 10% caption dropout for
         classifier-free guidance, EMA weights
  judge  a CNN naming shapes, colours, styles and background, trained on rendered ground truth
  clip   an open_clip CLIP trained contrastively on the world's captions
Seeded throughout. `--quick` trains every stage for a few steps (the test of the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasure.worlds.tiny import clip_tokenizer
from erasure.worlds.toy import models, world

DEFAULTS = dict(scenes=24000, vae_steps=800, unet_steps=4000, judge_steps=1500, clip_steps=1000)
QUICK = dict(scenes=512, vae_steps=20, unet_steps=40, judge_steps=20, clip_steps=20)
CAPTION_DROPOUT = 0.1
# Offset noise (a per-image, per-channel constant added to ε while training): without it, the colour of an
# image follows the mean of its initial noise, which SD-1's schedule never fully removes, and "a red
# circle" came out purple for some seeds (colour judged right in 82% of images; shapes in 100%).
OFFSET_NOISE = 0.1


def log(stage: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {message}", flush=True)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, h, w, 3] -> float [n, 3, h, w] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def dataset(count: int, seed: int):
    scenes = world.scenes(count, seed)
    return scenes, world.render_batch(scenes)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimiser, step: int, steps: int, peak: float, warmup: int) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr_at(step, steps, peak, warmup=min(warmup, steps // 4 + 1))


def optimise(stage: str, optimiser, loss, step: int, steps: int, losses: list, clip_parameters=None,
             log_every: int = 100, digits: int = 4) -> None:
    """One optimiser step on `loss` (gradient norm clipped to 1 over `clip_parameters` if given); the loss is
    recorded and its running mean logged every `log_every` steps."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if clip_parameters is not None:
        torch.nn.utils.clip_grad_norm_(clip_parameters, 1.0)
    optimiser.step()
    losses.append(loss.item())
    if step % log_every == 0 or step == steps - 1:
        log(stage, f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.{digits}f}")


def train_vae(images: torch.Tensor, steps: int, device: str, generator: torch.Generator) -> tuple[object, list]:
    vae = models.build_vae().to(device).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        set_lr(optimiser, step, steps, 1e-3, warmup=50)
        batch = images[torch.randint(len(images), (32,), generator=generator)].to(device)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimise("vae", optimiser, loss, step, steps, losses, digits=5)
    return vae.eval(), losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: str) -> torch.Tensor:
    out = [vae.encode(images[i:i + 256].to(device)).latent_dist.mean.cpu() for i in range(0, len(images), 256)]
    return torch.cat(out)


@torch.no_grad()
def encode_captions(captions: list[str], device: str) -> tuple[torch.Tensor, dict[str, int]]:
    tokenizer, encoder = clip_tokenizer(), models.build_text_encoder().to(device)
    unique = sorted(set(captions) | {""})
    rows = []
    for i in range(0, len(unique), 256):
        ids = tokenizer(unique[i:i + 256], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        rows.append(encoder(ids)[0].cpu())
    return torch.cat(rows), {c: i for i, c in enumerate(unique)}


def train_unet(latents: torch.Tensor, caption_ids: torch.Tensor, embeddings: torch.Tensor, empty: int, steps: int,
               device: str, generator: torch.Generator, log_every: int = 100, checkpoint=None, start=None):
    scheduler = models.build_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    unet = models.build_unet()
    if start is not None:
        models.load_weights(unet, start)
    unet = unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    embeddings, latents = embeddings.to(device), latents.to(device)
    losses = []
    for step in range(steps):
        set_lr(optimiser, step, steps, 5e-4, warmup=200)
        index = torch.randint(len(latents), (64,), generator=generator)
        x0 = latents[index.to(device)]
        conditions = caption_ids[index]
        dropped = torch.rand(64, generator=generator) < CAPTION_DROPOUT
        conditions = torch.where(dropped, torch.full_like(conditions, empty), conditions)
        noise = (torch.randn(x0.shape, generator=generator)
                 + OFFSET_NOISE * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=generator)).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (64,), generator=generator).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, embeddings[conditions.to(device)]).sample
        loss = F.mse_loss(prediction, noise)
        optimise("unet", optimiser, loss, step, steps, losses, clip_parameters=unet.parameters(),
                 log_every=log_every)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if checkpoint and (step + 1) % 500 == 0:
            checkpoint(ema, losses)
    return ema, losses


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a generated image may look like beside a rendered one: a little blur and noise."""
    n = len(images)
    blur = torch.rand(n, 1, 1, 1, generator=generator) * 0.6
    soft = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = images * (1 - blur) + soft * blur
    return images + torch.randn(images.shape, generator=generator) * 0.08 * torch.rand(n, 1, 1, 1, generator=generator)


def judge_targets(batch: list[world.Scene]) -> dict[str, torch.Tensor]:
    targets = {}
    for head, labels in models.JUDGE_HEADS.items():
        if head == "background":
            targets[head] = torch.tensor([labels.index(s.background) for s in batch])
            continue
        present = torch.zeros(len(batch), len(labels))
        for i, scene in enumerate(batch):
            for thing in scene.things:
                present[i, labels.index(getattr(thing, head))] = 1
        targets[head] = present
    return targets


def train_judge(scenes, images: torch.Tensor, steps: int, device: str, generator: torch.Generator):
    judge = models.Judge().to(device).train()
    optimiser = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    targets = judge_targets(scenes)
    losses = []
    for step in range(steps):
        set_lr(optimiser, step, steps, 2e-3, warmup=50)
        index = torch.randint(len(images), (128,), generator=generator)
        logits = judge(augment(images[index], generator).to(device))
        loss = sum(F.cross_entropy(logits[h], targets[h][index].to(device)) if h == "background" else
                   F.binary_cross_entropy_with_logits(logits[h], targets[h][index].to(device)) for h in logits)
        optimise("judge", optimiser, loss, step, steps, losses)
    return judge.eval(), losses


def train_clip(captions: list[str], images: torch.Tensor, steps: int, device: str, generator: torch.Generator):
    import open_clip

    model = models.build_clip().to(device).train()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tokens = tokenizer(captions)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = ((images + 1) / 2 - mean) / std  # what open_clip's preprocess gives for a 32×32 image
    # The token table gets no weight decay: rows of words the world never says must stay as seeded.
    table = [model.token_embedding.weight]
    rest = [p for p in model.parameters() if p is not model.token_embedding.weight]
    optimiser = torch.optim.AdamW([{"params": rest, "weight_decay": 0.05}, {"params": table, "weight_decay": 0.0}],
                                  lr=1e-3)
    losses = []
    for step in range(steps):
        set_lr(optimiser, step, steps, 1e-3, warmup=100)
        index = torch.randint(len(images), (128,), generator=generator)
        image = F.normalize(model.encode_image(augment(pixels[index], generator).to(device)), dim=-1)
        text = F.normalize(model.encode_text(tokens[index].to(device)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        # Scenes that share a caption are all positives for it.
        same = torch.tensor([[captions[i] == captions[j] for j in index.tolist()] for i in index.tolist()],
                            dtype=torch.float32, device=device)
        same = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, same) + F.cross_entropy(logits.T, same)) / 2
        optimise("clip", optimiser, loss, step, steps, losses)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return model.eval(), losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure.worlds.toy.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("toy-weights"),
                        help="folder for the weights and toy.json (default: toy-weights; the shipped weights live "
                             "in erasure/worlds/toy/weights)")
    parser.add_argument("--stages", nargs="+", default=["vae", "unet", "judge", "clip"],
                        choices=["vae", "unet", "judge", "clip"], help="stages to run (default: all, in order)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage on a few scenes (for tests)")
    parser.add_argument("--resume", action="store_true",
                        help="unet stage: continue from the UNet in --out instead of from scratch (more steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rendered data and of training (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the number of {name.replace('_', ' ')} (default {value}; --quick: "
                                 f"{QUICK[name]})")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else DEFAULTS)
    sizes.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    train(args.out, args.stages, sizes, args.seed, args.device, args.resume)


def train(out: Path, stages, sizes: dict, seed: int = 0, device: str = "cpu", resume: bool = False) -> dict:
    """Run the stages; returns the card written to out/toy.json (per-stage losses, times, sizes)."""
    out.mkdir(parents=True, exist_ok=True)
    card = models.read_card(out) or {"stages": {}}
    card.update(seed=seed, sizes=sizes)
    torch.manual_seed(seed)
    started = time.time()
    scenes, pixels = dataset(sizes["scenes"], seed)
    images = to_unit(pixels)
    log("data", f"{len(scenes)} scenes rendered in {time.time() - started:.0f} s")

    def record(stage, losses, began, **extra):
        window = max(1, len(losses) // 10)
        card["stages"][stage] = dict(steps=len(losses), seconds=round(time.time() - began, 1),
                                     first_loss=float(np.mean(losses[:window])),
                                     last_loss=float(np.mean(losses[-window:])), device=device, **extra)
        (out / "toy.json").write_text(json.dumps(card, indent=2), "utf-8")

    def generator(stage: str) -> torch.Generator:
        # One generator per stage: a stage draws the same batches whether it runs alone or after others.
        return torch.Generator().manual_seed(seed * 1000 + ["vae", "unet", "judge", "clip"].index(stage))

    if "vae" in stages:
        began = time.time()
        vae, losses = train_vae(images, sizes["vae_steps"], device, generator("vae"))
        latents = encode_latents(vae, images, device)
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        models.save_weights(vae, out / "vae.safetensors")
        record("vae", losses, began, scaling_factor=vae.config.scaling_factor)
    if "unet" in stages:
        began = time.time()
        vae = models.load_weights(models.build_vae(card["stages"]["vae"]["scaling_factor"]), out / "vae.safetensors")
        latents = encode_latents(vae.to(device), images, device) * vae.config.scaling_factor
        captions = [s.caption for s in scenes]
        embeddings, index = encode_captions(captions, device)
        log("unet", f"{len(index)} distinct captions encoded")
        caption_ids = torch.tensor([index[c] for c in captions])
        text_encoder = models.build_text_encoder()
        models.save_weights(text_encoder, out / "text_encoder.safetensors",
                            keep_rows={models.token_table_name(text_encoder): models.world_token_ids()})

        previous = card["stages"].get("unet", {}) if resume else {}
        # A resumed run records the steps before it, so the card says how the shipped UNet was trained.
        earlier = previous.get("steps", 0) + previous.get("steps_before", 0)

        def checkpoint(ema, losses):
            # fp16 on disk (loaded as fp32): the UNet is most of the weights' size budget.
            models.save_weights(ema, out / "unet.safetensors", dtype=torch.float16)
            record("unet", losses, began, steps_before=earlier)

        ema, losses = train_unet(latents, caption_ids, embeddings, index[""], sizes["unet_steps"], device,
                                 generator("unet"), checkpoint=checkpoint,
                                 start=out / "unet.safetensors" if resume else None)
        checkpoint(ema, losses)
    if "judge" in stages:
        began = time.time()
        judge, losses = train_judge(scenes, images, sizes["judge_steps"], device, generator("judge"))
        models.save_weights(judge, out / "judge.safetensors")
        record("judge", losses, began)
    if "clip" in stages:
        began = time.time()
        clip, losses = train_clip([s.caption for s in scenes], images, sizes["clip_steps"], device, generator("clip"))
        models.save_weights(clip, out / "clip.safetensors", keep_rows={"token_embedding.weight": clip_token_ids(clip)})
        record("clip", losses, began)
    log("done", f"{time.time() - started:.0f} s; weights in {out}")
    return card


def clip_token_ids(clip) -> list[int]:
    """The world's words, and any other row training moved (none should; it is checked, not assumed)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = set()
    for word in world.vocabulary():
        ids.update(int(i) for i in tokenizer([word])[0] if i != 0)
    table = clip.token_embedding.weight.detach().cpu()
    seeded = models.seeded_token_table(*table.shape, models.TOKEN_SEED + 1)
    ids.update((table != seeded).any(dim=1).nonzero().flatten().tolist())
    return sorted(ids)


if __name__ == "__main__":
    main()
