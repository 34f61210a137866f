// asgi_htag browser runtime: defines interact(o) for htag, talks to this page's own
// instance over a websocket (auto-reconnect with backoff) or over HTTP POST (http_only).
var __asgi_htag = (function () {
  "use strict";
  var cfg = /*ASGI_HTAG_CFG*/null;
  var ws = null, started = false, attempts = 0, finished = false, queue = [], everOpened = false, openedAt = 0;

  // --- parano: ECDH (P-256) key agreement per page, AES-256-GCM envelopes -------------
  var te = new TextEncoder(), td = new TextDecoder();
  var pageId = null, aesKey = null, seq = 0, chain = Promise.resolve();
  var httpChannel = {};  // what a hello sent over http_only is answered on (a socket, otherwise)
  var seenTop = 0, seen = {};  // numbers of the frames received (answers to concurrent POSTs may cross)
  var keyReady = null, resolveKey = null;
  keyReady = new Promise(function (resolve) { resolveKey = resolve; });
  if (cfg.parano) {
    var rnd = new Uint8Array(18);
    crypto.getRandomValues(rnd);
    pageId = b64(rnd).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function b64(buf) {
    var bytes = new Uint8Array(buf), s = "";
    for (var i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
    return btoa(s);
  }
  function unb64(str) {
    var s = atob(str), bytes = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return bytes;
  }
  // a key pair for one hello, kept on the channel (socket) it is sent on
  async function newHello() {
    if (!window.crypto || !crypto.subtle) throw new Error("parano mode needs a secure context (https or localhost)");
    var pair = await crypto.subtle.generateKey({name: "ECDH", namedCurve: "P-256"}, false, ["deriveBits"]);
    return {pair: pair, pub: b64(await crypto.subtle.exportKey("raw", pair.publicKey))};
  }
  async function agree(serverPub, pair) {
    var spub = await crypto.subtle.importKey("raw", unb64(serverPub), {name: "ECDH", namedCurve: "P-256"}, false, []);
    var bits = await crypto.subtle.deriveBits({name: "ECDH", public: spub}, pair.privateKey, 256);
    var hk = await crypto.subtle.importKey("raw", bits, "HKDF", false, ["deriveKey"]);
    return crypto.subtle.deriveKey(
      {name: "HKDF", hash: "SHA-256", salt: te.encode(cfg.token), info: te.encode("asgi_htag parano v1")},
      hk, {name: "AES-GCM", length: 256}, false, ["encrypt", "decrypt"]);
  }
  async function seal(o) {
    await keyReady; // a click before the key agreement finished waits for it
    seq += 1;
    var iv = new Uint8Array(12);
    crypto.getRandomValues(iv);
    var ct = await crypto.subtle.encrypt({name: "AES-GCM", iv: iv, additionalData: te.encode("asgi_htag c2s")},
      aesKey, te.encode(JSON.stringify({n: seq, o: o})));
    var out = new Uint8Array(12 + ct.byteLength);
    out.set(iv, 0); out.set(new Uint8Array(ct), 12);
    return JSON.stringify({k: pageId, p: b64(out)});
  }
  async function unseal(p) {
    await keyReady;
    var blob = unb64(p);
    var plain = await crypto.subtle.decrypt({name: "AES-GCM", iv: blob.slice(0, 12), additionalData: te.encode("asgi_htag s2c")},
      aesKey, blob.slice(12));
    var m = JSON.parse(td.decode(plain));
    if (!m || typeof m.n !== "number" || !m.hasOwnProperty("o")) throw new Error("malformed frame");
    // each number once: a replayed frame is refused (a window of 1000 behind the highest)
    if (m.n <= seenTop - 1000 || seen[m.n]) throw new Error("replayed frame refused");
    seen[m.n] = true;
    if (m.n > seenTop) {
      for (var k in seen) if (+k <= m.n - 1000) delete seen[k];
      seenTop = m.n;
    }
    return m.o;
  }
  // keep frames in order although WebCrypto is asynchronous
  function inOrder(fn) {
    chain = chain.then(fn).catch(function (e) { notice("Secure channel error: " + e, true); });
    return chain;
  }

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
  function control(o, from) {
    if (!o || typeof o !== "object" || !o.hasOwnProperty("asgi_htag")) return false;
    var kind = o.asgi_htag;
    if (kind === "gone") {
      // our instance no longer exists: get a fresh one instead of talking to a ghost,
      // unless reloading does not help (cookies blocked...): then say so and stop
      finished = true;
      var now = Date.now(), recent = [];
      try { recent = JSON.parse(sessionStorage.getItem("asgi_htag_reloads") || "[]"); } catch (e) {}
      recent = recent.filter(function (t) { return now - t < 30000; });
      if (recent.length >= 3) {
        notice("This page cannot reach its application instance (are cookies blocked?).", true);
        return true;
      }
      recent.push(now);
      try { sessionStorage.setItem("asgi_htag_reloads", JSON.stringify(recent)); } catch (e) {}
      notice(o.message || "This page expired; reloading...", false);
      setTimeout(function () { window.location.reload(); }, 300);
    } else if (kind === "dead") {
      finished = true;
      notice(o.message || "The application stopped.", true);
      if (ws) try { ws.close(); } catch (e) {}
    } else if (kind === "error") {
      if (window.error) window.error("SERVER ERROR: " + o.message);
      else notice(o.message, false);
    } else if (kind === "hello") {
      // only the answer to the hello sent on this channel, once, and while the page has no key
      var pending = from && from.__hello;
      if (!pending || aesKey) return true;
      from.__hello = null;
      // not through inOrder: queued clicks wait on keyReady, which this resolves
      agree(o.pub, pending).then(function (key) {
        if (from !== ws && from !== httpChannel) return;  // its socket went meanwhile: the next one agrees
        aesKey = key;
        resolveKey();
        flush();
        startOnce();
      }, function (e) { notice("Secure channel error: " + e, true); });
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

  // htag's action() throws the app's errors once it has shown them (its _error): they are
  // no failure of the channel, so they must not reach a catch that reports one; thrown
  // again on their own, they land in the console, as from a plain websocket's onmessage
  function apply(payload) {
    try { action(payload); } catch (e) { setTimeout(function () { throw e; }, 0); }
  }

  function deliver(o, from) {
    if (control(o, from)) return;
    if (cfg.parano) {
      if (!o || typeof o.p !== "string") return; // nothing is accepted in clear
      inOrder(async function () { var a = await unseal(o.p); apply(a); });
    } else {
      apply(o);
    }
  }

  function flush() {
    if (!ws || ws.readyState !== 1) return;
    var pending = queue; queue = [];
    pending.forEach(function (m) { ws.send(m); });
  }

  function connect() {
    if (finished) return;
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + cfg.ws +
      "?t=" + encodeURIComponent(cfg.token) + (everOpened ? "&resync=1" : "") +
      (pageId ? "&k=" + pageId : "");
    var sock = ws = new WebSocket(url);
    ws.onopen = function () {
      openedAt = Date.now();  // the backoff starts over only once a connection has lasted
      everOpened = true;
      clearNotice();
      if (cfg.parano && !aesKey) {
        newHello().then(function (h) {
          if (sock !== ws) return;
          sock.__hello = h.pair;
          sock.send(JSON.stringify({hello: h.pub, k: pageId}));
        }, function (e) { notice("Secure channel error: " + e, true); });
        return; // interactions wait for the key (see control "hello")
      }
      flush();
      startOnce();
    };
    ws.onmessage = function (e) {
      var o;
      try { o = JSON.parse(e.data); } catch (err) { if (!cfg.parano) action(e.data); return; }
      deliver(o, sock);
    };
    ws.onclose = function (e) {
      ws = null;
      if (finished) return;
      if (openedAt && Date.now() - openedAt > 5000) attempts = 0;
      openedAt = 0;
      attempts += 1;
      if (e && e.code === 4001 && attempts >= 5) {  // refused again and again (not a network blip)
        finished = true;
        notice("This page cannot reconnect to its application instance.", true);
        return;
      }
      var delay = Math.min(10000, 250 * Math.pow(2, Math.min(attempts, 6))) * (0.75 + Math.random() / 2);
      if (attempts > 1) notice("Connection lost, reconnecting...", false);
      setTimeout(connect, delay);
    };
  }

  var posting = Promise.resolve();
  var unreachable = false;  // the "Cannot reach the server" notice is up
  function cannotReach() {
    unreachable = true;
    notice("Cannot reach the server.", true);
  }
  function send(body) {
    return window.fetch(cfg.post + "?t=" + encodeURIComponent(cfg.token), {
      method: "POST", credentials: "same-origin", headers: {"content-type": "application/json"}, body: body
    });
  }
  async function post(o, raw, channel) {
    var r, text, obj;
    try {
      r = await send(raw || JSON.stringify(o));
      text = await r.text();
    } catch (e) {
      cannotReach();
      return;
    }
    if (unreachable) { unreachable = false; clearNotice(); }  // reached again
    try { obj = JSON.parse(text); } catch (e) { apply(text); return; }
    deliver(obj, channel);
  }

  window.interact = function (o) {
    if (finished) return;
    if (cfg.mode !== "http") keepAlive();  // (each POST of an http_only page renews it)
    if (cfg.parano) {
      return inOrder(async function () {
        var m = await seal(o);
        if (cfg.mode === "http") return post(null, m);
        if (ws && ws.readyState === 1) ws.send(m); else queue.push(m);
      });
    }
    if (cfg.mode === "http") {
      // one POST at a time, as over the websocket: answers are applied in the order of the clicks
      posting = posting.then(function () { return post(o); }).catch(cannotReach);
      return posting;
    }
    var m = JSON.stringify(o);
    if (ws && ws.readyState === 1) ws.send(m); else queue.push(m);
  };

  // The session cookie's Max-Age is renewed by HTTP responses, and a page that clicks over
  // its websocket makes none: while it is in use, it asks for one now and then.
  var keptAt = Date.now();
  function keepAlive() {
    if (!cfg.keepalive || Date.now() - keptAt < cfg.keepalive * 1000) return;
    keptAt = Date.now();
    send(JSON.stringify({contact: 1})).catch(function () {});  // the websocket says it if the server is gone
  }

  if (cfg.mode === "http") {
    if (cfg.parano) {
      newHello().then(function (h) {
        httpChannel.__hello = h.pair;
        return post(null, JSON.stringify({hello: h.pub, k: pageId}), httpChannel);
      }, function (e) { notice("Secure channel error: " + e, true); });
    } else {
      // the page's process waits for a sign of life (timeout_abandoned): a crawler sends none
      posting = posting.then(function () { return post(null, JSON.stringify({contact: 1})); }).catch(cannotReach);
      startOnce();
    }
  } else {
    connect();
  }
  return {cfg: cfg, notice: notice};
})();
