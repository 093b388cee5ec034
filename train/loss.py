"""DAAD losses.

Generator:      L = lambda_rec * ||x - x_hat||_2^2 + lambda_adv * BCE(D(x_hat), real) + lambda_ali * ||f_D(x) - f_D(x_hat)||_2^2
Discriminator:  L_D = BCE(D(x), real) + BCE(D(x_hat), fake)
(mean squared errors over elements; BCE on logits, i.e. the standard GAN loss log D(x) + log(1 - D(G(x))).)
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import LossWeights
from .model import Discriminator


def generator_loss(x: torch.Tensor, recon: torch.Tensor, disc: Optional[Discriminator],
                   weights: LossWeights) -> Tuple[torch.Tensor, Dict[str, float]]:
    rec = F.mse_loss(recon, x)
    if disc is None:
        return weights.rec * rec, {"rec": float(rec.detach())}
    logit_fake, f_fake = disc(recon)
    with torch.no_grad():
        _, f_real = disc(x)
    adv = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
    ali = F.mse_loss(f_fake, f_real)
    total = weights.rec * rec + weights.adv * adv + weights.ali * ali
    return total, {"rec": float(rec.detach()), "adv": float(adv.detach()), "ali": float(ali.detach())}


def discriminator_loss(x: torch.Tensor, recon: torch.Tensor, disc: Discriminator) -> Tuple[torch.Tensor, Dict[str, float]]:
    logit_real, _ = disc(x)
    logit_fake, _ = disc(recon.detach())
    loss = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
    return loss, {"disc": float(loss.detach())}
