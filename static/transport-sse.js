// The Server-Sent Events transport (/sse): see transport.js for the interface.

import { BACKOFF_BASE, BACKOFF_MAX, HTTP, JSON_HEADERS, backoff, httpStop, sessionUrl } from './net.js';

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

/**
 * SSE: one request per turn (POST /sse, with `type` chat, edit or regenerate), the running
 * reply followed with GET /sse and Last-Event-ID, control over HTTP. There is no connection
 * to hold, so "online" means the server answered. Requests run one at a time, in order.
 */
export class SseTransport {
  constructor(hooks) {
    this.hooks = hooks;
    this.ctrl = null;
    this.closed = true;
    this.online = false;
    this.checking = false; // finding out what the server kept, after coming online
    this.attempt = 0;
    this.timer = 0;
    this.queue = Promise.resolve();
    this.requested = null;
    this.kind = 'sse';
    this.label = 'SSE';
  }

  get ready() {
    return !this.closed && this.online && !this.checking;
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

  /** Run `fn` after every request queued before it. */
  enqueue(fn) {
    const run = this.queue.then(() => (this.closed ? undefined : fn()));
    this.queue = run.catch(() => {});
    return run;
  }

  /** Check that the server answers; while it does not, retry with backoff. */
  async probe() {
    clearTimeout(this.timer);
    let ok = false;
    try {
      ok = (await fetch('healthz', { cache: 'no-store' })).ok;
    } catch {
      ok = false;
    }
    if (this.closed) return;
    if (ok) this.connected();
    else this.wentOffline();
  }

  /** The server answered. Coming back online, ask it what it kept (like a WebSocket's first frame). */
  connected() {
    const was = this.online;
    this.online = true;
    this.attempt = 0;
    clearTimeout(this.timer);
    if (was) return;
    this.checking = true;
    this.hooks.onStatus('online', {});
    this.enqueue(() => this.check(this.hooks.onConnect().session)).finally(() => { this.checking = false; });
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
   * The session as a `session` frame: its history, or an empty one from no session when the
   * server forgot it (the page then restores it), and its running reply followed. `quiet`
   * (before a turn, whose own stream opens with the session): only a forgotten one is told.
   */
  async check(session, quiet = false) {
    this.requested = session || null;
    if (!session) {
      this.checking = false;
      this.emitSession({ session: null });
      return;
    }
    let r;
    try {
      r = await fetch(sessionUrl(session), HTTP);
    } catch {
      this.wentOffline();
      return;
    }
    if (this.closed) return;
    if (r.status === 401) {
      this.hooks.onAuth();
      return;
    }
    this.checking = false;
    if (r.status === 404) this.emitSession({ session: null });
    if (!r.ok || quiet) return;
    const data = await r.json();
    this.emitSession(data);
    if (data.running) await this.follow('dropped');
  }

  emitSession(data) {
    this.hooks.onFrame({ type: 'session', history: [], params: {}, model: null, ...data }, this);
  }

  turn(cmd) {
    if (!this.ready) return false;
    const { session } = this.hooks.position();
    // First make sure the server still has the session (else it is restored before the turn).
    this.enqueue(() => this.check(session, true)).then(() => this.enqueue(() => this.post(cmd)));
    return true;
  }

  async post(cmd) {
    const { session } = this.hooks.position();
    const body = { ...cmd };
    if (body.type === 'chat') delete body.type;
    if (session) body.session = session;
    this.requested = session || null;
    const outcome = await this.follow(await this.request('sse', {
      method: 'POST',
      headers: { ...JSON_HEADERS, Accept: 'text/event-stream' },
      body: JSON.stringify(body),
    }));
    // Nothing came back: whether it reached the server, the session's history will tell.
    if (outcome === 'network') this.hooks.onTurnLost();
  }

  /** While a stream ends early, resume it from the last seq we have (with backoff when offline). */
  async follow(outcome) {
    for (let attempt = 0; outcome === 'dropped' && !this.closed;) {
      const { session, after } = this.hooks.position();
      if (!session) break;
      const u = new URL('sse', window.location.href);
      u.searchParams.set('session', session);
      const next = await this.request(u.href, {
        method: 'GET',
        headers: { Accept: 'text/event-stream', 'Last-Event-ID': String(after || 0) },
      });
      if (next === 'none') {
        await this.check(session); // nothing left to resume: the session's history has the end of it
        return 'done';
      }
      if (next !== 'network') return next;
      await new Promise((done) => { setTimeout(done, Math.min(BACKOFF_MAX, BACKOFF_BASE * 2 ** attempt)); });
      attempt += 1;
    }
    return outcome;
  }

  set() { return false; } // every turn carries the model and parameters

  stop(session) { httpStop(session); }

  /** A new session seeded with `history` (POST api/sessions), answered as a `session` frame. */
  restore(history, { model, params } = {}) {
    this.enqueue(async () => {
      let r;
      let data = null;
      try {
        r = await fetch('api/sessions', { method: 'POST', headers: JSON_HEADERS, credentials: 'same-origin',
          body: JSON.stringify({ history, model: model || undefined, params }) });
        data = await r.json().catch(() => null);
      } catch {
        data = null;
      }
      if (r && r.ok && data && typeof data.session === 'string') {
        this.emitSession(data);
        return;
      }
      const err = (data && (data.type === 'error' ? data : data.error)) || {};
      this.hooks.onFrame({ type: 'error', code: err.code || 'restore_failed',
        message: err.message || (r ? `HTTP ${r.status}` : 'network') }, this);
    });
    return true;
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
      resp = await fetch(url, { ...init, ...HTTP, signal: ctrl.signal });
    } catch {
      if (ctrl.signal.aborted) return 'aborted';
      this.wentOffline();
      return 'network';
    }
    this.connected();
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
      }, this);
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
          this.hooks.onFrame(frame, this);
        }
      }
    } catch {
      if (ctrl.signal.aborted) return 'aborted';
    } finally {
      if (this.ctrl === ctrl) this.ctrl = null;
    }
    return finished ? 'done' : 'dropped';
  }

}
