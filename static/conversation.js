// The conversation model: pure (no DOM, no network), so Node's test runner can load it
// (tests/js); reply timings use the `now` its caller passes. One `Chat` object owns the
// open conversation and every change to it goes through one of its methods.
//
// The local copy `conv.messages` mirrors the server session's history: its last
// `messages.length - conv.offset` entries are the server's, index for index. Reply events
// are applied at most once (by `seq`); a user turn waits in `pending` until the server has
// it, and is sent at most once per connection.

import { PARAM_KEYS, SERVER_KEYS, bump, given, historyEntry, paramsForServer, replyStats, restorableHistory, sameTurn } from './history.js';

const streamState = (msg, reply, t0, resumed) => ({ msg, reply, t0, firstAt: null, thinkStart: null, thinkEnd: null, resumed });

export class Chat {
  constructor() {
    this.conv = null; // the open conversation (see store.js for its shape)
    this.pending = null; // {kind, msg, text, base, index?, sent, unsure?, snapshot?, t0}
    this.streaming = null; // {msg, reply, t0, firstAt, thinkStart, thinkEnd, resumed}
    this.notices = [];
    this.serverModel = null;
    this.serverParams = {};
    this.restoring = false; // a `restore` is on its way: hold the pending turn back
    this.handshake = false; // the next `session` frame is the first of a (re)connection
  }

  open(conv) {
    conv.offset = conv.offset || 0;
    for (const m of conv.messages) if (m.streaming) m.streaming = 'resuming';
    this.conv = conv;
    this.pending = null;
    this.streaming = null;
    this.notices = [];
    this.serverModel = null;
    this.serverParams = {};
  }

  get busy() { return Boolean(this.streaming || this.pending); }

  confirmed() { return this.conv.messages.filter((m) => !m.pending); }

  serverIndex(localIndex) { return localIndex - (this.conv.offset || 0); }

  /** A new connection starts: its first `session` frame tells what the server kept. */
  connecting() {
    this.handshake = true;
    this.restoring = false;
  }

  /** The transport is being replaced: the reply streaming now is picked up by the next one. */
  leaving() {
    this.handshake = false;
    if (this.streaming) this.streaming.msg.streaming = 'resuming';
  }

  /** A `restore` was sent: the pending turn waits for its answer. */
  restoreSent() { this.restoring = true; }

  /** The pending turn was handed to the transport (`sent`: it took it). */
  sending(sent) { if (this.pending) this.pending.sent = Boolean(sent); }

  addNotice(n) { this.notices.push(n); }

  /** This conversation's model or parameters (from the picker or the settings dialog). */
  choose({ model, params }) {
    if (model !== undefined) this.conv.model = model;
    if (params !== undefined) this.conv.params = params;
  }

  /** Reply events carry a rising `seq`: true the first time a seq is seen (resume may replay). */
  fresh(f) {
    if (typeof f.seq !== 'number') return true;
    if (f.seq <= (this.conv.lastSeq || 0)) return false;
    this.conv.lastSeq = f.seq;
    return true;
  }

  /** Set the title from the first question and the time of the last change. */
  touch(now) {
    const conv = this.conv;
    conv.updated = now;
    if (!conv.title) {
      const first = conv.messages.find((m) => m.role === 'user');
      if (first) conv.title = first.content.replace(/\s+/g, ' ').trim().slice(0, 60);
    }
  }

  /** Make the local copy agree with the server's history (a suffix of it, index for index). */
  mergeHistory(history) {
    const conv = this.conv;
    const p = this.pending;
    const withPending = conv.messages.filter((m) => !m.streaming && (!m.pending || (p && p.msg === m && (p.sent || p.unsure))));
    const without = conv.messages.filter((m) => !m.pending && !m.streaming);
    for (const local of [withPending, without]) {
      const o = local.length - history.length;
      if (o >= 0 && history.every((h, i) => sameTurn(local[o + i], h))) {
        history.forEach((h, i) => {
          const m = local[o + i];
          for (const k of SERVER_KEYS) {
            if (given(h[k]) && JSON.stringify(m[k]) !== JSON.stringify(h[k])) {
              m[k] = h[k];
              bump(m); // drawn again with what the server knows
            }
          }
        });
        conv.offset = o;
        conv.messages = local;
        return;
      }
    }
    // Different: the server's copy wins; keep what we measured locally where turns match.
    conv.messages = history.map((h, i) => {
      const m = historyEntry(h);
      const old = without[i];
      if (sameTurn(old, h) && old.stats) m.stats = old.stats;
      if (sameTurn(old, h) && old.error) m.error = old.error;
      return m;
    });
    conv.offset = 0;
  }

  /**
   * First half of a `session` frame. `requested` is the session the connection asked for.
   * Returns the history to `restore` when the server has forgotten the conversation and
   * we have a copy (the caller sends it, then sets `restoring`), else null: then `applySession`.
   */
  sessionFrame(f, requested) {
    const conv = this.conv;
    const history = Array.isArray(f.history) ? f.history : [];
    if (f.session !== conv.session) {
      conv.session = f.session;
      conv.lastSeq = 0;
    }
    this.serverModel = f.model || null;
    this.serverParams = f.params || {};
    if (requested && f.session !== requested) {
      for (const m of conv.messages) if (m.streaming) this.finishLocally(m, 'interrupted');
    }
    if (!history.length && !f.running && !this.restoring) {
      const seed = restorableHistory(conv.messages);
      if (seed.length) return seed;
    }
    return null;
  }

  /** Second half of a `session` frame. Returns {restored} (a restore was answered with a history). */
  applySession(f) {
    const conv = this.conv;
    const history = Array.isArray(f.history) ? f.history : [];
    const restored = this.restoring && history.length > 0;
    this.restoring = false;
    const handshake = this.handshake;
    this.handshake = false;
    if (typeof f.seq === 'number' && !f.running) conv.lastSeq = Math.max(conv.lastSeq || 0, f.seq);
    // A frame within a connection tells of a change made elsewhere (another tab, another device
    // or instance): take its settings, or `settingsCommand` would send ours back over them. Only
    // a connection's first frame lets this page's choices win (they may be newer: made offline).
    if (!handshake && f.params && typeof f.params === 'object') {
      if (f.model) conv.model = f.model;
      const params = {};
      for (const k of PARAM_KEYS) if (f.params[k] !== undefined && f.params[k] !== null) params[k] = f.params[k];
      conv.params = params;
    }

    const pending = this.pending;
    const streamingBefore = this.streaming;
    const before = conv.messages;
    this.mergeHistory(history);
    const accepted = Boolean(pending && (pending.sent || pending.unsure) && pending.kind !== 'regenerate'
      && history.length > pending.base && history[pending.base].role === 'user'
      && history[pending.base].content === pending.text);

    // A reply is running on the server: show it (or keep showing it) and let the replay fill it in.
    if (f.running) {
      const rid = f.running.reply;
      let msg = streamingBefore && streamingBefore.reply === rid ? streamingBefore.msg : null;
      if (!msg) msg = before.find((m) => m.streaming && m.reply === rid) || null;
      if (!msg) msg = { role: 'assistant', content: '', reasoning: '', model: f.running.model, reply: rid, stats: {} };
      msg.streaming = true;
      msg.reply = rid;
      conv.messages.push(msg);
      this.streaming = streamingBefore && streamingBefore.msg === msg ? streamingBefore : streamState(msg, rid, 0, true);
    } else {
      this.streaming = null;
    }

    if (pending) {
      if (accepted) {
        this.pending = null; // it reached the server (perhaps before the connection dropped)
        if (pending.msg) {
          pending.msg.pending = false;
          bump(pending.msg); // drawn again without its "sending" badge
        }
      } else if (pending.kind === 'regenerate' && pending.sent && (handshake || f.running)) {
        // Sent on a dead connection: the history tells what happened. Or the frame that
        // opens its own stream (SSE): the running reply is the new one.
        this.pending = null;
      } else {
        if (handshake && pending.sent) pending.sent = false; // lost with the connection: send it again, once
        pending.unsure = false;
        if (pending.msg && !conv.messages.includes(pending.msg)) conv.messages.push(pending.msg);
      }
    }
    return { restored };
  }

  /** `start`: the pending turn (if any) is accepted and the reply begins. Null if known already. */
  start(f, now) {
    const conv = this.conv;
    if (this.streaming && this.streaming.reply === f.reply) return null;
    if (this.streaming) this.finishLocally(this.streaming.msg, 'interrupted');
    const p = this.pending;
    if (p) {
      if (p.kind === 'edit') {
        // the edited message and everything after it are replaced
        conv.messages = conv.messages.filter((m) => m !== p.msg).slice(0, p.index + (conv.offset || 0)).concat([p.msg]);
      } else if (p.kind === 'regenerate') {
        const last = conv.messages[conv.messages.length - 1];
        if (last && last.role === 'assistant' && !last.streaming) conv.messages.pop();
      }
      if (p.msg) {
        p.msg.pending = false;
        bump(p.msg);
      }
      this.pending = null;
    }
    const msg = { role: 'assistant', content: '', reasoning: '', model: f.model, reply: f.reply, streaming: true, stats: {} };
    conv.messages.push(msg);
    this.streaming = streamState(msg, f.reply, p ? p.t0 : now, !p);
    this.touch(Date.now());
    return this.streaming;
  }

  /** The stream a reply event belongs to, or null. */
  current(f) {
    const s = this.streaming;
    return s && (s.reply === f.reply || !f.reply) ? s : null;
  }

  /** `status`: the reply waits for a one-at-a-time model; returns the stream when it changed. */
  status(f) {
    const s = this.current(f);
    if (!s || f.state !== 'queued') return null;
    s.msg.queuedAhead = f.position;
    return s;
  }

  /** `delta`: answer text to append. Returns {s, thinkEnded} or null. */
  delta(f, now) {
    const s = this.current(f);
    if (!s) return null;
    if (s.firstAt === null) s.firstAt = now;
    const thinkEnded = s.thinkStart !== null && s.thinkEnd === null;
    if (thinkEnded) s.thinkEnd = now;
    s.msg.content += f.content || '';
    delete s.msg.queuedAhead;
    return { s, thinkEnded };
  }

  /** `reasoning`: "thinking" text to append. Returns the stream or null. */
  reasoning(f, now) {
    const s = this.current(f);
    if (!s) return null;
    if (s.firstAt === null) s.firstAt = now;
    if (s.thinkStart === null) s.thinkStart = now;
    s.msg.reasoning = (s.msg.reasoning || '') + (f.content || '');
    delete s.msg.queuedAhead;
    return s;
  }

  /** `done`: the reply is over. Returns the finished stream or null. */
  done(f, now) {
    const s = this.current(f);
    if (!s) return null;
    const msg = s.msg;
    msg.stats = replyStats(s, f, now, msg.stats || {});
    if (f.usage) msg.usage = f.usage;
    if (f.model) msg.model = f.model;
    msg.finish_reason = f.finish_reason || 'stop';
    if (f.fallback) msg.fallback = f.fallback;
    delete msg.streaming;
    delete msg.reply;
    delete msg.queuedAhead;
    this.streaming = null;
    this.touch(Date.now());
    return s;
  }

  /**
   * `error`. Returns what it meant: {kind: 'reply', msg} (inside a reply), 'expired',
   * 'restore' (our copy was refused: carry on with a fresh session), or 'refused' (a command
   * was refused; `revertedText` is the text of the turn taken back, if any).
   */
  error(f) {
    const s = f.reply ? this.current(f) : null;
    if (s) {
      s.msg.error = { code: f.code, message: f.message };
      return { kind: 'reply', msg: s.msg };
    }
    if (f.code === 'session_expired') return { kind: 'expired' };
    if (this.restoring) {
      this.restoring = false;
      this.handshake = false;
      this.conv.offset = this.confirmed().length;
      return { kind: 'restore' };
    }
    const p = this.pending;
    if (p && p.sent && !this.streaming) return { kind: 'refused', revertedText: this.takeBack() };
    return { kind: 'refused', revertedText: null };
  }

  /** A reply we can no longer follow: keep what arrived, mark it. */
  finishLocally(msg, reason) {
    delete msg.streaming;
    delete msg.reply;
    msg.finish_reason = msg.finish_reason || reason;
    bump(msg);
    if (this.streaming && this.streaming.msg === msg) this.streaming = null;
  }

  // -- turns the user starts ---------------------------------------------------------

  /** A new question. Returns false when one is already on its way. */
  submit(text, now) {
    if (this.busy) return false;
    const msg = { role: 'user', content: text, pending: true };
    const base = this.confirmed().length - (this.conv.offset || 0);
    this.pending = { kind: 'chat', msg, text, base, sent: false, t0: now };
    this.conv.messages.push(msg);
    this.notices = [];
    this.touch(Date.now());
    return true;
  }

  /** Replace user message `localIndex` and what follows. Returns 'busy', 'old' or 'ok'. */
  edit(localIndex, text, now) {
    if (this.busy) return 'busy';
    const idx = this.serverIndex(localIndex);
    if (idx < 0) return 'old'; // the server never had it (older than what it keeps)
    const snapshot = this.conv.messages.slice();
    const msg = { role: 'user', content: text, pending: true };
    this.conv.messages = snapshot.slice(0, localIndex).concat([msg]);
    this.pending = { kind: 'edit', msg, text, base: idx, index: idx, sent: false, snapshot, t0: now };
    this.notices = [];
    return 'ok';
  }

  /** Replace the last reply with a new one. Returns false when there is none to replace. */
  regenerate(now) {
    const msgs = this.conv.messages;
    const last = msgs[msgs.length - 1];
    if (this.busy || !last || last.role !== 'assistant') return false;
    this.conv.messages = msgs.slice(0, -1);
    this.pending = { kind: 'regenerate', msg: null, text: '', base: this.confirmed().length - (this.conv.offset || 0),
      sent: false, snapshot: msgs.slice(), t0: now };
    this.notices = [];
    return true;
  }

  /** The command that sends the pending turn (the same for every transport), or null. */
  command() {
    const p = this.pending;
    if (!p || p.sent || this.streaming) return null;
    const cmd = { type: p.kind };
    if (p.kind === 'edit') cmd.index = p.index;
    if (p.kind !== 'regenerate') cmd.message = p.text;
    if (this.conv.model) cmd.model = this.conv.model;
    cmd.params = paramsForServer(this.conv.params);
    return cmd;
  }

  /** The transport lost the pending turn's request before any answer: it may or may not have arrived. */
  turnLost() {
    const p = this.pending;
    if (!p || !p.sent) return;
    p.sent = false;
    p.unsure = true;
  }

  /** Take the pending turn back (refused, or cancelled while queued). Returns its text. */
  takeBack() {
    const p = this.pending;
    if (!p) return null;
    this.pending = null;
    if (p.snapshot) this.conv.messages = p.snapshot;
    else this.conv.messages = this.conv.messages.filter((m) => m !== p.msg);
    return p.text || null;
  }

  /** The `set` command when this conversation's choices differ from the session's, else null. */
  settingsCommand(force = false) {
    const conv = this.conv;
    const want = paramsForServer(conv.params);
    const have = this.serverParams || {};
    const differs = Object.keys(want).some((k) => (want[k] ?? null) !== (have[k] ?? null));
    if (!force && !differs && !(conv.model && conv.model !== this.serverModel)) return null;
    const cmd = { type: 'set', params: want };
    if (conv.model) cmd.model = conv.model;
    return cmd;
  }

  /** What a reconnecting transport should ask for. */
  position() {
    return { session: this.conv.session || null, after: this.conv.lastSeq || 0 };
  }
}
