"""Small indexed datasets written on the fly for the data tests."""

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder


def write_dataset(prefix: str, documents, dtype=np.uint16) -> str:
    """Write one sequence per document; return the prefix."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)] if len(doc) else [])
    builder.finalize(prefix + ".idx")
    return prefix


def random_documents(seed: int, count: int, vocab: int = 300, max_len: int = 40, eod: int = None):
    """`count` documents of random length (some empty), each ending with eod when given."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        doc = list(rng.integers(0, vocab, int(rng.integers(0, max_len))))
        if eod is not None and doc:
            doc.append(eod)
        docs.append(doc)
    return docs


@pytest.fixture
def make_dataset(tmp_path):
    def make(name: str, documents, dtype=np.uint16) -> str:
        return write_dataset(str(tmp_path / name), documents, dtype)
    return make
