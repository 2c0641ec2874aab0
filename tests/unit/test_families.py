"""Any encoder as the base: tiny random checkpoints of five families, built here from their configs (no download).

Each is adopted (v1 answers exactly as the checkpoint does, its base stored
as an MLflow artifact and found again after the original directory is gone),
updated at the head rung, and served through ``refit.runtime.served.from_adapter``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from refit import modeling
from refit.errors import RefitError

LABELS = ["balance", "transfer", "alarm", "weather"]
TEXTS = {
    "balance": ["what is my balance", "how much money do i have", "show my account balance", "balance please",
                "tell me my checking balance", "what's left in savings"],
    "transfer": ["send 20 dollars to sam", "transfer money to savings", "move cash to my other account",
                 "wire funds to mom", "make a transfer", "pay jane back 5 dollars"],
    "alarm": ["set an alarm for six", "wake me at 7 am", "alarm for noon please", "set my alarm",
              "turn on an alarm at 5", "i need an alarm tomorrow"],
    "weather": ["will it rain today", "what's the weather", "is it cold outside", "forecast for tomorrow",
                "do i need an umbrella", "how hot is it"],
}
FRAME = pd.DataFrame([(t, label) for label, texts in TEXTS.items() for t in texts], columns=["text", "label"])
FAMILIES = ["bert", "distilbert", "roberta", "deberta-v2", "mpnet"]


def _tokenizer(family: str, directory: Path):
    """A real tokenizer of the family's kind: the packaged MiniLM's WordPiece vocabulary, or a byte-level BPE
    trained here for RoBERTa."""
    from transformers import BertTokenizerFast, DistilBertTokenizerFast, MPNetTokenizerFast, RobertaTokenizerFast

    vocab = str(modeling.packaged_base_path() / "vocab.txt")
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(FRAME["text"].tolist(), vocab_size=400, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        scratch = directory.parent / f"{directory.name}-bpe"
        scratch.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(scratch))
        return RobertaTokenizerFast(vocab=str(scratch / "vocab.json"), merges=str(scratch / "merges.txt"))
    cls = {"distilbert": DistilBertTokenizerFast, "mpnet": MPNetTokenizerFast}.get(family, BertTokenizerFast)
    return cls(vocab=vocab)


def _config(family: str, vocab: int, pad: int):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, MPNetConfig, RobertaConfig

    small = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=64, pad_token_id=pad)
    return {
        "bert": lambda: BertConfig(**small),
        "distilbert": lambda: DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                               max_position_embeddings=64, pad_token_id=pad),
        "roberta": lambda: RobertaConfig(**(small | {"max_position_embeddings": 66})),
        "deberta-v2": lambda: DebertaV2Config(**small, relative_attention=True, position_biased_input=False,
                                              pos_att_type=["p2c", "c2p"]),
        "mpnet": lambda: MPNetConfig(**(small | {"max_position_embeddings": 66})),
    }[family]()


def build_checkpoint(family: str, directory: Path, labels=LABELS, seed: int = 0) -> Path:
    """A random sequence-classification checkpoint of ``family`` with its tokenizer, as save_pretrained writes it."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = _tokenizer(family, directory)
    config = _config(family, len(tokenizer), tokenizer.pad_token_id)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def plain_probabilities(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """The checkpoint's own answers with plain transformers: what the team sees without refit."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        features = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return torch.softmax(model(**features).logits, dim=-1).numpy()


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real MLflow store (SQLite, artifacts under tmp_path) and REFIT_HOME for the base-model cache."""
    import mlflow

    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("families", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment
    mlflow.set_tracking_uri(None)


def _changed(before: Path, after: Path) -> set[str]:
    from safetensors.numpy import load_file

    a, b = load_file(str(before / modeling.ADAPTER_WEIGHTS)), load_file(str(after / modeling.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    return {k for k in a if not np.array_equal(a[k], b[k])}


@pytest.mark.parametrize("family", FAMILIES)
def test_adopt_update_and_serve_each_family(family, tmp_path, tracking, caplog):
    import mlflow

    from refit.runtime.served import from_adapter
    from tasks.adopt import adopted_adapter, prepare_adoption, publish_base

    torch.set_num_threads(1)
    checkpoint = build_checkpoint(family, tmp_path / family)
    FRAME.to_csv(tmp_path / "train.csv", index=False)
    texts = FRAME["text"].tolist()
    own = plain_probabilities(checkpoint, texts)

    # adopt: checked, v1 is the checkpoint as it is, its base published in the run
    adoption = prepare_adoption(tmp_path / "train.csv", model_path=checkpoint)
    assert adoption.labels == LABELS and not set(adoption.golden["text"]) & set(adoption.train["text"])
    with mlflow.start_run(experiment_id=tracking):
        v1 = adopted_adapter.fn(checkpoint, 8, 16)
        base = publish_base.fn(v1)
    assert base.kind == "artifact" and base.sha256 == modeling.weights_sha256(checkpoint)
    assert modeling.base_of(v1) == base
    shutil.rmtree(checkpoint)  # the base must be found again from the run, not from where it was adopted

    tokenizer = modeling.load_tokenizer(v1)
    model = modeling.load_model(v1)
    assert np.abs(modeling.predict_proba(model, tokenizer, texts) - own).max() < 1e-5
    assert modeling.base_model_path(v1).is_relative_to(tmp_path / "home" / "cache" / "base-models")

    # update: the head rung (all layers frozen, cached), warm from v1
    warm = modeling.load_model(v1, trainable=True)
    ids = FRAME["label"].map({label: i for i, label in enumerate(LABELS)}).tolist()
    modeling.train_upper(warm, tokenizer, texts, ids, frozen_layers=6, epochs=8, learning_rate=0.05, batch_size=8)
    v2 = modeling.save_model(warm, tmp_path / "v2")
    changed = _changed(v1, v2)
    parts = modeling.anatomy(warm)
    assert changed and all(any(f".{h}." in k for h in parts.head) for k in changed), changed
    assert modeling.base_of(v2) == base
    assert not np.allclose(modeling.predict_proba(modeling.load_model(v2), tokenizer, texts), own)

    # serve: merged, exported to ONNX and checked against torch. Every family here exports; the torch fallback
    # (an export that fails or disagrees) is forced in tests/serving/test_model.py.
    with caplog.at_level(logging.WARNING, logger="refit.serving"):
        served = from_adapter(v2, 2, tokenizer=tokenizer, runtime="onnx")
    torch_served = from_adapter(v2, 2, tokenizer=tokenizer, runtime="torch")
    labels, confidence = served.predict(texts)
    expected, _ = torch_served.predict(texts)
    assert labels == expected and len(confidence) == len(texts)
    assert served.runtime == "onnx", caplog.text
    assert "serving with torch" not in caplog.text


@pytest.mark.parametrize("family,replays", [("bert", True), ("roberta", True), ("distilbert", True),
                                            ("deberta-v2", False), ("mpnet", False)])
def test_partial_freezing_replays_cached_layers_only_where_they_reproduce_the_model(family, replays, tmp_path,
                                                                                     tracking, caplog):
    torch.set_num_threads(1)
    checkpoint = build_checkpoint(family, tmp_path / family)
    adapter = modeling.save_model(modeling.adopt_checkpoint(checkpoint, modeling.LoraSpec()), tmp_path / "v1")
    model, tokenizer = modeling.load_model(adapter, trainable=True), modeling.load_tokenizer(adapter)
    ids = FRAME["label"].map({label: i for i, label in enumerate(LABELS)}).tolist()
    with caplog.at_level(logging.INFO, logger="refit.modeling"):
        modeling.train_upper(model, tokenizer, FRAME["text"].tolist(), ids, frozen_layers=3, epochs=1,
                             learning_rate=0.01, batch_size=8)
    assert ("training the whole forward pass" not in caplog.text) == replays, caplog.text
    changed = _changed(adapter, modeling.save_model(model, tmp_path / "v2"))
    layers = modeling.anatomy(model).layers
    trained_layers = {int(k.split(f"{layers}.")[1].split(".")[0]) for k in changed if f"{layers}." in k}
    assert trained_layers == {1}  # 3 of the policy's 6 frozen is 1 of these 2 layers: only the top one trains


@pytest.mark.parametrize("family,targets,head_out", [
    ("bert", ("query", "value"), "classifier"),
    ("distilbert", ("q_lin", "v_lin"), "classifier"),
    ("roberta", ("query", "value"), "classifier.out_proj"),
    ("deberta-v2", ("query_proj", "value_proj"), "classifier"),
    ("mpnet", ("q", "v"), "classifier.out_proj"),
])
def test_anatomy_is_read_from_the_model(family, targets, head_out, tmp_path):
    from transformers import AutoModelForSequenceClassification

    checkpoint = build_checkpoint(family, tmp_path / family)
    parts = modeling.anatomy(AutoModelForSequenceClassification.from_pretrained(checkpoint))
    assert (parts.num_layers, parts.targets, parts.head_out) == (2, targets, head_out)
    assert parts.max_length == 64


def test_packaged_base_keeps_its_bert_recipe():
    model = modeling.new_model(LABELS, modeling.LoraSpec(), seed=0)
    parts = modeling.anatomy(model)
    assert (parts.num_layers, parts.targets, parts.head) == (6, ("query", "value"), ("classifier", "pooler"))
    assert model.refit_base.kind == "packaged"


def test_frozen_layers_are_scaled_from_the_policys_six():
    assert [modeling.frozen_for(f, 6) for f in (0, 4, 6)] == [0, 4, 6]
    assert [modeling.frozen_for(f, 12) for f in (0, 4, 6)] == [0, 8, 12]
    assert [modeling.frozen_for(f, 2) for f in (0, 3, 4, 6)] == [0, 1, 1, 2]
    with pytest.raises(ValueError):
        modeling.frozen_for(7, 12)


def test_grown_head_of_a_dense_head_family_adds_rows_to_the_output_layer_only(tmp_path):
    checkpoint = build_checkpoint("roberta", tmp_path / "roberta")
    v1 = modeling.save_model(modeling.adopt_checkpoint(checkpoint, modeling.LoraSpec()), tmp_path / "v1")
    grown = modeling.grow_head(v1, ["crypto"], tmp_path / "grown")
    model = modeling.load_model(grown)
    texts = FRAME["text"].tolist()[:6]
    before = plain_probabilities(checkpoint, texts)
    after = modeling.predict_proba(model, modeling.load_tokenizer(grown), texts)
    assert after.shape == (6, 5) and modeling.model_labels(model) == LABELS + ["crypto"]
    assert np.abs(after[:, :4] / after[:, :4].sum(axis=1, keepdims=True) - before).max() < 1e-5


def test_a_base_whose_weights_changed_is_refused(tmp_path):
    checkpoint = build_checkpoint("bert", tmp_path / "bert")
    v1 = modeling.save_model(modeling.adopt_checkpoint(checkpoint, modeling.LoraSpec()), tmp_path / "v1")
    build_checkpoint("bert", checkpoint, seed=1)  # same place, other weights
    with pytest.raises(RefitError, match="not the"):
        modeling.load_model(v1)


def test_configured_base_model_trains_fresh_and_warm_through_train_adapter(tmp_path, monkeypatch):
    """REFIT_BASE_MODEL names the base of new models; the fine-tune task trains and updates over it."""
    from refit.cost import Rates
    from tasks.finetune import Recipe, train_adapter

    torch.set_num_threads(1)
    checkpoint = build_checkpoint("distilbert", tmp_path / "distil")
    monkeypatch.setenv("REFIT_BASE_MODEL", str(checkpoint))
    monkeypatch.setenv("REFIT_HOME", str(tmp_path / "home"))
    fresh = train_adapter(FRAME, Recipe(start="fresh", epochs=1, learning_rate=0.01, batch_size=8), Rates(0.048, 2.5),
                          labels=LABELS)
    assert modeling.base_of(fresh.adapter_dir).location == str(checkpoint.resolve())
    assert modeling.anatomy(modeling.load_model(fresh.adapter_dir)).model_type == "distilbert"
    warm = train_adapter(FRAME.assign(origin="new"), Recipe(frozen_layers=6, epochs=2, learning_rate=0.01,
                                                            batch_size=8), Rates(0.048, 2.5),
                         warm_start=fresh.adapter_dir)
    assert modeling.base_of(warm.adapter_dir) == modeling.base_of(fresh.adapter_dir)
    assert _changed(fresh.adapter_dir, warm.adapter_dir)


@pytest.mark.parametrize("case,match", [
    ("no-label-column", "has no label column 'label'"),
    ("empty", "is empty"),
    ("golden-label", "golden labels the model cannot output: crypto"),
    ("not-classifier", "not a sequence-classification checkpoint"),
    ("pickle-weights", "pickle-format"),
])
def test_bad_input_is_refused_before_anything_is_written(case, match, tmp_path):
    from tasks.adopt import prepare_adoption

    checkpoint = build_checkpoint("bert", tmp_path / "bert")
    train, golden = tmp_path / "train.csv", None
    FRAME.to_csv(train, index=False)
    if case == "no-label-column":
        FRAME.rename(columns={"label": "intent"}).to_csv(train, index=False)
    elif case == "empty":
        train.write_text("")
    elif case == "golden-label":
        golden = tmp_path / "golden.csv"
        pd.DataFrame({"text": ["buy bitcoin"], "label": ["crypto"]}).to_csv(golden, index=False)
    elif case == "not-classifier":
        checkpoint = modeling.packaged_base_path()  # a BertModel: an encoder without a classification head
    elif case == "pickle-weights":
        (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(RefitError, match=match):
        prepare_adoption(train, golden, checkpoint)
    assert sorted(p for p in tmp_path.rglob("*")) == before
