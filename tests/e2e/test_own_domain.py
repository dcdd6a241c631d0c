"""A second, unseen company through the CLI only: init -> data -> index -> finetune -> eval -> serve -> one chat.

Acme Heating (tests/fixtures/acme) has Markdown and HTML help pages, a manual and a semicolon CSV of tickets whose
columns are named "Customer wrote", "Agent resolution", "Product line" and "KB article". Nothing in the code knows
it; the tiny random model stands in for the base, so answers are noise: this proves the wiring, not quality.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_model import save_tiny_model

from pipeline.cli import main

ACME = Path(__file__).resolve().parents[1] / "fixtures" / "acme"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def test_unseen_company_end_to_end_through_the_cli(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "tiny-base")
    bot = tmp_path / "acme-bot"
    _run("init", str(bot), "--docs", str(ACME / "helpcenter"), str(ACME / "manuals"),
         "--qa", str(ACME / "tickets.csv"), "--name", "Acme Heating", "--subdomain", "category=heat-pumps,boilers",
         "--question-field", "Customer wrote", "--answer-field", "Agent resolution", "--base", str(base))  # fmt: skip
    config = str(bot / "raglora.yaml")
    # A user renames a stage; PEFT refuses '.' in adapter names, so this name also proves the stage plumbing.
    text = (bot / "raglora.yaml").read_text()
    text = text.replace("name: subdomain", "name: heat.pumps-boilers").replace(":subdomain", ":heat.pumps-boilers")
    (bot / "raglora.yaml").write_text(text)
    _run("data", "--config", config)
    manifest = json.loads((bot / "data" / "manifest.json").read_text())
    assert manifest["leak_check"]["held_out_in_training"] == 0
    _run("index", "--config", config)
    _run("finetune", "--config", config, "--max-steps", "2", "--set", "finetune.stages.0.batch_size=2")
    for stage, parents in [("general", []), ("domain", ["general"]), ("heat.pumps-boilers", ["general", "domain"])]:
        m = json.loads((bot / "artifacts" / "adapters" / stage / "manifest.json").read_text())
        assert m["parents"] == parents and m["metrics"]["optimizer_steps"] == 2
    capsys.readouterr()
    _run("merge", "--config", config, "--out", str(bot / "artifacts" / "merged"))
    assert (bot / "artifacts" / "merged" / "config.json").is_file()
    _run("eval", "--config", config, "--limit", "3", "--set", "eval.speedup_questions=0",
         "--set", "eval.max_new_tokens=8", "--set", "eval.bootstrap_resamples=50")  # fmt: skip
    report = Path(capsys.readouterr().out.split("report: ")[1].split()[0])
    assert report.is_file() and report.resolve().is_relative_to(bot.resolve())
    results = json.loads((report.parent / "results.json").read_text())
    assert {"rag+lora-heat.pumps-boilers", "rag+lora-domain", "lora-general"} <= set(results["arms"])
    assert {n: s["n"] for n, s in results["test_sets"].items()} == {
        "domain": 2,
        "subdomain": 3,
        "general": 3,
        "out_of_kb": 3,
        "gold_removed_domain": 2,  # every held-out ticket has gold in the index (help-center pages or FAQ rows)
        "gold_removed_subdomain": 3,
    }
    served = results["arms"][results["headline"]["served_arm"]]
    assert {"trust_score", "grounded_refusal_f1", "refusal_gold_removed"} <= set(served["metrics"])

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--config", config, "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(0.5)
        assert "raglora-rag+lora-heat.pumps-boilers" in models
        reply = client.chat.completions.create(
            model="raglora-rag+lora-heat.pumps-boilers",
            messages=[{"role": "user", "content": "my boiler pressure is low, what should I do?"}],
            max_tokens=8,
        )
        assert reply.choices[0].message.content is not None and reply.model == "raglora-rag+lora-heat.pumps-boilers"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
