"""The GPU path on a GPU (issue 20): ``pytest -m cuda`` on a machine with CUDA.

Every test marked ``cuda`` is skipped with the reason where torch sees no CUDA device, also under
CI=true: CI has no GPU, and a missing GPU is not one of the missing tools that fail there
(tests/conftest.py). ``benchmarks/gpu_check.py`` runs this suite, then times the paper recipe.

The tests here not marked ``cuda`` run everywhere: torch's flex_attention computing a
multiplicative mask as score x M against the explicit path, on the CPU, and gpu_check's refusal
without a GPU and its report format (README "On a GPU").
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from gmmvit.attention import MaskedAttention
from gmmvit.masks import build_mask
from gmmvit.models import build_model
from gmmvit.registry import model_names

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)  # benchmarks/ is no package: loaded from its file
_spec.loader.exec_module(gpu_check)

GMMVIT = [sys.executable, "-m", "gmmvit.cli"]
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = (f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda or 'none, a CPU-only build'}) "
           "sees no GPU; the GPU path is tested on a machine with one")


def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)(test))


def relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| over ||b|| (or over ``floor`` where ||b|| is smaller), in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-300)).item()


# ---------------------------------------------------------------- every model x mask, CUDA against the CPU


# none, the two multiplicative families, an additive one (rmt: the fused kernel with a bias) and
# the mixture (gpsa: its positional attention added to the fused kernel's output)
MASKS_ON_GPU = ("none", "gmm", "elm", "rmt", "gpsa")


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def check_close(name: str, got: tuple, want: tuple, logits_tol: float, grads_tol: float) -> None:
    """Logits and every parameter's gradient; a gradient's error counts against its own norm, or a
    thousandth of the largest gradient's norm where its own is smaller (GPSA's positional bias has a
    gradient that is zero but for rounding)."""
    (logits, grads), (want_logits, want_grads) = got, want
    assert relative_error(logits, want_logits) < logits_tol, (name, relative_error(logits, want_logits))
    assert grads.keys() == want_grads.keys(), (name, set(grads) ^ set(want_grads))
    floor = 1e-3 * max(g.double().norm().item() for g in want_grads.values())
    worst = max(((relative_error(grads[n], g, floor), n) for n, g in want_grads.items()))
    assert worst[0] < grads_tol, (name, "gradient of", worst[1], worst[0])


@needs_cuda
@pytest.mark.parametrize("mask", MASKS_ON_GPU)
@pytest.mark.parametrize("name", model_names())
def test_forward_and_gradients_on_cuda_equal_the_cpu(name, mask):
    """Training mode (no stochastic depth), batch 2 at 32x32, against the CPU in float64:
    - CUDA in float64: relative error below 1e-9 (logits and every gradient);
    - CUDA in float32, TF32 off (so the fused attention kernels that float32 training runs, IEEE
      rounding): below 1e-4 on the logits and 1e-3 on the gradients."""
    torch.manual_seed(0)
    model = build_model(name, mask=mask, img_size=32, num_classes=10, drop_path_rate=0.0).double().train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=g), torch.tensor([3, 7])
    want = forward_backward(model, x, y)
    on_gpu = copy.deepcopy(model).cuda()
    check_close(f"{name}-{mask} float64", forward_backward(on_gpu, x.cuda(), y.cuda()), want, 1e-9, 1e-9)

    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        on_gpu = on_gpu.float()
        check_close(f"{name}-{mask} float32", forward_backward(on_gpu, x.float().cuda(), y.cuda()), want,
                    1e-4, 1e-3)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


# ---------------------------------------------------------------- flex_attention: score x M


def masked_layer(mask: str, prefix: int, dtype: torch.dtype = torch.float32) -> MaskedAttention:
    """One attention layer as ViT's (8x8 patches, 4 heads of 16) on the explicit path, its mask's
    parameters drawn at random (the initial ones are special: ELM starts at all ones)."""
    torch.manual_seed(0)
    attn = MaskedAttention(64, num_heads=4, mask=build_mask(mask, 8, 4), num_prefix_tokens=prefix, fused=False)
    with torch.no_grad():
        for p in attn.mask.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return attn.to(dtype)


def flex_masked_attention(attn: MaskedAttention, x: torch.Tensor, flex) -> torch.Tensor:
    """The layer's output with its attention computed by ``flex`` (torch's flex_attention, eager or
    compiled): the formula a flex path for multiplicative masks will use. flex's score is
    q.k * scale; the score_mod multiplies it by M[h, q, k], the layer's factor over all tokens
    (1 on special tokens' rows and columns), so softmax(score * M) @ v is the explicit path's."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    factor, bias, blocked = attn._mask_terms(N)
    assert attn.mask.combine == "mul" and bias is None and blocked is None and not attn.talking_heads
    assert factor.shape in ((attn.num_heads, N, N), (1, N, N))  # per head (GMM), or shared (ELM)

    if factor.shape[0] == 1:
        def times_mask(score, b, h, q_idx, kv_idx):
            return score * factor[0, q_idx, kv_idx]
    else:
        def times_mask(score, b, h, q_idx, kv_idx):
            return score * factor[h, q_idx, kv_idx]

    out = flex(q, k, v, score_mod=times_mask, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(B, N, attn.inner_dim))


FLEX_CASES = [("gmm", 1), ("elm", 0)]  # with a class token (its row and column unmasked), and without


@pytest.mark.parametrize("mask,prefix", FLEX_CASES)
def test_flex_attention_forward_on_the_cpu_equals_the_explicit_path(mask, prefix):
    """On the CPU, torch (2.14) runs flex_attention's forward only. Eager, as here, it is an
    unfused reference that materialises the scores (and warns so), in any float dtype: the formula
    in float64, to rounding. Compiled, it is an inductor C++ kernel for float32, bfloat16 and
    float16 (float64 is refused): the next test. Any input that requires grad is refused
    (NotImplementedError: "FlexAttention does not support backward on CPU")."""
    from torch.nn.attention.flex_attention import flex_attention

    attn = masked_layer(mask, prefix, torch.float64)
    x = torch.randn(2, prefix + 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        got = flex_masked_attention(attn, x, flex_attention)
        want = attn(x)
    assert relative_error(got, want) < 1e-12


@pytest.mark.slow  # compiling the kernel: about 10 s on 2 cores, a few once inductor's cache holds it
def test_compiled_flex_attention_forward_on_the_cpu_equals_the_explicit_path():
    from torch.nn.attention.flex_attention import flex_attention

    attn = masked_layer("gmm", 1)
    x = torch.randn(2, 65, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = flex_masked_attention(attn, x, torch.compile(flex_attention))
        want = attn.double()(x.double())
    assert relative_error(got, want) < 1e-5


def test_flex_attention_backward_on_the_cpu_where_torch_has_one():
    """Skipped, with torch's words, while torch has no flex_attention backward on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    attn = masked_layer("gmm", 1, torch.float64)
    x = torch.randn(2, 65, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            flex_masked_attention(attn, x, flex_attention).square().sum().backward()
    except NotImplementedError as err:
        pytest.skip(f"torch {torch.__version__} on the CPU: {err}")
    got = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    attn(x).square().sum().backward()
    for n, p in attn.named_parameters():
        assert relative_error(got[n], p.grad) < 1e-10, n


@needs_cuda
@pytest.mark.parametrize("mask,prefix", FLEX_CASES)
def test_compiled_flex_attention_on_cuda_equals_the_explicit_path_forward_and_backward(mask, prefix):
    """The fused flex kernel in float32 against the explicit path in float64, both on CUDA: the
    output within 1e-4, and the gradients of every parameter (q, k, v and the projection's
    weights, and the mask's own parameters, through the score_mod's captured M) within 1e-3."""
    from torch.nn.attention.flex_attention import flex_attention

    attn = masked_layer(mask, prefix).cuda()
    reference = copy.deepcopy(attn).double()
    x = torch.randn(8, prefix + 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    got = flex_masked_attention(attn, x, torch.compile(flex_attention))
    got.square().mean().backward()
    want = reference(x.double())
    want.square().mean().backward()
    assert relative_error(got, want) < 1e-4
    for (n, p), (_, r) in zip(attn.named_parameters(), reference.named_parameters()):
        assert p.grad is not None, f"no gradient reaches {n} through flex_attention"
        assert relative_error(p.grad, r.grad) < 1e-3, (n, relative_error(p.grad, r.grad))


# ---------------------------------------------------------------- cells through `gmmvit train`


def gmmvit_train(out: Path, *sets: str, recipe: str = "demo", mask: str = "gmm", extra: tuple = (),
                 env: dict | None = None, wait: bool = True):
    cmd = GMMVIT + ["train", "--dataset", "digits", "--model", "vit", "--mask", mask, "--seed", "0",
                    "--recipe", recipe, "--out", str(out), "--data-root", str(out.parent / "data"), *extra]
    for s in sets:
        cmd += ["--set", s]
    env = env or os.environ | {"GMMVIT_THREADS": "2"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def record(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def without_clock(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("wall_time_s", "train_images_per_s")}


def nondeterminism_warnings(*texts: str) -> list[str]:
    """torch's warnings of ops without a deterministic CUDA implementation (warn_only): the first
    suspects when two runs of one cell differ."""
    return sorted({line.strip() for text in texts for line in text.splitlines() if "deterministic" in line})


@needs_cuda
@pytest.mark.slow
def test_a_cell_killed_mid_epoch_on_cuda_resumes_to_the_uninterrupted_run(tmp_path):
    """The demo recipe (3 epochs of 81 steps) for ViT-GMM, deterministic as every recipe is: killed
    with SIGKILL after its first checkpoint (in its second epoch), then run again, it ends with the
    uninterrupted run's history (but images/s) and record, the sha256 of its weights included."""
    straight = gmmvit_train(tmp_path / "straight", "epochs=3")
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert record(tmp_path / "straight")["device"] != "cpu"

    out = tmp_path / "killed"
    proc = gmmvit_train(out, "epochs=3", wait=False)
    deadline = time.time() + 300
    while not (out / ".staging" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    killed_stdout, killed_stderr = proc.communicate()
    assert not (out / "metrics.json").exists(), "the run ended before it was killed"
    assert len(re.findall(r"^epoch +\d", killed_stdout, re.M)) == 1, killed_stdout  # mid-epoch 2
    resumed = gmmvit_train(out, "epochs=3")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    suspects = nondeterminism_warnings(straight.stderr, killed_stderr, resumed.stderr)
    assert history(out) == history(tmp_path / "straight"), suspects
    assert without_clock(record(out)) == without_clock(record(tmp_path / "straight")), suspects


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("mask", ["none", "gmm"])
@pytest.mark.parametrize("setting", ["amp=true", "tf32=true"])
def test_bf16_autocast_and_tf32_cells_train(tmp_path, setting, mask):
    """3 epochs of the demo recipe: no non-finite loss (the loop's check would stop the run), the
    training and test losses end below ln(10) (uniform over the 10 digits), and the cell learned."""
    run = gmmvit_train(tmp_path / "cell", setting, mask=mask)
    assert run.returncode == 0, run.stdout + run.stderr
    key = setting.split("=")[0]
    rec, rows = record(tmp_path / "cell"), history(tmp_path / "cell")
    assert rec["recipe_config"][key] is True and rec["device"] != "cpu"
    assert len(rows) == 3 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert float(rows[-1]["train_loss"]) < math.log(10) and float(rows[-1]["test_loss"]) < math.log(10), rows
    assert rec["learned"], rec["not_learned_reason"]


# ---------------------------------------------------------------- the data path


@needs_cuda
def test_data_workers_keep_a_cuda_step_fed_from_pinned_memory():
    """The paper's augmentation (flip, crop, AutoAugment, erasing) through the package's loader with
    gpu_check's worker count (8 where the cores allow), feeding the unmasked ViT's step at batch 128,
    the fastest step of the grid and so the hungriest: batches arrive pinned, and the loop waits
    for data less than 20% of its time (30 steps, after 5 that start the workers)."""
    from gmmvit.batches import training_loader
    from gmmvit.recipe import BUILTIN_RECIPES, BatchMixer, soft_cross_entropy, train_transform

    device = torch.device("cuda")
    recipe = BUILTIN_RECIPES["paper"].replace(workers=gpu_check.default_workers(), passes_per_epoch=1)
    data = gpu_check.cifar_shaped(recipe.batch_size * 36, 10)
    loader = training_loader(data.train_images, data.train_labels,
                             train_transform(recipe, data.mean, data.std, data.autoaugment, 32), recipe,
                             torch.Generator().manual_seed(0), device)
    torch.manual_seed(0)
    model = build_model("vit", img_size=32, num_classes=10, drop_path_rate=recipe.drop_path).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    mixer = BatchMixer(recipe, 10)
    waited, pinned, batches = 0.0, [], iter(loader)
    for step in range(35):
        if step == 5:
            torch.cuda.synchronize()
            started, waited = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        x, y = next(batches)
        waited += time.perf_counter() - t0
        pinned.append(x.is_pinned() and y.is_pinned())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, target = mixer(x, y)
        loss = soft_cross_entropy(model(x), target, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - started
    assert all(pinned)
    assert waited / total < 0.2, (f"{recipe.workers} workers: waited {waited:.3f} s of {total:.3f} s "
                                  f"({1000 * total / 30:.1f} ms a step)")


# ---------------------------------------------------------------- device slots


CLAIMANT = """
import os, sys
from gmmvit.devices import claim_device_slot
slot = claim_device_slot(sys.argv[1], int(sys.argv[2]), poll_seconds=0.1, log=lambda m: None)
import torch
print(slot, os.environ["CUDA_VISIBLE_DEVICES"], torch.cuda.device_count(),
      torch.cuda.get_device_properties(0).uuid, flush=True)
"""


def slot_env(visible: str) -> dict:
    """The environment of a job that sees ``visible`` and no fake devices, outside SLURM, with
    CUDA's order the order of nvidia-smi's indexes."""
    env = os.environ | {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    for var in ("GMMVIT_FAKE_GPU_COUNT", "SLURM_JOB_ID", "GMMVIT_DEVICE_SLOT"):
        env.pop(var, None)
    return env


def nvidia_smi_uuids() -> dict[str, str]:
    """nvidia-smi's index -> UUID of every GPU ("GPU-" + the UUID torch reports)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(line.replace(" ", "").split(",", 1) for line in out.splitlines() if "," in line)


def first_visible_device() -> str:
    """The first GPU this process may use, as gmmvit.devices names it (what a slot would name)."""
    from gmmvit.devices import visible_devices

    devices = visible_devices()
    assert devices, "torch sees a CUDA device but gmmvit.devices finds none (is nvidia-smi missing?)"
    return devices[0]


@needs_cuda
@pytest.mark.slow
def test_two_cells_with_two_cells_per_gpu_share_one_gpu(tmp_path):
    """Two `gmmvit train --device-slots ... --cells-per-gpu 2` jobs started together on a box that
    shows them one GPU: both train on it, in its two slots (a job holds its slot for its life, so
    the second would take the first slot again had they not overlapped)."""
    device = first_visible_device()
    env = slot_env(device) | {"GMMVIT_THREADS": "2"}
    jobs = [gmmvit_train(tmp_path / f"cell{i}", "epochs=2", recipe="smoke", mask="none", env=env, wait=False,
                         extra=("--device-slots", str(tmp_path / "slots"), "--cells-per-gpu", "2"))
            for i in range(2)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    records = [record(tmp_path / f"cell{i}") for i in range(2)]
    assert sorted(r["device_slot"] for r in records) == [f"{device}:0", f"{device}:1"]
    assert all(r["gpu_ids"] == device and r["device"] != "cpu" for r in records), records


@needs_cuda
def test_a_gpu_named_by_uuid_in_cuda_visible_devices_is_the_one_trained_on(tmp_path):
    """CUDA_VISIBLE_DEVICES=GPU-<uuid> (as some schedulers set it): the slot is that device, and
    torch in the claiming process sees it alone."""
    device = first_visible_device()
    if device.startswith("MIG-"):
        pytest.skip(f"the visible device is a MIG instance ({device}): named by its own UUID already")
    uuid = device if device.startswith("GPU-") else nvidia_smi_uuids()[device]
    run = subprocess.run([sys.executable, "-c", CLAIMANT, str(tmp_path), "1"], env=slot_env(uuid),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    slot, visible, count, seen = run.stdout.split()
    assert (slot, visible, count) == (f"{uuid}:0", uuid, "1")
    assert uuid.removeprefix("GPU-") == seen.removeprefix("GPU-")


@needs_cuda
def test_a_list_in_cuda_visible_devices_is_honoured_in_its_order(tmp_path):
    """CUDA_VISIBLE_DEVICES=<last>,<first>: the first claim takes <last>, the second <first>, and
    each process trains on the GPU its slot names (UUIDs compared). Needs two GPUs."""
    uuids = nvidia_smi_uuids()
    if len(uuids) < 2 or "CUDA_VISIBLE_DEVICES" in os.environ:
        pytest.skip(f"needs two GPUs that nvidia-smi lists and no CUDA_VISIBLE_DEVICES set "
                    f"(this machine: {len(uuids)} GPU(s), CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    last, first = max(uuids, key=int), min(uuids, key=int)
    env = slot_env(f"{last},{first}")
    claimants = [subprocess.Popen([sys.executable, "-c", CLAIMANT + "sys.stdin.read()\n", str(tmp_path), "1"],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
    try:
        lines = []
        for claimant in claimants:  # one after the other: the second sees the first's slot taken
            lines.append(claimant.stdout.readline().split())
        assert [line[0] for line in lines] == [f"{last}:0", f"{first}:0"], lines
        for slot, visible, count, seen in lines:
            assert count == "1" and uuids[visible].removeprefix("GPU-") == seen.removeprefix("GPU-")
    finally:
        for claimant in claimants:
            claimant.kill()
            claimant.wait()


# ---------------------------------------------------------------- benchmarks/gpu_check.py (CPU)


def test_gpu_check_refuses_without_a_cuda_device_in_one_line():
    """Run with no device visible (as on every machine of this project, and on a GPU box with
    CUDA_VISIBLE_DEVICES empty): exit 2, one line, no traceback."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT,
                         env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("no CUDA device: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stdout == ""


def test_gpu_check_report_format_is_what_readme_shows():
    readme = (ROOT / "README.md").read_text()
    assert f"```text\n{gpu_check.format_report(gpu_check.EXAMPLE_REPORT)}```" in readme
    # a flex column that says what it is, and a cell that failed in one row
    failed = copy.deepcopy(gpu_check.EXAMPLE_REPORT)
    failed["cells"][1] = {"model": "vit", "mask": "gmm", "error": "RuntimeError: CUDA out of memory"}
    text = gpu_check.format_report(failed | {"tests": None})
    assert "| vit-gmm | failed: RuntimeError: CUDA out of memory |" in text and "cuda tests: not run" in text
    assert "| vit-elm |" in text and gpu_check.FLEX_NOT_YET in text
