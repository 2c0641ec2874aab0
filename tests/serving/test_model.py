"""The served model: ONNX Runtime answers as torch does, and torch takes over when the export cannot be trusted.

The two fallback tests inject the fault (an exporter that raises, an export
that answers other labels) by patching: neither happens on demand with the
real exporter. Everything else is real: trained adapters, torch, ONNX Runtime.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest


@pytest.fixture(scope="module")
def both(adapters):
    from refit.runtime.served import from_adapter

    return (from_adapter(adapters.good, 1, batch_size=8, runtime="onnx", threads=1),
            from_adapter(adapters.good, 1, batch_size=8, runtime="torch"))


def test_onnx_runtime_gives_torch_answers(both, adapters):
    onnx, plain = both
    assert onnx.runtime == "onnx" and plain.runtime == "torch"
    texts = adapters.texts[:100] + ["", "x" * 3000]  # an empty text and one past the length limit too
    labels_onnx, confidence_onnx = onnx.predict(texts)
    labels_torch, confidence_torch = plain.predict(texts)
    assert labels_onnx == labels_torch
    assert np.abs(confidence_onnx - confidence_torch).max() < 1e-4
    # The model is good enough that this is not agreement by accident.
    assert np.mean(np.array(labels_torch[:100]) == np.array(labels_torch[:100])[0]) < 0.5


def test_a_failed_export_is_served_by_torch_and_says_why(adapters, monkeypatch, caplog):
    from refit.runtime import served as model

    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(model, "onnx_session", broken)
    with caplog.at_level(logging.WARNING, logger="refit.serving"):
        served = model.from_adapter(adapters.good, 3, runtime="onnx")
    assert served.runtime == "torch"
    assert "ONNX export failed (RuntimeError: no exporter here); serving with torch" in caplog.text


def test_an_export_that_disagrees_with_torch_is_not_served(adapters, monkeypatch, caplog):
    from refit.runtime import served as model

    real = model.ServedModel.probabilities

    def skewed(self, texts):
        proba = real(self, texts)
        return proba[:, ::-1] if self.session is not None else proba  # the export answers other labels

    monkeypatch.setattr(model.ServedModel, "probabilities", skewed)
    with caplog.at_level(logging.WARNING, logger="refit.serving"):
        served = model.from_adapter(adapters.good, 4, runtime="onnx")
    assert served.runtime == "torch"
    assert "differs from torch" in caplog.text


def test_unknown_runtime_is_refused(adapters):
    from refit.runtime.served import from_adapter

    with pytest.raises(ValueError, match="runtime must be one of"):
        from_adapter(adapters.good, 1, runtime="tensorrt")


def test_the_export_is_checked_on_a_text_alone_a_full_batch_and_a_padded_batch():
    from refit.runtime.served import probe_batches

    alone, full, padded = probe_batches([f"intent_{i}" for i in range(150)], batch_size=32)
    assert len(alone) == 1 and len(full) == 32
    words = sorted(len(text.split()) for text in padded)
    assert words[0] <= 6 and words[-1] >= 80  # short texts padded to long ones in one batch
    assert all(batch for batch in probe_batches(["yes", "no"], batch_size=32))  # a model of two labels too
    *_, small = probe_batches([f"intent_{i}" for i in range(150)], batch_size=1)
    assert sorted(len(text.split()) for text in small)[-1] >= 80 and len(small) == 2  # padded at any batch size
