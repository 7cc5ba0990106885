"""The fit-time warning about group sizes GPU servers refuse (in_features not a whole number of groups)."""

import pytest
import torch

import lightning_gptq as lg
from lightning_gptq.checkpoint.serving import ragged_layers, serving_group_size, serving_warning
from tiny_models import FACTORIES


def test_smollm2_widths_at_g128_name_the_layers_and_suggest_g64():
    widths = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536,
              "model.layers.0.mlp.up_proj": 576}
    assert ragged_layers(widths, 128) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert serving_group_size(widths, 128) == 64
    message = serving_warning(widths, 128)
    assert "2 layers" in message and "q_proj" in message and "up_proj" in message and "down_proj" not in message
    assert "group_size=64 would serve" in message


def test_no_warning_when_every_layer_is_whole_groups_or_per_row():
    widths = {"a": 4096, "b": 11008}
    assert serving_warning(widths, 128) is None and serving_warning(widths, -1) is None
    assert serving_group_size({"a": 100}, 128) == -1  # nothing served divides 100: one grid per row
    assert "group_size=-1" in serving_warning({"a": 100}, 128)


def test_fit_warns_once_with_the_layers_and_a_group_size_that_serves():
    lm = FACTORIES["llama"]()  # in_features 32 (attention, up/gate) and 64 (down)
    windows = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"21 layers .*group_size=32 would serve") as caught:
        lg.quantize(lm, windows, lg.QuantConfig(bits=4, group_size=48), method="rtn", backend="torch", accelerator="cpu")
    assert sum("would serve" in str(w.message) for w in caught) == 1
