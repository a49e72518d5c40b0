"""Guidance objects: one contract suite over every implementation, each formula against a hand
computation in numpy, the interleaving schedule against the floor formula, configs and errors.

The generator-level checks (real UNet predictions, batched rows, diffusers parity) are in
test_diffusion.py.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mmrag.generators import (
    GUIDANCES,
    ROWS,
    ClassifierFreeGuidance,
    GeneratorsError,
    Guidance,
    GuidanceError,
    InterleavedGuidance,
    JointGuidance,
    guidance_from_config,
)

# The formulas below are checked in float64 on predictions of magnitude <= ~5 (guided results up to
# ~21). Measured here: the library's result equals the numpy formula bit for bit, and an
# algebraically equivalent reordering (or an FMA a CPU's kernels may use) moves it by at most
# 7.1e-15 (on up to 64x4x16x16 elements); a 0.1% error in a scale moves it by 1.8e-2. An absolute
# tolerance sits between the two, 140x above the one and 1.8e10x below the other; a relative one
# alone would not hold where a guided value is near zero (relative rounding error there reached 6.4e-13).
FORMULA_TOL = dict(rtol=0, atol=1e-12)

IMPLEMENTATIONS = [
    ClassifierFreeGuidance(scale=5.0),
    JointGuidance(text_scale=4.0, reference_scale=2.5),
    InterleavedGuidance(text_scale=4.0, reference_scale=2.5, eta=0.5),
]


def fake_predictions(shape=(2, 4, 3, 3), seed=0) -> dict[str, torch.Tensor]:
    """Distinct random predictions per row, so a formula that mixes up two rows cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    return {row: torch.randn(shape, generator=generator, dtype=torch.float64) for row in ROWS}


def numpy(predictions):
    return {row: tensor.numpy() for row, tensor in predictions.items()}


# ------------------------------------------------------------------------------------ contract suite
@pytest.mark.parametrize("guidance", IMPLEMENTATIONS, ids=lambda g: g.name)
class TestGuidanceContract:
    def test_rows_are_known_conditions_and_include_cond(self, guidance):
        for step in range(6):
            rows = guidance.rows(step, 6)
            assert set(rows) <= set(ROWS) and "cond" in rows and len(set(rows)) == len(rows)

    def test_forward_uses_only_the_rows_it_asked_for(self, guidance):
        predictions = fake_predictions()
        for step in range(4):
            rows = guidance.rows(step, 4)
            asked = {row: predictions[row] for row in rows}
            result = guidance.forward(step, 4, asked)
            assert result.shape == predictions["cond"].shape
            torch.testing.assert_close(result, guidance.forward(step, 4, predictions))

    def test_missing_row_is_a_typed_error(self, guidance):
        rows = guidance.rows(0, 4)
        partial = {row: tensor for row, tensor in fake_predictions().items() if row == "cond"}
        with pytest.raises(GuidanceError, match=rows[0] if rows[0] != "cond" else rows[1]):
            guidance.forward(0, 4, partial)

    def test_step_outside_the_schedule_is_a_typed_error(self, guidance):
        with pytest.raises(GuidanceError, match="`step`"):
            guidance.rows(4, 4)

    def test_scales_of_one_give_the_conditioned_prediction(self, guidance):
        unguided = guidance_from_config(guidance.to_dict(), **{
            field.name: 1.0 for field in dataclasses.fields(guidance) if field.name.endswith("scale")})
        predictions = fake_predictions()
        for step in range(4):
            torch.testing.assert_close(unguided.forward(step, 4, predictions), predictions["cond"], **FORMULA_TOL)

    def test_dict_round_trip(self, guidance):
        data = guidance.to_dict()
        assert data["name"] == guidance.name
        assert guidance_from_config(data) == guidance
        assert Guidance.from_dict(data) == guidance
        assert type(guidance).from_dict(data) == guidance

    def test_registry_builds_it_by_name(self, guidance):
        params = {k: v for k, v in guidance.to_dict().items() if k != "name"}
        assert guidance_from_config(guidance.name, **params) == guidance
        assert GUIDANCES[guidance.name] is type(guidance)


# ---------------------------------------------------------------------------------------- formulas
def test_cfg_formula():
    guidance, p = ClassifierFreeGuidance(scale=5.0), fake_predictions()
    n = numpy(p)
    assert guidance.rows(0, 3) == ("drop_both", "cond")
    np.testing.assert_allclose(guidance.forward(0, 3, p).numpy(),
                               n["drop_both"] + 5.0 * (n["cond"] - n["drop_both"]), **FORMULA_TOL)


def test_joint_formula():
    guidance, p = JointGuidance(text_scale=4.0, reference_scale=2.5), fake_predictions()
    n = numpy(p)
    expected = n["cond"] + 3.0 * (n["cond"] - n["drop_text"]) + 1.5 * (n["cond"] - n["drop_reference"])
    for step in range(3):
        assert guidance.rows(step, 3) == ("cond", "drop_text", "drop_reference")
        np.testing.assert_allclose(guidance.forward(step, 3, p).numpy(), expected, **FORMULA_TOL)


def test_interleaved_formulas_on_text_and_reference_steps():
    guidance, p = InterleavedGuidance(text_scale=4.0, reference_scale=2.5, eta=0.5), fake_predictions()
    n = numpy(p)
    text_enhanced = 4.0 * n["cond"] - 3.0 * n["drop_text"]
    reference_enhanced = 2.5 * n["cond"] - 1.5 * n["drop_reference"]
    # eta = 1/2: floor((i+1)/2) - floor(i/2) is 1 for odd i, so steps 1, 3 are text steps.
    assert guidance.rows(0, 4) == ("cond", "drop_reference")
    assert guidance.rows(1, 4) == ("cond", "drop_text")
    np.testing.assert_allclose(guidance.forward(0, 4, p).numpy(), reference_enhanced, **FORMULA_TOL)
    np.testing.assert_allclose(guidance.forward(1, 4, p).numpy(), text_enhanced, **FORMULA_TOL)
    assert not np.allclose(text_enhanced, reference_enhanced)


# ---------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("eta", [Fraction(0), Fraction(1, 4), Fraction(3, 8), Fraction(1, 2), Fraction(3, 4),
                                 Fraction(1)])
@pytest.mark.parametrize("num_steps", [1, 7, 30])
def test_interleaving_schedule_is_the_floor_formula(eta, num_steps):
    guidance = InterleavedGuidance(eta=float(eta))  # dyadic etas: the float is exact
    for i in range(num_steps):
        # Exact rational arithmetic, independent of the float code under test.
        text_step = ((i + 1) * eta.numerator) // eta.denominator - (i * eta.numerator) // eta.denominator == 1
        assert guidance.rows(i, num_steps) == (("cond", "drop_text") if text_step else ("cond", "drop_reference"))


@pytest.mark.parametrize("eta", [0.1, 0.3, 1 / 3, 0.6, 0.9])
def test_interleaving_spreads_floor_n_eta_text_steps_evenly(eta):
    n = 30
    text_steps = [i for i in range(n) if "drop_text" in InterleavedGuidance(eta=eta).rows(i, n)]
    assert len(text_steps) == math.floor(n * eta + 1e-9)
    gaps = np.diff([-1] + text_steps)
    assert gaps.max() - gaps.min() <= 1  # evenly spread: gaps differ by at most one step


def test_eta_extremes_use_one_kind_of_step():
    assert all(InterleavedGuidance(eta=1.0).rows(i, 9) == ("cond", "drop_text") for i in range(9))
    assert all(InterleavedGuidance(eta=0.0).rows(i, 9) == ("cond", "drop_reference") for i in range(9))


# ------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("guidance", IMPLEMENTATIONS, ids=lambda g: g.name)
def test_without_references_is_cfg_at_the_text_scale(guidance):
    expected = 5.0 if guidance.name == "cfg" else 4.0
    assert guidance.without_references() == ClassifierFreeGuidance(scale=expected)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_eta_is_a_typed_error_naming_it(eta):
    with pytest.raises(GuidanceError, match="`eta`"):
        InterleavedGuidance(eta=eta)


@pytest.mark.parametrize("scale", [-1.0, float("inf"), "7", None, False])
@pytest.mark.parametrize("cls, argument", [(ClassifierFreeGuidance, "scale"), (JointGuidance, "text_scale"),
                                           (JointGuidance, "reference_scale"),
                                           (InterleavedGuidance, "reference_scale")])
def test_bad_scale_is_a_typed_error_naming_it(cls, argument, scale):
    with pytest.raises(GuidanceError, match=f"`{argument}`"):
        cls(**{argument: scale})


def test_scales_below_one_are_allowed():
    # Between 0 and 1 the guidance interpolates towards the dropped prediction: legitimate for ablations.
    assert JointGuidance(text_scale=0.0, reference_scale=0.5).text_scale == 0.0


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(GuidanceError, match="'cfg', 'joint', 'interleaved'") as error:
        guidance_from_config("reimagen")
    assert isinstance(error.value, GeneratorsError) and isinstance(error.value, ValueError)


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(GuidanceError, match="'text_scale', 'reference_scale', 'eta'"):
        guidance_from_config("interleaved", scale=3.0)


def test_mapping_without_name_and_wrong_types_are_typed_errors():
    with pytest.raises(GuidanceError, match="'name'"):
        guidance_from_config({"scale": 3.0})
    with pytest.raises(GuidanceError, match="int"):
        guidance_from_config(3)
    with pytest.raises(GuidanceError, match="not 'joint'"):
        JointGuidance.from_dict({"name": "cfg"})


def test_overrides_replace_parameters_of_an_object_and_a_dict():
    base = InterleavedGuidance(text_scale=3.0, eta=0.25)
    assert guidance_from_config(base, eta=0.75) == InterleavedGuidance(text_scale=3.0, eta=0.75)
    assert guidance_from_config({"name": "cfg", "scale": 2.0}, scale=0.0) == ClassifierFreeGuidance(scale=0.0)
    assert base.eta == 0.25  # frozen: the original is untouched
