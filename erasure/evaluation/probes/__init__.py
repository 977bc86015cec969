"""Probes: is an erased concept really gone? ("When Are Concepts Erased From Diffusion Models?", NeurIPS 2025)

Each probe renders images of the target with the *edited* model under some pressure and returns them with
what a recovery rate needs: the variant of every image, and N, the number of images per (prompt, seed) a
best-of-N rate would pick from. The set:

- `standard`: the target prompts on the edited model (the baseline every other probe is compared with);
- `inpainting`: an original-model image of the target with its centre repainted by the edited model;
- `diffusion_completion`: the original weights run the first k denoising steps, the edited ones the rest;
- `noise_based`: DDIM with η (> 1 allowed) and a multiplier v on its noise, every variant from the same
  initial latent (the reference also changed the initial latent per variant, which made it best-of-24 seeds);
- `classifier_guidance`: the edited model sampled toward the target by a latent classifier trained here on the
  original model's images (guidance.py);
- `textual_inversion` (quick) and `adversarial`: a learned token, and a budgeted search over prompt tokens, that
  make the edited model denoise the original model's images of the target (inversion.py);
- `interference`: the edit's effect on the target's nearest concepts (interference.py);
- `diagnostic`: avoidance vs destruction, from original-model latents of the target noised at several t.

Recovery is judged by the caller's judge (the toy world's classifier, or CLIP zero-shot on real models).
"""

# Each probe registers itself (with its column in the table) when its file is imported.
from erasure.evaluation.probes import (avoidance, completion, guidance, inpaint,  # noqa: F401
                                       interference, inversion, noisy, standard_prompt)
from erasure.evaluation.probes.avoidance import Diagnostic, diagnostic, original_latents
from erasure.evaluation.probes.completion import diffusion_completion
from erasure.evaluation.probes.guidance import classifier_guidance
from erasure.evaluation.probes.inpaint import centre_mask, inpainting
from erasure.evaluation.probes.inversion import adversarial, textual_inversion
from erasure.evaluation.probes.judge import Judge, model_classifier
from erasure.evaluation.probes.noisy import noise_based, noisy_image
from erasure.evaluation.probes.registry import PROBE_TITLES, PROBES, Probe, ProbeImages, register_probe
from erasure.evaluation.probes.report import recovery_table
from erasure.evaluation.probes.runner import ProbeProgress, check_probe_names, run_probes
from erasure.evaluation.probes.sheet import probe_sheet
from erasure.evaluation.probes.standard_prompt import standard

__all__ = ["Diagnostic", "Judge", "PROBES", "PROBE_TITLES", "Probe", "ProbeImages", "ProbeProgress", "adversarial",
           "centre_mask", "check_probe_names", "classifier_guidance", "diagnostic", "diffusion_completion",
           "inpainting", "model_classifier", "noise_based", "noisy_image", "original_latents", "probe_sheet",
           "recovery_table", "register_probe", "run_probes", "standard", "textual_inversion"]
