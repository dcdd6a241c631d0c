"""Stage names and order come from the trained manifests' parent chains, never from a list in the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import make_service, make_stage_adapters, serve_settings

from pipeline.api.app import create_app
from pipeline.routing import UnknownModel
from pipeline.stage_models import StageInfo, deepest_stage, discover_stages, order_stages
from raglora.errors import RagloraError

CHAIN = ("basics", "heat-pumps", "heat-pumps.boilers")


@pytest.fixture(scope="module")
def own_adapters(tmp_path_factory):
    # Written in reverse-alphabetical folder order on purpose: the order must come from the manifests.
    return make_stage_adapters(tmp_path_factory.mktemp("own-adapters"), stages=CHAIN)


@pytest.fixture
def own_service(tmp_path, own_adapters):
    svc = make_service(serve_settings(tmp_path), own_adapters)
    yield svc
    svc.close()


def _info(name, parents=(), initialized_from=None):
    return StageInfo(name, Path(name), tuple(parents), initialized_from=initialized_from)


def test_discovered_in_parent_chain_order_whatever_the_names(own_adapters):
    stages = discover_stages(own_adapters)
    assert [s.name for s in stages] == list(CHAIN)
    assert stages[-1].chain == CHAIN
    assert deepest_stage(stages) == "heat-pumps.boilers"


def test_order_puts_every_stage_after_its_parents_and_breaks_ties_by_name():
    stages = [
        _info("zeta"),
        _info("b-child", ["zeta"]),
        _info("a-root"),
        _info("a-child", ["a-root"]),
        _info("grandchild", ["zeta", "b-child"]),
    ]
    names = [s.name for s in order_stages(stages)]
    assert names == ["a-root", "a-child", "zeta", "b-child", "grandchild"]
    assert deepest_stage(stages) == "grandchild"
    # equally deep ends: the first by name
    assert deepest_stage([_info("r"), _info("y", ["r"]), _info("x", ["r"])]) == "x"
    assert deepest_stage([]) is None


def test_a_stage_continued_from_another_comes_after_it():
    # continue_previous_adapter: "specialist" has no parents but was initialized from "alpha-general"'s weights
    stages = [_info("specialist", initialized_from="zz-general"), _info("zz-general")]
    assert [s.name for s in order_stages(stages)] == ["zz-general", "specialist"]
    assert deepest_stage(stages) == "specialist"


def test_a_parent_cycle_is_a_clear_error():
    with pytest.raises(RagloraError, match="cycle"):
        order_stages([_info("a", ["b"]), _info("b", ["a"])])


def test_default_stage_is_the_deepest_and_model_names_use_the_trained_stages(own_service):
    svc = own_service
    assert svc.models.stage_names == list(CHAIN)
    assert svc.default_stage == "heat-pumps.boilers"
    assert svc.default_model == "raglora-lora-heat-pumps.boilers"  # no index: rag+lora falls back to lora
    assert svc.model_names() == ["raglora-base", "raglora-lora", *(f"raglora-lora-{s}" for s in CHAIN)]
    assert svc.resolve_model("raglora-lora-heat-pumps") == ("lora", "heat-pumps")
    assert svc.resolve_model("raglora-lora-heat-pumps.boilers") == ("lora", "heat-pumps.boilers")
    assert svc.resolve_model("raglora-lora") == ("lora", "heat-pumps.boilers")
    assert svc.resolve_model(None) == ("lora", "heat-pumps.boilers")
    with pytest.raises(UnknownModel):
        svc.resolve_model("raglora-lora-subdomain")
    assert svc.answer("hello", [], mode="lora").stage == "heat-pumps.boilers"


def test_configured_default_stage_is_used(tmp_path, own_adapters):
    svc = make_service(serve_settings(tmp_path, default_stage="heat-pumps"), own_adapters)
    try:
        assert svc.default_stage == "heat-pumps"
    finally:
        svc.close()


def test_untrained_default_stage_is_one_clear_error(tmp_path, own_adapters):
    with pytest.raises(RagloraError, match="serve.default_stage 'subdomain' is not a trained stage") as err:
        make_service(serve_settings(tmp_path, default_stage="subdomain"), own_adapters)
    assert "basics, heat-pumps, heat-pumps.boilers" in str(err.value) and "\n" not in str(err.value)


def test_models_endpoint_and_chat_with_free_stage_names(tmp_path, own_service, index):
    settings = serve_settings(tmp_path)
    own_service.index = index  # rag modes on
    own_service.routing.has_index = True
    with TestClient(create_app(serve=settings, service=own_service)) as client:
        client.headers["Authorization"] = "Bearer key-a"
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "raglora-rag+lora-heat-pumps.boilers" in ids and "raglora-lora-basics" in ids
        assert not any(i.endswith(("-general", "-domain", "-subdomain")) for i in ids)
        body = {
            "model": "raglora-rag+lora-heat-pumps",
            "messages": [{"role": "user", "content": "Do I need a building permit for an extension?"}],
        }
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["model"] == "raglora-rag+lora-heat-pumps"
        assert reply["raglora"]["stage"] == "heat-pumps" and reply["raglora"]["mode"] == "rag+lora"
