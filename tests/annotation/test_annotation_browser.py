"""End to end in Debian's headless Chromium: a clinician judges demo items with the mouse and
the keyboard, reloads, loses the server mid-way, works beside a colleague, and the export's
records and agreement come out right. Leaves a screenshot in outputs/test-artifacts/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from annotation_helpers import REPO, AnnotateServer, read_jsonl

pytestmark = pytest.mark.browser

ARTIFACT = REPO / "outputs" / "test-artifacts" / "annotate.png"


def open_page(browser: Any, url: str, context: Any = None) -> Any:
    ctx = context or browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector('body[data-ready="1"]')
    return page


def wait_saved(page: Any) -> None:
    page.wait_for_function(
        "() => { const s = document.getElementById('save-status');"
        " return s.dataset.state === 'saved' && s.dataset.pending === '0'; }"
    )


def wait_index(page: Any, index: int) -> None:
    page.wait_for_function(f"() => document.body.dataset.index === '{index}'")
    page.wait_for_function(
        f"() => document.getElementById('item-pos').textContent.startsWith('Item {index + 1} ')"
    )


def shown_order(page: Any, item: dict) -> list[int]:
    """Item answer index at positions A and B, read off the page."""
    texts = [page.text_content(f"#answer-text-{p}") for p in (0, 1)]
    return [item["answers"].index(t) for t in texts]


def judge(
    page: Any, item: dict, marks: tuple[bool, bool], pref: int | str, keys: bool
) -> list[int]:
    """Mark and prefer in the item's terms (answer 0, answer 1), whatever order is shown."""
    shown = shown_order(page, item)
    pos = {orig: p for p, orig in enumerate(shown)}
    for orig, ok in enumerate(marks):
        p = pos[orig]
        if keys:
            page.keyboard.press(str(1 + 2 * p + (0 if ok else 1)))
        else:
            page.click(f"#mark-{p}-{'yes' if ok else 'no'}")
    choice = "equal" if pref == "equal" else "AB"[pos[pref]]
    if keys:
        page.keyboard.press({"A": "a", "B": "b", "equal": "e"}[choice])
    else:
        page.click(f"#prefer-{choice}")
    wait_saved(page)
    return shown


def test_judge_with_the_mouse_and_screenshot(browser, demo_pairs, tmp_path, servers) -> None:
    items_path, image_root = demo_pairs
    items = read_jsonl(items_path)
    srv = AnnotateServer(items_path, tmp_path / "ann", "alice", image_root).start()
    servers.append(srv)
    page = open_page(browser, srv.url)

    # the first item: a DICOM CT, windowed, with its text
    assert page.get_attribute("body", "data-item-id") == items[0]["id"] == "ct_small-p1"
    page.wait_for_selector('#image[data-loaded="1"]')
    assert page.evaluate("document.getElementById('image').naturalWidth") == 128
    assert "DICOM CT" in page.text_content("#image-note")
    assert page.text_content("#question") == items[0]["question"]
    assert page.text_content("#caption") == items[0]["fig_caption"]
    assert page.text_content("#mentions") == items[0]["in_text_mention"]
    assert sorted(page.text_content(f"#answer-text-{p}") for p in (0, 1)) == sorted(
        items[0]["answers"]
    )

    # every click is on disk by the time the page says saved
    page.click("#mark-0-yes")
    wait_saved(page)
    lines = read_jsonl(srv.journal)
    assert len(lines) == 1 and lines[0]["acceptable"] == [True, None]
    page.click("#mark-1-no")
    page.click("#prefer-A")
    wait_saved(page)
    page.fill("#comment", "Sagittal reformats would settle a compression fracture.")
    page.locator("#comment").blur()
    wait_saved(page)
    lines = read_jsonl(srv.journal)
    assert len(lines) == 4
    assert lines[-1]["acceptable"] == [True, False] and lines[-1]["preferred"] == "A"
    assert lines[-1]["comment"].startswith("Sagittal")
    assert page.text_content("#item-status") == "judged"
    assert page.text_content("#progress-text") == "1 of 29 judged"

    # zoom, CT window presets, collapsible caption
    page.click("#zoom-in")
    page.click("#zoom-in")
    assert float(page.get_attribute("#viewer", "data-zoom")) > 1.5
    page.click("#zoom-reset")
    assert page.get_attribute("#viewer", "data-zoom") == "1"
    page.select_option("#window", "bone")
    page.wait_for_function(
        "() => document.getElementById('image-note').textContent.includes('bone window')"
    )
    page.select_option("#window", "soft")
    page.wait_for_function(
        "() => document.getElementById('image-note').textContent.includes('soft tissue')"
    )
    page.wait_for_selector('#image[data-loaded="1"]')
    page.click("#context summary")
    assert page.evaluate("document.getElementById('context').open") is False
    page.click("#context summary")

    shot = tmp_path / "annotate.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACT)
    print(f"screenshot of the annotation page: {ARTIFACT}")

    # next item, flag it as broken; previous brings the first judgment back
    page.click("#next")
    wait_index(page, 1)
    page.click("#flag")
    wait_saved(page)
    last = read_jsonl(srv.journal)[-1]
    assert last["item"] == items[1]["id"] and last["flagged"] is True
    assert page.text_content("#item-status") == "flagged"
    assert page.text_content("#progress-text") == "1 of 29 judged · 1 flagged"
    page.click("#prev")
    wait_index(page, 0)
    assert page.get_attribute("#mark-0-yes", "aria-pressed") == "true"
    assert page.get_attribute("#prefer-A", "aria-pressed") == "true"
    assert page.input_value("#comment").startswith("Sagittal")
    assert page.errors == []


def test_keyboard_reload_resume_and_server_killed(browser, demo_pairs, tmp_path, servers) -> None:
    items_path, image_root = demo_pairs
    items = read_jsonl(items_path)
    srv = AnnotateServer(items_path, tmp_path / "ann", "bob", image_root).start()
    servers.append(srv)
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = open_page(browser, srv.url, ctx)

    # view shortcuts: help, zoom, caption, CT window
    page.keyboard.press("?")
    assert page.evaluate("() => document.getElementById('help').open") is True
    page.keyboard.press("Escape")
    assert page.evaluate("() => document.getElementById('help').open") is False
    page.keyboard.press("+")
    assert float(page.get_attribute("#viewer", "data-zoom")) > 1
    page.keyboard.press("0")
    assert page.get_attribute("#viewer", "data-zoom") == "1"
    page.keyboard.press("m")
    assert page.evaluate("() => document.getElementById('context').open") is False
    page.keyboard.press("m")
    page.wait_for_selector('#image[data-loaded="1"]')
    page.keyboard.press("w")
    page.wait_for_function(
        "() => document.getElementById('image-note').textContent.includes('soft tissue window')"
    )

    judge(page, items[0], (True, False), 0, keys=True)
    page.keyboard.press("n")
    wait_index(page, 1)
    judge(page, items[1], (False, True), "equal", keys=True)
    page.keyboard.press("c")
    page.keyboard.type("Answer wording is ambiguous.")
    page.keyboard.press("Escape")  # leaves the box; the comment is saved
    wait_saved(page)
    assert read_jsonl(srv.journal)[-1]["comment"] == "Answer wording is ambiguous."
    page.keyboard.press("Enter")
    wait_index(page, 2)
    page.keyboard.press("1")  # one mark only: the item is not done
    wait_saved(page)

    # reload mid-way: back at the first unjudged item, with its partial judgment
    page.reload()
    page.wait_for_selector('body[data-ready="1"]')
    wait_index(page, 2)
    assert page.get_attribute("#mark-0-yes", "aria-pressed") == "true"
    assert page.text_content("#progress-text") == "2 of 29 judged"
    judge(page, items[2], (True, True), 1, keys=True)

    # kill -9 between two judgments: every line the page called saved is in the journal
    before = read_jsonl(srv.journal)
    srv.kill()
    # one line per action: 3 + 4 (with the comment) + 4 (one mark before the reload)
    assert len(before) == 11 and [ln["item"] for ln in before].count(items[2]["id"]) == 4
    assert before[-1]["preferred"] in ("A", "B") and None not in before[-1]["acceptable"]
    # a judgment while the server is down waits in the page, says so, and survives the tab
    page.keyboard.press("e")
    page.wait_for_function("() => document.getElementById('save-status').dataset.state === 'error'")
    assert "Not saved" in page.text_content("#save-status")
    page.close()
    assert len(read_jsonl(srv.journal)) == 11
    srv.start(port=srv.port)
    page = open_page(browser, srv.url, ctx)  # a new tab sends what the old one could not
    wait_index(page, 3)
    after = read_jsonl(srv.journal)
    assert len(after) == 12 and after[-1]["item"] == items[2]["id"]
    assert after[-1]["preferred"] == "equal"

    # and with the tab open, the page retries until the server is back
    judge(page, items[3], (True, False), 0, keys=True)
    srv.kill()
    page.keyboard.press("f")
    page.wait_for_function("() => document.getElementById('save-status').dataset.state === 'error'")
    srv.start(port=srv.port)
    wait_saved(page)
    last = read_jsonl(srv.journal)[-1]
    assert last["item"] == items[3]["id"] and last["flagged"] is True
    assert page.errors == []


def test_two_annotators_export_and_agreement(browser, demo_pairs, tmp_path, servers) -> None:
    items_path, image_root = demo_pairs
    items = read_jsonl(items_path)
    out = tmp_path / "ann"
    carol = AnnotateServer(items_path, out, "carol", image_root).start()
    servers.append(carol)
    dave = AnnotateServer(items_path, out, "dave", image_root).start()
    servers.append(dave)
    page_c, page_d = open_page(browser, carol.url), open_page(browser, dave.url)

    # in the items' terms: (marks of answers 0 and 1, preferred answer)
    plan = {
        "carol": [((True, False), 0), ((True, False), 0), ((False, True), 1), ((True, True), 0)],
        "dave": [
            ((True, False), 0),
            ((True, True), 1),
            ((False, True), 1),
            ((True, True), "equal"),
        ],
    }
    shown: dict[str, list[list[int]]] = {"carol": [], "dave": []}
    for i in range(4):  # interleaved: both servers write beside each other
        for name, page, keys in (("carol", page_c, False), ("dave", page_d, True)):
            marks, pref = plan[name][i]
            shown[name].append(judge(page, items[i], marks, pref, keys=keys))
            if keys:
                page.keyboard.press("ArrowRight")
            else:
                page.click("#next")
            wait_index(page, i + 1)
    page_c.click("#flag")
    page_c.fill("#comment", "Image is cropped too tightly.")
    page_c.locator("#comment").blur()
    wait_saved(page_c)
    # the two saw some answers in different orders, and some in the file's reverse order
    assert shown["carol"] != shown["dave"]
    assert [1, 0] in shown["carol"] + shown["dave"]

    run = subprocess.run(
        [sys.executable, "-m", "biomedvital", "annotate", "--export", "true",
         "--items", str(items_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["counts"]["preferences"] == 7 and summary["counts"]["flagged"] == 1

    prefs = read_jsonl(out / "export" / "preferences.jsonl")
    assert {p["annotator"] for p in prefs} == {"carol", "dave"}
    by_item = {(p["annotator"], p["item_id"]): p for p in prefs}
    for name, rows in plan.items():
        for i, (_, pref) in enumerate(rows):
            rec = by_item.get((name, items[i]["id"]))
            if pref == "equal":
                assert rec is None
                continue
            assert rec["preferred"] == items[i]["answers"][pref]  # shown order undone
            assert rec["rejected"] == items[i]["answers"][1 - pref]
            assert rec["shown_order"] == shown[name][i]
    marks = read_jsonl(out / "export" / "marks.jsonl")
    assert len(marks) == 8
    for m in marks:
        i = next(k for k, it in enumerate(items) if it["id"] == m["item_id"])
        expected = plan[m["annotator"]][i][0]
        assert [a["text"] for a in m["answers"]] == items[i]["answers"]
        assert tuple(a["acceptable"] for a in m["answers"]) == expected

    report = json.loads((out / "export" / "report.json").read_text())
    pair = report["agreement"]["pairs"]["carol|dave"]
    assert pair["shared_items"] == 4
    # preference labels carol 0,0,1,0 / dave 0,1,1,equal: p_o = 1/2, p_e = (3*1 + 1*2)/16
    assert pair["preference"]["agreement"] == pytest.approx(0.5)
    assert pair["preference"]["kappa"] == pytest.approx(3 / 11)
    # answer marks carol T,F,T,F,F,T,T,T / dave T,F,T,T,F,T,T,T: p_o = 7/8, p_e = 36/64
    assert pair["acceptable"]["agreement"] == pytest.approx(7 / 8)
    assert pair["acceptable"]["kappa"] == pytest.approx(5 / 7)
    assert report["annotators"]["carol"]["judged"] == 4
    assert report["annotators"]["dave"]["equal"] == 1
    assert report["flagged_items"] == [
        {"item": items[4]["id"], "annotator": "carol", "comment": "Image is cropped too tightly."}
    ]
    assert page_c.errors == [] and page_d.errors == []


def test_token_prompt_and_item_text_shown_as_text(browser, demo_pairs, tmp_path, servers) -> None:
    _, image_root = demo_pairs
    hostile = {
        "id": "x1",
        "image": "ct_small.dcm",
        "question": '<img src=x onerror="window.__pwned=1">Is <b>this</b> a fracture?',
        "answers": ['<script>window.__pwned=2</script>No & "no"', "</p><h1>Yes</h1>"],
        "fig_caption": "<iframe src=/api/state></iframe>caption",
        "in_text_mention": "<style>body{display:none}</style>mention",
    }
    items_path = tmp_path / "items.jsonl"
    items_path.write_text(json.dumps(hostile) + "\n")
    token = "correct-horse-battery-staple"
    srv = AnnotateServer(
        items_path, tmp_path / "ann", "erin", image_root, env={"BIOMEDVITAL_ANNOTATE_TOKEN": token}
    ).start()
    servers.append(srv)
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.goto(srv.url)
    page.wait_for_selector("#token-panel:not([hidden])")
    assert page.is_hidden("#main")
    page.fill("#token-input", "wrong-token-wrong-token")
    page.click("#token-submit")
    page.wait_for_function(
        "() => document.getElementById('token-error').textContent.includes('wrong')"
    )
    page.fill("#token-input", token)
    page.click("#token-submit")
    page.wait_for_selector('body[data-ready="1"]')
    page.wait_for_selector('#image[data-loaded="1"]')  # images travel with the token too

    assert page.text_content("#question") == hostile["question"]
    assert page.text_content("#caption") == hostile["fig_caption"]
    assert page.text_content("#mentions") == hostile["in_text_mention"]
    assert sorted(page.text_content(f"#answer-text-{p}") for p in (0, 1)) == sorted(
        hostile["answers"]
    )
    for tag in ("img", "b", "script", "h1", "iframe", "style"):
        assert page.locator(f"main {tag}").count() == (1 if tag == "img" else 0), tag
    assert page.evaluate("window.__pwned") is None
    assert page.is_visible("#question")
    page.keyboard.press("f")
    wait_saved(page)
    assert read_jsonl(srv.journal)[-1]["flagged"] is True


def test_a_save_waiting_through_a_restart_with_another_order_is_refused(
    browser, demo_pairs, tmp_path, servers
) -> None:
    """The page says what it showed, so a pending "A is better" is never applied to answers the
    restarted server would show in the other order (here: another ``--seed``)."""
    from biomedvital.annotation.items import shown_order as order_of

    items_path, image_root = demo_pairs
    first = read_jsonl(items_path)[0]["id"]
    srv = AnnotateServer(items_path, tmp_path / "ann", "fay", image_root).start()
    servers.append(srv)
    page = open_page(browser, srv.url)
    shown_a = page.text_content("#answer-text-0")
    srv.kill()
    page.keyboard.press("1")
    page.keyboard.press("4")
    page.keyboard.press("a")  # waits in the page: the server is down
    page.wait_for_function("() => document.getElementById('save-status').dataset.state === 'error'")
    seed = next(s for s in range(1, 64) if order_of(first, "fay", s) != order_of(first, "fay"))
    srv.args[-2:-2] = ["--seed", str(seed)]  # before --port, which start() replaces
    srv.start(port=srv.port)
    page.wait_for_function(
        "() => { const s = document.getElementById('save-status');"
        " return s.dataset.pending === '0' && s.dataset.state !== 'saving'; }"
    )
    assert "Not saved" in page.text_content("#save-status")
    assert "reload the page" in page.text_content("#save-status")
    assert not srv.journal.exists() or read_jsonl(srv.journal) == []
    page.reload()  # judged again as now shown: recorded for the answer the clinician saw
    page.wait_for_selector('body[data-ready="1"]')
    assert page.text_content("#answer-text-1") == shown_a
    page.keyboard.press("b")
    wait_saved(page)
    assert read_jsonl(srv.journal)[-1]["preferred"] == "B"
    assert page.errors == []
