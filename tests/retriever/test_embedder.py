import numpy as np
import pytest
from fake_embedder import FakeEmbedder

from raglora.errors import RagloraError
from retriever.embedder import Embedder, load_embedder, normalise, resolve_model_path


def test_fake_embedder_satisfies_the_protocol_and_is_deterministic():
    a, b = FakeEmbedder(), FakeEmbedder()
    assert isinstance(a, Embedder)
    va = a.encode(["roof tiles", "kitchen"])
    assert va.dtype == np.float32 and va.shape == (2, 64)
    assert np.array_equal(va, b.encode(["roof tiles", "kitchen"]))
    assert np.allclose(np.linalg.norm(va, axis=1), 1.0)


def test_normalise_keeps_zero_rows_zero():
    out = normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert out.dtype == np.float32 and np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_missing_local_model_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(RagloraError, match="no-model-here"):
        load_embedder(str(tmp_path / "no-model-here"))


def test_unknown_packaged_model_is_an_error():
    with pytest.raises(RagloraError, match="unknown packaged embedder 'packaged:nope'"):
        load_embedder("packaged:nope")


def test_packaged_name_resolves_to_the_shipped_folder():
    path = resolve_model_path("packaged:all-MiniLM-L6-v2")
    assert path.endswith("model") and resolve_model_path("some/model") == "some/model"


@pytest.mark.integration
def test_real_packaged_embedder_loads_once_and_hub_models_fail_offline():
    emb = load_embedder("packaged:all-MiniLM-L6-v2")
    assert emb is load_embedder("packaged:all-MiniLM-L6-v2")
    assert (emb.name, emb.dimension) == ("packaged:all-MiniLM-L6-v2", 384)
    v = emb.encode(["building permit", "bygglov"])
    assert v.shape == (2, 384) and v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1.0)
    with pytest.raises(RagloraError, match="could not load embedder 'nobody/not-a-cached-model'"):
        load_embedder("nobody/not-a-cached-model")
