// The two ways to talk to the server: a WebSocket (/ws) and Server-Sent Events (/sse).
// Both hand the same JSON event objects to `hooks.onFrame`; all URLs are relative to the
// page, so the app works under a path prefix behind a reverse proxy.
//
// hooks = {
//   onFrame(frame, via)             every event from the server
//   onStatus(status, detail)        'connecting' | 'online' | 'reconnecting' | 'offline'
//   onAuth()                        the server wants a login (HTTP 401)
//   resumeInfo() -> {session, after}  where to reattach on (re)connect
// }

const BACKOFF_BASE = 500; // ms
const BACKOFF_MAX = 15000;
const PING_EVERY = 20000;
const PING_TIMEOUT = 10000;

/** Exponential backoff with jitter: a random delay in [d/2, d], d = base * 2^attempt. */
export function backoff(attempt, base = BACKOFF_BASE, max = BACKOFF_MAX) {
  const d = Math.min(max, base * 2 ** Math.min(attempt, 16));
  return Math.round(d / 2 + Math.random() * (d / 2));
}

export function wsUrl(params) {
  const u = new URL('ws', window.location.href);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') u.searchParams.set(k, String(v));
  return u.href;
}

/** Ask the server whether we need to log in (after repeated connection failures). */
async function needsLogin() {
  try {
    const r = await fetch('api/models', { credentials: 'same-origin', cache: 'no-store' });
    return r.status === 401;
  } catch {
    return false;
  }
}

export class WsConnection {
  constructor(hooks) {
    this.hooks = hooks;
    this.ws = null;
    this.ready = false; // open and the first `session` frame received
    this.attempt = 0;
    this.timer = 0;
    this.pingTimer = 0;
    this.pongTimer = 0;
    this.closed = true;
    this.requestedSession = null;
    this.kind = 'ws';
  }

  open() {
    this.closed = false;
    this.attempt = 0;
    this.connect();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.drop();
  }

  /** Reconnect now (network came back, tab became visible, user asked). */
  retryNow() {
    if (this.closed || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    clearTimeout(this.timer);
    this.connect();
  }

  /** Leave the current socket without waiting for its close handshake. */
  drop() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000); } catch { /* already closed */ }
    }
  }

  send(obj) {
    if (!this.ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  connect() {
    this.drop();
    const { session, after } = this.hooks.resumeInfo();
    this.requestedSession = session || null;
    const url = wsUrl(session ? { session, after: after || 0 } : {});
    this.hooks.onStatus(this.attempt ? 'reconnecting' : 'connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      this.heard();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!frame || typeof frame !== 'object') return;
      if (frame.type === 'pong') return;
      if (frame.type === 'session' && !this.ready) {
        this.ready = true;
        this.attempt = 0;
        this.hooks.onStatus('online', {});
      }
      this.hooks.onFrame(frame, 'ws');
    };
    ws.onopen = () => {
      this.pingTimer = setInterval(() => this.ping(), PING_EVERY);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.drop();
      if (!this.closed) this.scheduleReconnect(ev.code);
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  ping() {
    if (!this.send({ type: 'ping' })) return;
    clearTimeout(this.pongTimer);
    this.pongTimer = setTimeout(() => {
      // No answer: the connection is dead even if the browser has not noticed yet.
      if (!this.closed) {
        this.drop();
        this.scheduleReconnect();
      }
    }, PING_TIMEOUT);
  }

  heard() {
    clearTimeout(this.pongTimer);
  }

  async scheduleReconnect(code) {
    clearTimeout(this.timer);
    const delay = backoff(this.attempt);
    this.attempt += 1;
    this.hooks.onStatus('offline', { code, retryIn: delay, attempt: this.attempt });
    if (this.attempt >= 3 && this.attempt % 3 === 0 && (await needsLogin())) {
      this.hooks.onAuth();
      return;
    }
    if (this.closed) return;
    this.timer = setTimeout(() => this.connect(), delay);
  }
}

// --- SSE -------------------------------------------------------------------------------

/** Incremental text/event-stream decoder: feed strings, get {event, data, id} objects. */
export class SseDecoder {
  constructor() {
    this.buf = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = null;
  }

  push(text) {
    const out = [];
    this.buf += text;
    let m;
    const re = /\r\n|\r|\n/g;
    let start = 0;
    // A lone '\r' at the very end may be the first half of '\r\n': wait for more.
    const limit = this.buf.endsWith('\r') ? this.buf.length - 1 : this.buf.length;
    while ((m = re.exec(this.buf)) && m.index < limit) {
      const line = this.buf.slice(start, m.index);
      start = m.index + m[0].length;
      this.line(line, out);
    }
    this.buf = this.buf.slice(start);
    return out;
  }

  line(line, out) {
    if (line === '') {
      if (this.data.length) out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
      this.reset();
      return;
    }
    if (line.startsWith(':')) return;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

export class SseConnection {
  constructor(hooks) {
    this.hooks = hooks;
    this.ctrl = null;
    this.closed = true;
    this.online = false;
    this.attempt = 0;
    this.timer = 0;
    this.kind = 'sse';
  }

  get ready() {
    return !this.closed && this.online;
  }

  open() {
    this.closed = false;
    this.attempt = 0;
    this.hooks.onStatus('connecting', {});
    this.probe();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ctrl) this.ctrl.abort();
    this.ctrl = null;
  }

  retryNow() {
    if (this.closed || this.online) return;
    clearTimeout(this.timer);
    this.probe();
  }

  /** Check that the server answers; while it does not, retry with backoff. */
  async probe() {
    clearTimeout(this.timer);
    let ok = false;
    try {
      const r = await fetch('healthz', { cache: 'no-store' });
      ok = r.ok;
    } catch {
      ok = false;
    }
    if (this.closed) return;
    if (ok) this.setOnline(true);
    else this.wentOffline();
  }

  setOnline(yes) {
    const was = this.online;
    this.online = yes;
    if (yes) {
      this.attempt = 0;
      clearTimeout(this.timer);
      if (!was) this.hooks.onStatus('online', {});
    }
  }

  wentOffline() {
    this.online = false;
    const delay = backoff(this.attempt);
    this.attempt += 1;
    this.hooks.onStatus('offline', { retryIn: delay, attempt: this.attempt });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.probe(), delay);
  }

  /**
   * One request whose answer is an event stream. Resolves to
   *   'done'     the stream ended after a `done` event (or an error without a reply)
   *   'dropped'  the stream ended early: resume with `resume()`
   *   'refused'  an HTTP error (reported through onFrame as an `error` event)
   *   'none'     204: nothing to resume
   *   'network'  the request failed before any answer (we went offline)
   *   'aborted'  we closed it
   */
  async request(url, init) {
    const ctrl = new AbortController();
    this.ctrl = ctrl;
    let resp;
    try {
      resp = await fetch(url, { ...init, signal: ctrl.signal, cache: 'no-store', credentials: 'same-origin' });
    } catch {
      if (ctrl.signal.aborted) return 'aborted';
      this.wentOffline();
      return 'network';
    }
    this.setOnline(true);
    if (resp.status === 401) {
      this.hooks.onAuth();
      return 'refused';
    }
    if (resp.status === 204) return 'none';
    const type = resp.headers.get('content-type') || '';
    if (!resp.ok || !type.includes('text/event-stream')) {
      let body = null;
      try { body = await resp.json(); } catch { /* not JSON */ }
      const err = (body && (body.type === 'error' ? body : body.error)) || {};
      this.hooks.onFrame({
        type: 'error',
        code: err.code || (resp.status === 429 ? 'rate_limited' : resp.status === 404 ? 'not_found' : 'http_error'),
        message: err.message || (typeof err === 'string' ? err : `HTTP ${resp.status}`),
        status: resp.status,
      }, 'sse');
      return 'refused';
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const sse = new SseDecoder();
    let finished = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const ev of sse.push(decoder.decode(value, { stream: true }))) {
          if (this.closed) return 'aborted';
          let frame;
          try { frame = JSON.parse(ev.data); } catch { continue; }
          if (!frame || typeof frame !== 'object') continue;
          if (!frame.type) frame.type = ev.event;
          if (frame.seq === undefined && ev.id !== null && /^\d+$/.test(ev.id)) frame.seq = Number(ev.id);
          if (frame.type === 'done' || (frame.type === 'error' && !frame.reply)) finished = true;
          this.hooks.onFrame(frame, 'sse');
        }
      }
    } catch {
      if (ctrl.signal.aborted) return 'aborted';
    } finally {
      if (this.ctrl === ctrl) this.ctrl = null;
    }
    return finished ? 'done' : 'dropped';
  }

  /** POST sse: one turn. `body` = {message, model, session, params, ...}. */
  turn(body) {
    return this.request('sse', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify(body),
    });
  }

  /** GET sse?session=ID with Last-Event-ID: the events after `after`, then the live stream. */
  resume(session, after) {
    const u = new URL('sse', window.location.href);
    u.searchParams.set('session', session);
    return this.request(u.href, {
      method: 'GET',
      headers: { Accept: 'text/event-stream', 'Last-Event-ID': String(after || 0) },
    });
  }

  /** Stop the session's running reply (SSE is one-way, so control goes over HTTP). */
  static async stop(session) {
    try {
      const r = await fetch(`api/sessions/${encodeURIComponent(session)}/stop`, { method: 'POST', credentials: 'same-origin' });
      return r.ok;
    } catch {
      return false;
    }
  }
}

/**
 * A new server session seeded with `history` (user/assistant turns), for SSE mode, which has
 * no command of its own for it. Tries `POST api/sessions` first; else a short-lived WebSocket
 * that sends `restore` (and `set`) and closes. Resolves to the new session id.
 */
export async function restoreSession(history, { model, params } = {}) {
  try {
    const r = await fetch('api/sessions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      credentials: 'same-origin',
      body: JSON.stringify({ history, model: model || undefined, params }),
    });
    if (r.ok) {
      const data = await r.json();
      if (data && typeof data.session === 'string') return data.session;
    } else if (r.status !== 404 && r.status !== 405) {
      const data = await r.json().catch(() => null);
      throw new Error((data && data.message) || `HTTP ${r.status}`);
    }
  } catch (err) {
    if (err instanceof Error && err.message && !(err instanceof TypeError)) throw err;
  }
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl({}));
    let sid = null;
    let step = 0;
    const finish = (err) => {
      clearTimeout(timer);
      ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000); } catch { /* closed */ }
      if (err) reject(err); else resolve(sid);
    };
    const timer = setTimeout(() => finish(new Error('timeout')), 10000);
    const cmds = [];
    if (history.length) cmds.push({ type: 'restore', history });
    const set = { type: 'set' };
    if (model) set.model = model;
    if (params) set.params = params;
    if (set.model || set.params) cmds.push(set);
    ws.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      if (f.type === 'error') {
        finish(new Error(f.message || f.code));
      } else if (f.type === 'session') {
        sid = f.session;
        if (step < cmds.length) ws.send(JSON.stringify(cmds[step]));
        else finish(null);
        step += 1;
      }
    };
    ws.onerror = () => finish(new Error('WebSocket failed'));
    ws.onclose = () => finish(new Error('WebSocket closed'));
  });
}
