from pathlib import Path

import pytest

from pipeline.config import dump_config, load_config
from raglora.errors import RagloraError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert load_config(None, None).model_fields.keys() == cfg.model_fields.keys()


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS[0])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_set_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["retrieval.k=3", "retrieval.mode=bm25", "index.docs=[a, b]"])
    assert cfg.retrieval.k == 3 and cfg.retrieval.mode == "bm25" and cfg.index.docs == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("index:\n  chunk_size: -1\n", r"index\.chunk_size: .*greater than 0.*got -1"),
        ("retrieval:\n  mode: fuzzy\n", r"retrieval\.mode: .*'fuzzy'"),
        ("retreival:\n  k: 3\n", r"retreival: Extra inputs are not permitted"),
        ("index: [1, 2\n", r"invalid YAML at line"),
        ("- just\n- a list\n", r"top level must be a mapping"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RagloraError, match=message):
        load_config(p)


def test_missing_config_file_and_bad_override_are_clear_errors(tmp_path):
    with pytest.raises(RagloraError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(RagloraError, match="--set expects KEY=VALUE"):
        load_config(None, ["retrieval.k"])


def test_default_yaml_spells_out_the_code_defaults_of_every_section_it_does_not_customise():
    """configs/default.yaml is documentation users read; apart from the demo project's own choices (persona,
    sources, stages, eval sets) and its paths, it must not drift from the models' defaults."""
    from pipeline.config import Config

    cfg, defaults = load_config(CONFIGS[0].parent / "default.yaml"), Config()
    for section in ("retrieval", "model", "serve"):
        got, want = getattr(cfg, section).model_dump(), getattr(defaults, section).model_dump()
        got.pop("db_path", None), want.pop("db_path", None)
        assert got == want, section
    assert cfg.index.model_dump(exclude={"docs"}) == defaults.index.model_dump(exclude={"docs"})
    assert cfg.finetune.model_dump(exclude={"stages"}) == defaults.finetune.model_dump(exclude={"stages"})


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path):
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "raglora.yaml").write_text("paths:\n  data_dir: data\nindex:\n  docs: [../docs]\n")
    cfg = load_config(tmp_path / "bot" / "raglora.yaml", ["paths.reports_dir=out"])
    assert cfg.paths.data_dir == str(tmp_path / "bot" / "data")
    assert cfg.paths.index_dir == str(tmp_path / "bot" / "artifacts" / "index")  # a default, inside the project
    assert cfg.index.docs == [str(tmp_path / "docs")]
    assert cfg.paths.reports_dir == "out"  # --set values are as typed (relative to the working directory)


def test_cross_references_name_what_is_missing(tmp_path):
    with pytest.raises(RagloraError, match=r"stages\[x\]\.sources: unknown source 'nope'"):
        load_config(None, ["finetune.stages=[{name: x, sources: [nope]}]"])
    with pytest.raises(RagloraError, match=r"eval\.sets\.a: 'held_out:y' names no stage"):
        load_config(None, ["finetune.stages=[{name: x}]", "eval.sets={a: 'held_out:y'}"])


def test_set_indexes_into_lists_of_a_yaml_file():
    cfg = load_config(CONFIGS[0].parent / "default.yaml", ["finetune.stages.1.max_steps=2"])
    assert [s.max_steps for s in cfg.finetune.stages] == [15, 2, 12]
    with pytest.raises(RagloraError, match="'7' is not an index of a list with 3 items"):
        load_config(CONFIGS[0].parent / "default.yaml", ["finetune.stages.7.max_steps=2"])
