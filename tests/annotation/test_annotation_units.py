"""Annotation building blocks without a browser: journal, resume, export, kappa, safety."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from annotation_helpers import read_jsonl

from biomedvital.annotation.agreement import agreement, cohen_kappa
from biomedvital.annotation.annotate import annotate
from biomedvital.annotation.export import export_annotations
from biomedvital.annotation.images import ImageServer
from biomedvital.annotation.items import AnnotationItem, read_items, shown_order
from biomedvital.annotation.journal import (
    Journal,
    JournalLockedError,
    Judgment,
    journal_path,
    read_journal,
)
from biomedvital.annotation.server import (
    AnnotationApp,
    build_server,
    check_binding,
    static_file,
)
from biomedvital.annotation.session import AnnotationSession, JudgmentRejected
from biomedvital.data.images import ImageRoot
from biomedvital.data.records import read_preferences
from biomedvital.data.report import BadRecordError


def make_items(n: int = 4, image: str = "ct.dcm") -> list[dict]:
    return [
        {
            "id": f"it{i}",
            "image": image,
            "question": f"<image>\nQuestion {i}?",
            "answers": [f"first answer {i}", f"second answer {i}"],
            "fig_caption": f"caption {i}",
            "in_text_mention": [{"tokens": f"mention {i}."}],
            "pair_id": f"fig{i}",
        }
        for i in range(n)
    ]


def write_items(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def judgment(item: AnnotationItem, annotator: str = "ann", **kw: object) -> Judgment:
    fields: dict = {"shown": [0, 1], "acceptable": [None, None], "preferred": None}
    fields.update(kw)
    return Judgment(item=item.id, digest=item.digest(), annotator=annotator, **fields)


# ----------------------------------------------------------------------------- journal


def test_journal_torn_last_line_is_counted_ignored_and_cut(tmp_path: Path) -> None:
    items = [AnnotationItem.model_validate(r) for r in make_items(3)]
    path = journal_path(tmp_path, "ann")
    with Journal(path) as j:
        j.append(judgment(items[0], acceptable=[True, False], preferred="A"))
        # U+2028 is a line break for str.splitlines but not for JSONL: still one record
        j.append(judgment(items[1], comment="line\u2028separator"))
    with open(path, "ab") as f:  # a write cut short by a power cut
        f.write(b'{"v":1,"item":"it2","dig')
    state = read_journal(path)
    assert (state.lines, state.torn, state.invalid) == (3, 1, 0)
    assert set(state.latest) == {"it0", "it1"}
    assert state.latest["it1"].comment == "line\u2028separator"

    with Journal(path) as j:  # reopening cuts the torn tail (counted) before appending
        j.append(judgment(items[2], flagged=True))
    assert j.torn_cut == 1
    state = read_journal(path)
    assert (state.lines, state.torn) == (3, 0)
    assert state.latest["it2"].flagged
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 3


def test_one_server_per_annotator_journal(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "ann")
    with Journal(path), pytest.raises(JournalLockedError, match="in use"):
        Journal(path).open()
    with pytest.raises(ValueError, match="annotator"):
        journal_path(tmp_path, "../evil")


def test_reading_a_journal_keeps_its_writers_lock(tmp_path: Path) -> None:
    """The server reads the journals it appends to; the lock is on a file of its own, so closing
    the journal after a read (which drops a POSIX record lock on the journal itself) keeps it."""
    import subprocess
    import sys

    items = [AnnotationItem.model_validate(r) for r in make_items(1)]
    path = journal_path(tmp_path, "ann")
    other = (
        "import sys; from biomedvital.annotation.journal import Journal, JournalLockedError\n"
        "try:\n    Journal(sys.argv[1]).open()\nexcept JournalLockedError:\n    print('refused')"
    )
    with Journal(path) as j:
        j.append(judgment(items[0], flagged=True))
        assert read_journal(path).latest["it0"].flagged  # opens and closes the journal
        run = subprocess.run(
            [sys.executable, "-c", other, str(path)], capture_output=True, text=True, timeout=120
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "refused"


def test_resume_at_first_unjudged_item(tmp_path: Path) -> None:
    items = [AnnotationItem.model_validate(r) for r in make_items(5)]
    path = journal_path(tmp_path, "ann")
    with Journal(path) as j:
        j.append(judgment(items[0], acceptable=[True, False], preferred="A"))
        j.append(judgment(items[1], acceptable=[True, None]))  # partial: not done
        j.append(judgment(items[2], flagged=True))  # flagged counts as done
        j.append(judgment(items[3], acceptable=[False, True], preferred="equal"))
    with Journal(path) as j:
        session = AnnotationSession(items, j, "ann")
        assert session.resume_index() == 1
        assert [session.status(i) for i in range(5)] == [
            "done",
            "partial",
            "flagged",
            "done",
            "todo",
        ]
        session.record({"index": 1, "id": "it1", "acceptable": [True, True], "preferred": "B"})
        assert session.resume_index() == 4
        session.record({"index": 4, "id": "it4", "flagged": True})
        assert session.resume_index() is None
        progress = session.progress()
        assert (progress["done"], progress["flagged"], progress["resume"]) == (3, 2, None)
    # a changed item (same id, new text) is not taken as judged
    rows = make_items(5)
    rows[0]["answers"] = ["regenerated one", "regenerated two"]
    changed = [AnnotationItem.model_validate(r) for r in rows]
    with Journal(path) as j:
        session = AnnotationSession(changed, j, "ann")
        assert session.resume_index() == 0
        assert session.set_aside["changed_items"] == 1


def test_shown_order_is_stable_and_differs_between_annotators() -> None:
    orders = {a: [tuple(shown_order(f"it{i}", a)) for i in range(40)] for a in ("x", "y")}
    assert orders["x"] == [tuple(shown_order(f"it{i}", "x")) for i in range(40)]
    assert orders["x"] != orders["y"]
    assert {(0, 1), (1, 0)} == set(orders["x"])


# ----------------------------------------------------------------------------- export


def test_export_undoes_the_shown_order(tmp_path: Path) -> None:
    items_path = write_items(tmp_path / "items.jsonl", make_items(4))
    items = read_items(items_path)
    ann = tmp_path / "ann"
    with Journal(journal_path(ann, "x")) as j:
        # shown B first: "A" on the page is the item's answer 1
        j.append(judgment(items[0], "x", shown=[1, 0], acceptable=[True, False], preferred="A"))
        j.append(judgment(items[1], "x", shown=[0, 1], acceptable=[True, False], preferred="A"))
        j.append(judgment(items[2], "x", shown=[1, 0], acceptable=[True, True], preferred="equal"))
        j.append(judgment(items[3], "x", shown=[1, 0], flagged=True, comment="image cropped"))
        j.append(Judgment(item="gone", digest="0", annotator="x", shown=[0, 1], preferred="A"))
    report = export_annotations(items_path, ann)
    prefs = read_jsonl(ann / "export" / "preferences.jsonl")
    assert [(p["item_id"], p["preferred"], p["rejected"]) for p in prefs] == [
        ("it0", "second answer 0", "first answer 0"),
        ("it1", "first answer 1", "second answer 1"),
    ]
    assert prefs[0]["id"] == "it0@x" and prefs[0]["annotator"] == "x"
    assert prefs[0]["shown_order"] == [1, 0] and prefs[0]["question"] == "Question 0?"
    marks = {m["item_id"]: m["answers"] for m in read_jsonl(ann / "export" / "marks.jsonl")}
    assert marks["it0"] == [
        {"text": "first answer 0", "acceptable": False},
        {"text": "second answer 0", "acceptable": True},
    ]
    assert set(marks) == {"it0", "it1", "it2"}  # flagged items are left out
    c = report["annotators"]["x"]
    assert (c["judged"], c["equal"], c["flagged"], c["unknown_items"]) == (3, 1, 1, 1)
    assert report["flagged_items"] == [
        {"item": "it3", "annotator": "x", "comment": "image cropped"}
    ]
    # the selector's reader takes the exported file as is
    assert len(read_preferences(ann / "export" / "preferences.jsonl")) == 2


def test_kappa_golden_values() -> None:
    # Wikipedia's worked example: 50 proposals, 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = 0.2 / 0.5
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    # three labels, by hand: p_o = 4/6; a: 0,0,1,1,e,e; b: 0,1,1,1,e,0
    # p_e = (2*2 + 2*3 + 2*1) / 36 = 12/36; kappa = (4/6 - 1/3) / (2/3) = 1/2
    assert cohen_kappa(
        ["0", "0", "1", "1", "e", "e"], ["0", "1", "1", "1", "e", "0"]
    ) == pytest.approx(0.5, abs=1e-12)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined, not 1 or 0
    assert cohen_kappa([], []) is None
    assert agreement(["a", "a"], ["a", "a"]) == {"n": 2, "agreement": 1.0, "kappa": None}
    with pytest.raises(ValueError, match="length"):
        cohen_kappa(["a"], [])


# ----------------------------------------------------------------------------- items


def test_bad_items_file_names_file_line_and_field(tmp_path: Path) -> None:
    rows = make_items(3)
    rows[1].pop("answers")
    path = write_items(tmp_path / "items.jsonl", rows)
    with pytest.raises(BadRecordError, match=r"items\.jsonl:2: field 'answers'"):
        read_items(path)
    rows = make_items(3)
    rows[2]["answers"] = ["one", "two", "three"]
    with pytest.raises(BadRecordError, match=r"items\.jsonl:3: .*exactly two answers"):
        read_items(write_items(path, rows))
    rows = make_items(3)
    rows[2]["id"] = "it0"
    with pytest.raises(BadRecordError, match="duplicate id 'it0'"):
        read_items(write_items(path, rows))
    path.write_text(
        '{"id": "a", "image": "x.png", "question": "q?", "answers": ["a", "b"]}\n{oops\n'
    )
    with pytest.raises(BadRecordError, match=r"items\.jsonl:2: invalid JSON"):
        read_items(path)


def test_demo_items_are_the_demo_preference_pairs(demo_pairs: tuple[Path, Path]) -> None:
    items_path, image_root = demo_pairs
    items = read_items(items_path)
    root = ImageRoot(image_root)
    assert len(items) == 29
    assert {Path(it.image).suffix for it in items} >= {".dcm", ".png", ".jpg"}
    for it in items:
        root.resolve(it.image)
    prefs = {p.id: p for p in read_preferences(image_root.parent / "preferences.jsonl")}
    assert all(it.answers == [prefs[it.id].preferred, prefs[it.id].rejected] for it in items)


# ----------------------------------------------------------------------------- server


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """An in-process server over hostile items (escapes, absolute paths, markup)."""
    import pydicom.data

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), images / "ct.dcm")
    (tmp_path / "secret.png").write_bytes(b"not for the page")
    (images / "link.png").symlink_to(tmp_path / "secret.png")
    rows = make_items(5)
    rows[1]["image"] = "../secret.png"
    rows[2]["image"] = str(tmp_path / "secret.png")
    rows[3]["image"] = "link.png"
    rows[4]["question"] = '<img src=x onerror="alert(1)"> What <b>is</b> this?'
    items = read_items(write_items(tmp_path / "items.jsonl", rows))
    token = getattr(request, "param", None)
    journal = Journal(journal_path(tmp_path / "ann", "ann")).open()
    session = AnnotationSession(items, journal, "ann")
    server = build_server(AnnotationApp(session, ImageServer(ImageRoot(images)), token), port=0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield {"base": f"http://127.0.0.1:{server.server_address[1]}", "journal": journal.path}
    server.shutdown()
    server.server_close()
    journal.close()


def http(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_image_paths_stay_inside_the_image_root(served: dict) -> None:
    base = served["base"]
    status, headers, body = http(f"{base}/api/image?index=0")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body.startswith(b"\x89PNG")
    assert "DICOM CT" in urllib.parse.unquote(headers["X-Image-Note"])
    status, headers, body = http(f"{base}/api/image?index=0&window=bone")
    assert status == 200 and "bone window" in urllib.parse.unquote(headers["X-Image-Note"])
    for index in (1, 2, 3):  # ../ escape, absolute path, symlink out of the root
        status, _, body = http(f"{base}/api/image?index={index}")
        assert status == 403, index
        assert b"not for the page" not in body and b"secret" not in body
    assert http(f"{base}/api/image?index=99")[0] == 404
    assert http(f"{base}/../secret.png")[0] == 404


def test_item_text_is_data_never_markup(served: dict) -> None:
    status, headers, body = http(f"{served['base']}/api/item?index=4")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["question"] == '<img src=x onerror="alert(1)"> What <b>is</b> this?'
    status, headers, page = http(served["base"] + "/")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in page and b"onerror" not in page  # no inline script at all
    js = static_file("app.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    assert "textContent" in js


def test_judgments_are_validated_and_journaled(served: dict) -> None:
    base, ctype = served["base"], {"Content-Type": "application/json"}

    def post(obj: object, headers: dict[str, str] = ctype) -> int:
        return http(f"{base}/api/judge", json.dumps(obj).encode(), headers)[0]

    ok = {"index": 0, "id": "it0", "acceptable": [True, False], "preferred": "B"}
    assert post(ok) == 200
    assert post({**ok, "id": "it1"}) == 400  # index and id disagree: stale page
    assert post({**ok, "preferred": "C"}) == 400
    assert post({**ok, "acceptable": [True]}) == 400
    assert post({**ok, "annotator": "someone-else"}) == 400
    assert post({**ok, "index": 99}) == 400
    assert post(ok, {"Content-Type": "text/plain"}) == 415  # no cross-site simple form posts
    lines = read_jsonl(served["journal"])
    assert len(lines) == 1 and lines[0]["preferred"] == "B" and lines[0]["item"] == "it0"
    assert http(f"{base}/api/state", headers={"Host": "attacker.example:80"})[0] == 403


@pytest.mark.parametrize("served", ["s3cret-token-of-24-chars"], indirect=True)
def test_token_is_required_when_set(served: dict) -> None:
    base = served["base"]
    assert http(f"{base}/api/config")[2] == b'{"token_required": true}'
    assert http(f"{base}/")[0] == 200  # the page itself holds no item data
    assert http(f"{base}/api/state")[0] == 401
    assert http(f"{base}/api/item?index=0", headers={"X-Annotate-Token": "wrong"})[0] == 401
    assert http(f"{base}/api/image?index=0")[0] == 401
    good = {"X-Annotate-Token": "s3cret-token-of-24-chars"}
    assert http(f"{base}/api/state", headers=good)[0] == 200
    body = json.dumps({"index": 0, "id": "it0", "flagged": True}).encode()
    assert http(f"{base}/api/judge", body, {"Content-Type": "application/json"})[0] == 401
    assert http(f"{base}/api/judge", body, {"Content-Type": "application/json", **good})[0] == 200


def test_binding_beyond_loopback_needs_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("localhost", None)
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(ValueError, match="needs an access token"):
            check_binding(host, None)
    with pytest.raises(ValueError, match="at least 16"):
        check_binding("0.0.0.0", "short")
    check_binding("0.0.0.0", "a-long-enough-token-1234")
    monkeypatch.delenv("BIOMEDVITAL_ANNOTATE_TOKEN", raising=False)
    items = write_items(tmp_path / "items.jsonl", make_items(1))
    with pytest.raises(ValueError, match="BIOMEDVITAL_ANNOTATE_TOKEN"):
        annotate(
            items=items, out=tmp_path / "a", annotator="x", host="0.0.0.0", image_root=tmp_path
        )
    assert not (tmp_path / "a").exists()  # refused before anything was opened or bound


def test_dicom_images_are_windowed_for_the_browser(demo_pairs: tuple[Path, Path]) -> None:
    images = ImageServer(ImageRoot(demo_pairs[1]))
    mr = images.get("mr_small.dcm")
    assert mr.content_type == "image/png" and mr.data.startswith(b"\x89PNG")
    assert mr.note == "DICOM MR · file window C 600 / W 1600" and mr.windows == ()
    ct = images.get("ct_small.dcm")
    assert "min–max" in ct.note and ct.windows == ("soft", "lung", "bone", "brain")
    lung = images.get("ct_small.dcm", "lung")
    assert lung.note == "DICOM CT · lung window C -600 / W 1500" and lung.data != ct.data
    assert images.get("mr_small.dcm", "lung").data == mr.data  # presets are for CT only
    jpg = images.get("retina.jpg")
    assert (
        jpg.content_type == "image/jpeg" and jpg.data == (demo_pairs[1] / "retina.jpg").read_bytes()
    )


def test_export_of_the_demo_through_the_verb(tmp_path: Path, demo_pairs: tuple[Path, Path]) -> None:
    demo_dir, out = demo_pairs[1].parent, tmp_path / "ann"
    with pytest.raises(FileNotFoundError, match="no annotator journals"):
        annotate(demo=demo_dir, out=out, export=True)
    items = read_items(out / "demo_items.jsonl")
    with Journal(journal_path(out, "x")) as j:
        j.append(judgment(items[0], "x", shown=[1, 0], acceptable=[False, True], preferred="B"))
    summary = annotate(demo=demo_dir, out=out, export=True)
    assert summary["counts"] == {
        "items": 29,
        "annotators": 1,
        "judged_by_any": 1,
        "preferences": 1,
        "marks": 1,
        "flagged": 0,
        "partial_preferences": 0,
    }
    pref = read_preferences(out / "export" / "preferences.jsonl")[0]
    assert pref.preferred == items[0].answers[0]  # "B" shown first was the demo's preferred
    with pytest.raises(ValueError, match="either --items or --demo"):
        annotate(items=out / "demo_items.jsonl", demo=demo_dir, out=out, export=True)


# ----------------------------------------------------------------------------- review fixes


def test_export_leaves_out_preferences_of_partly_judged_items(tmp_path: Path) -> None:
    # the page shows "partly judged" until both answers are marked: not yet a preference
    items_path = write_items(tmp_path / "items.jsonl", make_items(3))
    items = read_items(items_path)
    ann = tmp_path / "ann"
    with Journal(journal_path(ann, "x")) as j:
        j.append(judgment(items[0], "x", acceptable=[True, False], preferred="A"))
        j.append(judgment(items[1], "x", preferred="B"))  # no marks at all
        j.append(judgment(items[2], "x", acceptable=[None, True], preferred="A"))
    report = export_annotations(items_path, ann)
    prefs = read_jsonl(ann / "export" / "preferences.jsonl")
    assert [p["item_id"] for p in prefs] == ["it0"]
    c = report["annotators"]["x"]
    assert (c["judged"], c["partial"], c["preferences"], c["partial_preferences"]) == (1, 2, 1, 2)
    assert c["preferred_position_A"] == 1
    assert report["counts"]["preferences"] == 1 and report["counts"]["partial_preferences"] == 2


def test_item_text_too_long_to_export_is_refused_when_read(tmp_path: Path) -> None:
    # else a clinician judges it and the export dies on it with a bare validation error
    for field, value in (
        ("fig_caption", "c" * 100_001),
        ("question", "<image>\n" + "q" * 100_001),
        ("answers", ["short answer", "a" * 100_001]),
    ):
        rows = make_items(2)
        rows[1][field] = value
        path = write_items(tmp_path / "items.jsonl", rows)
        with pytest.raises(BadRecordError, match=rf"items\.jsonl:2: field '{field}.*100,000"):
            read_items(path)


_FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_annotation_units import judgment, make_items
from biomedvital.annotation.items import AnnotationItem
from biomedvital.annotation.journal import Journal

items = [AnnotationItem.model_validate(r) for r in make_items(3)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, like a full disk
j = Journal({path!r}).open()
j.append(judgment(items[0], "x", acceptable=[True, False], preferred="A"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, ({size_after_first} + 20, hard))
try:
    j.append(judgment(items[1], "x", acceptable=[True, True], preferred="B"))
except OSError:
    print("first try failed")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again: the page retries
j.append(judgment(items[1], "x", acceptable=[True, True], preferred="B"))
j.append(judgment(items[2], "x", flagged=True))
j.close()
"""


def test_a_failed_append_does_not_swallow_the_next_saved_line(tmp_path: Path) -> None:
    # a write cut short mid-line (disk full) must not glue the retried line to its remains
    import subprocess
    import sys

    items = [AnnotationItem.model_validate(r) for r in make_items(1)]
    probe = tmp_path / "probe.jsonl"
    with Journal(probe) as j:
        j.append(judgment(items[0], "x", acceptable=[True, False], preferred="A"))
    path = journal_path(tmp_path, "x")
    script = _FULL_DISK.format(
        tests=str(Path(__file__).parent), path=str(path), size_after_first=probe.stat().st_size
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "first try failed" in run.stdout  # the limit did cut the second line short
    state = read_journal(path)
    assert sorted(state.latest) == ["it0", "it1", "it2"]
    assert state.torn == 0 and state.latest["it1"].preferred == "B"


def test_a_judgment_of_another_text_or_order_is_refused(tmp_path: Path) -> None:
    # the page judged positions A/B as it showed them; a restart with another --seed, or
    # regenerated items, must not map those positions onto other answers
    items = read_items(write_items(tmp_path / "items.jsonl", make_items(1)))
    other_seed = next(
        s for s in range(1, 64) if shown_order("it0", "x", s) != shown_order("it0", "x")
    )
    with Journal(journal_path(tmp_path / "ann", "x")) as j:
        view = AnnotationSession(items, j, "x").item_view(0)
    payload = {"index": 0, "id": "it0", "acceptable": [True, False], "preferred": "A"}
    with Journal(journal_path(tmp_path / "ann", "x")) as j:
        session = AnnotationSession(items, j, "x", seed=other_seed)
        with pytest.raises(JudgmentRejected, match="reload the page"):
            session.record({**payload, "view": view.get("view")})
    rows = make_items(1)
    rows[0]["answers"] = ["regenerated one", "regenerated two"]
    changed = read_items(write_items(tmp_path / "changed.jsonl", rows))
    with Journal(journal_path(tmp_path / "ann", "x")) as j:
        session = AnnotationSession(changed, j, "x")
        with pytest.raises(JudgmentRejected, match="no longer shown"):
            session.record({**payload, "view": view.get("view")})
    assert read_journal(journal_path(tmp_path / "ann", "x")).lines == 0
    with Journal(journal_path(tmp_path / "ann", "x")) as j:  # the same view is recorded
        session = AnnotationSession(items, j, "x")
        j_ = session.record({**payload, "view": view.get("view")})
        assert view["answers"][0] == items[0].answers[j_.original_preferred()]


def test_loopback_host_header_on_any_port_is_accepted(served: dict) -> None:
    # ssh -L 9000:localhost:8765 makes the browser send Host: localhost:9000
    base = served["base"]
    for host in ("localhost:9000", "127.0.0.1:80", "[::1]:8080", "127.0.0.1", "LOCALHOST:1"):
        assert http(f"{base}/api/state", headers={"Host": host})[0] == 200, host
    for host in ("attacker.example:8765", "localhost.attacker.example", "localhost@x.example"):
        assert http(f"{base}/api/state", headers={"Host": host})[0] == 403, host


def test_export_records_the_hash_of_the_journal_bytes_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server still running appends while the export works: the report's hash must be that of
    # the bytes the preferences came from, not of the file as it is later
    import hashlib

    import biomedvital.annotation.export as export_mod

    items_path = write_items(tmp_path / "items.jsonl", make_items(2))
    items = read_items(items_path)
    ann = tmp_path / "ann"
    path = journal_path(ann, "x")
    with Journal(path) as j:
        j.append(judgment(items[0], "x", acceptable=[True, False], preferred="A"))
    read = path.read_bytes()
    real = export_mod.read_journal

    def read_then_append(p: Path) -> object:
        state = real(p)
        with Journal(path) as j:  # the live server's next save
            j.append(judgment(items[1], "x", acceptable=[True, False], preferred="B"))
        return state

    monkeypatch.setattr(export_mod, "read_journal", read_then_append)
    report = export_annotations(items_path, ann)
    assert report["counts"]["preferences"] == 1
    assert report["inputs"]["journals"]["x"]["sha256"] == hashlib.sha256(read).hexdigest()
