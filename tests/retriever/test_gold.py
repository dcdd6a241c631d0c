"""Gold passages of a Q/A row: by the row's source or id, else by the answer's distinctive words."""

from dataclasses import dataclass

from retriever.gold import GoldFinder


@dataclass
class C:
    chunk_id: str
    source: str
    text: str
    title: str = ""


FILLER = [
    C(f"f{i}", f"/kb/other-{i}.md", "You are welcome, yes we are open. Thank you for asking about that.")
    for i in range(30)
]
CHUNKS = [
    C("hp#0", "/kb/helpcenter/heat-pumps.md#e4", "E4 means the defrost cycle took too long. Switch the heat pump off at the isolator for five minutes.", "Error code E4"),
    C("bo#0", "/kb/helpcenter/boilers.html#pressure", "The pressure gauge should read between 1.0 and 1.5 bar when the system is cold.", "Low boiler pressure"),
    C("faq-7", "faq-7", "Invoices are sent by e-mail 14 days before the due date."),
    *FILLER,
]  # fmt: skip


def test_source_matches_path_file_name_stem_title_or_id():
    g = GoldFinder(CHUNKS)
    assert g.find({"source": "/kb/helpcenter/heat-pumps.md#e4"}) == ["hp#0"]
    assert g.find({"source": "heat-pumps.md"}) == ["hp#0"]
    assert g.find({"source": "Boilers"}) == ["bo#0"]  # the file stem, any case
    assert g.find({"source": "Low boiler pressure"}) == ["bo#0"]  # a section title
    assert g.find({"id": "faq-7", "source": None}) == ["faq-7"]  # a Q/A knowledge base indexes rows by id


def test_content_match_needs_most_of_the_answers_distinctive_words():
    g = GoldFinder(CHUNKS)
    paraphrase = "Switch the heat pump off at the isolator; E4 means the defrost took too long."
    assert g.find({"id": "t-1", "answer": paraphrase}) == ["hp#0"]
    # below the threshold: only the boiler's gauge is shared, the rest is about something else
    assert g.find({"id": "t-2", "answer": "Read the gauge of your water meter monthly and report usage online."}) == []


def test_short_or_generic_answers_have_no_gold_instead_of_matching_everything():
    g = GoldFinder(CHUNKS)
    for answer in ["Yes.", "You are welcome, thank you for asking.", "Yes we are open, thank you."]:
        assert g.find({"id": "x", "answer": answer}) == [], answer


def test_all_gold_adds_a_near_duplicate_answer_to_the_row_s_own_chunk():
    dup = C("faq-9", "faq-9", "Invoices are sent by e-mail 14 days before the due date, as a PDF.")
    g = GoldFinder([*CHUNKS, dup])
    row = {"id": "faq-7", "answer": "Invoices are sent by e-mail 14 days before the due date."}
    assert g.find(row) == ["faq-7"]  # the row's own chunk wins
    assert g.all_gold(row) == ["faq-7", "faq-9"]  # what a gold-removed question must not retrieve
