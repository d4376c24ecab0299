"""The five models against the paper's table, and every model x mask trained for one step."""

from __future__ import annotations

import re

import pytest
import torch

from gmmvit.attention import MaskedAttention
from gmmvit.complexity import macs_by_operator, macs_paper_convention, measure
from gmmvit.masks import LocalityMask, mask_names
from gmmvit.masks.gmm import GaussianMixtureMask
from gmmvit.models import build_model, model_names

# model: (params, paper-convention MACs, depth) at 32x32, 10 classes, from the paper's table
PAPER = {
    "vit": (2.7e6, 170.9e6, 9),
    "swin": (7.1e6, 236.9e6, 12),
    "cait": (5.1e6, 305.9e6, 26),
    "pit": (7.0e6, 239.1e6, 12),
    "t2t": (6.5e6, 417.4e6, 13),
}
# exact counts of the official code (PAPER.md)
OFFICIAL_PARAMS = {"vit": 2_692_042, "swin": 7_073_188, "cait": 5_078_834, "pit": 6_972_586, "t2t": 6_486_080}
OFFICIAL_GMM_EXTRA = {"vit": 1_080, "swin": 900, "cait": 960, "pit": 600, "t2t": 490}
MASKS = mask_names()  # every registered family, and none


def test_registry_holds_the_five_models():
    assert model_names() == sorted(PAPER)


@pytest.mark.parametrize("name", list(PAPER))
def test_counts_match_the_paper(name):
    record = measure(name, "none", img_size=32, num_classes=10)
    params, macs, depth = PAPER[name]
    assert record["params"] == pytest.approx(params, rel=0.01)
    assert record["params"] == pytest.approx(OFFICIAL_PARAMS[name], rel=0.001)
    assert record["macs_paper"] == pytest.approx(macs, rel=0.01)
    assert record["depth"] == depth


# q.k^T and attn.v at 32x32: 2 * heads * queries * keys * head_dim per attention, summed by hand
ATTENTION_PRODUCTS = {
    "vit": 9 * 2 * 12 * 64 * 64 * 16,  # 8x8 patches, no class token (GAP head)
    "swin": (2 * 2 * 16 * 3 * 16 * 16 * 32  # windows of 4x4 tokens: 16 windows at 16x16, 3 heads
             + 6 * 2 * 4 * 6 * 16 * 16 * 32  # 4 windows at 8x8, 6 heads
             + 4 * 2 * 1 * 12 * 16 * 16 * 32),  # 1 window at 4x4, 12 heads; head dim 32 throughout
    "pit": (2 * 2 * 2 * 257**2 * 48  # 16x16 tokens + the class token, 2 heads of 48
            + 6 * 2 * 4 * 65**2 * 48 + 4 * 2 * 8 * 17**2 * 48),
}


@pytest.mark.parametrize("name", list(ATTENTION_PRODUCTS))
def test_fvcore_counts_the_attention_products_exactly(name):
    # fvcore drops an operator it has no handle for, so without ours the fused path would count 0
    fused = macs_by_operator(build_model(name).eval(), 32)
    assert fused["scaled_dot_product_attention"] == ATTENTION_PRODUCTS[name]
    # the GMM mask takes the explicit path: fvcore's own matmul count must agree with our handle
    explicit = macs_by_operator(build_model(name, mask="gmm").eval(), 32)
    assert "scaled_dot_product_attention" not in explicit
    assert explicit["matmul"] == ATTENTION_PRODUCTS[name]
    assert sum(fused.values()) == sum(explicit.values())  # and so the same macs_all


@pytest.mark.parametrize("name", list(PAPER))
def test_mask_parameter_counts(name):
    base = measure(name, "none")["params"]
    gmm = build_model(name, mask="gmm")
    masked = [m for m in gmm.modules() if isinstance(m, LocalityMask)]
    assert all(isinstance(m, GaussianMixtureMask) for m in masked)
    assert sum(p.numel() for p in gmm.parameters()) - base == OFFICIAL_GMM_EXTRA[name]
    assert sum(2 * 5 * m.num_heads for m in masked) == OFFICIAL_GMM_EXTRA[name]
    elm = build_model(name, mask="elm")
    elm_layers = [m for m in elm.modules() if isinstance(m, LocalityMask)]
    assert sum(p.numel() for p in elm.parameters()) - base == sum(m.num_tokens**2 for m in elm_layers)
    # the paper convention ignores the mask's own operations
    assert macs_paper_convention(gmm.eval(), 32) == measure(name, "none")["macs_paper"]


def test_gmm_kernels_are_configurable():
    base = sum(p.numel() for p in build_model("vit").parameters())
    three = build_model("vit", mask="gmm", mask_kwargs={"num_kernels": 3})
    assert sum(p.numel() for p in three.parameters()) - base == 9 * 2 * 3 * 12


@pytest.mark.parametrize("kernels", [1, 3, 9])
@pytest.mark.parametrize("name", list(PAPER))
def test_k_variant_specs_count_2_k_heads_per_masked_layer(name, kernels):
    base = sum(p.numel() for p in build_model(name).parameters())
    # the spec's K wins over a default (the recipe's mask_kernels)
    model = build_model(name, mask=f"gmm-k{kernels}", mask_kwargs={"num_kernels": 5})
    layers = [m for m in model.modules() if isinstance(m, LocalityMask)]
    assert layers and all(sum(p.numel() for p in m.parameters()) == 2 * kernels * m.num_heads for m in layers)
    assert sum(p.numel() for p in model.parameters()) - base == OFFICIAL_GMM_EXTRA[name] // 5 * kernels
    assert model.mask_name == f"gmm-k{kernels}"


@pytest.mark.parametrize("name", list(PAPER))
def test_temperature_starts_as_the_unmasked_model(name):
    """tau_h starts at each layer's own logit scale (T2T's token layer: its input width's)."""
    torch.manual_seed(0)
    plain = build_model(name, mask="none").eval()
    model = build_model(name, mask="temperature").eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5, rtol=1e-5)


FUSED_IN_VIT = ("rmt", "alibi2d", "gmm_add", "temperature", "lsa", "gpsa")


@pytest.mark.parametrize("mask", [m for m in MASKS if m in FUSED_IN_VIT])
def test_vit_additive_and_temperature_masks_run_fused(mask, monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    build_model("vit", mask=mask).eval()(torch.randn(1, 3, 32, 32))
    assert len(calls) == 9  # every layer, none on the explicit path


@pytest.mark.parametrize("name", list(PAPER))
def test_neutral_gmm_gives_the_unmasked_logits(name):
    """A GMM mask that multiplies by 1 must reproduce the unmasked model, whose attention runs on the
    fused scaled_dot_product_attention path: the two attention paths and the placement agree."""
    torch.manual_seed(0)
    plain = build_model(name, mask="none").eval()
    gmm = build_model(name, mask="gmm").eval()
    gmm.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for m in gmm.modules():
            if isinstance(m, GaussianMixtureMask):
                m.alpha.zero_()
                m.alpha[0].fill_(1.0)
                m.sigma.fill_(1e6)  # exp(-d2 / 2e12) == 1 in float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gmm(x), plain(x), atol=1e-4, rtol=1e-4)


# Which model x mask reaches scaled_dot_product_attention (the fused path), written out rather than
# derived from attention.py: never with CaiT's talking heads; never with a mask that multiplies the
# logits pair by pair (gmm, gmm_official, elm); a per-head factor (temperature, lsa) folds into q
# only without special tokens, so not on PiT (class token). GPSA's content part is the plain
# attention: fused wherever that is.
ADDITIVE = {"none", "gmm_add", "rmt", "alibi2d", "gpsa"}


def takes_fused_path(model: str, mask: str) -> bool:
    if model == "cait":
        return False
    return mask in ADDITIVE or (mask in ("temperature", "lsa") and model != "pit")


@pytest.mark.parametrize("name", list(PAPER))
@pytest.mark.parametrize("mask", MASKS)
def test_fused_and_explicit_paths_agree(name, mask, monkeypatch):
    """Each model x mask against its own float64 explicit evaluation; where the fused kernel is
    expected it must have run in every attention layer (counted), and nowhere else."""
    import copy

    torch.manual_seed(0)
    model = build_model(name, mask=mask).eval()
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention)]
    x = torch.randn(1, 3, 32, 32)
    real, calls = torch.nn.functional.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    with torch.no_grad():
        fused = model(x)
        expected_calls = len(layers) if takes_fused_path(name, mask) else 0
        assert len(calls) == expected_calls, (name, mask, len(calls))
        reference = copy.deepcopy(model).double()
        for m in reference.modules():
            if isinstance(m, MaskedAttention):
                m.fused = False
        calls.clear()
        want = reference(x.double())
        assert not calls  # the reference is the explicit path
        for layer in layers:
            layer.fused = False
        explicit = model(x)
    assert torch.allclose(fused.double(), want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(explicit.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("img_size,num_classes", [(32, 10), (64, 200)])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", list(PAPER))
def test_every_model_and_mask_trains_one_step(name, mask, img_size, num_classes):
    torch.manual_seed(0)
    # no stochastic depth: a dropped branch would leave its mask without gradient by chance
    model = build_model(name, mask=mask, img_size=img_size, num_classes=num_classes,
                        drop_path_rate=0.0).train()
    x = torch.randn(2, 3, img_size, img_size)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    masks = [m for m in model.modules() if isinstance(m, LocalityMask)]
    assert bool(masks) == (mask != "none")
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LocalityMask)]
    for i, (n, m) in enumerate(named):
        if name == "pit" and i == len(named) - 1:
            # Official placement: in PiT's last layer only the class token reaches the head and its
            # row is unmasked, so that layer's mask cannot receive a gradient (kept, as in the paper).
            continue
        for param_name, p in m.named_parameters():  # rmt has none
            assert p.grad is not None, f"no gradient reaches {n}.{param_name}"
            if param_name == "pos_bias":
                continue  # GPSA's positional bias cancels in its softmax: zero but for rounding
            assert p.grad.abs().sum() > 0, f"no gradient reaches {n}.{param_name}"


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("resnet")
    for name in PAPER:
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["gauss", "elm-k3"])
def test_unknown_mask_lists_valid_names(spec):
    with pytest.raises(ValueError) as err:
        build_model("vit", mask=spec)
    for mask in MASKS:
        assert mask in str(err.value)


@pytest.mark.parametrize("name", list(PAPER))
def test_image_size_not_divisible_names_both_numbers(name):
    with pytest.raises(ValueError) as err:
        build_model(name, img_size=30)
    assert re.search(r"\b30\b.*not divisible by .*\b\d+\b", str(err.value)), str(err.value)


def vit_paper_macs(tokens: int = 64, dim: int = 192, depth: int = 9, mlp: int = 384, patch_in: int = 48,
                   classes: int = 10) -> int:
    """The small-dataset ViT's paper-convention MACs at 32x32, summed from its layers' shapes
    (PAPER.md: a Linear counts in x out per token and out once for its bias; a Conv, per output
    position, its bias included; a LayerNorm 2 per element; attention products not at all)."""
    patch = tokens * dim * (patch_in + 1)          # 4x4x3 convolution to 192 channels, stride 4
    block = (2 * tokens * dim                      # LayerNorm
             + tokens * dim * 3 * dim              # qkv, no bias
             + tokens * dim * dim + dim            # output projection
             + 2 * tokens * dim                    # LayerNorm
             + tokens * dim * mlp + mlp            # MLP in
             + tokens * mlp * dim + dim)           # MLP out
    head = 2 * dim + dim * classes + classes       # LayerNorm of the pooled token, classifier
    return patch + depth * block + head


def test_measure_command_prints_the_counts(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "m.json"
    run = subprocess.run([sys.executable, "-m", "gmmvit.cli", "measure", "--model", "vit", "--mask", "gmm",
                          "--mask-kernels", "3", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    record = json.loads(out.read_text())
    assert json.loads(run.stdout) == record
    assert record["params"] == 2_692_042 + 9 * 2 * 3 * 12 and record["mask_params"] == 9 * 2 * 3 * 12
    assert record["macs_paper"] == vit_paper_macs() == 170_923_018 and record["depth"] == 9
    # the spec carries K: gmm-k3 without --mask-kernels measures K = 3, under its own name
    run = subprocess.run([sys.executable, "-m", "gmmvit.cli", "measure", "--model", "vit", "--mask", "gmm-k3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    spec_record = json.loads(run.stdout)
    assert spec_record["mask"] == "gmm-k3" and spec_record["mask_params"] == 9 * 2 * 3 * 12
    run = subprocess.run([sys.executable, "-m", "gmmvit.cli", "measure", "--model", "vit", "--mask", "elm-k3"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "elm has no K" in run.stderr and "gmm_official" in run.stderr


# The official ViT and CaiT embed patches with a Linear(patch*patch*3, dim), xavier-normal:
# std sqrt(2 / (fan_in + fan_out)) over THAT Linear's fans, whatever module computes it here.
@pytest.mark.parametrize("name,dim", [("vit", 192), ("cait", 108)])
@pytest.mark.parametrize("img_size", [32, 64])
def test_patch_embedding_std_is_the_official_linears(name, dim, img_size):
    torch.manual_seed(0)
    model = build_model(name, img_size=img_size)
    weight = model.patch_embed.proj.weight
    patch = img_size // 8
    official_std = (2.0 / (patch * patch * 3 + dim)) ** 0.5  # 0.091 at patch 4
    assert weight.std().item() == pytest.approx(official_std, rel=0.05)
    assert not model.patch_embed.proj.bias.any()


def test_t2t_position_table_is_the_official_float64_table():
    import numpy as np

    from gmmvit.models.t2t import sinusoid_table

    n, dim = 64, 256
    position = np.arange(n)[:, None].astype(np.float64)
    channel = np.arange(dim)
    angle = position / np.power(10000, 2 * (channel // 2) / dim)  # numpy: float64 throughout
    official = np.where(channel % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)
    assert torch.equal(sinusoid_table(n, dim)[0], torch.from_numpy(official))


@pytest.mark.parametrize("name", list(PAPER))
def test_layer_norms_use_the_official_eps(name):
    # The official models use PyTorch's default LayerNorm eps, 1e-5 (timm's ViT default is 1e-6).
    model = build_model(name)
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-5}


# ---------------------------------------------------------------- ConViT's GPSA


@pytest.mark.parametrize("name", list(PAPER))
def test_gpsa_v_starts_as_the_identity_after_the_models_own_init(name):
    """Every model redraws its Linears after building its attention layers (official_init, timm's
    init_weights, T2T's apply): the identity v must survive that, in every masked layer."""
    model = build_model(name, mask="gpsa")
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention) and m.mask is not None]
    assert layers
    for layer in layers:
        inner, dim = layer.inner_dim, layer.qkv.in_features
        assert torch.equal(layer.qkv.weight[2 * inner:], torch.eye(inner, dim)), (name, inner, dim)
        if layer.qkv.bias is not None:
            assert torch.all(layer.qkv.bias[2 * inner:] == 0)
        assert layer.mask.pos_weight[0, 2] == -1  # the local init survived too
    plain = [m for m in build_model(name).modules() if isinstance(m, MaskedAttention)]
    assert not any(torch.equal(m.qkv.weight[2 * m.inner_dim:], torch.eye(m.inner_dim, m.qkv.in_features))
                   for m in plain)


@pytest.mark.parametrize("name", list(PAPER))
def test_gpsa_parameters_are_5_per_head_and_leave_the_paper_macs_alone(name):
    base = measure(name, "none")
    record = measure(name, "gpsa")
    layers = [m for m in build_model(name, mask="gpsa").modules() if isinstance(m, LocalityMask)]
    assert record["params"] - base["params"] == record["mask_params"] == sum(5 * m.num_heads for m in layers)
    assert record["macs_paper"] == base["macs_paper"]  # no module of its own: nothing to hook


@pytest.mark.parametrize("name", list(ATTENTION_PRODUCTS))
def test_fvcore_counts_gpsa_p_v_like_attention_v(name):
    """P @ v is one more attention-sized product: fvcore's count grows by exactly attn.v's (half of
    q.k^T + attn.v), on the fused path (SDPA + P.v) and the explicit one (three matmuls) alike."""
    extra = ATTENTION_PRODUCTS[name] // 2
    model = build_model(name, mask="gpsa").eval()
    fused = macs_by_operator(model, 32)
    assert fused["scaled_dot_product_attention"] == ATTENTION_PRODUCTS[name]
    assert fused["matmul"] == extra
    for layer in model.modules():
        if isinstance(layer, MaskedAttention):
            layer.fused = False
    explicit = macs_by_operator(model, 32)
    assert "scaled_dot_product_attention" not in explicit and explicit["matmul"] == ATTENTION_PRODUCTS[name] + extra
    plain = macs_by_operator(build_model(name).eval(), 32)
    assert sum(fused.values()) == sum(explicit.values()) == sum(plain.values()) + extra
