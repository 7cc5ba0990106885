"""Every architecture of ``tiny_models``: quantized end to end (sink rule, input scaling, act-order), saved,
loaded back to the same logits; and the replay check that stands between an unverified one and a silent error."""

import warnings

import pytest
import torch

import lightning_gptq as lg
from lightning_gptq.driver import CalibrationDriver
from lightning_gptq.models import UnsupportedArchitectureError, check_replay, get_adapter
from lightning_gptq.models import adapters as adapters_module
from lightning_gptq.models.adapters import VERIFIED_MODEL_TYPES, ArchitectureAdapter
from lightning_gptq.nn import QuantLinear
from lightning_gptq.sources import LoadedModel
from tiny_models import FACTORIES, full_logits, token_ids


def _quantized(arch, windows, **options):
    model = FACTORIES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "attention" falls back to 1 where the attention cannot be probed
        return lg.quantize(model, windows, lg.QuantConfig(bits=3, group_size=16, act_order=True), accelerator="cpu",
                           **options)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_every_architecture_quantizes_better_than_rounding_saves_and_loads(arch, tmp_path):
    reference = FACTORIES[arch]()
    assert reference.config.model_type in VERIFIED_MODEL_TYPES  # what these tests cover is what is called verified
    adapter = get_adapter(reference)
    n_linears = sum(len(adapter.linear_layers(b)) for b in adapter.blocks(reference))
    windows, held_out = token_ids(n=32, seqlen=16), token_ids(n=4, seqlen=16, seed=5)  # (8 windows: too few for act-order)
    model = _quantized(arch, windows, sink_weight="attention", equalize=[0.5])
    rounded = _quantized(arch, windows, method="rtn")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linears

    def error(m):
        return float((full_logits(m, held_out) - full_logits(reference, held_out)).norm()
                     / full_logits(reference, held_out).norm())
    # on text it did not see, GPTQ's 3-bit model is nearer the original than round-to-nearest's
    assert 0 < error(model) < error(rounded), (error(model), error(rounded))
    lg.save_quantized(model, None, tmp_path / "model")
    loaded, _ = lg.load_quantized(tmp_path / "model")
    torch.testing.assert_close(full_logits(loaded, held_out), full_logits(model, held_out), rtol=1e-5, atol=1e-5)


class _NoLogitScale(ArchitectureAdapter):
    """An adapter that forgets what the config does to the logits (as one for an unknown model might)."""

    def logits(self, model, hidden):
        for module in self.final_modules(model):
            hidden = module(hidden)
        return hidden


def test_an_adapter_that_misses_a_step_is_refused_before_any_work(monkeypatch):
    model = FACTORIES["granite"]()  # its logits are divided by logits_scaling outside the blocks
    assert check_replay(model, get_adapter(model)) < 1e-6
    monkeypatch.setitem(adapters_module._REGISTRY, "granite-unverified", _NoLogitScale(name="granite-unverified"))
    monkeypatch.setattr(model.config, "model_type", "granite-unverified")
    with pytest.raises(UnsupportedArchitectureError, match="does not reproduce its forward"):
        CalibrationDriver(LoadedModel(model), fire=lambda name, ctx: None)
    # a verified type is trusted to its tests: no extra forward
    monkeypatch.setitem(adapters_module._REGISTRY, "granite", _NoLogitScale(name="granite"))
    monkeypatch.setattr(model.config, "model_type", "granite")
    CalibrationDriver(LoadedModel(model), fire=lambda name, ctx: None)
