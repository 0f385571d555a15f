import os
import subprocess
import sys

import pytest
import torch

from lowbit import decompose, quant
from lowbit.data import load_images
from lowbit.models import ResNet


def _on_grid(ce: torch.Tensor, e_min: int, e_max: int) -> bool:
    nz = ce[ce != 0].abs()
    e = torch.log2(nz)
    return bool(torch.equal(e, e.round()) and (e >= e_min).all() and (e <= e_max).all())


def test_pow2_round_is_the_nearest_power_of_two_in_range():
    c = torch.tensor([0.2, 0.6, 1.4, 1.6, -2.9, -3.1, 5.0, 100.0, 0.0])
    assert pow2(c).tolist() == [0.0, 1.0, 1.0, 2.0, -2.0, -4.0, 4.0, 32.0, 0.0]
    levels = torch.tensor([0.0] + [2.0**e for e in range(6)])
    x = torch.rand(1000) * 40
    nearest = levels[(x[:, None] - levels).abs().argmin(1)]
    assert torch.allclose(decompose.pow2_round(x), nearest)


def pow2(c):
    return decompose.pow2_round(c, 0, 5)


def test_decomposition_structure_error_and_bad_input():
    torch.manual_seed(0)
    # on a weight that is Ce.B with a mixing basis, alternating refits beat the identity-basis
    # start (plain power-of-two rounding) by far
    ce = pow2(torch.randn(96, 3) * 8) * (torch.rand(96, 1) > 0.5)
    w = (ce @ torch.randn(3, 3)).reshape(8, 4, 3, 3)
    ce_hat, b_hat, mask, err = decompose.decompose(w, sparsity=0.5, iters=30)
    assert err < 0.8 * decompose.decompose(w, sparsity=0.5, iters=1)[3]
    assert _on_grid(ce_hat, 0, 5) and b_hat.shape == (3, 3)
    assert int(mask.sum()) == 48 and not ce_hat[~mask].any()  # whole rows are zero
    # on a dense random weight the fit is worse with more sparsity, but always on the grid
    w = torch.randn(16, 8, 3, 3)
    errs = [decompose.decompose(w, sparsity=s)[3] for s in (0.0, 0.5, 0.75)]
    assert errs[0] < errs[1] < errs[2] < 1
    with pytest.raises(ValueError, match="sparsity"):
        decompose.decompose(w, sparsity=1.0)
    with pytest.raises(ValueError, match="divisible"):
        decompose.decompose(torch.randn(4, 10), basis=4)


def test_smartdeal_keeps_its_structure_through_fine_tuning_and_recovers_accuracy():
    from lowbit.train import evaluate_classifier

    torch.manual_seed(0)
    train = load_images("digits", "train", 500)
    test = load_images("digits", "test", 300)
    model = ResNet(widths=(8, 16, 16))
    quant.train_quantized(model, train, test, epochs=4, batch_size=64, lr=5e-3, progress=False)
    sd = decompose.smartdeal(model, sparsity=0.5)
    layers = [m.weight_quantizer for m in sd.modules() if isinstance(getattr(m, "weight_quantizer", None), decompose.SmartDealWeight)]
    masks = [q.mask.clone() for q in layers]
    bases = [q.b.detach().clone() for q in layers]
    assert layers and all(_on_grid(q.effective_ce(), 0, 5) for q in layers)
    before = evaluate_classifier(sd, *test)
    after = quant.train_quantized(sd, train, test, epochs=3, batch_size=64, lr=2e-3, progress=False).metric
    assert after > before + 5
    for q, mask, b in zip(layers, masks, bases):
        ce = q.effective_ce()
        assert torch.equal(q.mask, mask) and _on_grid(ce, 0, 5) and not ce[~mask].any()
        assert not torch.equal(q.b, b)  # B learns in float
        w = q()
        assert torch.allclose(w.reshape(-1, ce.shape[1]), ce @ q.basis(), atol=1e-5)
    rep = decompose.report(sd)
    assert all(row["stored_bytes"] * 8 <= row["float32_bytes"] for row in rep)  # >= 8x smaller per layer


def test_smartdeal_config_validates_and_matches_the_string_form():
    from lowbit.decompose import SmartDealConfig
    from lowbit.quant import quantize

    for bad in ({"sparsity": 1.0}, {"e_min": 3, "e_max": 2}, {"iters": 0}, {"basis": 0}):
        with pytest.raises(ValueError, match="SmartDealConfig"):
            SmartDealConfig(**bad)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    x = torch.randn(5, 16)
    a = quantize(model, SmartDealConfig(sparsity=0.25, iters=5))
    b = quantize(model, "smartdeal", sparsity=0.25, iters=5)
    assert torch.equal(a(x), b(x))


def _run_fresh(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_smartdeal_recipe_is_found_without_importing_decompose_first():
    # a fresh interpreter: the recipe comes from the package's "lowbit.recipes" entry point
    code = ("import sys, torch\nfrom lowbit import quant\nfrom lowbit.models import MLP\n"
            "assert 'lowbit.decompose' not in sys.modules\n"
            "q = quant.quantize(MLP(), 'smartdeal')\n"
            "from lowbit.decompose import SmartDealWeight\n"
            "assert any(isinstance(getattr(m, 'weight_quantizer', None), SmartDealWeight) for m in q.modules())\n"
            "print(sorted(quant.RECIPES))")
    out = _run_fresh(code)
    assert out.returncode == 0, out.stderr
    assert "'smartdeal'" in out.stdout


def test_a_broken_recipe_plugin_warns_and_leaves_the_others(tmp_path):
    # a real installed-distribution record on sys.path whose entry point names a missing module
    info = tmp_path / "brokenplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lowbit.recipes]\nbroken = no_such_module_here\n")
    code = ("import warnings\nfrom lowbit import quant\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    names = sorted(quant.RECIPES)\n"
            "assert 'xnor' in names and 'smartdeal' in names and 'broken' not in names, names\n"
            "print([str(x.message) for x in w])")
    out = _run_fresh(code, str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "'broken'" in out.stdout and "no_such_module_here" in out.stdout
