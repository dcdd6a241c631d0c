"""Test data helpers for retriever tests (imported by conftest.py and tests; tests/retriever is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

ROOFING = [
    "Roof tiles crack in frost; replace broken roof tiles before winter to keep the roof dry.",
    "A roof inspection checks tiles, flashing and gutters for leaks after storms.",
    "Metal roof sheets last longer than concrete roof tiles but cost more per square metre.",
    "Moss on roof tiles holds water; clean the roof gently without a pressure washer.",
    "Roof repair after a leak: dry the attic, replace the underlay and the damaged tiles.",
    "Roof tiles and ridge tiles need new mortar every twenty years.",
]
PERMITS = [
    "A building permit is needed for an extension; changing roof colour may also need one.",
    "The municipality answers a permit application within ten weeks.",
]
KITCHEN = [
    "Kitchen renovation starts with plumbing and electrics before new cabinets.",
    "Choose a worktop: stone resists heat, wood needs oiling twice a year.",
]


def faq_rows() -> list[dict]:
    rows = []
    for category, answers in (("roofing", ROOFING), ("permits", PERMITS), ("kitchen", KITCHEN)):
        for i, answer in enumerate(answers, start=1):
            rows.append(
                {
                    "id": f"{category}-{i:03d}",
                    "category": category,
                    "question": f"Question {i} about {category}?",
                    "answer": answer,
                    "sources": ["Boverket"],
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GUIDE_MD = """# Heat pumps

An air-to-water heat pump heats radiators and tap water. It needs a yearly service.

## Noise

Place the outdoor unit away from bedroom windows; neighbours may complain about fan noise.

# Insulation

Attic insulation is the cheapest energy saving. Add mineral wool to reach 500 millimetres.
"""


def make_pdf(path: Path, pages: list[str]) -> Path:
    """Write a minimal valid PDF with one line of Helvetica text per page (no PDF writer needed)."""
    objects: list[bytes] = []
    n_pages = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    font_id = 3 + 2 * n_pages
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path
