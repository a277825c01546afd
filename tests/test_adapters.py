"""Each architecture family is one adapter, registered by name: its roles name real matrices, the
matrices of a group read one input, and a scale folded where the group says leaves the block's
output as it was."""

import pytest
import torch

from edgequant.adapters import adapter, adapter_for_gguf, supported
from edgequant.errors import EdgequantError
from edgequant.models import load_model
from edgequant.smoothing import fold
from edgequant.walker import block_inputs, run_block

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "mamba2")
SIZES = {"mamba2": {"expand": 2, "num_heads": 8, "head_dim": 64, "state_size": 64}}  # inner 512 = 8 heads of 64


def test_every_family_is_registered_by_its_model_type_and_gguf_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, FalconConfig

    assert set(FAMILIES) <= set(supported())
    assert adapter("mistral") is adapter("llama")
    assert adapter_for_gguf("deci") is adapter("llama")  # llama.cpp's Llama with per-block sizes
    assert adapter_for_gguf("qwen3").model_type == "qwen3"
    with pytest.raises(EdgequantError, match="unsupported architecture 'gpt2'"):
        adapter("gpt2")
    with pytest.raises(EdgequantError, match="unsupported GGUF architecture"):
        adapter_for_gguf("bert")
    falcon = tmp_path / "falcon"  # a real model of a family we do not support
    AutoModelForCausalLM.from_config(FalconConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4)).save_pretrained(falcon)
    with pytest.raises(EdgequantError, match="unsupported architecture 'falcon'; supported: .*gemma3_text.*llama.*mamba2.*phi3.*qwen3"):
        load_model(str(falcon))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_groups_matrices_share_one_input_and_a_folded_scale_changes_nothing(tiny_model, model_type):
    loaded = load_model(tiny_model(model_type, **SIZES.get(model_type, {})))
    family, model = loaded.adapter, loaded.model
    layer = family.layers(model)[0]
    windows = torch.randint(0, 1000, (1, 32)).numpy()
    hidden, kwargs = block_inputs(model, windows)

    seen = {}
    hooks = [family.module(layer, role).register_forward_pre_hook(lambda _m, args, role=role: seen.update({role: args[0]}))
             for g in family.groups for role in g.consumers]
    with torch.no_grad():
        before = run_block(layer, hidden[0], kwargs[0])
    for h in hooks:
        h.remove()
    for g in family.groups:
        first = seen[g.consumers[0]]
        assert all(seen[role] is first or torch.equal(seen[role], first) for role in g.consumers), g.key

    with torch.no_grad():
        for g in family.groups:
            channels = family.module(layer, g.into).weight.shape[0]
            fold(family, layer, model.config, g, torch.rand(channels, generator=torch.Generator().manual_seed(1)) + 0.5)
        after = run_block(layer, hidden[0], kwargs[0])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type, config", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("gemma3_text", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ("mamba2", SIZES["mamba2"]),
], ids=["qwen2", "gemma3", "mamba2"])
def test_a_walk_calls_each_block_as_the_model_does(tiny_model, model_type, config):
    """Sliding-window and global layers get different masks (and in Gemma 3 their own rotary
    tables): a walk through a streamed model, block by block, ends where the model's own forward
    does."""
    from edgequant.walker import Walk

    loaded = load_model(str(tiny_model(model_type, num_hidden_layers=3, **config)), streamed=True)
    if model_type != "mamba2":  # a state-space model has no masks to tell apart, only its blocks to walk
        assert set(loaded.config.layer_types) == {"full_attention", "sliding_attention"}
    windows = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0)).numpy()
    walked = Walk(loaded, windows).final_hidden()
    with torch.inference_mode():
        for window, hidden in zip(windows, walked):
            whole = loaded.model(torch.from_numpy(window)[None], use_cache=False).logits
            torch.testing.assert_close(loaded.adapter.logits(loaded.model, hidden), whole, rtol=1e-4, atol=1e-4)
