"""``fix_untrained_tokens``: give untrained token rows a trained starting point.

Many base models ship tokens whose embedding rows were never trained (all
zeros: reserved or chat-template tokens of a base model). A row of zeros in
the head gives the token a logit of 0 whatever the input, and training on it
can diverge. Axolotl's meaning (its copy of Unsloth's fix): before training,
every such token that occurs in the training rows gets, in the input
embeddings and in the output head, the mean of the trained rows, scaled by how
often the token occurs relative to the most frequent token of the data; a
listed token that never occurs gets zeros.

``true`` finds the untrained rows (every value of the input-embedding row
within 1e-16 of 0); a token id or a list of ids adds those tokens whatever
their rows hold.
"""

from __future__ import annotations

from plait.errors import ConfigError

#: a row whose every value is within this of 0 was never trained
UNTRAINED_EPS = 1e-16


def listed_ids(value) -> list[int]:
    """The ids ``fix_untrained_tokens`` names (``true``: none, only the found ones)."""
    if value is True:
        return []
    return [value] if isinstance(value, int) else list(value)


def token_counts(dataset, size: int):
    """How often each token id occurs in the training rows' ``input_ids``."""
    import numpy as np

    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, len(dataset), 1024):
        rows = dataset[start:start + 1024]["input_ids"]
        ids = np.fromiter((i for row in rows for i in row), dtype=np.int64)
        np.add.at(counts, ids[ids < size], 1)
    return counts


def fix_untrained_tokens(model, dataset, value) -> list[int]:
    """Set the rows of the untrained tokens of ``dataset`` (and the listed ones)
    to the frequency-scaled mean of the trained rows, in the input embeddings
    and the head. Returns the fixed token ids."""
    import torch

    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else None
    vocab = embedding.shape[0]
    listed = listed_ids(value)
    bad = [i for i in listed if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"config key 'fix_untrained_tokens': {bad} are not token ids of this model "
                          f"(0 to {vocab - 1})")
    with torch.no_grad():
        untrained = embedding.detach().abs().amax(dim=1) <= UNTRAINED_EPS
        if listed:
            untrained[listed] = True
        counts = torch.from_numpy(token_counts(dataset, vocab))
        # found rows the data never uses stay as they are; listed ones are set even if unused (to 0)
        chosen = untrained & ((counts > 0) | torch.isin(torch.arange(vocab), torch.tensor(listed, dtype=torch.long)))
        ids = torch.nonzero(chosen).flatten()
        if not len(ids):
            return []
        trained = ~untrained
        if not trained.any():
            raise ConfigError("config key 'fix_untrained_tokens': every embedding row of the model is untrained "
                              "(all zeros); there is no trained mean to start from")
        scale = (counts[ids].double() / max(int(counts.max()), 1)).unsqueeze(1)
        for matrix in {id(m): m for m in (embedding, head) if m is not None}.values():
            rows = min(matrix.shape[0], vocab)
            keep = trained[:rows].to(matrix.device)
            mean = matrix[:rows][keep].double().mean(dim=0, keepdim=True)
            fixed = ids[ids < rows]
            matrix[fixed.to(matrix.device)] = (mean * scale[:len(fixed)].to(matrix.device)).to(matrix.dtype)
    return ids.tolist()
