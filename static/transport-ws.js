// The WebSocket transport (/ws): one socket, commands as frames, ping/pong, reconnect with
// backoff and `?session=ID&after=SEQ` so the server replays what was missed. See transport.js.

import { backoff, httpStop, needsLogin, wsUrl } from './net.js';

const PING_EVERY = 20000;
const PING_TIMEOUT = 10000;

export class WsTransport {
  constructor(hooks) {
    this.hooks = hooks;
    this.ws = null;
    this.ready = false; // open and the first `session` frame received
    this.attempt = 0;
    this.timer = 0;
    this.pingTimer = 0;
    this.pongTimer = 0;
    this.closed = true;
    this.requested = null; // the session this connection asked for
    this.kind = 'ws';
    this.label = 'WebSocket';
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

  turn(cmd) { return this.send(cmd); }

  set(cmd) { return this.send(cmd); }

  restore(history) { return this.send({ type: 'restore', history }); }

  /** Commands run in order over the socket: a stop right after a chat stops its reply. */
  stop(session) {
    if (!this.send({ type: 'stop' })) httpStop(session);
  }

  connect() {
    this.drop();
    const { session, after } = this.hooks.onConnect();
    this.requested = session || null;
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
      this.hooks.onFrame(frame, this);
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
