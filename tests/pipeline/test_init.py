"""`raglora init`: inspect a company's inputs, write a complete config inside the project folder, fail clearly."""

import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.datasets import datasets_from_config
from pipeline.init import detect_language, init_project
from raglora.errors import RagloraError

ACME = Path(__file__).resolve().parents[1] / "fixtures" / "acme"


def test_init_writes_a_loadable_config_with_every_output_inside_the_project(tmp_path, capsys):
    rc = main(["init", str(tmp_path / "bot"), "--docs", str(ACME / "helpcenter"), str(ACME / "manuals"),
               "--qa", str(ACME / "tickets.csv"), "--name", "Acme Heating", "--subdomain", "category=heat-pumps,boilers"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "question=Customer wrote, answer=Agent resolution" in out and "heat-pumps (13)" in out
    assert "language: en" in out and "raglora demo --config" in out
    cfg = load_config(tmp_path / "bot" / "raglora.yaml")
    project = (tmp_path / "bot").resolve()
    for path in [*cfg.paths.model_dump().values(), cfg.serve.db_path]:
        assert Path(path).resolve().is_relative_to(project), path
    assert [s.name for s in cfg.finetune.stages] == ["general", "domain", "subdomain"]
    assert cfg.finetune.stages[2].where == {"category": ["heat-pumps", "boilers"]}
    assert cfg.project.name == "Acme Heating"
    assert Path(cfg.data.sources[1].path) == (ACME / "tickets.csv").resolve()


def test_init_project_data_is_leak_free_and_stages_split_by_category(tmp_path):
    target, _ = init_project(tmp_path / "bot", docs=[str(ACME / "helpcenter")], qa=[str(ACME / "tickets.csv")],
                             name="Acme", subdomain="category=heat-pumps,boilers")  # fmt: skip
    files, info, _ = datasets_from_config(load_config(target))
    assert {r["category"] for r in files["subdomain/train.jsonl"]} == {"heat-pumps", "boilers"}
    assert {r["category"] for r in files["domain/train.jsonl"]} == {"billing"}
    assert info["leak_check"]["held_out_in_training"] == 0
    assert files["subdomain/test.jsonl"] and all(r["source"] for r in files["subdomain/test.jsonl"])


def test_language_is_detected_from_the_data():
    swedish = ["Behöver jag bygglov för att bygga en altan på min tomt?", "Hur lång tid tar det att få ett beslut?"]
    assert detect_language(swedish * 3)[0] == "sv"
    assert detect_language(["How long does it take to install a heat pump at home?"] * 3)[0] == "en"


def test_init_keeps_an_existing_config_unless_forced(tmp_path):
    kwargs = dict(docs=[str(ACME / "helpcenter")], qa=[], name="Acme")
    target, _ = init_project(tmp_path, **kwargs)
    target.write_text(target.read_text() + "# my edits\n")
    with pytest.raises(RagloraError, match="already exists; pass --force"):
        init_project(tmp_path, **kwargs)
    assert target.read_text().endswith("# my edits\n")
    init_project(tmp_path, **kwargs, force=True)
    assert not target.read_text().endswith("# my edits\n")


def test_docs_only_project_gets_a_text_stage(tmp_path):
    target, _ = init_project(tmp_path, docs=[str(ACME / "helpcenter")], qa=[], name="Acme")
    cfg = load_config(target)
    assert [(s.name, s.kind) for s in cfg.finetune.stages] == [("general", "chat"), ("docs", "text")]
    files, _, _ = datasets_from_config(cfg)
    assert files["docs/train.jsonl"] and all("text" in r for r in files["docs/train.jsonl"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--docs", "{empty}"], r"--docs .*: no supported documents"),
        (["--docs", "{missing}"], r"--docs .*: no such file or folder"),
        (
            ["--qa", "{acme}/tickets.csv", "--subdomain", "category=saunas"],
            r"--subdomain: category \['saunas'\] not in the data",
        ),
        (["--qa", "{acme}/tickets.csv", "--subdomain", "category"], r"--subdomain expects FIELD=VALUE"),
        (
            ["--qa", "{acme}/tickets.csv", "--subdomain", "colour=red"],
            r"--subdomain: no column 'colour' in the Q/A files \(columns: Agent resolution, ",
        ),
        (["--qa", "{acme}/tickets.csv", "--question-field", "Subject"], r"question_field 'Subject' is not a column"),
        ([], r"give documents \(--docs\) or Q/A files \(--qa\)"),
    ],
)
def test_bad_init_input_is_one_error_line_and_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.xyz").write_text("x")
    args = [a.format(empty=tmp_path / "empty", missing=tmp_path / "nope", acme=ACME) for a in extra]
    assert main(["init", str(tmp_path / "bot"), "--name", "Acme", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "bot" / "raglora.yaml").exists()


def test_text_stage_without_documents_and_duplicate_stage_names_are_clear_errors(tmp_path):
    shutil.copy(ACME / "tickets.csv", tmp_path / "t.csv")
    target, _ = init_project(tmp_path / "bot", docs=[], qa=[str(tmp_path / "t.csv")], name="Acme")
    cfg = load_config(target, ["finetune.stages=[{name: docs, kind: text}]", "eval.sets={}"])
    with pytest.raises(RagloraError, match=r"stages\[docs\]: a text stage trains on the documents in index.docs"):
        datasets_from_config(cfg)
    with pytest.raises(RagloraError, match=r"duplicate stage names \['general'\]"):
        load_config(target, ["finetune.stages.1.name=general"])


def test_subdomain_may_name_the_mapped_column_in_any_case(tmp_path):
    target, _ = init_project(
        tmp_path, docs=[], qa=[str(ACME / "tickets.csv")], name="Acme", subdomain="product LINE=boilers"
    )
    cfg = load_config(target)
    assert cfg.finetune.stages[2].where == {"category": ["boilers"]}
