// Conduit console: a client of the public API, with the key the user pastes. The key
// lives in sessionStorage only (gone when the tab closes) and travels in the
// Authorization header, or as a WebSocket subprotocol for the stream; never in a URL.
"use strict";

(() => {
  const KEY_STORE = "conduit.console.key";
  const STATUSES = ["pending", "processing", "completed", "failed", "cancelled"];
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const PAGE_SIZE = 20;
  // Polling is the fallback while the stream is down; the delivery log has no stream.
  const POLL_MS = 3000;
  const DELIVERY_POLL_MS = 2000;

  const app = {
    key: sessionStorage.getItem(KEY_STORE),
    ws: null,
    live: false,
    lastEventId: null,
    retryDelay: 1000,
    reconnectTimer: null,
    view: null,
    list: { status: "", after: null, cursors: [] },
  };

  // ---- DOM helpers -------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "text") el.textContent = value;
      else if (name === "class") el.className = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function $(id) {
    return document.getElementById(id);
  }

  const main = () => $("main");

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  }

  function timeEl(iso) {
    return iso ? h("time", { datetime: iso, text: when(iso) }) : "";
  }

  function eta(seconds) {
    if (seconds === undefined || seconds === null) return "";
    if (seconds < 60) return `about ${Math.max(0, Math.round(seconds))} s left`;
    const m = Math.floor(seconds / 60);
    return `about ${m} min ${Math.round(seconds - m * 60)} s left`;
  }

  function badge(status) {
    return h("span", { class: "badge", "data-status": status, text: status });
  }

  // A progress bar that can be updated in place: `source` says what fed the last value
  // (the stream, or a poll of the API).
  function progressBar(id, label, value, source) {
    const fill = h("div", { class: "fill" });
    const bar = h(
      "div",
      {
        id,
        class: "progress",
        role: "progressbar",
        "aria-label": label,
        "aria-valuemin": 0,
        "aria-valuemax": 100,
      },
      h("div", { class: "track" }, fill),
      h("span", { class: "pct", "aria-hidden": "true" }),
    );
    setProgress(bar, value, source);
    return bar;
  }

  function setProgress(bar, value, source) {
    if (!bar) return;
    const v = Math.max(0, Math.min(100, Number(value) || 0));
    const now = Number(bar.getAttribute("aria-valuenow"));
    // A late poll never moves a bar back past what the stream already showed.
    if (bar.hasAttribute("aria-valuenow") && source !== "stream" && v < now && !bar.dataset.reset) return;
    delete bar.dataset.reset;
    bar.dataset.source = source;
    bar.setAttribute("aria-valuenow", String(v));
    bar.setAttribute("aria-valuetext", `${v} %`);
    bar.querySelector(".fill").style.width = `${v}%`;
    bar.querySelector(".pct").textContent = `${v} %`;
  }

  // ---- API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param, code) {
      super(message);
      this.status = status;
      this.param = param;
      this.code = code;
    }
  }

  async function api(method, path, body, key) {
    const headers = { Authorization: `Bearer ${key || app.key}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, `The API could not be reached (${err.message}).`);
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (_) {
      json = null;
    }
    if (!response.ok) {
      const e = (json && json.error) || {};
      const error = new ApiError(response.status, e.message || `HTTP ${response.status}`, e.param, e.code);
      if (response.status === 401 && !key) forgetKey("The key was refused; paste a valid one.");
      throw error;
    }
    return json;
  }

  function taskPath(id) {
    return `/v1/videos/generations/tasks/${encodeURIComponent(id)}`;
  }

  // ---- The key -----------------------------------------------------------------------

  function forgetKey(message) {
    app.key = null;
    sessionStorage.removeItem(KEY_STORE);
    closeStream();
    showKeyForm(message);
  }

  function showKeyForm(message) {
    stopView();
    $("nav").hidden = true;
    $("session").hidden = true;
    const input = h("input", {
      id: "key-input",
      name: "key",
      type: "password",
      required: true,
      autocomplete: "off",
      spellcheck: "false",
      "aria-describedby": "key-help key-error",
    });
    const error = h("p", { id: "key-error", class: "error", role: "alert", text: message || "" });
    const form = h(
      "form",
      { id: "key-form", class: "card key-card", onsubmit: (e) => useKey(e, input, error) },
      h("h1", { tabindex: "-1", text: "Open the console" }),
      h("div", { class: "field" }, h("label", { for: "key-input", text: "API key" }), input),
      h("p", {
        id: "key-help",
        class: "hint",
        text: "Paste a key made with conduit-api keys create. It stays in this tab's session storage and is sent only to this API.",
      }),
      error,
      h("button", { type: "submit", id: "key-submit", text: "Open console" }),
    );
    main().replaceChildren(form);
    input.focus();
  }

  async function useKey(event, input, error) {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Paste a key first.";
      input.setAttribute("aria-invalid", "true");
      return;
    }
    error.textContent = "";
    try {
      await api("GET", "/v1/models", undefined, key);
    } catch (err) {
      input.setAttribute("aria-invalid", "true");
      error.textContent = err.status === 401 ? "This key was refused." : err.message;
      return;
    }
    app.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    startSession();
  }

  function startSession() {
    $("nav").hidden = false;
    $("session").hidden = false;
    openStream();
    route();
  }

  // ---- The stream --------------------------------------------------------------------

  function setLive(live, text) {
    app.live = live;
    const el = $("live");
    el.dataset.live = String(live);
    el.textContent = text;
  }

  function openStream() {
    if (!app.key || app.ws) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}/v1/stream`, ["conduit.v1", `conduit.key.${app.key}`]);
    } catch (_) {
      setLive(false, "Polling (no live stream)");
      return;
    }
    app.ws = ws;
    setLive(false, "Connecting…");
    ws.onopen = () => {
      app.retryDelay = 1000;
      if (app.lastEventId) ws.send(JSON.stringify({ resume_after: app.lastEventId }));
      setLive(true, "Live");
      if (app.view && app.view.resync) app.view.resync();
    };
    ws.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      app.lastEventId = frame.id;
      if (app.view && app.view.onEvent) app.view.onEvent(frame);
    };
    ws.onclose = (closed) => {
      app.ws = null;
      // 4410: the last event is too old to resume from; start afresh and re-read.
      if (closed.code === 4410) app.lastEventId = null;
      if (!app.key) return;
      setLive(false, "Polling (reconnecting)");
      app.reconnectTimer = setTimeout(openStream, app.retryDelay);
      app.retryDelay = Math.min(app.retryDelay * 2, 30000);
    };
  }

  function closeStream() {
    clearTimeout(app.reconnectTimer);
    if (app.ws) {
      const ws = app.ws;
      app.ws = null;
      ws.onclose = null;
      ws.close(1000);
    }
    app.live = false;
  }

  // ---- Routing -----------------------------------------------------------------------

  function stopView() {
    if (app.view && app.view.stop) app.view.stop();
    app.view = null;
  }

  function route() {
    if (!app.key) {
      showKeyForm();
      return;
    }
    stopView();
    const hash = location.hash.replace(/^#\/?/, "");
    const [name, arg] = hash.split("/");
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.route === (name || "tasks")) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (name === "tasks" && arg) app.view = taskView(decodeURIComponent(arg));
    else if (name === "new") app.view = submitView();
    else if (name === "secret") app.view = secretView();
    else app.view = listView();
  }

  function heading(text) {
    const el = h("h1", { tabindex: "-1", text });
    return el;
  }

  function mount(...children) {
    main().replaceChildren(...children);
    const first = main().querySelector("h1");
    if (first) first.focus({ preventScroll: true });
  }

  function every(ms, fn) {
    const timer = setInterval(fn, ms);
    return () => clearInterval(timer);
  }

  // ---- The task list -----------------------------------------------------------------

  function listView() {
    const list = app.list;
    const filter = h(
      "select",
      { id: "status-filter", name: "status" },
      h("option", { value: "", text: "All statuses" }),
      STATUSES.map((s) => h("option", { value: s, text: s })),
    );
    filter.value = list.status;
    filter.addEventListener("change", () => {
      list.status = filter.value;
      list.after = null;
      list.cursors = [];
      load();
    });
    const body = h("tbody", { id: "task-rows" });
    const status = h("p", { id: "list-status", class: "hint", role: "status" });
    const newer = h("button", { type: "button", class: "quiet", id: "page-newer", text: "Newer" });
    const older = h("button", { type: "button", class: "quiet", id: "page-older", text: "Older" });
    let lastPage = null;
    let refreshTimer = null;
    newer.addEventListener("click", () => {
      list.after = list.cursors.pop() || null;
      load();
    });
    older.addEventListener("click", () => {
      if (!lastPage || !lastPage.data.length) return;
      list.cursors.push(list.after);
      list.after = lastPage.data[lastPage.data.length - 1].task_id;
      load();
    });

    mount(
      heading("Tasks"),
      h(
        "div",
        { class: "toolbar" },
        h("div", { class: "field" }, h("label", { for: "status-filter", text: "Status" }), filter),
        h("a", { class: "button push", href: "#/new", text: "New task" }),
      ),
      h(
        "table",
        { class: "stack tasks" },
        h("caption", { class: "visually-hidden", text: "Your tasks, newest first" }),
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Created", "Task", "Model", "Status", "Progress", "Time left"].map((t) => h("th", { scope: "col", text: t })),
          ),
        ),
        body,
      ),
      status,
      h("div", { class: "pager" }, newer, older),
    );

    function row(task) {
      const running = !TERMINAL.has(task.status);
      return h(
        "tr",
        { id: `task-row-${task.task_id}`, "data-status": task.status },
        h("td", { "data-label": "Created", class: "nowrap" }, timeEl(task.created_at)),
        h(
          "td",
          { class: "prompt", "data-label": "Task" },
          h("a", { href: `#/tasks/${task.task_id}`, text: truncate(task.prompt, 80) }),
          h("span", { class: "sub mono", text: task.task_id }),
        ),
        h("td", { "data-label": "Model", class: "nowrap", text: task.model }),
        h("td", { "data-label": "Status", class: "status" }, badge(task.status)),
        h(
          "td",
          { "data-label": "Progress" },
          progressBar(`progress-${task.task_id}`, `Progress of ${truncate(task.prompt, 40)}`, task.progress, "poll"),
        ),
        h("td", { "data-label": "Time left", class: "eta", text: running ? eta(task.estimated_seconds_remaining) : "" }),
      );
    }

    async function load() {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (list.status) query.set("status", list.status);
      if (list.after) query.set("after", list.after);
      let page;
      try {
        page = await api("GET", `/v1/videos/generations/tasks?${query}`);
      } catch (err) {
        status.textContent = err.message;
        status.className = "error";
        return;
      }
      if (app.view !== view) return;
      lastPage = page;
      status.className = "hint";
      body.replaceChildren(...page.data.map(row));
      if (!page.data.length) {
        body.append(h("tr", {}, h("td", { colspan: 6, class: "empty", text: list.status ? `No ${list.status} tasks.` : "No tasks yet. Submit one under New task." })));
      }
      status.textContent = `${page.data.length} task${page.data.length === 1 ? "" : "s"} on this page${list.status ? ` (${list.status})` : ""}.`;
      newer.disabled = list.cursors.length === 0 && !list.after;
      older.disabled = !page.has_more;
    }

    function refreshSoon() {
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(load, 400);
    }

    const view = {
      onEvent(frame) {
        const data = frame.data || {};
        const rowEl = $(`task-row-${data.task_id}`);
        if (!rowEl) {
          // A task not on this page (a new one, or one a filter hides) changed.
          if (!list.after) refreshSoon();
          return;
        }
        if (frame.type === "progress") {
          setProgress($(`progress-${data.task_id}`), data.progress_percentage, "stream");
          rowEl.querySelector(".eta").textContent = eta(data.estimated_seconds_remaining);
          if (rowEl.dataset.status !== "processing") {
            rowEl.dataset.status = "processing";
            rowEl.querySelector(".status").replaceChildren(badge("processing"));
          }
        } else {
          if (frame.type === "completed") setProgress($(`progress-${data.task_id}`), 100, "stream");
          rowEl.dataset.status = frame.type;
          rowEl.querySelector(".status").replaceChildren(badge(frame.type));
          rowEl.querySelector(".eta").textContent = "";
          refreshSoon();
        }
      },
      resync: load,
      stop: every(POLL_MS, () => {
        if (!app.live) load();
      }),
    };
    const stopPoll = view.stop;
    view.stop = () => {
      stopPoll();
      clearTimeout(refreshTimer);
    };
    load();
    return view;
  }

  function truncate(text, n) {
    const s = String(text || "");
    return s.length > n ? `${s.slice(0, n - 1)}…` : s;
  }

  // ---- One task ----------------------------------------------------------------------

  function taskView(id) {
    const statusBadge = h("span", { id: "task-status" });
    const bar = progressBar("task-progress", "Task progress", 0, "poll");
    bar.classList.add("task-progress");
    bar.dataset.reset = "1";
    const etaEl = h("span", { id: "task-eta", class: "hint" });
    const messageEl = h("p", { id: "task-message", class: "hint" });
    const fields = h("dl", { class: "fields", id: "task-fields" });
    const videoBox = h("div", { id: "video-box" }, h("p", { class: "hint", text: "The video appears here once the task completes." }));
    const actionStatus = h("p", { id: "action-status", role: "status", class: "hint" });
    const cancelBtn = h("button", { type: "button", class: "danger", id: "cancel-task", text: "Cancel task", hidden: true });
    const retryBtn = h("button", { type: "button", id: "retry-task", text: "Retry task", hidden: true });
    const redeliverBtn = h("button", { type: "button", id: "redeliver", text: "Redeliver last webhook", disabled: true });
    // Newest event first: the terminal webhook, the one worth replaying, leads.
    const deliveries = h("div", { id: "deliveries", "aria-live": "polite" });
    const redeliverStatus = h("p", { id: "redeliver-status", role: "status", class: "hint" });
    let task = null;
    let lastLog = "";

    mount(
      h("p", {}, h("a", { href: "#/tasks", text: "← All tasks" })),
      heading("Task"),
      h("p", { class: "mono", text: id }),
      h("div", { class: "task-head" }, statusBadge, bar, etaEl),
      messageEl,
      h("div", { class: "actions" }, cancelBtn, retryBtn, actionStatus),
      h(
        "div",
        { class: "grid2" },
        h("section", { "aria-labelledby": "fields-h" }, h("h2", { id: "fields-h", text: "Details" }), fields),
        h("section", { class: "video-section", "aria-labelledby": "video-h" }, h("h2", { id: "video-h", text: "Video" }), videoBox),
      ),
      h(
        "section",
        { "aria-labelledby": "deliveries-h" },
        h("h2", { id: "deliveries-h", text: "Webhook deliveries" }),
        h("div", { class: "actions" }, redeliverBtn, redeliverStatus),
        deliveries,
      ),
    );

    cancelBtn.addEventListener("click", () =>
      act(actionStatus, "DELETE", `/v1/videos/generations/${encodeURIComponent(id)}`, "Cancelled.", "Cancel this task?"),
    );
    retryBtn.addEventListener("click", () =>
      act(actionStatus, "POST", `${taskPath(id)}/retry`, "Running again as a new attempt."),
    );
    redeliverBtn.addEventListener("click", () =>
      act(redeliverStatus, "POST", `${taskPath(id)}/webhooks/redeliver`, "The last terminal webhook is queued again."),
    );

    async function act(out, method, path, done, question) {
      if (question && !window.confirm(question)) return;
      out.className = "hint";
      out.textContent = "Working…";
      try {
        await api(method, path);
        out.className = "notice";
        out.textContent = done;
      } catch (err) {
        out.className = "error";
        out.textContent = err.message;
      }
      await Promise.all([loadTask(), loadLog()]);
    }

    function showTask(t) {
      task = t;
      statusBadge.replaceChildren(badge(t.status));
      if (t.status === "pending" || (t.status !== "processing" && t.status !== "completed")) bar.dataset.reset = "1";
      setProgress(bar, t.progress, "poll");
      etaEl.textContent = t.status === "processing" ? eta(t.estimated_seconds_remaining) : "";
      messageEl.textContent = t.error || t.message || "";
      messageEl.className = t.error ? "error" : "hint";
      cancelBtn.hidden = TERMINAL.has(t.status);
      retryBtn.hidden = !(t.status === "failed" || t.status === "cancelled");
      const items = [
        ["Status", t.status],
        ["Model", t.model],
        ["Prompt", t.prompt],
        ["Duration", `${t.duration} s`],
        ["Size", t.size],
        ["Frames per second", t.fps],
        ["Seed", t.seed],
        ["Created", timeEl(t.created_at)],
        ["Updated", timeEl(t.updated_at)],
        ["Completed", timeEl(t.completed_at)],
        ["Generation time", t.generation_duration_seconds !== undefined ? `${t.generation_duration_seconds.toFixed(1)} s` : undefined],
        ["Error", t.error],
      ];
      fields.replaceChildren(
        ...items
          .filter(([, v]) => v !== undefined && v !== null && v !== "")
          .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]),
      );
      if (t.video_url && !$("task-video")) {
        // The URL is signed and changes on every read: set it once, so playback is not reset.
        videoBox.replaceChildren(
          h("video", {
            id: "task-video",
            src: t.video_url,
            controls: true,
            muted: true,
            playsinline: true,
            preload: "metadata",
            "aria-label": `Video of ${truncate(t.prompt, 60)}`,
          }),
          h("p", {}, h("a", { href: t.video_url, text: "Open the video file", rel: "noreferrer" })),
        );
      } else if (!t.video_url && $("task-video")) {
        videoBox.replaceChildren(h("p", { class: "hint", text: "The video appears here once the task completes." }));
      }
    }

    async function loadTask() {
      try {
        const t = await api("GET", taskPath(id));
        if (app.view === view) showTask(t);
      } catch (err) {
        if (app.view !== view) return;
        if (err.status === 404) {
          mount(heading("Task not found"), h("p", { text: "No task of this key has this id." }), h("a", { href: "#/tasks", text: "All tasks" }));
          view.stop();
        } else {
          actionStatus.className = "error";
          actionStatus.textContent = err.message;
        }
      }
    }

    // Numbered in the order they were made: a redelivery starts a fresh schedule, so the
    // API's own attempt numbers start again at 1.
    function attemptRow(a, index) {
      const result = a.status_code !== undefined ? `HTTP ${a.status_code}` : a.error || "";
      return h(
        "tr",
        { class: "attempt" },
        h("td", { "data-label": "Attempt", text: index + 1 }),
        h("td", { "data-label": "Time" }, timeEl(a.attempted_at)),
        h("td", { "data-label": "Result", class: a.status_code >= 200 && a.status_code < 300 ? "" : "error", text: result }),
        h("td", { "data-label": "Duration", text: `${a.duration_ms} ms` }),
      );
    }

    function deliveryEntry(d) {
      return h(
        "article",
        { class: "delivery", "data-event": d.event, "data-webhook-id": d.webhook_id },
        h("h3", {}, h("span", { text: d.event }), badge(d.status), h("code", { text: d.webhook_id })),
        h("p", { class: "hint" }, "To ", h("code", { text: d.url }), " · happened ", timeEl(d.occurred_at)),
        d.next_attempt_at ? h("p", { class: "hint" }, "Next attempt ", timeEl(d.next_attempt_at)) : null,
        d.attempts.length
          ? h(
              "table",
              { class: "stack" },
              h("caption", { class: "visually-hidden", text: `Attempts of the ${d.event} webhook` }),
              h("thead", {}, h("tr", {}, ["#", "Time", "Status code or error", "Duration"].map((t) => h("th", { scope: "col", text: t })))),
              h("tbody", {}, d.attempts.map(attemptRow)),
            )
          : h("p", { class: "hint", text: "No attempt yet." }),
      );
    }

    async function loadLog() {
      let log;
      try {
        log = await api("GET", `${taskPath(id)}/webhooks`);
      } catch (err) {
        if (err.status !== 404 && app.view === view) deliveries.replaceChildren(h("p", { class: "error", text: err.message }));
        return;
      }
      if (app.view !== view) return;
      const text = JSON.stringify(log.data);
      const terminal = log.data.some((d) => d.event !== "progress");
      redeliverBtn.disabled = !terminal;
      if (text === lastLog) return;
      lastLog = text;
      deliveries.replaceChildren(
        ...(log.data.length
          ? log.data.slice().reverse().map(deliveryEntry)
          : [h("p", { class: "hint", text: "No webhooks: the task has no webhook_url, or none was due yet." })]),
      );
    }

    const stopTaskPoll = every(POLL_MS, () => {
      if (!app.live) loadTask();
    });
    const stopLogPoll = every(DELIVERY_POLL_MS, loadLog);
    const view = {
      onEvent(frame) {
        const data = frame.data || {};
        if (data.task_id !== id) return;
        if (frame.type === "progress") {
          setProgress(bar, data.progress_percentage, "stream");
          etaEl.textContent = eta(data.estimated_seconds_remaining);
          if (data.message) messageEl.textContent = data.message;
          if (!task || task.status !== "processing") statusBadge.replaceChildren(badge("processing"));
        } else {
          if (frame.type === "completed") setProgress(bar, 100, "stream");
          statusBadge.replaceChildren(badge(frame.type));
          etaEl.textContent = "";
          loadTask();
          loadLog();
        }
      },
      resync: loadTask,
      stop() {
        stopTaskPoll();
        stopLogPoll();
      },
    };
    loadTask();
    loadLog();
    return view;
  }

  // ---- Submit ------------------------------------------------------------------------

  function limitsOf(m) {
    const parts = [];
    if (!m.available) parts.push(`unavailable: set ${m.missing_setting || "its provider's credentials"}`);
    if (m.durations) parts.push(`durations ${m.durations.join(", ")} s`);
    else parts.push(`duration 1 to ${m.max_duration || 60} s`);
    if (m.sizes) parts.push(`sizes ${m.sizes.join(", ")}`);
    else parts.push("size 64 to 3840 per side, even");
    if (m.resolutions) parts.push(`resolutions ${m.resolutions.join(", ")}`);
    parts.push(m.image_input ? "takes an image_url" : "no image input");
    if (m.fallback && m.fallback.length) parts.push(`falls back to ${m.fallback.join(", ")}`);
    return parts.join("; ");
  }

  function submitView() {
    const model = h("select", { id: "f-model", name: "model", required: true, "aria-describedby": "model-limits" });
    const limits = h("p", { id: "model-limits", class: "hint", "aria-live": "polite" });
    const prompt = h("textarea", { id: "f-prompt", name: "prompt", required: true, maxlength: 4000, rows: 3 });
    const duration = h("input", { id: "f-duration", name: "duration", type: "number", min: 1, max: 60, step: 1, value: 6, inputmode: "numeric" });
    const size = h("input", { id: "f-size", name: "size", type: "text", value: "1280x720", pattern: "[0-9]+x[0-9]+", list: "size-options", "aria-describedby": "size-help" });
    const sizes = h("datalist", { id: "size-options" });
    const fps = h("input", { id: "f-fps", name: "fps", type: "number", min: 1, max: 60, step: 1, value: 24, inputmode: "numeric" });
    const seed = h("input", { id: "f-seed", name: "seed", type: "number", step: 1, inputmode: "numeric" });
    const webhook = h("input", { id: "f-webhook", name: "webhook_url", type: "url", placeholder: "https://example.com/webhooks/video", "aria-describedby": "webhook-help" });
    const error = h("p", { id: "submit-error", class: "error", role: "alert" });
    const models = h("tbody", { id: "model-rows" });
    const button = h("button", { type: "submit", id: "submit-task", text: "Submit task" });
    let catalog = [];

    const field = (id, label, input, help) =>
      h("div", { class: "field" }, h("label", { for: id, text: label }), input, help ? h("p", { class: "hint", id: help[0], text: help[1] }) : null);

    const form = h(
      "form",
      { id: "submit-form", class: "card", novalidate: true },
      field("f-model", "Model", model),
      limits,
      field("f-prompt", "Prompt", prompt),
      h(
        "div",
        { class: "row" },
        field("f-duration", "Duration (seconds)", duration),
        field("f-size", "Size (width x height)", size, ["size-help", "Both even, for example 640x360."]),
        field("f-fps", "Frames per second", fps),
        field("f-seed", "Seed (optional)", seed),
      ),
      sizes,
      field("f-webhook", "Webhook URL (optional)", webhook, ["webhook-help", "Where the progress and completion webhooks go, signed with your webhook secret."]),
      error,
      button,
    );
    form.addEventListener("submit", submit);

    mount(
      heading("New task"),
      form,
      h("h2", { id: "models-h", text: "Models" }),
      h(
        "table",
        { class: "stack models", "aria-labelledby": "models-h" },
        h("thead", {}, h("tr", {}, ["Model", "Provider", "Available", "Limits"].map((t) => h("th", { scope: "col", text: t })))),
        models,
      ),
    );

    function pick() {
      const m = catalog.find((x) => x.id === model.value);
      if (!m) return;
      limits.textContent = `Limits of ${m.id}: ${limitsOf(m)}.`;
      duration.max = String(m.max_duration || (m.durations ? Math.max(...m.durations) : 60));
      sizes.replaceChildren(...(m.sizes || ["1280x720", "640x360", "320x180"]).map((s) => h("option", { value: s })));
    }
    model.addEventListener("change", pick);

    async function load() {
      try {
        const list = await api("GET", "/v1/models");
        catalog = list.data;
      } catch (err) {
        error.textContent = err.message;
        return;
      }
      if (app.view !== view) return;
      model.replaceChildren(
        ...catalog.map((m) => h("option", { value: m.id, disabled: !m.available, text: m.available ? m.id : `${m.id} (unavailable)` })),
      );
      const first = catalog.find((m) => m.id === "local-video" && m.available) || catalog.find((m) => m.available);
      if (first) model.value = first.id;
      models.replaceChildren(
        ...catalog.map((m) =>
          h(
            "tr",
            {},
            h("td", { "data-label": "Model" }, h("code", { text: m.id })),
            h("td", { "data-label": "Provider", text: m.provider }),
            h("td", { "data-label": "Available", text: m.available ? "yes" : "no" }),
            h("td", { "data-label": "Limits", text: limitsOf(m) }),
          ),
        ),
      );
      pick();
    }

    function number(input) {
      const v = input.value.trim();
      return v === "" ? undefined : Number(v);
    }

    async function submit(event) {
      event.preventDefault();
      for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
      error.textContent = "";
      const body = {
        model: model.value,
        prompt: prompt.value,
        duration: number(duration),
        size: size.value.trim() || undefined,
        fps: number(fps),
        seed: number(seed),
        webhook_url: webhook.value.trim() || undefined,
      };
      if (!body.prompt.trim()) {
        prompt.setAttribute("aria-invalid", "true");
        error.textContent = "A prompt is required.";
        prompt.focus();
        return;
      }
      button.disabled = true;
      try {
        const accepted = await api("POST", "/v1/videos/generations/async", body);
        location.hash = `#/tasks/${accepted.task_id}`;
      } catch (err) {
        error.textContent = err.message;
        const target = { model, prompt, duration, size, fps, seed, webhook_url: webhook }[err.param];
        if (target) {
          target.setAttribute("aria-invalid", "true");
          target.focus();
        }
      } finally {
        button.disabled = false;
      }
    }

    const view = {};
    load();
    return view;
  }

  // ---- The webhook secret ------------------------------------------------------------

  function secretView() {
    const out = h("div", { id: "secret-out", hidden: true });
    const status = h("p", { id: "secret-status", role: "status", class: "hint" });
    const overlap = h("input", { id: "rotate-overlap", type: "number", min: 0, max: 168, step: 1, value: 24, inputmode: "numeric" });
    const show = h("button", { type: "button", id: "show-secret", text: "Show secret" });
    const hide = h("button", { type: "button", id: "hide-secret", class: "quiet", text: "Hide", hidden: true });
    const rotate = h("button", { type: "button", id: "rotate-secret", class: "danger", text: "Rotate secret" });

    mount(
      heading("Webhook signing secret"),
      h("p", {
        text: "Webhooks of this key are signed with this secret (Standard Webhooks). It is read from the API only when you ask, and hidden again when you leave this page.",
      }),
      h("div", { class: "actions" }, show, hide),
      out,
      status,
      h("h2", { text: "Rotate" }),
      h("p", {
        class: "hint",
        text: "Rotating makes a new secret. During the overlap every webhook carries two signatures, new and old, so receivers can switch without a failed check.",
      }),
      h("div", { class: "field" }, h("label", { for: "rotate-overlap", text: "Overlap with the old secret (hours, 0 to 168)" }), overlap),
      rotate,
    );

    function reveal(secret) {
      const value = h("input", { id: "secret-value", readonly: true, value: secret.secret, class: "mono", spellcheck: "false" });
      const copy = h("button", { type: "button", class: "quiet", text: "Copy" });
      copy.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(secret.secret);
          status.textContent = "Copied.";
        } catch (_) {
          value.select();
          status.textContent = "Select the text and copy it.";
        }
      });
      out.replaceChildren(
        h("label", { for: "secret-value", text: "Current secret" }),
        h("div", { class: "secret-box" }, value, copy),
        secret.previous
          ? h("p", { class: "hint" }, "The previous secret ", h("code", { text: secret.previous.secret }), " still signs until ", timeEl(secret.previous.expires_at), ".")
          : null,
      );
      out.hidden = false;
      hide.hidden = false;
      value.focus();
    }

    function conceal() {
      out.replaceChildren();
      out.hidden = true;
      hide.hidden = true;
      status.textContent = "";
    }

    show.addEventListener("click", async () => {
      try {
        reveal(await api("GET", "/v1/webhooks/secret"));
      } catch (err) {
        status.textContent = err.message;
      }
    });
    hide.addEventListener("click", conceal);
    rotate.addEventListener("click", async () => {
      const hours = Number(overlap.value || 0);
      if (!Number.isInteger(hours) || hours < 0 || hours > 168) {
        overlap.setAttribute("aria-invalid", "true");
        status.textContent = "The overlap is a whole number of hours from 0 to 168.";
        return;
      }
      overlap.removeAttribute("aria-invalid");
      if (!window.confirm("Make a new webhook secret now?")) return;
      try {
        reveal(await api("POST", "/v1/webhooks/secret/rotate", { overlap_seconds: hours * 3600 }));
        status.textContent = "Rotated. Give the new secret to your receivers.";
      } catch (err) {
        status.textContent = err.message;
      }
    });
    return { stop: conceal };
  }

  // ---- Start -------------------------------------------------------------------------

  $("forget-key").addEventListener("click", () => forgetKey("The key is forgotten in this tab."));
  window.addEventListener("hashchange", route);
  if (app.key) startSession();
  else showKeyForm();
})();
