"""Typed method configs: validation (errors name the field), frozen, the string shortcut gives
exactly what the config gives, and a method registered here (config + handler) is used."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import explain, quant
from lowbit.act import (
    ActConfig,
    ActivationCompressor,
    CometConfig,
    DivisionConfig,
    GactConfig,
    Ledger,
    MesaConfig,
    NoneConfig,
    UniformConfig,
    UniformPolicy,
    compress,
    register_method,
)
from lowbit.act import config as act_config
from lowbit.explain import (
    AntitheticConfig,
    ExactConfig,
    KernelConfig,
    PermutationConfig,
    SampledConfig,
    ShearConfig,
    register_estimator,
    shapley,
)
from lowbit.explain import config as explain_config
from lowbit.explain.estimators import permutation_shapley
from lowbit.models import MLP
from lowbit.quant import recipes
from lowbit.quant.config import (
    BnnConfig,
    BwnConfig,
    DirNetConfig,
    FdaConfig,
    HqConfig,
    Int4Config,
    Int8Config,
    QnnConfig,
    QuantConfig,
    SbnnConfig,
    TernaryPtqConfig,
    TwnConfig,
    VerticalConfig,
    XnorConfig,
)
from lowbit.quant.quantizers import BinaryWeight

ACT_CONFIGS = [NoneConfig, UniformConfig, GactConfig, DivisionConfig, CometConfig, MesaConfig]
QUANT_CONFIGS = [BnnConfig, QnnConfig, BwnConfig, XnorConfig, FdaConfig, DirNetConfig, SbnnConfig, TwnConfig, HqConfig,
                 TernaryPtqConfig, VerticalConfig, Int8Config, Int4Config]
EXPLAIN_CONFIGS = [ExactConfig, PermutationConfig, AntitheticConfig, KernelConfig, ShearConfig]


@pytest.fixture
def registries():
    """Registrations made by a test are undone after it."""
    saved = [(d, dict(d)) for d in (act_config.HANDLERS, act_config.METHODS, recipes.RECIPES, recipes.CONFIGS,
                                    explain_config.ESTIMATORS, explain_config.SHORTCUTS)]
    yield
    for d, old in saved:
        d.clear()
        d.update(old)


# --- validation: a bad value fails when the config is built, naming the field -------------------

BAD = [
    (lambda: UniformConfig(bits=3), "UniformConfig.bits"),
    (lambda: UniformConfig(bits="4"), "UniformConfig.bits"),
    (lambda: UniformConfig(bits=True), "UniformConfig.bits"),
    (lambda: UniformConfig(group_size=0), "UniformConfig.group_size"),
    (lambda: UniformConfig(min_numel=-1), "UniformConfig.min_numel"),
    (lambda: NoneConfig(small_fraction=1.5), "NoneConfig.small_fraction"),
    (lambda: NoneConfig(seed="0"), "NoneConfig.seed"),
    (lambda: GactConfig(average_bits=0.5), "GactConfig.average_bits"),
    (lambda: GactConfig(average_bits="2"), "GactConfig.average_bits"),
    (lambda: GactConfig(interval=0), "GactConfig.interval"),
    (lambda: GactConfig(probe_groups=1.5), "GactConfig.probe_groups"),
    (lambda: GactConfig(probe_bits=3), "GactConfig.probe_bits"),
    (lambda: GactConfig(momentum=1.0), "GactConfig.momentum"),
    (lambda: DivisionConfig(hfc_bits=3), "DivisionConfig.hfc_bits"),
    (lambda: DivisionConfig(block=0), "DivisionConfig.block"),
    (lambda: DivisionConfig(other_bits=16), "DivisionConfig.other_bits"),
    (lambda: CometConfig(tolerance=-0.1), "CometConfig.tolerance"),
    (lambda: CometConfig(init_eb=0.6), "CometConfig.init_eb"),
    (lambda: CometConfig(calibration_rounds=-1), "CometConfig.calibration_rounds"),
    (lambda: MesaConfig(momentum=float("nan")), "MesaConfig.momentum"),
    (lambda: QnnConfig(w_bits=0), "QnnConfig.w_bits"),
    (lambda: QnnConfig(a_bits=2.5), "QnnConfig.a_bits"),
    (lambda: QnnConfig(g_bits=17), "QnnConfig.g_bits"),
    (lambda: Int4Config(bits=1), "Int4Config.bits"),
    (lambda: Int8Config(bits="8"), "Int8Config.bits"),
    (lambda: SbnnConfig(sparsity=1.0), "SbnnConfig.sparsity"),
    (lambda: SbnnConfig(domain="11"), "SbnnConfig.domain"),
    (lambda: HqConfig(float_phase=-1), "HqConfig.float_phase"),
    (lambda: TernaryPtqConfig(decay=-1e-3), "TernaryPtqConfig.decay"),
    (lambda: FdaConfig(terms=0), "FdaConfig.terms"),
    (lambda: FdaConfig(estimator="lol"), "FdaConfig.estimator"),
    (lambda: DirNetConfig(t_min=1.0, t_max=0.5), "DirNetConfig.t_max"),
    (lambda: VerticalConfig(bits=9), "VerticalConfig.bits"),
    (lambda: XnorConfig(skip=[1]), "XnorConfig.skip"),
    (lambda: BnnConfig(keep_first_last="yes"), "BnnConfig.keep_first_last"),
    (lambda: BwnConfig(distill=-1.0), "BwnConfig.distill"),
    (lambda: TwnConfig(embeddings=1), "TwnConfig.embeddings"),
    (lambda: ShearConfig(budget=-4), "ShearConfig.budget"),
    (lambda: KernelConfig(budget=1), "KernelConfig.budget"),
    (lambda: PermutationConfig(budget=2.5), "PermutationConfig.budget"),
    (lambda: AntitheticConfig(seed=0.5), "AntitheticConfig.seed"),
    (lambda: ShearConfig(interactions="jacobian"), "ShearConfig.interactions"),
    (lambda: ShearConfig(outside="half"), "ShearConfig.outside"),
    (lambda: ExactConfig(max_players=0), "ExactConfig.max_players"),
]


@pytest.mark.parametrize("make,field", BAD, ids=[f for _, f in BAD])
def test_a_bad_value_is_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_configs_are_frozen_and_positional_arguments_are_refused():
    for cls in ACT_CONFIGS + QUANT_CONFIGS + EXPLAIN_CONFIGS:
        c = cls()
        name = dataclasses.fields(c)[-1].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(c, name, getattr(c, name))
        assert c == cls() and hash(c) == hash(cls())  # a value: comparable and hashable
    with pytest.raises(TypeError):
        UniformConfig(4)  # keywords only: bits=4 cannot be mistaken for another field


def test_integral_floats_are_stored_as_ints_and_lists_as_tuples():
    assert UniformConfig(bits=4.0).bits == 4 and isinstance(UniformConfig(bits=4.0).bits, int)
    assert GactConfig(average_bits=2).average_bits == 2.0
    assert ShearConfig(budget=8.0).budget == 8
    assert XnorConfig(skip=["a", "b"]).skip == ("a", "b")


# --- the string shortcut builds the config: same config, same results --------------------------

def test_act_shortcut_builds_the_config_bits_means_the_methods_field():
    assert ActivationCompressor("uniform", bits=4).config == UniformConfig(bits=4)
    assert ActivationCompressor("gact", bits=3, interval=5, min_numel=10).config == \
        GactConfig(average_bits=3, interval=5, min_numel=10)
    assert ActivationCompressor("division", bits=4).config == DivisionConfig(hfc_bits=4)
    assert ActivationCompressor("comet", tolerance=0.1).config == CometConfig(tolerance=0.1)
    assert ActivationCompressor("none", bits=2).config == NoneConfig()  # a baseline ignores the others' bits
    with pytest.raises(TypeError, match="takes no options.*'interval'"):
        ActivationCompressor("uniform", bits=2, interval=5)
    with pytest.raises(TypeError, match=r"set \['bits', 'min_numel'\] there"):
        ActivationCompressor(UniformConfig(), bits=2, min_numel=4)
    with pytest.raises(TypeError, match="needs a config"):
        compress(None, "uniform")


def _step(model, act, x):
    model.zero_grad()
    with act:
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), act.report()


@pytest.mark.parametrize("method,bits,config", [
    ("uniform", 2, UniformConfig(bits=2, min_numel=256, seed=3)),
    ("gact", 3, GactConfig(average_bits=3, min_numel=256, seed=3)),
    ("division", 2, DivisionConfig(hfc_bits=2, min_numel=256, seed=3)),
])
def test_act_config_and_shortcut_give_identical_gradients_and_bytes(method, bits, config):
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(128, 128))
    x = torch.randn(32, 64)
    exact, _ = _step(model, ActivationCompressor("none", model=model), x)
    g_cfg, rep_cfg = _step(model, compress(model, config), x)
    g_str, rep_str = _step(model, ActivationCompressor(method, bits=bits, model=model, min_numel=256, seed=3), x)
    assert torch.equal(g_cfg, g_str)
    assert (rep_cfg.raw_bytes, rep_cfg.stored_bytes) == (rep_str.raw_bytes, rep_str.stored_bytes)
    assert rep_cfg.stored_bytes < rep_cfg.raw_bytes / 4  # really compressed ...
    assert F.cosine_similarity(g_cfg, exact, dim=0) > 0.8  # ... and still near the float gradient (2-3 bits)


def test_the_engine_options_of_a_config_reach_the_engine():
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(128, 128))
    x = torch.randn(32, 64)
    g_cfg, rep_cfg = _step(model, compress(model, UniformConfig(bits=4, min_numel=256, group_size=64, seed=5)), x)
    g_pol, rep_pol = _step(model, ActivationCompressor(UniformPolicy(4), model=model, min_numel=256, group_size=64,
                                                       seed=5), x)
    assert torch.equal(g_cfg, g_pol) and rep_cfg.stored_bytes == rep_pol.stored_bytes
    _, rep_big = _step(model, compress(model, UniformConfig(bits=4, min_numel=10**6, small_fraction=1.0)), x)
    assert rep_big.stored_bytes == rep_big.raw_bytes  # every tensor below min_numel stays raw


@pytest.mark.parametrize("name,overrides", [(r.name, {}) for r in sorted(recipes.CONFIGS.values(), key=lambda r: r.name)
                                            if r.config in QUANT_CONFIGS]
                         + [("sbnn", {"sparsity": 0.9, "domain": "01"}), ("qnn", {"w_bits": 4, "a_bits": 3, "g_bits": None}),
                            ("int4", {"bits": 3, "skip": ["net.3"]}), ("fda", {"estimator": "ste", "noise_adaptation": False})])
def test_quant_config_and_shortcut_give_identical_models(name, overrides):
    model = MLP(hidden=(32, 32, 32))
    config = recipes.RECIPES[name].config(**overrides)
    assert recipes.recipe_for(config).name == name
    x = torch.randn(8, 1, 28, 28)
    outs = []
    for recipe in (config, name):
        torch.manual_seed(0)
        q = quant.quantize(model, recipe) if recipe is config else quant.quantize(model, recipe, **overrides)
        q.train()
        outs.append((q(x), q.lowbit_recipe, str(q)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1] and outs[0][2] == outs[1][2]
    with pytest.raises(TypeError, match="takes its options from the config"):
        quant.quantize(model, config, bits=2)


@pytest.mark.parametrize("config", [ExactConfig(), PermutationConfig(budget=8, seed=2), AntitheticConfig(budget=8, seed=2),
                                    KernelConfig(budget=8, seed=2), ShearConfig(budget=8, seed=2),
                                    ShearConfig(budget=8, seed=2, interactions="finite-difference", outside="uniform")])
def test_explain_config_and_shortcut_give_identical_values(config):
    torch.manual_seed(0)
    w = torch.randn(6)
    f = lambda z: torch.tanh(z @ w + z[:, 0] * z[:, 1])  # noqa: E731
    x, base = torch.randn(3, 6), torch.zeros(6)
    options = {"budget": getattr(config, "budget", None), "seed": getattr(config, "seed", None),
               "interactions": getattr(config, "interactions", None), "shear_outside": getattr(config, "outside", None)}
    phi = shapley(f, x, base, config)
    assert torch.equal(phi, shapley(f, x, base, config.name, **options))
    exact = shapley(f, x, base, "exact")
    if not isinstance(config, ShearConfig):  # SHEAR does not sum to f(x) - f(baseline) exactly
        assert torch.allclose(phi.sum(1), f(x) - f(base[None]), atol=1e-5)  # efficiency
    assert (phi - exact).abs().max() < 0.15 * exact.abs().max()  # an estimate of the exact values
    with pytest.raises(TypeError, match="takes its options from the config"):
        shapley(f, x, base, config, budget=4)


# --- registering a new method: one config and one handler ---------------------------------------

def test_a_new_act_method_is_one_config_and_one_handler(registries):
    @dataclass(frozen=True, kw_only=True)
    class FixedConfig(ActConfig):
        bits_field = "width"
        width: int = 8

    @register_method(FixedConfig, "test-fixed")
    def _fixed(c: FixedConfig) -> UniformPolicy:
        return UniformPolicy(c.width)

    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(128, 128))
    x = torch.randn(32, 64)
    g_new, rep_new = _step(model, compress(model, FixedConfig(width=4, min_numel=256, seed=1)), x)
    g_ref, rep_ref = _step(model, compress(model, UniformConfig(bits=4, min_numel=256, seed=1)), x)
    assert torch.equal(g_new, g_ref) and rep_new.stored_bytes == rep_ref.stored_bytes
    act = ActivationCompressor("test-fixed", bits=2, model=model)
    assert act.config == FixedConfig(width=2) and act.method == "test-fixed"

    @dataclass(frozen=True, kw_only=True)
    class Unregistered(ActConfig):
        pass

    with pytest.raises(TypeError, match="no ACT method is registered for Unregistered"):
        compress(model, Unregistered())


def test_a_new_recipe_is_one_config_and_one_handler(registries):
    @dataclass(frozen=True, kw_only=True)
    class SignConfig(QuantConfig):
        scale: str = "mean"

    @recipes.register_recipe("test-sign", "sign weights, float inputs", config=SignConfig, weight_bits=1)
    def _sign(layer, c: SignConfig) -> dict:
        return dict(weight_quantizer=BinaryWeight(scale=c.scale, estimator="ste"))

    model = MLP(hidden=(32, 32))
    x = torch.randn(4, 1, 28, 28)
    q = quant.quantize(model, SignConfig())
    assert torch.equal(q(x), quant.quantize(model, BwnConfig())(x))  # the same quantizer as BWN's
    assert not torch.allclose(q(x), model(x))  # and really quantized
    assert q.lowbit_recipe["name"] == "test-sign"
    assert torch.equal(quant.quantize(model, "test-sign", scale="none")(x), quant.quantize(model, SignConfig(scale="none"))(x))

    @dataclass(frozen=True, kw_only=True)
    class Unregistered(QuantConfig):
        pass

    with pytest.raises(TypeError, match="no recipe is registered for Unregistered"):
        quant.quantize(model, Unregistered())


def test_a_new_estimator_is_one_config_and_one_handler(registries):
    @dataclass(frozen=True, kw_only=True)
    class OrdersConfig(SampledConfig):
        pass

    @register_estimator(OrdersConfig, "test-orders")
    def _orders(v, c: OrdersConfig, gen, row, prepared):
        return permutation_shapley(v, c.budget * v.players, gen)

    f = lambda z: z.pow(2).sum(1)  # noqa: E731
    x, base = torch.randn(2, 5), torch.zeros(5)
    phi = shapley(f, x, base, OrdersConfig(budget=6, seed=4))
    assert torch.equal(phi, shapley(f, x, base, PermutationConfig(budget=6, seed=4)))
    assert torch.allclose(phi, x.pow(2), atol=1e-5)  # additive model: phi_i = x_i**2 exactly
    assert torch.equal(shapley(f, x, base, "test-orders", budget=6, seed=4), phi)


# --- byte accounting -----------------------------------------------------------------------------

def test_ledger_counts_live_and_peak_bytes():
    led = Ledger()
    free_a = led.add("m", "Relu", "float", numel=100, raw=400, stored=50, bit_sum=200.0)
    free_b = led.add("m", "Relu", "float", numel=100, raw=400, stored=50, bit_sum=200.0)
    assert (led.live_raw, led.live_stored, led.peak_stored) == (800, 100, 100)
    rep = led.report("x")
    assert rep.rows[0].count == 2 and rep.rows[0].mean_bits == 2.0 and rep.ratio == 8.0
    free_a()
    free_b()
    assert (led.live_raw, led.live_stored, led.peak_raw) == (0, 0, 800)
    led.end_step("x")
    assert led.report("x").stored_bytes == 100  # right after a step: the step just finished
