"""Fixtures for the chat API and answer-pipeline tests (tiny random model, fake-embedder index, tiny adapters)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import make_index, make_service, make_stage_adapters, serve_settings

from pipeline.api.app import create_app


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory):
    return make_stage_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def index(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("kb"))


@pytest.fixture
def settings(tmp_path):
    return serve_settings(tmp_path)


@pytest.fixture
def service(settings, adapters_dir, index):
    svc = make_service(settings, adapters_dir, index)
    yield svc
    svc.close()


@pytest.fixture
def app(settings, service):
    return create_app(serve=settings, service=service)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer key-a"
        yield c
