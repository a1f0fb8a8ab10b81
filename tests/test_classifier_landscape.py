"""Fine-tuned classifiers (as `landscape finetune --save-models` writes them) go through the same
Fisher and surface stages: their loss is the cross-entropy of each row's label."""

import numpy as np
import pytest
import torch
from conftest import TEXT

from landscape import directions, fisher, surface
from landscape.data.corpus import load_batches
from landscape.data.objectives import sequence_losses
from landscape.models import load_model


@pytest.fixture
def labelled_file(tmp_path):
    path = tmp_path / "labelled.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXT)))
    return path


def test_saved_classifier_keeps_its_head_and_its_loss(classifier_dir, labelled_file):
    loaded = load_model(str(classifier_dir))
    assert loaded.kind == "classification"
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    batches = load_batches(loaded, corpus=str(labelled_file), seq_len=32, batch_size=5)
    assert sum(b["labels"].shape[0] for b in batches) == len(TEXT)
    with torch.no_grad():
        ours = sequence_losses(loaded.model, batches[0], loaded.kind)
        theirs = loaded.model(**batches[0]).loss
    torch.testing.assert_close(ours.loss_sum.mean(), theirs)
    assert torch.equal(ours.n_tokens, torch.ones(5))


def test_classifier_fisher_and_surface(classifier_dir, labelled_file):
    loaded = load_model(str(classifier_dir))
    batches = load_batches(loaded, corpus=str(labelled_file), seq_len=32, batch_size=4)
    scores = fisher.compute_fisher(loaded.model, batches, kind=loaded.kind)
    assert scores["classifier.weight"].abs().sum() > 0
    d = directions.random_direction(loaded.model, seed=0)
    z = surface.evaluate(loaded.model, [d], batches, np.array([-0.5, 0.0, 0.5]), kind=loaded.kind)
    with torch.no_grad():
        parts = [sequence_losses(loaded.model, b, loaded.kind) for b in batches]
    origin = float(sum(p.loss_sum.sum() for p in parts) / sum(p.n_tokens.sum() for p in parts))
    assert z.shape == (3,) and z[1] == pytest.approx(origin, rel=1e-5)
