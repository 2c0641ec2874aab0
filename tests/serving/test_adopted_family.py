"""A classifier of another family, with its own tokenizer, adopted and served as its team sees it.

The checkpoint is a small RoBERTa whose byte-level BPE vocabulary is trained
here on the training texts, and whose weights are fine-tuned here with plain
torch and saved with ``save_pretrained``: nothing of it comes from the
packaged MiniLM. ``refit adopt`` registers it and ``refit serve`` (a real
process, real HTTP) must answer with the checkpoint's own label, as plain
transformers computes it, on the golden texts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REFIT = [sys.executable, "-m", "refit.cli"]
INTENTS = ["balance", "transfer", "alarm", "weather", "flip_coin", "timer", "translate", "book_flight", "recipe",
           "pay_bill"]


def _train_checkpoint(train: pd.DataFrame, directory: Path) -> Path:
    """A RoBERTa trained from scratch on ``train`` with its own BPE vocabulary, as a team outside refit would."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train["text"].tolist(), vocab_size=1500, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    vocab_dir = directory.parent / "bpe"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(vocab_dir))
    tokenizer = RobertaTokenizerFast(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                           num_labels=len(INTENTS), id2label=dict(enumerate(INTENTS)),
                           label2id={label: i for i, label in enumerate(INTENTS)})
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ids = torch.tensor(train["label"].map(INTENTS.index).to_numpy())
    model.train()
    for _ in range(6):
        order = torch.randperm(len(train))
        for start in range(0, len(train), 16):
            pick = order[start : start + 16]
            features = tokenizer(train["text"].iloc[pick.numpy()].tolist(), padding=True, return_tensors="pt")
            model(**features, labels=ids[pick]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _own_labels(checkpoint: Path, texts: list[str]) -> list[str]:
    """The checkpoint's answers with plain transformers, loaded from its directory alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    labels = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            features = tokenizer(texts[start : start + 64], padding=True, truncation=True, return_tensors="pt")
            labels += [model.config.id2label[int(i)] for i in model(**features).logits.argmax(-1)]
    return labels


def test_adopted_roberta_is_served_with_its_own_tokenizer(tmp_path, data_dir):
    import httpx
    import torch

    from refit.bench.children import free_port, wait_ready
    from refit.data import load_clinc150

    torch.set_num_threads(1)
    clinc = load_clinc150(data_dir)
    train = clinc[(clinc["split"] == "train") & clinc["label"].isin(INTENTS)].groupby("label").head(60)
    golden = clinc[(clinc["split"] == "test") & clinc["label"].isin(INTENTS)].groupby("label").head(30)
    assert len(golden) == 300
    train[["text", "label"]].to_csv(tmp_path / "train.csv", index=False)
    golden[["text", "label"]].to_csv(tmp_path / "golden.csv", index=False)
    checkpoint = _train_checkpoint(train, tmp_path / "roberta")
    texts = golden["text"].tolist()
    own = _own_labels(checkpoint, texts)
    # The checkpoint learned something, so agreeing with it is not agreeing with a constant.
    assert np.mean([a == b for a, b in zip(own, golden["label"])]) > 0.4
    assert len(set(own)) >= 5

    port = free_port()
    env = os.environ | {"REFIT_HOME": str(tmp_path / "home"), "REFIT_DATA_DIR": str(data_dir),
                        "REFIT_TORCH_THREADS": "1", "REFIT_SERVE_PORT": str(port),
                        "REFIT_SERVE_URL": f"http://127.0.0.1:{port}", "REFIT_SERVE_POLL_SECONDS": "0"}
    adopted = subprocess.run(REFIT + ["adopt", "--model", str(checkpoint), "--train", str(tmp_path / "train.csv"),
                                      "--golden", str(tmp_path / "golden.csv"), "--model-name", "roberta-intents",
                                      "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert adopted.returncode == 0, adopted.stderr[-3000:]
    assert json.loads(adopted.stdout.strip().splitlines()[-1])["version"] == 1

    server = subprocess.Popen(REFIT + ["serve", "--model-name", "roberta-intents"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout=240)
        served = []
        for start in range(0, len(texts), 50):
            reply = httpx.post(url + "/predict", json={"texts": texts[start : start + 50]}, timeout=120)
            assert reply.status_code == 200, reply.text
            served += [(p["label"], p.get("served_by", "champion")) for p in reply.json()["predictions"]]
    finally:
        server.terminate()
        server.wait(timeout=60)
    # Where its gated cascade is served, its student answers some texts: the model's own answers are the rest.
    by_model = [(label, mine) for (label, tier), mine in zip(served, own) if tier == "champion"]
    assert len(by_model) >= 50, len(by_model)
    agree = np.mean([a == b for a, b in by_model])
    assert agree >= 0.97, agree


def test_a_tokenizer_of_another_base_is_refused(tmp_path):
    """Pairing a version with a vocabulary larger than its embeddings fails loudly, before it answers anything."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from refit import modeling
    from refit.errors import RefitError
    from refit.runtime.served import check_vocabulary

    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=37))
    with pytest.raises(RefitError, match="tokenizer has 30522 ids but the model embeds 300"):
        check_vocabulary(model, modeling.load_tokenizer(), 3)
