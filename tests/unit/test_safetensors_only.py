"""Weights are read from safetensors only: an adapter or base holding only a pickled ``.bin`` is refused.

``torch.load`` on a pickle runs whatever code the file carries; transformers
and peft both fall back to such files when no safetensors sit beside them.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from refit import modeling  # noqa: E402
from refit.errors import RefitError  # noqa: E402


def test_an_adapter_without_safetensors_is_refused(tmp_path):
    adapter = modeling.save_model(modeling.new_model(["a", "b"], modeling.LoraSpec()), tmp_path / "adapter")
    assert modeling.load_model(adapter) is not None
    from safetensors.torch import load_file

    torch.save(load_file(str(adapter / modeling.ADAPTER_WEIGHTS)), adapter / "adapter_model.bin")
    (adapter / modeling.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(RefitError, match="has no adapter_model.safetensors"):
        modeling.load_model(adapter)


def test_a_base_checkpoint_without_safetensors_is_not_unpickled(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    checkpoint = tmp_path / "pickled"
    config = BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=17, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(checkpoint)
    from safetensors.torch import load_file

    torch.save(load_file(str(checkpoint / "model.safetensors")), checkpoint / "pytorch_model.bin")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        modeling._base_classifier(["a", "b"], modeling.BaseRef("path", str(checkpoint), ""))
