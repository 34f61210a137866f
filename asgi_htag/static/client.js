// asgi_htag browser runtime: defines interact(o) for htag, talks to this page's own
// instance over a websocket (auto-reconnect with backoff) or over HTTP POST (http_only).
var __asgi_htag = (function () {
  "use strict";
  var cfg = /*ASGI_HTAG_CFG*/null;
  var ws = null, started = false, attempts = 0, finished = false, queue = [], everOpened = false;

  function notice(text, withReload) {
    var d = document.getElementById("asgi-htag-notice");
    if (!d) {
      d = document.createElement("div");
      d.id = "asgi-htag-notice";
      d.setAttribute("role", "alert");
      d.setAttribute("style", "z-index:2147483647;position:fixed;left:0;right:0;bottom:0;padding:10px 14px;" +
        "background:#222;color:#fff;font:14px sans-serif;box-shadow:0 -2px 6px rgba(0,0,0,.3)");
      (document.body || document.documentElement).appendChild(d);
    }
    d.textContent = text + " ";
    if (withReload) {
      var a = document.createElement("a");
      a.href = "#"; a.textContent = "Reload"; a.style.color = "#9cf";
      a.onclick = function (e) { e.preventDefault(); window.location.reload(); };
      d.appendChild(a);
    }
  }
  function clearNotice() {
    var d = document.getElementById("asgi-htag-notice");
    if (d) d.remove();
  }

  // A control message from the server, not htag actions. Returns true if handled.
  function control(o) {
    if (!o || typeof o !== "object" || !o.hasOwnProperty("asgi_htag")) return false;
    var kind = o.asgi_htag;
    if (kind === "gone") {
      // our instance no longer exists: get a fresh one instead of talking to a ghost
      finished = true;
      notice(o.message || "This page expired; reloading...", false);
      setTimeout(function () { window.location.reload(); }, 300);
    } else if (kind === "dead") {
      finished = true;
      notice(o.message || "The application stopped.", true);
      if (ws) try { ws.close(); } catch (e) {}
    } else if (kind === "error") {
      if (window.error) window.error("SERVER ERROR: " + o.message);
      else notice(o.message, false);
    } else if (kind === "busy") {
      finished = true;
      notice(o.message || "The server is busy, try again later.", true);
    }
    return true;
  }

  function startOnce() {
    if (started) return;
    started = true;
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
  }

  function deliver(o) {
    if (!control(o)) action(o);
  }

  function connect() {
    if (finished) return;
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + cfg.ws +
      "?t=" + encodeURIComponent(cfg.token) + (everOpened ? "&resync=1" : "");
    ws = new WebSocket(url);
    ws.onopen = function () {
      attempts = 0;
      everOpened = true;
      clearNotice();
      var pending = queue; queue = [];
      pending.forEach(function (m) { ws.send(m); });
      startOnce();
    };
    ws.onmessage = function (e) {
      var o;
      try { o = JSON.parse(e.data); } catch (err) { action(e.data); return; }
      deliver(o);
    };
    ws.onclose = function () {
      ws = null;
      if (finished) return;
      attempts += 1;
      var delay = Math.min(10000, 250 * Math.pow(2, Math.min(attempts, 6))) * (0.75 + Math.random() / 2);
      if (attempts > 1) notice("Connection lost, reconnecting...", false);
      setTimeout(connect, delay);
    };
  }

  async function post(o) {
    var r;
    try {
      r = await window.fetch(cfg.post + "?t=" + encodeURIComponent(cfg.token), {
        method: "POST", credentials: "same-origin",
        headers: {"content-type": "application/json"}, body: JSON.stringify(o)
      });
    } catch (e) {
      notice("Cannot reach the server.", true);
      return;
    }
    var text = await r.text(), obj;
    try { obj = JSON.parse(text); } catch (e) { action(text); return; }
    deliver(obj);
  }

  window.interact = function (o) {
    if (finished) return;
    if (cfg.mode === "http") return post(o);
    var m = JSON.stringify(o);
    if (ws && ws.readyState === 1) ws.send(m); else queue.push(m);
  };

  if (cfg.mode === "http") {
    startOnce();
  } else {
    connect();
  }
  return {cfg: cfg, notice: notice};
})();
