"""Mask math against a float64 reference, and the one attention module's two paths against each other."""

from __future__ import annotations

import math

import pytest
import torch

from gmmvit.attention import MaskedAttention
from gmmvit.masks import MASKS, build_mask, grid_offsets


def gmm_reference(alpha: torch.Tensor, sigma: torch.Tensor, grid: int) -> torch.Tensor:
    """The paper's formula, pair by pair, in float64 Python arithmetic."""
    K, H = alpha.shape
    n = grid * grid
    out = torch.zeros(H, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d2 = (i // grid - j // grid) ** 2 + (i % grid - j % grid) ** 2
            for h in range(H):
                out[h, i, j] = sum(
                    float(alpha[k, h]) * math.exp(-d2 / (2 * (float(sigma[k, h]) ** 2 + 1e-5)))
                    for k in range(K)
                )
    return out


def test_grid_offsets_are_row_major_key_minus_query():
    dy, dx = grid_offsets(3)
    # token 1 is (row 0, col 1); token 5 is (row 1, col 2)
    assert (dy[1, 5].item(), dx[1, 5].item()) == (1, 1)
    assert (dy[5, 1].item(), dx[5, 1].item()) == (-1, -1)


def test_gmm_matches_float64_formula_on_random_parameters():
    torch.manual_seed(0)
    mask = build_mask("gmm", grid=4, num_heads=3, num_kernels=2)
    with torch.no_grad():
        mask.alpha.copy_(torch.randn(2, 3) * 2)
        mask.sigma.copy_(torch.tensor([[0.7, 3.0, -1.5], [12.0, 0.3, 5.0]]))  # sign is free
    ref = gmm_reference(mask.alpha.detach().double(), mask.sigma.detach().double(), 4)
    assert torch.allclose(mask().double(), ref, rtol=1e-5, atol=1e-6)


def test_gmm_does_not_underflow_where_the_official_code_did():
    # The official code computes exp(-d2) ** (1 / (2 var)) in float32: 0 for d2 >= 104.
    mask = build_mask("gmm", grid=16, num_heads=1, num_kernels=1)
    with torch.no_grad():
        mask.alpha.fill_(1.0)
        mask.sigma.fill_(10.0)
    far = mask()[0, 0, -1].item()  # d2 = 15^2 + 15^2 = 450
    assert far == pytest.approx(math.exp(-450 / 200.00001), rel=1e-5)
    assert far > 0


def test_gmm_official_initialisation_statistics():
    torch.manual_seed(0)
    alphas = torch.cat([build_mask("gmm", 8, 12).alpha.flatten() for _ in range(200)])
    sigmas = torch.cat([build_mask("gmm", 8, 12).sigma.flatten() for _ in range(200)])
    assert alphas.mean().item() == pytest.approx(0, abs=0.1)
    assert alphas.std().item() == pytest.approx(2, rel=0.05)
    assert sigmas.mean().item() == pytest.approx(10, abs=0.3)
    assert sigmas.std().item() == pytest.approx(10, rel=0.05)


def test_parameter_counts_per_layer():
    assert sum(p.numel() for p in build_mask("gmm", 8, 12).parameters()) == 2 * 5 * 12
    assert sum(p.numel() for p in build_mask("gmm", 8, 12, num_kernels=3).parameters()) == 2 * 3 * 12
    assert sum(p.numel() for p in build_mask("elm", 8, 12).parameters()) == 64 * 64
    assert sum(p.numel() for p in build_mask("rmt", 8, 12).parameters()) == 0
    assert build_mask("none", 8, 12) is None


def test_elm_starts_uniform():
    attn = MaskedAttention(32, num_heads=4, mask=build_mask("elm", 4, 4)).eval()
    x = torch.randn(2, 16, 32)
    # zero weights multiply every logit to zero: each query attends uniformly, so every token's
    # output is the projection of the mean value vector
    v = attn.qkv(x)[..., 64:]
    expected = attn.proj(v.mean(dim=1, keepdim=True)).expand(-1, 16, -1)
    for fused in (True, False):
        attn.fused = fused
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_rmt_bias_is_manhattan_decay():
    mask = build_mask("rmt", grid=3, num_heads=2)
    gamma0 = 1 - 2**-2.0  # h = 0: a + b * 0 / H
    # token 0 (0,0) to token 8 (2,2): Manhattan distance 4
    assert mask()[0, 0, 8].item() == pytest.approx(math.log(gamma0) * 4, rel=1e-6)
    assert mask()[1, 4, 4].item() == 0


def test_unknown_mask_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_mask("gauss", 8, 12)
    for name in MASKS:
        assert name in str(err.value)


def _reference_attention(attn: MaskedAttention, x: torch.Tensor, bias=None) -> torch.Tensor:
    """Straightforward float64 attention with the mask applied to the patch block only."""
    B, N, _ = x.shape
    H, d, p = attn.num_heads, attn.head_dim, attn.num_prefix_tokens
    qkv = attn.qkv(x).double().reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if attn.mask is not None:
        m = attn.mask().double()
        if attn.mask.combine == "mul":
            logits[:, :, p:, p:] = logits[:, :, p:, p:] * m
        else:
            logits[:, :, p:, p:] = logits[:, :, p:, p:] + m
    if bias is not None:
        logits = logits + bias.double()
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * d)
    return attn.proj(out.float())


@pytest.mark.parametrize("mask_name", [m for m in MASKS])
@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_matches_reference_and_leaves_special_tokens_alone(mask_name, prefix):
    torch.manual_seed(1)
    grid, heads = 4, 2
    mask = build_mask(mask_name, grid, heads)
    if mask_name == "elm":
        with torch.no_grad():
            mask.weight.normal_()
    attn = MaskedAttention(16, num_heads=heads, mask=mask, num_prefix_tokens=prefix).eval()
    x = torch.randn(3, prefix + grid * grid, 16)
    bias = torch.randn(1, heads, prefix + grid * grid, prefix + grid * grid)
    expected = _reference_attention(attn, x, bias)
    for fused in (True, False):
        attn.fused = fused
        assert torch.allclose(attn(x, attn_mask=bias), expected, atol=1e-5), f"fused={fused}"

    if prefix and mask is not None:
        neutral = 1.0 if mask.combine == "mul" else 0.0
        full, _ = attn._padded_mask(prefix + grid * grid)
        assert torch.all(full[:, :prefix, :] == neutral) and torch.all(full[:, :, :prefix] == neutral)
        # The class token's own output row equals that of the same attention without a mask.
        plain = MaskedAttention(16, num_heads=heads, num_prefix_tokens=prefix).eval()
        plain.load_state_dict(attn.state_dict(), strict=False)
        assert torch.allclose(attn(x)[:, 0], plain(x)[:, 0], atol=1e-5)
        assert not torch.allclose(attn(x)[:, 1:], plain(x)[:, 1:], atol=1e-3)
