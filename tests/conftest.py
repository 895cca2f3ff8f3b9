import pytest
import torch

from tests.toy import CTX, make_lora, make_unet

# The fixtures are tiny: one thread avoids the intra-op thread pool's spin-waits on a shared, loaded CPU.
torch.set_num_threads(1)


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def two_loras(unet):
    return [make_lora(unet, seed=1), make_lora(unet, seed=2)]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g)
    sigma = torch.rand(6, generator=g) * 5 + 0.5
    context = torch.randn(6, 3, CTX, generator=g)
    return x, sigma, context
