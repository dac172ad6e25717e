"""Stage A of UniErase: the unlearning token (docs/algorithm.md, "Stage A: the unlearning token").

New special tokens `<unlearn_0> … <unlearn_{K-1}>` are added to the vocabulary and only their
embedding rows are trained, so that "question + U" continues with a refusal, the closing U and the
end-of-turn token. Every original parameter stays frozen and bit-identical. One file per step:

- config.py: the settings (TokenConfig, its phases and the phase-3 noise).
- vocabulary.py: the token strings, how many tokens, adding them to tokenizer and model.
- refusal.py: which refusal each question is trained to give.
- examples.py: the training examples (plain and chat formats), their labels, the batch order.
- perturbation.py: the phase-3 noise on the edit layers' `down_proj` weights.
- module.py: the LightningModule that trains only the new rows.
- artifact.py: the trained rows on disk (save, load, apply to a fresh model) and their cache key.
- train.py: the driver, `train_unlearning_token`, running the three phases.
"""
from unierase.token.artifact import TokenArtifact, artifact_key
from unierase.token.config import TokenConfig
from unierase.token.refusal import refusal_for
from unierase.token.train import train_unlearning_token

__all__ = ["TokenArtifact", "TokenConfig", "artifact_key", "refusal_for", "train_unlearning_token"]
