"""Mask math against a float64 reference, and the one attention module's two paths against each other."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gmmvit.attention import MaskedAttention
from gmmvit.models import build_model
from gmmvit.registry import model_names
from gmmvit.masks import (LocalityMask, build_mask, squared_distances, family_names, grid_offsets, kernel_families, mask_class, mask_names,
                          mask_options, parse_mask_spec)

MASKS = mask_names()


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


@pytest.mark.parametrize("spec", ["gauss", "gmm-x3", "gmm-k0", "elm-k3", "gmm_k3", "GMM"])
def test_unknown_mask_lists_valid_names(spec):
    with pytest.raises(ValueError) as err:
        build_mask(spec, 8, 12)
    for name in MASKS:
        assert name in str(err.value)
    assert "<family>-k<K>" in str(err.value) and "gmm_add" in str(err.value)


def _reference_attention(attn: MaskedAttention, x: torch.Tensor, bias=None) -> torch.Tensor:
    """Straightforward float64 attention with the mask applied to the patch block only: scaled
    logits, times the factor, plus the mask's bias and the host's, (talking heads), own-token pairs
    blocked where the mask says so, softmax, (talking heads), a mixture's positional attention
    mixed into the patch rows (the class token's row: the content attention alone)."""
    B, N, _ = x.shape
    H, d, p = attn.num_heads, attn.head_dim, attn.num_prefix_tokens
    qkv = attn.qkv(x).double().reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) * attn.scale
    patches = (slice(None), slice(None), slice(p, None), slice(p, None))
    mixture = attn.mask is not None and attn.mask.combine == "mix"
    if attn.mask is not None and not mixture:
        m = attn.mask().double()
        if attn.mask.combine == "mul":
            logits[patches] = logits[patches] * m
        else:
            logits[patches] = logits[patches] + m
    if bias is not None:
        logits = logits + bias.double()
    if attn.talking_heads:
        logits = torch.einsum("bhij,hg->bgij", logits, attn.mix_pre.weight.double())
    if attn.mask is not None and attn.mask.blocked() is not None:
        blocked = torch.zeros(N, N, dtype=torch.bool)
        blocked[p:, p:] = attn.mask.blocked()[0]
        logits = logits.masked_fill(blocked, -math.inf)
    weights = logits.softmax(-1)
    if attn.talking_heads:
        weights = torch.einsum("bhij,hg->bgij", weights, attn.mix_post.weight.double())
    if mixture:
        gate = attn.mask.gate().double()[None, :, None, None]
        mixed = (1 - gate) * weights[:, :, p:] + gate * F.pad(attn.mask().double(), (p, 0))
        weights = torch.cat([weights[:, :, :p], mixed], dim=2)
    out = (weights @ v).transpose(1, 2).reshape(B, N, H * d)
    return attn.proj(out.float())


def _randomise(mask) -> None:
    """Random values for every learnable parameter (the initial ELM and temperature are special)."""
    with torch.no_grad():
        for p in mask.parameters():
            p.copy_(torch.randn_like(p) * 2 + 1)


@pytest.mark.parametrize("talking_heads", [False, True], ids=["plain", "talking-heads"])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_matches_reference_and_leaves_special_tokens_alone(mask_name, prefix, talking_heads):
    torch.manual_seed(1)
    grid, heads = 4, 2
    mask = build_mask(mask_name, grid, heads)
    attn = MaskedAttention(16, num_heads=heads, mask=mask, num_prefix_tokens=prefix,
                           talking_heads=talking_heads).eval()
    if mask is not None:
        _randomise(mask)
    x = torch.randn(3, prefix + grid * grid, 16)
    bias = torch.randn(1, heads, prefix + grid * grid, prefix + grid * grid)
    expected = _reference_attention(attn, x, bias)
    for fused in (True, False):
        attn.fused = fused
        out = attn(x, attn_mask=bias)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, expected, atol=1e-5), f"fused={fused}"

    if prefix and mask is not None:
        factor, add, blocked = attn._mask_terms(prefix + grid * grid)
        for term, neutral in ((factor, 1.0), (add, 0.0), (blocked, False)):
            if term is not None:
                assert torch.all(term[:, :prefix, :] == neutral) and torch.all(term[:, :, :prefix] == neutral)
        # The class token's own output row equals that of the same attention without a mask.
        plain = MaskedAttention(16, num_heads=heads, num_prefix_tokens=prefix,
                                talking_heads=talking_heads).eval()
        plain.load_state_dict(attn.state_dict(), strict=False)
        assert torch.allclose(attn(x)[:, 0], plain(x)[:, 0], atol=1e-5)
        assert not torch.allclose(attn(x)[:, 1:], plain(x)[:, 1:], atol=1e-3)


# ---------------------------------------------------------------- the registry and mask specs


# family: parameters of one layer, from K (kernels), H (heads) and N (patch tokens). Every family
# must be here: a new one states its count.
PARAMETERS_PER_LAYER = {
    "gmm": lambda K, H, N: 2 * K * H,
    "gmm_add": lambda K, H, N: 2 * K * H,
    "gmm_official": lambda K, H, N: 2 * K * H,
    "elm": lambda K, H, N: N * N,
    "rmt": lambda K, H, N: 0,
    "alibi2d": lambda K, H, N: 0,
    "temperature": lambda K, H, N: H,
    "lsa": lambda K, H, N: H,
    "gpsa": lambda K, H, N: 5 * H,  # w_h (3), b_h, lambda_h
}


def test_every_family_states_its_parameter_count():
    assert sorted(PARAMETERS_PER_LAYER) == family_names()


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("kernels", [1, 3, 9])
def test_parameter_count_per_layer_of_every_family(family, kernels):
    spec = f"{family}-k{kernels}" if family in kernel_families() else family
    mask = build_mask(spec, grid=8, num_heads=12)
    assert sum(p.numel() for p in mask.parameters()) == PARAMETERS_PER_LAYER[family](kernels, 12, 64)
    if PARAMETERS_PER_LAYER[family](kernels, 12, 64) == 0:
        assert not list(mask.parameters())  # nothing for the optimiser, nothing in mask_params.pt


def test_specs_parse_and_the_spec_k_overrides_the_default():
    assert parse_mask_spec("gmm") == ("gmm", {})
    assert parse_mask_spec("gmm_add-k9") == ("gmm_add", {"num_kernels": 9})
    assert mask_options("gmm", default_kernels=7) == {"num_kernels": 7}  # the recipe's mask_kernels
    assert mask_options("gmm-k3", default_kernels=7) == {"num_kernels": 3}
    assert mask_options("lsa", default_kernels=7) == {}
    assert build_mask("gmm-k3", 4, 2, num_kernels=7).num_kernels == 3
    assert kernel_families() == ["gmm", "gmm_add", "gmm_official"]


def test_registries_list_everything_without_importing_it():
    code = ("import json, sys, gmmvit.masks as m, gmmvit.models as g; names = m.mask_names() + g.model_names(); "
            "loaded = sorted(k for k in sys.modules if k.startswith(('gmmvit.masks.', 'gmmvit.models.'))); "
            "print(json.dumps([names, loaded]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, loaded = json.loads(run.stdout)
    assert names == MASKS + ["cait", "pit", "swin", "t2t", "vit"]
    assert loaded == ["gmmvit.masks.base"]  # no family, no model imported


def test_a_family_must_live_in_the_module_of_its_name():
    from gmmvit.masks import LocalityMask, register_mask

    with pytest.raises(ValueError, match=r"must live in masks/gauss\.py"):
        register_mask("gauss")(type("Gauss", (LocalityMask,), {"combine": "add"}))


# ---------------------------------------------------------------- the new families' formulas


def test_gmm_add_is_the_same_mixture_as_a_bias():
    torch.manual_seed(0)
    mask = build_mask("gmm_add-k2", grid=4, num_heads=3)
    _randomise(mask)
    ref = gmm_reference(mask.alpha.detach().double(), mask.sigma.detach().double(), 4)
    assert mask.combine == "add"
    assert torch.allclose(mask().double(), ref, rtol=1e-5, atol=1e-6)


# ALiBi's slopes as its paper's code gives them (Press et al. 2022), written out.
ALIBI_SLOPES = {
    1: [2**-8],
    2: [2**-4, 2**-8],
    3: [2**-4, 2**-8, 2**-2],
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    12: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
}


@pytest.mark.parametrize("heads", list(ALIBI_SLOPES))
def test_alibi2d_is_minus_slope_times_euclidean_distance(heads):
    grid = 5
    mask = build_mask("alibi2d", grid=grid, num_heads=heads)
    out = mask().double()
    assert out.shape == (heads, grid * grid, grid * grid) and mask.combine == "add"
    for h, slope in enumerate(ALIBI_SLOPES[heads]):
        for i in range(grid * grid):
            for j in range(grid * grid):
                dist = math.hypot(i // grid - j // grid, i % grid - j % grid)
                assert out[h, i, j].item() == pytest.approx(-slope * dist, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["temperature", "lsa"])
def test_temperature_replaces_the_logit_scale_per_head(family):
    torch.manual_seed(0)
    mask = build_mask(family, grid=4, num_heads=3)
    attn = MaskedAttention(24, num_heads=3, mask=mask).eval()
    # it starts at the layer's own scale (the SPT/LSA initialisation): the plain attention
    assert torch.equal(mask.temperature.detach(), torch.full((3,), 8**-0.5))
    tau = torch.tensor([0.05, 0.7, -1.3])
    with torch.no_grad():
        mask.temperature.copy_(tau)
    x = torch.randn(2, 16, 24)
    q, k, v = attn.qkv(x).double().reshape(2, 16, 3, 3, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * tau.double()[:, None, None]  # softmax(q.k tau_h)
    if family == "lsa":
        logits = logits.masked_fill(torch.eye(16, dtype=torch.bool), -math.inf)
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 24).float())
    for fused in (True, False):
        attn.fused = fused
        assert torch.allclose(attn(x), expected, atol=1e-5), fused


def test_lsa_gives_no_weight_to_the_own_token_even_through_talking_heads():
    torch.manual_seed(0)
    attn = MaskedAttention(16, num_heads=4, head_dim=8, talking_heads=True, mask=build_mask("lsa", 3, 4))
    weights = {}
    attn.mix_post.register_forward_hook(lambda module, inputs, out: weights.setdefault("softmax", inputs[0]))
    out = attn(torch.randn(2, 9, 16))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(attn.mask.temperature.grad).all()
    assert torch.all(weights["softmax"].diagonal(dim1=-2, dim2=-1) == 0)


def test_lsa_refuses_a_single_token_grid():
    with pytest.raises(ValueError, match="nothing to attend to"):
        build_mask("lsa", grid=1, num_heads=2)


def official_float32_gmm(alpha: torch.Tensor, sigma: torch.Tensor, grid: int) -> torch.Tensor:
    """PAPER.md's official expression, in float32: E = exp(-d2) ** 0.5 once, then
    M = sum_k alpha * E ** (1 / (sigma^2 + 1e-5)), kernels summed in order. The square root is the
    correctly rounded one (math.sqrt, exact in double, rounded to float32): torch's goes through
    MKL's vector math, whose last bit depends on the CPU make (tests/test_numerics.py)."""
    dy, dx = grid_offsets(grid)
    e = torch.exp(-(dy**2 + dx**2).to(torch.float32))
    e_half = torch.tensor([[math.sqrt(v) for v in row] for row in e.tolist()], dtype=torch.float32)
    total = None
    for k in range(alpha.shape[0]):
        term = alpha[k, :, None, None] * e_half ** (1.0 / (sigma[k] ** 2 + 1e-5))[:, None, None]
        total = term if total is None else total + term
    return total


def test_gmm_official_is_the_official_float32_formula_to_the_bit():
    torch.manual_seed(0)
    mask = build_mask("gmm_official", grid=16, num_heads=2)  # K = 5
    with torch.no_grad():
        ref = official_float32_gmm(mask.alpha.float(), mask.sigma.float(), 16)
        assert mask().dtype == torch.float32
        assert torch.equal(mask(), ref)


def test_gmm_official_differs_from_gmm_exactly_where_d2_reaches_104():
    torch.manual_seed(0)
    official = build_mask("gmm_official-k1", grid=16, num_heads=1)
    clean = build_mask("gmm-k1", grid=16, num_heads=1)
    with torch.no_grad():
        for m in (official, clean):
            m.alpha.fill_(1.5)
            m.sigma.fill_(10.0)  # wide: exp(-d2 / 200) is far from 0 everywhere on the grid
        dy, dx = grid_offsets(16)
        d2 = dy**2 + dx**2
        underflow = d2 >= 104
        assert underflow.float().mean().item() == pytest.approx(1 / 3, abs=0.02)  # a third of the pairs
        got, want = official()[0], clean()[0]
        assert torch.all(got[underflow] == 0) and torch.all(want[underflow] > 0.1)
        normal = d2 < 88  # exp(-d2) is a normal float32 there: the two agree to rounding
        assert torch.allclose(got[normal], want[normal], rtol=1e-5)
        subnormal = ~normal & ~underflow  # exp(-d2) subnormal: precision lost, not the value
        assert torch.allclose(got[subnormal], want[subnormal], rtol=5e-3)
        assert not torch.allclose(got[subnormal], want[subnormal], rtol=1e-6)


def test_gmm_official_trains_through_the_underflow():
    mask = build_mask("gmm_official", grid=16, num_heads=2)
    mask().sum().backward()
    assert torch.isfinite(mask.alpha.grad).all() and torch.isfinite(mask.sigma.grad).all()


# ---------------------------------------------------------------- which path runs


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


# A mask takes the fused path when it is additive, a mixture (its content part), or a per-head
# factor (folded into q) on a layer without special tokens; a token-pair factor (GMM, ELM) needs
# the explicit one.
FUSED = {"none", "rmt", "alibi2d", "gmm_add", "temperature", "lsa", "gpsa"}


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_which_path_each_mask_takes(mask_name, prefix, sdpa_calls):
    attn = MaskedAttention(16, num_heads=2, mask=build_mask(mask_name, 4, 2), num_prefix_tokens=prefix)
    attn(torch.randn(2, prefix + 16, 16))
    cls = mask_class(mask_name)
    fused = mask_name in FUSED and not (prefix and cls is not None and cls.combine == "mul")
    assert len(sdpa_calls) == int(fused)
    if cls is not None and cls.combine == "add":
        assert len(sdpa_calls) == 1  # every additive mask, with or without special tokens


def test_fused_path_table_covers_every_family():
    assert FUSED - set(MASKS) == set()
    assert {m for m in family_names() if mask_class(m).combine == "add"} <= FUSED


def all_pairs_gmm(mask) -> torch.Tensor:
    """The mixture evaluated over every token pair, as the mask family did before it evaluated
    each distinct squared distance once: (K, H, N, N) Gaussians summed over K."""
    d2 = squared_distances(mask.grid)
    var = mask.sigma**2 + 1e-5
    return (mask.alpha[:, :, None, None] * torch.exp(-d2 / (2.0 * var[:, :, None, None]))).sum(0)


@pytest.mark.parametrize("family", ["gmm", "gmm_add"])
@pytest.mark.parametrize("model", model_names())
def test_mixture_per_distinct_distance_equals_every_pair_to_the_bit(family, model):
    """Every masked layer of every model (their grids and head counts): the values the all-pairs
    evaluation gave, bit for bit; the gradients equal to rounding (summed in another order)."""
    torch.manual_seed(0)
    masks = [m for m in build_model(model, mask=family).modules() if isinstance(m, LocalityMask)]
    assert masks
    for mask in masks:
        grid, heads = mask.grid, mask.num_heads
        assert mask.d2_values.numel() < grid**4  # fewer distances than pairs: what makes it cheap
        got, want = mask(), all_pairs_gmm(mask)
        assert got.shape == want.shape == (heads, grid * grid, grid * grid)
        assert torch.equal(got, want), (model, grid, heads)
        check_gradients(mask, got)


def check_gradients(mask, got):
    # the gradients: the same sums in another order, so equal to rounding
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    params = (mask.alpha, mask.sigma)
    new = torch.autograd.grad((mask() * weights).sum(), params)
    old = torch.autograd.grad((all_pairs_gmm(mask) * weights).sum(), params)
    for a, b in zip(new, old):
        # float32 sums over up to 65,536 pairs in two orders: equal to a few ulps of the largest
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())


# ---------------------------------------------------------------- ConViT's GPSA


def official_gpsa(attn: MaskedAttention, x: torch.Tensor) -> torch.Tensor:
    """ConViT's GPSA as its paper and official code state it, transcribed here: per pair the
    relative encoding (dx, dy, dx^2 + dy^2), the positional softmax expanded over the batch, the
    mixed map (1 - g) softmax(q.k / sqrt(d)) + g P divided by its row sum, then A v and the output
    projection. In the dtype of x and the module."""
    mask = attn.mask
    B, N, _ = x.shape
    H, d, grid = attn.num_heads, attn.head_dim, mask.grid
    rel = torch.zeros(N, N, 3, dtype=x.dtype)
    for i in range(N):
        for j in range(N):
            dx, dy = j % grid - i % grid, j // grid - i // grid
            rel[i, j] = torch.tensor([dx, dy, dx * dx + dy * dy], dtype=x.dtype)
    pos_score = rel[None].expand(B, -1, -1, -1) @ mask.pos_weight.T + mask.pos_bias  # (B, N, N, H)
    pos_score = pos_score.permute(0, 3, 1, 2).softmax(dim=-1)
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    patch_score = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
    gating = torch.sigmoid(mask.gating).view(1, -1, 1, 1)
    mixed = (1.0 - gating) * patch_score + gating * pos_score
    mixed = mixed / mixed.sum(dim=-1, keepdim=True)
    return attn.proj((mixed @ v).transpose(1, 2).reshape(B, N, H * d))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_gpsa_equals_the_official_formula_forward_and_backward(dtype, tolerance):
    torch.manual_seed(0)
    grid, heads = 5, 9
    attn = MaskedAttention(36, num_heads=heads, mask=build_mask("gpsa", grid, heads)).to(dtype).eval()
    with torch.no_grad():  # away from the initial values: random positional weights and gates
        attn.mask.pos_weight.add_(torch.randn(heads, 3, dtype=dtype) * 0.3)
        attn.mask.pos_bias.normal_()
        attn.mask.gating.normal_()
    x = torch.randn(2, grid * grid, 36, dtype=dtype, requires_grad=True)
    probe = torch.randn(2, grid * grid, 36, dtype=dtype)  # a random loss direction
    inputs = [x, *attn.parameters()]
    want = official_gpsa(attn, x)
    want_grads = torch.autograd.grad((want * probe).sum(), inputs)
    for fused in (True, False):
        attn.fused = fused
        got = attn(x)
        error = float((got - want).detach().abs().max())
        assert torch.allclose(got, want, rtol=0, atol=tolerance), (fused, error)
        for a, b in zip(torch.autograd.grad((got * probe).sum(), inputs), want_grads):
            # the bias's gradient is zero but for rounding (it cancels in the softmax): atol alone
            assert torch.allclose(a, b, rtol=0, atol=tolerance * max(1.0, float(b.abs().max()))), (
                fused, float((a - b).abs().max()))


def test_gpsa_local_init_centres_nine_heads_on_the_3x3_offsets():
    grid = 15  # the centre query is 7 patches from every edge: the grid's border cuts nothing visible
    mask = build_mask("gpsa", grid, 9)
    positional = mask().detach()
    centre = 7 * grid + 7
    peaks = set()
    for head in range(9):
        h1, h2 = head % 3, head // 3  # head = h1 + 3 h2
        row = positional[head, centre]
        key = int(row.argmax())
        dx, dy = key % grid - 7, key // grid - 7
        assert (dx, dy) == (h2 - 1, h1 - 1)  # w = (2 (h2 - c), 2 (h1 - c), -1) over (dx, dy, d^2)
        assert round(float(row.max()), 3) == 0.318  # 1 / (sum_n exp(-n^2))^2
        peaks.add((dx, dy))
    assert peaks == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert torch.allclose(mask.gate(), torch.sigmoid(torch.ones(9)))  # lambda = 1: g = 0.73
    assert torch.all(mask.pos_bias == 0)


def test_gpsa_local_init_of_an_even_kernel_and_of_heads_beyond_k_squared():
    torch.manual_seed(0)
    weight = build_mask("gpsa", 8, 4).pos_weight.detach()  # k = 2, c = 0.5
    assert weight.tolist() == [[-1, -1, -1], [-1, 1, -1], [1, -1, -1], [1, 1, -1]]
    twelve = build_mask("gpsa", 8, 12).pos_weight.detach()  # k = 3: heads 9-11 keep the default draw
    assert torch.all(twelve[:9, 2] == -1)
    # N(0, 0.02): timm's trunc_normal_ cuts at +-2 absolute, as ConViT calls it, so in effect no cut
    assert twelve[9:].abs().max() < 0.1 and twelve[9:].abs().min() > 0
    plain = build_mask("gpsa", 8, 9, local_init=False).pos_weight.detach()
    assert plain.abs().max() < 0.1
    strong = build_mask("gpsa", 8, 9, locality_strength=2.0).pos_weight.detach()
    assert torch.equal(strong[:, 2], torch.full((9,), -2.0))


@pytest.mark.parametrize("heads,head_dim,dim,bias",
                         [(9, 4, 36, False), (4, 64, 108, True), (1, 64, 27, False)])
def test_gpsa_starts_v_as_the_rectangular_identity(heads, head_dim, dim, bias):
    # square (ViT), CaiT's inner width 256 over dim 108, T2T's token layer 64 over 27
    attn = MaskedAttention(dim, num_heads=heads, head_dim=head_dim, qkv_bias=bias,
                           mask=build_mask("gpsa", 3, heads))
    inner = heads * head_dim
    assert torch.equal(attn.qkv.weight[2 * inner:], torch.eye(inner, dim))
    assert not torch.equal(attn.qkv.weight[:inner], torch.eye(inner, dim))  # q and k untouched
    if bias:
        assert torch.all(attn.qkv.bias[2 * inner:] == 0)
    x = torch.randn(2, 9, dim)
    v = attn.qkv(x)[..., 2 * inner:]
    assert torch.equal(v[..., :min(inner, dim)], x[..., :min(inner, dim)])
    plain = MaskedAttention(dim, num_heads=heads, head_dim=head_dim,
                            mask=build_mask("gpsa", 3, heads, local_init=False))
    assert not torch.equal(plain.qkv.weight[2 * inner:], torch.eye(inner, dim))


def test_gpsa_positional_attention_respects_the_hosts_window_mask():
    """Swin's shifted windows: a pair the host blocks gets no positional weight either; P is one
    per window (windows batch-major), not one per image."""
    torch.manual_seed(0)
    grid, heads, windows, images = 3, 2, 2, 3
    attn = MaskedAttention(8, num_heads=heads, mask=build_mask("gpsa", grid, heads)).eval()
    n = grid * grid
    window_mask = torch.zeros(windows, n, n)
    window_mask[1, :, 4:] = -100.0  # window 1: keys 4.. are on the far side of the seam
    window_mask[1, 4:, :] = -100.0
    window_mask[1, 4:, 4:] = 0.0
    x = torch.randn(images * windows, n, 8)
    B = x.shape[0]
    q, k, v = attn.qkv(x).double().reshape(B, n, 3, heads, 4).permute(2, 0, 3, 1, 4)
    bias = window_mask.repeat(images, 1, 1)[:, None].double()
    content = ((q @ k.transpose(-2, -1)) * attn.scale + bias).softmax(-1)
    positional = (attn.mask.positional_logits().double()[None] + bias).softmax(-1)  # (B, H, n, n)
    assert positional[1, :, 0, 4:].max() < 1e-30  # what the window mask does to P
    gate = attn.mask.gate().double()[None, :, None, None]
    mixed = (1 - gate) * content + gate * positional
    expected = attn.proj((mixed @ v).transpose(1, 2).reshape(B, n, 8).float())
    for fused in (True, False):
        attn.fused = fused
        got = attn(x, attn_mask=bias.float(), window_mask=window_mask)
        assert torch.allclose(got, expected, atol=1e-5), fused
        unwindowed = attn(x, attn_mask=bias.float())  # without the window mask, P crosses the seam
        assert not torch.allclose(unwindowed, expected, atol=1e-3)
