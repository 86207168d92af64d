"""The whole training objective traces into one torch.compile graph (fullgraph=True, CPU inductor): the
reconstruction and KL terms with the KL warm-up, the learned likelihood scale, the free-bits KL, the
adversarial generator term with latent diffusion's adaptive weight (gradients taken by torch.func), and the
logs; the compiled objective gives the eager loss, logs and gradients."""

import pytest
import torch
from support import TINY

from vae_scale.config import load_config
from vae_scale.train.objective import LastLayer, VAELoss

ADVERSARIAL = [
    "loss.recon=gaussian",
    "loss.kl_warmup_steps=10",
    "loss.free_bits=0.01",
    "loss.disc_weight=0.5",
    "loss.disc_start=1",
    "loss.disc_layers=2",
    "loss.disc_channels=8",
]


class Posterior:
    """What the objective reads of a posterior for free bits: its KL per channel, (B, C)."""

    def __init__(self, kl_channels: torch.Tensor):
        self.kl_channels = kl_channels

    def kl_per_channel(self) -> torch.Tensor:
        return self.kl_channels


@pytest.mark.slow
@pytest.mark.compiles
@pytest.mark.numerics
def test_the_objective_compiles_whole_and_gives_the_eager_loss_logs_and_gradients():
    torch.manual_seed(0)
    criterion = VAELoss(load_config(None, [*TINY, *ADVERSARIAL]).loss)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1)  # the decoder's last layer, whose gradients weigh g_loss
    last = LastLayer(conv)
    h = torch.randn(2, 6, 13, 15)  # odd sizes; the discriminator needs 12 px a side
    x = torch.rand(2, 3, 13, 15) * 2 - 1
    kl_channels = torch.rand(2, 4, requires_grad=True)

    def loss_and_grads(objective, step):
        conv.zero_grad()
        x_hat = conv(h)  # records conv's input for the adaptive weight
        kl = kl_channels.sum(1)
        loss, logs = objective(x, x_hat, Posterior(kl_channels), kl, step, last_layer=last)
        leaves = [conv.weight, conv.bias, criterion.likelihood.logvar, kl_channels]
        return loss.detach(), logs, torch.autograd.grad(loss, leaves)

    step = 3  # adversarial (disc_start=1), KL mid warm-up
    torch._dynamo.reset()
    compiled = torch.compile(criterion.autoencoder_loss, fullgraph=True)  # a graph break raises here
    running = criterion.discriminator.main[3].running_mean
    before = running.clone()
    got = loss_and_grads(compiled, step)
    # The generator term's discriminator forward updates BatchNorm's running statistics, compiled too.
    assert not torch.equal(running, before)
    want = loss_and_grads(criterion.autoencoder_loss, step)
    assert want[1]["d_weight"] != 0.5 and want[1]["disc_factor"] == 1  # the adaptive weight, not the fallback
    # Inductor fuses and reorders fp32 sums of a few hundred to a few thousand terms: ~1e-6 relative. A term
    # missing or traced wrongly (the adaptive weight's ratio, the warm-up factor, a gradient dropped by a
    # detach) moves the loss or a gradient by far more than 1e-4.
    assert got[0] == pytest.approx(want[0], rel=1e-4)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        assert got[1][k] == pytest.approx(want[1][k], rel=1e-4, abs=1e-6), k
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
