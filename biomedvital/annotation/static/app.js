// Clinician annotation page. Item text is only ever set with textContent (never parsed as
// HTML). Every action is sent at once as the item's whole new state; until the server says it
// is on disk it waits in a queue kept in localStorage, retried every second, so a closed tab or a
// server restart loses nothing.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const RETRY_MS = 1000;
  const COMMENT_DEBOUNCE_MS = 700;
  const ZOOM_MIN = 1;
  const ZOOM_MAX = 8;
  const WINDOW_NAMES = { soft: "soft tissue", lung: "lung", bone: "bone", brain: "brain" };

  const st = {
    token: sessionStorage.getItem("annotate-token") || "",
    annotator: "",
    total: 0,
    statuses: [],
    index: 0,
    item: null,
    judgment: null,
    loadSeq: 0,
    pending: [],
    flushing: false,
    retryTimer: null,
    commentTimer: null,
    imageUrl: null,
    window: "",
    zoom: 1,
    panX: 0,
    panY: 0,
  };

  // ------------------------------------------------------------------ server

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function request(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    opts.headers = Object.assign({}, opts.headers);
    if (st.token) opts.headers["X-Annotate-Token"] = st.token;
    opts.cache = "no-store";
    const resp = await fetch(path, opts);
    if (resp.status === 401) {
      showToken("The access token is missing or wrong.");
    }
    return resp;
  }

  async function getJson(path) {
    const resp = await request(path);
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new HttpError(resp.status, body.error || resp.statusText);
    return body;
  }

  // ------------------------------------------------------------------ start

  async function boot() {
    bindControls();
    let config;
    try {
      config = await getJson("/api/config");
    } catch (err) {
      return showLoadError("The annotation server does not answer. Is it running?");
    }
    if (config.token_required && !st.token) return showToken("");
    await start();
  }

  function showToken(message) {
    $("main").hidden = true;
    $("token-panel").hidden = false;
    $("token-error").textContent = message || "";
    $("token-input").focus();
  }

  async function start() {
    let state;
    try {
      state = await getJson("/api/state");
    } catch (err) {
      if (err.status === 401) return;
      return showLoadError("Cannot read the progress: " + err.message);
    }
    $("token-panel").hidden = true;
    st.annotator = state.annotator;
    $("annotator").textContent = "Annotator: " + state.annotator;
    st.pending = loadPending();
    if (st.pending.length) {
      await flush();
      state = await getJson("/api/state");
    }
    applyProgress(state);
    st.statuses = state.statuses;
    const resume = state.resume === null ? 0 : state.resume;
    $("done-banner").hidden = state.resume !== null;
    await show(resume);
    document.body.dataset.ready = "1";
  }

  function showLoadError(message) {
    const el = $("load-error");
    el.textContent = message;
    el.hidden = !message;
  }

  // ------------------------------------------------------------------ items

  async function show(index) {
    if (index < 0 || index >= st.total) return;
    flushComment();
    const seq = ++st.loadSeq;
    st.index = index;
    let item;
    try {
      item = await getJson("/api/item?index=" + index);
    } catch (err) {
      if (seq !== st.loadSeq) return;
      if (err.status === 401) return;
      showLoadError("Cannot load item " + (index + 1) + " (" + err.message + "); retrying…");
      setTimeout(() => { if (seq === st.loadSeq) show(index); }, RETRY_MS);
      return;
    }
    if (seq !== st.loadSeq) return;
    showLoadError("");
    st.item = item;
    const saved = item.judgment || { acceptable: [null, null], preferred: null, comment: "", flagged: false };
    // an action still waiting in the queue is newer than what the server has
    const queued = st.pending.filter((p) => p.id === item.id).pop();
    st.judgment = queued
      ? { acceptable: queued.acceptable.slice(), preferred: queued.preferred, comment: queued.comment, flagged: queued.flagged }
      : { acceptable: saved.acceptable.slice(), preferred: saved.preferred, comment: saved.comment, flagged: saved.flagged };
    $("main").hidden = false;
    $("question").textContent = item.question;
    $("caption").textContent = item.fig_caption || "(no caption)";
    $("mentions").textContent = item.in_text_mention || "(no in-text mentions)";
    $("answer-text-0").textContent = item.answers[0];
    $("answer-text-1").textContent = item.answers[1];
    $("item-id").textContent = item.id;
    $("comment").value = st.judgment.comment;
    document.body.dataset.index = String(index);
    document.body.dataset.itemId = item.id;
    renderJudgment();
    renderPosition();
    resetZoom();
    loadImage(index, seq);
  }

  async function loadImage(index, seq) {
    const img = $("image");
    const missing = $("image-missing");
    img.dataset.loaded = "0";
    let resp;
    try {
      const win = st.window ? "&window=" + encodeURIComponent(st.window) : "";
      resp = await request("/api/image?index=" + index + win);
    } catch (err) {
      resp = null;
    }
    if (seq !== st.loadSeq) return;
    if (!resp || !resp.ok) {
      const body = resp ? await resp.json().catch(() => ({})) : {};
      img.hidden = true;
      missing.hidden = false;
      missing.textContent = "Image unavailable: " + (body.error || "server unreachable") + ". Flag the item (F) if it stays broken.";
      $("image-note").textContent = "";
      return;
    }
    const note = resp.headers.get("X-Image-Note");
    const blob = await resp.blob();
    if (seq !== st.loadSeq) return;
    if (st.imageUrl) URL.revokeObjectURL(st.imageUrl);
    st.imageUrl = URL.createObjectURL(blob);
    img.onload = () => { img.dataset.loaded = "1"; };
    img.src = st.imageUrl;
    img.hidden = false;
    missing.hidden = true;
    $("image-note").textContent = note ? decodeURIComponent(note) : "";
    renderWindows((resp.headers.get("X-Image-Windows") || "").split(",").filter((w) => w));
  }

  function renderWindows(names) {
    const select = $("window");
    $("window-box").hidden = names.length === 0;
    while (select.options.length > 1) select.remove(1);
    for (const name of names) {
      const opt = document.createElement("option");
      opt.value = name;
      opt.textContent = WINDOW_NAMES[name] || name;
      select.append(opt);
    }
    select.value = names.includes(st.window) ? st.window : "";
  }

  function setWindow(name) {
    st.window = name;
    $("window").value = name;
    loadImage(st.index, st.loadSeq);
  }

  function cycleWindow() {
    const select = $("window");
    if ($("window-box").hidden) return;
    const next = (select.selectedIndex + 1) % select.options.length;
    setWindow(select.options[next].value);
  }

  function renderPosition() {
    $("item-pos").textContent = "Item " + (st.index + 1) + " of " + st.total;
    $("prev").disabled = st.index <= 0;
    $("next").disabled = st.index >= st.total - 1;
  }

  const STATUS_TEXT = { todo: "not judged", partial: "partly judged", done: "judged", flagged: "flagged" };

  function localStatus(j) {
    if (j.flagged) return "flagged";
    const marked = j.acceptable.every((a) => a !== null);
    if (marked && j.preferred !== null) return "done";
    if (j.preferred !== null || j.acceptable.some((a) => a !== null)) return "partial";
    return "todo";
  }

  function renderJudgment() {
    const j = st.judgment;
    for (const pos of [0, 1]) {
      const mark = j.acceptable[pos];
      $("mark-" + pos + "-yes").setAttribute("aria-pressed", String(mark === true));
      $("mark-" + pos + "-no").setAttribute("aria-pressed", String(mark === false));
      const card = $("answer-" + pos);
      card.dataset.mark = mark === true ? "yes" : mark === false ? "no" : "";
      card.dataset.preferred = String(j.preferred === (pos === 0 ? "A" : "B"));
    }
    for (const c of ["A", "B", "equal"]) {
      $("prefer-" + c).setAttribute("aria-pressed", String(j.preferred === c));
    }
    $("flag").setAttribute("aria-pressed", String(j.flagged));
    $("flag").textContent = "";
    $("flag").append(j.flagged ? "⚑ Flagged " : "⚑ Flag item ", kbd("F"));
    const status = localStatus(j);
    const badge = $("item-status");
    badge.dataset.status = status;
    badge.textContent = STATUS_TEXT[status];
  }

  function kbd(text) {
    const k = document.createElement("kbd");
    k.textContent = text;
    return k;
  }

  function applyProgress(p) {
    st.total = p.total;
    const finished = p.done + p.flagged;
    $("bar").style.width = (p.total ? (100 * finished) / p.total : 0) + "%";
    $("progressbar").setAttribute("aria-valuemax", String(p.total));
    $("progressbar").setAttribute("aria-valuenow", String(finished));
    let text = p.done + " of " + p.total + " judged";
    if (p.flagged) text += " · " + p.flagged + " flagged";
    $("progress-text").textContent = text;
  }

  // ------------------------------------------------------------------ actions

  function act(change) {
    if (!st.item) return;
    change(st.judgment);
    renderJudgment();
    save();
  }

  function mark(pos, value) {
    act((j) => { j.acceptable[pos] = value; });
  }

  function prefer(choice) {
    act((j) => { j.preferred = choice; });
  }

  function toggleFlag() {
    act((j) => { j.flagged = !j.flagged; });
  }

  function flushComment() {
    if (st.commentTimer === null) return;
    clearTimeout(st.commentTimer);
    st.commentTimer = null;
    saveComment();
  }

  function saveComment() {
    if (!st.item) return;
    const text = $("comment").value;
    if (text === st.judgment.comment) return;
    st.judgment.comment = text;
    save();
  }

  function save() {
    const j = st.judgment;
    st.pending.push({
      index: st.index,
      id: st.item.id,
      view: st.item.view,
      annotator: st.annotator,
      acceptable: j.acceptable.slice(),
      preferred: j.preferred,
      comment: j.comment,
      flagged: j.flagged,
      client_time: new Date().toISOString(),
    });
    storePending();
    flush();
  }

  // ------------------------------------------------------------------ the save queue

  function pendingKey() {
    return "annotate-pending:" + st.annotator;
  }

  function loadPending() {
    try {
      return JSON.parse(localStorage.getItem(pendingKey()) || "[]");
    } catch (err) {
      return [];
    }
  }

  function storePending() {
    try {
      localStorage.setItem(pendingKey(), JSON.stringify(st.pending));
    } catch (err) {
      /* storage full or disabled: the in-memory queue still retries */
    }
  }

  function setSaveStatus(state, text) {
    const el = $("save-status");
    el.dataset.state = state;
    el.dataset.pending = String(st.pending.length);
    el.textContent = text;
  }

  async function flush() {
    if (st.flushing) return;
    st.flushing = true;
    if (st.retryTimer !== null) {
      clearTimeout(st.retryTimer);
      st.retryTimer = null;
    }
    try {
      while (st.pending.length) {
        setSaveStatus("saving", "Saving…");
        const next = st.pending[0];
        let resp;
        try {
          resp = await request("/api/judge", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify(next),
          });
        } catch (err) {
          resp = null;
        }
        if (resp && resp.ok) {
          const body = await resp.json();
          st.pending.shift();
          storePending();
          st.statuses[next.index] = body.status;
          applyProgress(body.progress);
          $("done-banner").hidden = body.progress.resume !== null;
          const time = new Date(body.time).toLocaleTimeString();
          setSaveStatus("saved", "✓ Saved " + time);
          continue;
        }
        if (resp && resp.status >= 400 && resp.status < 500 && resp.status !== 401 && resp.status !== 408 && resp.status !== 429) {
          const body = await resp.json().catch(() => ({}));
          st.pending.shift(); // the server will never take it: say so, do not retry forever
          storePending();
          setSaveStatus("error", "✗ Not saved: " + (body.error || resp.status));
          continue;
        }
        setSaveStatus("error", "✗ Not saved yet — server unreachable, retrying (" + st.pending.length + " waiting)");
        st.retryTimer = setTimeout(flush, RETRY_MS);
        return;
      }
    } finally {
      st.flushing = false;
    }
  }

  // ------------------------------------------------------------------ zoom

  function applyZoom() {
    const img = $("image");
    img.style.transform = "translate(" + st.panX + "px, " + st.panY + "px) scale(" + st.zoom + ")";
    $("zoom-level").textContent = Math.round(st.zoom * 100) + " %";
    $("viewer").dataset.zoom = String(st.zoom);
  }

  function zoomBy(factor) {
    st.zoom = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, st.zoom * factor));
    if (st.zoom === ZOOM_MIN) {
      st.panX = 0;
      st.panY = 0;
    }
    applyZoom();
  }

  function resetZoom() {
    st.zoom = 1;
    st.panX = 0;
    st.panY = 0;
    applyZoom();
  }

  function bindZoom() {
    const viewer = $("viewer");
    viewer.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      zoomBy(ev.deltaY < 0 ? 1.2 : 1 / 1.2);
    }, { passive: false });
    let drag = null;
    viewer.addEventListener("pointerdown", (ev) => {
      drag = { x: ev.clientX - st.panX, y: ev.clientY - st.panY };
      viewer.classList.add("dragging");
      viewer.setPointerCapture(ev.pointerId);
    });
    viewer.addEventListener("pointermove", (ev) => {
      if (!drag || st.zoom === 1) return;
      st.panX = ev.clientX - drag.x;
      st.panY = ev.clientY - drag.y;
      applyZoom();
    });
    const end = () => { drag = null; viewer.classList.remove("dragging"); };
    viewer.addEventListener("pointerup", end);
    viewer.addEventListener("pointercancel", end);
    viewer.addEventListener("dblclick", resetZoom);
    $("zoom-in").addEventListener("click", () => zoomBy(1.25));
    $("zoom-out").addEventListener("click", () => zoomBy(1 / 1.25));
    $("zoom-reset").addEventListener("click", resetZoom);
    $("window").addEventListener("change", (ev) => {
      setWindow(ev.target.value);
      ev.target.blur();
    });
  }

  // ------------------------------------------------------------------ controls

  function go(delta) {
    const target = st.index + delta;
    if (target >= 0 && target < st.total) show(target);
  }

  function toggleHelp() {
    const dlg = $("help");
    if (dlg.open) dlg.close();
    else dlg.showModal();
  }

  function bindControls() {
    $("mark-0-yes").addEventListener("click", () => mark(0, true));
    $("mark-0-no").addEventListener("click", () => mark(0, false));
    $("mark-1-yes").addEventListener("click", () => mark(1, true));
    $("mark-1-no").addEventListener("click", () => mark(1, false));
    $("prefer-A").addEventListener("click", () => prefer("A"));
    $("prefer-B").addEventListener("click", () => prefer("B"));
    $("prefer-equal").addEventListener("click", () => prefer("equal"));
    $("flag").addEventListener("click", toggleFlag);
    $("prev").addEventListener("click", () => go(-1));
    $("next").addEventListener("click", () => go(1));
    $("help-btn").addEventListener("click", toggleHelp);
    $("help-close").addEventListener("click", () => $("help").close());
    const comment = $("comment");
    comment.addEventListener("input", () => {
      if (st.commentTimer !== null) clearTimeout(st.commentTimer);
      st.commentTimer = setTimeout(() => { st.commentTimer = null; saveComment(); }, COMMENT_DEBOUNCE_MS);
    });
    comment.addEventListener("blur", flushComment);
    $("token-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      st.token = $("token-input").value.trim();
      sessionStorage.setItem("annotate-token", st.token);
      $("token-error").textContent = "";
      await start();
    });
    window.addEventListener("online", flush);
    window.addEventListener("beforeunload", flushComment);
    bindZoom();
    document.addEventListener("keydown", onKey);
  }

  const KEYS = {
    "1": () => mark(0, true),
    "2": () => mark(0, false),
    "3": () => mark(1, true),
    "4": () => mark(1, false),
    a: () => prefer("A"),
    b: () => prefer("B"),
    e: () => prefer("equal"),
    f: toggleFlag,
    n: () => go(1),
    ArrowRight: () => go(1),
    Enter: () => go(1),
    p: () => go(-1),
    ArrowLeft: () => go(-1),
    "+": () => zoomBy(1.25),
    "=": () => zoomBy(1.25),
    "-": () => zoomBy(1 / 1.25),
    "0": resetZoom,
    m: () => { $("context").open = !$("context").open; },
    w: cycleWindow,
    c: () => $("comment").focus(),
    "?": toggleHelp,
  };

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const target = ev.target;
    const typing = target && ["TEXTAREA", "INPUT", "SELECT"].includes(target.tagName);
    if (typing) {
      if (ev.key === "Escape") {
        target.blur();
        ev.preventDefault();
      }
      return;
    }
    if ($("help").open || !$("token-panel").hidden || !st.item) return;
    const key = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    const handler = KEYS[key];
    if (!handler) return;
    ev.preventDefault();
    handler();
  }

  boot();
})();
