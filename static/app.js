// NexLM chat page. Plain ES module, no build step; every URL is relative to the page.
//
// The page keeps a local mirror of the server session's history (conv.messages, whose
// last `messages.length - conv.offset` entries are the server's history, index for index),
// applies reply events at most once (by `seq`), and reattaches / resumes / re-seeds the
// server session after drops, reloads and server restarts.

import { t, setLang, getLang, onLangChange, applyI18n } from './i18n.js';
import { StreamRenderer, renderMarkdown } from './markdown.js';
import { WsConnection, SseConnection, restoreSession } from './transport.js';
import * as store from './store.js';

const $ = (id) => document.getElementById(id);
const ui = {
  app: $('app'), sidebar: $('sidebar'), scrim: $('scrim'), convList: $('conv-list'), convEmpty: $('conv-empty'),
  newChat: $('new-chat'), newChatEmbed: $('new-chat-embed'), openSidebar: $('open-sidebar'), closeSidebar: $('close-sidebar'),
  langToggle: $('lang-toggle'), themeToggle: $('theme-toggle'), title: $('conv-title'), chips: $('param-chips'),
  model: $('model'), conn: $('conn'), connText: $('conn-text'), exportBtn: $('export-btn'), exportMenu: $('export-menu'),
  settingsBtn: $('settings-btn'), scroller: $('scroller'), empty: $('empty'), thread: $('thread'), notices: $('notices'),
  jump: $('jump'), announcer: $('announcer'), composer: $('composer'), input: $('input'), send: $('send'), stop: $('stop'),
  note: $('composer-note'), dialog: $('settings'), form: $('settings-form'),
};

const query = new URLSearchParams(window.location.search);
const EMBED = document.body.classList.contains('embed') || query.get('embed') === '1';
if (EMBED) document.body.classList.add('embed');

const state = {
  conv: null, // the open conversation (see store.js for its shape)
  models: [], defaultModel: null,
  transport: store.getPref('transport', 'ws') === 'sse' ? 'sse' : 'ws',
  conn: null, // WsConnection | SseConnection
  connState: 'connecting',
  pending: null, // {msg, text, kind, base, sent, snapshot, index}: a user turn not yet accepted
  streaming: null, // {msg, reply, view, renderer, thinkRenderer, t0, firstAt, thinkStart, thinkEnd}
  notices: [],
  serverParams: {}, serverModel: null,
  sseBusy: false,
  stickToBottom: true,
};

// ------------------------------------------------------------------ theme & language

const media = window.matchMedia('(prefers-color-scheme: dark)');
function applyTheme() {
  const pref = store.getPref('theme', 'system');
  const dark = pref === 'dark' || (pref === 'system' && media.matches);
  document.documentElement.dataset.theme = dark ? 'dark' : 'light';
  $('hljs-light').media = dark ? 'not all' : 'all';
  $('hljs-dark').media = dark ? 'all' : 'not all';
}
media.addEventListener('change', applyTheme);

function applyLang() {
  setLang(store.getPref('lang', 'auto'));
}
onLangChange(() => {
  if (!state.conv) return;
  ui.langToggle.setAttribute('lang', getLang() === 'zh' ? 'en' : 'zh');
  renderModels();
  renderSidebar();
  renderHeader();
  rerenderThread();
  renderConn();
  renderComposer();
});

// ------------------------------------------------------------------ helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
const ICONS = {
  copy: 'M9 9h10v10H9zM5 15V5h10',
  edit: 'M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4',
  regen: 'M20 11a8 8 0 1 0-2.3 5.7M20 4v7h-7',
  check: 'M5 12.5l4.5 4.5L19 7',
  trash: 'M5 7h14M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3',
  chevron: 'M9 6l6 6-6 6',
  alert: 'M12 8v5M12 16.5v.5M10.3 3.9 2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z',
  bulb: 'M9 18h6M10 21h4M12 3a6 6 0 0 0-3.5 10.9c.6.5 1 1.2 1 2.1h5c0-.9.4-1.6 1-2.1A6 6 0 0 0 12 3z',
};
function icon(name) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const p = document.createElementNS(SVG_NS, 'path');
  p.setAttribute('d', ICONS[name]);
  svg.appendChild(p);
  return svg;
}

function iconButton(name, label, action, cls = 'icon-btn small') {
  const b = el('button', cls);
  b.type = 'button';
  b.dataset.action = action;
  b.setAttribute('aria-label', label);
  b.title = label;
  b.appendChild(icon(name));
  return b;
}

function announce(text) {
  ui.announcer.textContent = '';
  window.setTimeout(() => { ui.announcer.textContent = text; }, 30);
}

const fmt = (n, digits = 1) => (Number.isFinite(n) ? n.toFixed(digits) : '—');

async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch { /* fall back below */ }
  const ta = el('textarea', 'clipboard-helper');
  ta.value = text;
  ta.setAttribute('readonly', '');
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand('copy'); } catch { ok = false; }
  ta.remove();
  return ok;
}

function flashCopied(button) {
  button.classList.add('copied');
  const label = button.querySelector('.label');
  const before = button.dataset.action === 'copy-code' ? button.textContent : null;
  if (before !== null) button.textContent = t('copied');
  if (label) label.textContent = t('copied');
  window.setTimeout(() => {
    button.classList.remove('copied');
    if (before !== null) button.textContent = t('copy');
  }, 1400);
}

// ------------------------------------------------------------------ conversations

function serverIndex(localIndex) {
  return localIndex - (state.conv.offset || 0);
}

function confirmed() {
  return state.conv.messages.filter((m) => !m.pending);
}

let saveTimer = 0;
/** Save the open conversation now, or (soon=true, while streaming) at most every 800 ms. */
function save(soon = false) {
  const conv = state.conv;
  if (!conv) return;
  if (soon) {
    if (!saveTimer) {
      saveTimer = window.setTimeout(() => {
        saveTimer = 0;
        if (state.conv === conv) store.saveConversation(conv);
      }, 800);
    }
    return;
  }
  clearTimeout(saveTimer);
  saveTimer = 0;
  store.saveConversation(conv);
  renderSidebar();
}
// leaving the page (reload, close, navigate): keep what arrived so far
window.addEventListener('pagehide', () => { if (state.conv) store.saveConversation(state.conv); });

function touch() {
  state.conv.updated = Date.now();
  if (!state.conv.title) {
    const first = state.conv.messages.find((m) => m.role === 'user');
    if (first) state.conv.title = first.content.replace(/\s+/g, ' ').trim().slice(0, 60);
  }
}

function openConversation(conv, { connect = true } = {}) {
  if (state.conn) state.conn.close();
  if (state.conv && state.conv !== conv) save();
  state.conv = conv;
  conv.offset = conv.offset || 0;
  for (const m of conv.messages) if (m.streaming) m.streaming = 'resuming';
  state.pending = null;
  state.streaming = null;
  state.notices = [];
  state.serverModel = null;
  state.serverParams = {};
  store.setPref('current', conv.id);
  closeSidebarOnNarrow();
  rerenderThread();
  renderHeader();
  renderSidebar();
  renderModels();
  renderComposer();
  if (connect) startTransport();
}

function newChat() {
  if (state.conv && !state.conv.messages.length && !state.pending) {
    ui.input.focus();
    return;
  }
  const conv = store.newConversation();
  const prev = state.conv;
  if (prev) {
    conv.model = prev.model; // keep the model choice; parameters start from the defaults
  }
  openConversation(conv);
  ui.input.focus();
}

// ------------------------------------------------------------------ transport

function startTransport() {
  const hooks = {
    onFrame: handleFrame,
    onStatus: (s, detail) => setConn(s, detail),
    onAuth: () => { window.location.href = 'login'; },
    resumeInfo: () => {
      state.handshake = true;
      state.restoring = false;
      return { session: state.conv.session, after: state.conv.lastSeq || 0 };
    },
  };
  state.conn = state.transport === 'sse' ? new SseConnection(hooks) : new WsConnection(hooks);
  state.conn.open();
}

function switchTransport(kind) {
  if (kind === state.transport) return;
  state.transport = kind;
  state.handshake = false;
  store.setPref('transport', kind);
  if (state.conn) state.conn.close();
  if (state.streaming) state.streaming.msg.streaming = 'resuming';
  startTransport();
}

let retryTick = 0;
function setConn(s, detail = {}) {
  const before = state.connState;
  state.connState = s;
  // Tell screen readers about real changes only (the countdown is not announced).
  if (s === 'online' && before !== 'online' && before !== 'connecting') announce(t('connOnline'));
  if (s === 'offline' && before === 'online') announce(t('connOffline'));
  state.connDetail = detail;
  clearInterval(retryTick);
  if (s === 'offline' && detail.retryIn) {
    const until = Date.now() + detail.retryIn;
    state.connDetail.until = until;
    retryTick = window.setInterval(renderConn, 1000);
  }
  renderConn();
  if (s === 'online' && state.transport === 'sse') onSseOnline();
}

function renderConn() {
  const s = state.connState;
  ui.conn.dataset.state = s;
  let text;
  if (s === 'online') text = `${t('connOnline')} · ${state.transport === 'sse' ? 'SSE' : 'WebSocket'}`;
  else if (s === 'connecting') text = t('connConnecting');
  else if (s === 'reconnecting') text = t('connReconnecting');
  else {
    const left = state.connDetail && state.connDetail.until ? Math.max(0, Math.ceil((state.connDetail.until - Date.now()) / 1000)) : 0;
    text = left ? t('connOfflineRetry', { s: left }) : t('connOffline');
  }
  ui.connText.textContent = text;
}

window.addEventListener('online', () => state.conn && state.conn.retryNow());
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && state.conn) state.conn.retryNow();
});

function sendCommand(obj) {
  if (state.transport !== 'ws') return false;
  return state.conn && state.conn.send(obj);
}

// ------------------------------------------------------------------ server frames

function handleFrame(f, via) {
  if (via !== state.transport) return;
  switch (f.type) {
    case 'session': onSession(f); break;
    case 'start': if (fresh(f)) onStart(f); break;
    case 'status': if (fresh(f)) onStatus(f); break;
    case 'delta': if (fresh(f)) onDelta(f); break;
    case 'reasoning': if (fresh(f)) onReasoning(f); break;
    case 'done': if (fresh(f)) onDone(f); break;
    case 'error': if (f.seq === undefined || fresh(f)) onError(f); break;
    default: break;
  }
}

/** Reply events carry a rising `seq`: apply each at most once (resume may replay some). */
function fresh(f) {
  if (typeof f.seq !== 'number') return true;
  if (f.seq <= (state.conv.lastSeq || 0)) return false;
  state.conv.lastSeq = f.seq;
  return true;
}

const same = (a, b) => a && b && a.role === b.role && a.content === b.content;

function historyEntry(h) {
  const m = { role: h.role, content: typeof h.content === 'string' ? h.content : '' };
  for (const k of ['finish_reason', 'model', 'reasoning', 'usage']) if (h[k] !== undefined && h[k] !== null) m[k] = h[k];
  return m;
}

/** Make the local copy agree with the server's history (a suffix of it, index for index). */
function mergeHistory(history) {
  const conv = state.conv;
  const p = state.pending;
  const withPending = conv.messages.filter((m) => !m.streaming && (!m.pending || (p && p.msg === m && (p.sent || p.unsure))));
  const without = conv.messages.filter((m) => !m.pending && !m.streaming);
  for (const local of [withPending, without]) {
    const o = local.length - history.length;
    if (o >= 0 && history.every((h, i) => same(local[o + i], h))) {
      history.forEach((h, i) => {
        const m = local[o + i];
        for (const k of ['finish_reason', 'model', 'reasoning', 'usage']) {
          if (h[k] !== undefined && h[k] !== null && JSON.stringify(m[k]) !== JSON.stringify(h[k])) {
            m[k] = h[k];
            views.delete(m); // drawn again with what the server knows
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
    if (same(old, h) && old.stats) m.stats = old.stats;
    if (same(old, h) && old.error) m.error = old.error;
    return m;
  });
  conv.offset = 0;
}

const RESTORE_MAX_CHARS = 300000;

function restorableHistory(messages = state.conv.messages) {
  const out = [];
  for (const m of messages) {
    if (m.pending || m.streaming) continue;
    if (m.role !== 'user' && m.role !== 'assistant') continue;
    const want = !out.length || out[out.length - 1].role === 'assistant' ? 'user' : 'assistant';
    if (m.role !== want) {
      if (m.role === 'user') out.pop(); // a question without an answer: drop it
      else continue;
    }
    const entry = { role: m.role, content: m.content || '' };
    if (m.role === 'assistant') {
      entry.finish_reason = m.finish_reason || 'stop';
      if (m.model) entry.model = m.model;
    }
    out.push(entry);
  }
  if (out.length && out[out.length - 1].role === 'user') out.pop();
  // A restore travels in one frame (the server's limit is 1 MiB by default): keep the newest turns.
  while (out.length > 2 && JSON.stringify(out).length > RESTORE_MAX_CHARS) out.splice(0, 2);
  return out;
}

function onSession(f) {
  const conv = state.conv;
  const previous = conv.session;
  const requested = state.conn && state.conn.kind === 'ws' ? state.conn.requestedSession : previous;
  const handshake = state.handshake && state.transport === 'ws'; // the first frame of a (re)connection
  const history = Array.isArray(f.history) ? f.history : [];
  if (f.session !== previous) {
    conv.session = f.session;
    conv.lastSeq = 0;
  }
  state.serverModel = f.model || null;
  state.serverParams = f.params || {};

  // The server forgot this conversation (restart, expiry): seed the new session from our copy.
  const lost = Boolean(requested && f.session !== requested);
  if (lost) {
    for (const m of conv.messages) if (m.streaming) finishLocally(m, 'interrupted');
  }
  if (!history.length && !f.running && !state.restoring) {
    const seed = restorableHistory();
    if (seed.length && sendCommand({ type: 'restore', history: seed })) {
      state.restoring = true;
      return; // the server answers with a new `session` frame: continue there
    }
  }
  if (state.restoring) {
    state.restoring = false;
    if (history.length) addNotice({ code: 'restored', message: t('errRestore'), info: true });
  }
  state.handshake = false;
  if (typeof f.seq === 'number' && !f.running) conv.lastSeq = Math.max(conv.lastSeq || 0, f.seq);

  const pending = state.pending;
  const streamingBefore = state.streaming;
  const before = conv.messages;
  mergeHistory(history);
  const pendingAccepted = Boolean(pending && (pending.sent || pending.unsure) && pending.kind !== 'regenerate'
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
    state.streaming = streamingBefore && streamingBefore.msg === msg ? streamingBefore : newStreamingState(msg, rid);
  } else {
    state.streaming = null;
  }

  if (pending) {
    const has = pending.msg && conv.messages.includes(pending.msg);
    if (pendingAccepted) {
      state.pending = null; // it reached the server (perhaps before the connection dropped)
      if (pending.msg) {
        pending.msg.pending = false;
        views.delete(pending.msg); // drawn again without its "sending" badge
      }
    } else if (pending.kind === 'regenerate' && handshake && pending.sent) {
      state.pending = null; // sent on a dead connection: the history tells what happened
    } else {
      if (handshake && pending.sent) pending.sent = false; // lost with the connection: send it again, once
      pending.unsure = false;
      if (pending.msg && !has) conv.messages.push(pending.msg);
    }
  }
  rerenderThread();
  renderHeader();
  renderModels();
  applySettingsToServer(false);
  flushPending();
  renderComposer();
  save();
}

function newStreamingState(msg, reply) {
  return { msg, reply, t0: performance.now(), firstAt: null, thinkStart: null, thinkEnd: null, resumed: true };
}

function onStart(f) {
  const conv = state.conv;
  if (state.streaming && state.streaming.reply === f.reply) return;
  if (state.streaming) finishLocally(state.streaming.msg, 'interrupted');
  const p = state.pending;
  let t0 = performance.now();
  if (p) {
    if (p.kind === 'edit') {
      // the edited message and everything after it are replaced
      conv.messages = conv.messages.filter((m) => m !== p.msg).slice(0, p.index + (conv.offset || 0)).concat([p.msg]);
    } else if (p.kind === 'regenerate') {
      const last = conv.messages[conv.messages.length - 1];
      if (last && last.role === 'assistant' && !last.streaming) conv.messages.pop();
    }
    if (p.msg) p.msg.pending = false;
    t0 = p.t0 || t0;
    state.pending = null;
  }
  const msg = { role: 'assistant', content: '', reasoning: '', model: f.model, reply: f.reply, streaming: true, stats: {} };
  conv.messages.push(msg);
  state.streaming = { msg, reply: f.reply, t0, firstAt: null, thinkStart: null, thinkEnd: null, resumed: !p };
  if (p && p.msg) views.delete(p.msg); // drop its "sending" badge
  touch();
  rerenderThread();
  renderComposer();
  save(true);
  scrollToBottom(true);
}

function currentStream(f) {
  const s = state.streaming;
  return s && (s.reply === f.reply || !f.reply) ? s : null;
}

/** The reply waits for a one-at-a-time model (the embedded one): say how many are ahead. */
function onStatus(f) {
  const s = currentStream(f);
  if (!s || f.state !== 'queued') return;
  s.msg.queuedAhead = f.position;
  if (s.view && !s.msg.content && !s.msg.reasoning) showQueued(s.view.body, f.position);
}

function showQueued(body, ahead) {
  body.classList.add('waiting', 'queued');
  body.setAttribute('data-waiting', t('waitingAhead', { n: ahead }));
}

function onDelta(f) {
  const s = currentStream(f);
  if (!s) return;
  const now = performance.now();
  if (s.firstAt === null) s.firstAt = now;
  if (s.thinkStart !== null && s.thinkEnd === null) {
    s.thinkEnd = now;
    updateThinking(s.msg, s.view);
  }
  s.msg.content += f.content || '';
  delete s.msg.queuedAhead;
  if (s.view) {
    s.view.body.classList.remove('waiting', 'queued');
    s.renderer.update(s.msg.content);
  }
  save(true);
  followBottom();
}

function onReasoning(f) {
  const s = currentStream(f);
  if (!s) return;
  const now = performance.now();
  if (s.firstAt === null) s.firstAt = now;
  if (s.thinkStart === null) s.thinkStart = now;
  s.msg.reasoning = (s.msg.reasoning || '') + (f.content || '');
  delete s.msg.queuedAhead;
  if (s.view) {
    if (!s.thinkRenderer) attachRenderers(s);
    else s.thinkRenderer.update(s.msg.reasoning);
    s.view.body.classList.remove('waiting', 'queued');
  }
  save(true);
  followBottom();
}

function onDone(f) {
  const s = currentStream(f);
  if (!s) return;
  const msg = s.msg;
  const now = performance.now();
  const timing = f.timing || {};
  const usage = f.usage || null;
  const tokens = usage && Number.isFinite(usage.completion_tokens) ? usage.completion_tokens : null;
  const ttft = Number.isFinite(timing.ttft_ms) ? timing.ttft_ms : (!s.resumed && s.firstAt !== null ? s.firstAt - s.t0 : null);
  const total = Number.isFinite(timing.total_ms) ? timing.total_ms : (!s.resumed ? now - s.t0 : null);
  const genMs = total !== null && ttft !== null ? total - ttft : null;
  msg.stats = {
    tokens,
    ttft_ms: ttft,
    total_ms: total,
    tps: tokens !== null && genMs > 0 ? tokens / (genMs / 1000) : null,
    think_ms: s.thinkStart !== null ? (s.thinkEnd || now) - s.thinkStart : (msg.stats && msg.stats.think_ms) || null,
  };
  if (usage) msg.usage = usage;
  if (f.model) msg.model = f.model;
  msg.finish_reason = f.finish_reason || 'stop';
  if (f.fallback) msg.fallback = f.fallback;
  delete msg.streaming;
  delete msg.reply;
  delete msg.queuedAhead;
  state.streaming = null;
  touch();
  save();
  const v = views.get(msg);
  if (v && s.renderer && msg.content.length > 20000) {
    // A long reply keeps the blocks drawn while it streamed (drawing it all again would stall
    // the page); only its last block and the footer are finished.
    s.renderer.finish(msg.content);
    if (s.thinkRenderer) s.thinkRenderer.finish(msg.reasoning);
    v.root.classList.remove('streaming');
    v.root.setAttribute('aria-busy', 'false');
    v.body.classList.remove('waiting', 'queued');
    updateThinking(msg, v);
    const tag = v.head.querySelector('.model-tag');
    if (tag && msg.model) tag.textContent = msg.model;
    if (msg.error) renderError(msg, v);
    renderMeta(msg, v);
  } else {
    replaceView(msg);
  }
  renderComposer();
  announce(msg.finish_reason === 'stopped' ? t('replyStopped') : t('replyDone'));
  followBottom();
  flushPending();
  // A reply this page did not start (another tab, or picked up after a reload) may come after
  // turns we have not seen: ask the server for the whole history once it is over.
  if (s.resumed) syncFromServer();
}

async function syncFromServer() {
  const conv = state.conv;
  if (!conv.session) return;
  try {
    const r = await fetch(`api/sessions/${encodeURIComponent(conv.session)}`, { cache: 'no-store', credentials: 'same-origin' });
    if (!r.ok) return;
    const data = await r.json();
    if (state.conv === conv && !busy() && data.session === conv.session && !data.running) {
      onSession({ type: 'session', ...data });
    }
  } catch { /* offline: the next connection brings the history anyway */ }
}

function onError(f) {
  const s = f.reply ? currentStream(f) : null;
  if (s) {
    s.msg.error = { code: f.code, message: f.message };
    if (s.view) renderError(s.msg, s.view);
    save(true);
    return;
  }
  if (f.code === 'session_expired') {
    addNotice({ code: f.code, message: t('errSessionExpired'), info: true });
    return;
  }
  if (state.restoring) {
    // The server refused our copy: carry on with a fresh session, keeping the local view.
    state.restoring = false;
    state.handshake = false;
    state.conv.offset = confirmed().length;
    addNotice({ code: f.code, message: t('errRestoreFailed', { message: f.message || f.code }) });
    flushPending();
    return;
  }
  // A refused command: a turn we sent was not accepted. Put things back as they were.
  const p = state.pending;
  if (p && p.sent && !state.streaming) {
    state.pending = null;
    if (p.snapshot) state.conv.messages = p.snapshot;
    else state.conv.messages = state.conv.messages.filter((m) => m !== p.msg);
    if (p.text && !ui.input.value.trim()) {
      ui.input.value = p.text;
      autosize();
    }
    rerenderThread();
    renderComposer();
  }
  addNotice({ code: f.code, message: f.message || t('errUnknown') });
}

/** A reply we can no longer follow: keep what arrived, mark it. */
function finishLocally(msg, reason) {
  delete msg.streaming;
  delete msg.reply;
  msg.finish_reason = msg.finish_reason || reason;
  state.streaming = null;
}

// ------------------------------------------------------------------ sending

function paramsForServer() {
  const p = state.conv.params || {};
  const out = {};
  for (const k of ['temperature', 'top_p', 'max_tokens', 'system']) out[k] = p[k] === undefined || p[k] === '' ? null : p[k];
  return out;
}

function modelForServer() {
  return state.conv.model || null;
}

/** Send `set` when this conversation's choices differ from the server session's. */
function applySettingsToServer(force) {
  if (state.transport !== 'ws') return;
  const conv = state.conv;
  const want = paramsForServer();
  const have = state.serverParams || {};
  const differs = Object.keys(want).some((k) => (want[k] ?? null) !== (have[k] ?? null));
  const modelDiffers = conv.model && conv.model !== state.serverModel;
  if (force || differs || modelDiffers) {
    const cmd = { type: 'set', params: want };
    if (conv.model) cmd.model = conv.model;
    sendCommand(cmd);
  }
}

function busy() {
  return Boolean(state.streaming || state.pending);
}

function submit(text) {
  text = text.replace(/\s+$/, '');
  if (!text.trim()) return;
  if (busy()) {
    ui.note.textContent = t('busyNote');
    return;
  }
  const msg = { role: 'user', content: text, pending: true };
  const base = confirmed().length - (state.conv.offset || 0);
  state.pending = { kind: 'chat', msg, text, base, sent: false, t0: performance.now() };
  state.conv.messages.push(msg);
  state.notices = [];
  ui.input.value = '';
  autosize();
  touch();
  rerenderThread();
  renderNotices();
  scrollToBottom(true);
  flushPending();
  renderComposer();
}

function editAndResend(localIndex, text) {
  if (busy() || !text.trim()) return;
  const idx = serverIndex(localIndex);
  if (idx < 0) {
    addNotice({ code: 'edit', message: t('errEditOld') });
    return;
  }
  const snapshot = state.conv.messages.slice();
  const msg = { role: 'user', content: text, pending: true };
  state.conv.messages = state.conv.messages.slice(0, localIndex).concat([msg]);
  state.pending = { kind: 'edit', msg, text, base: idx, index: idx, localIndex, sent: false, snapshot, t0: performance.now() };
  state.notices = [];
  rerenderThread();
  renderNotices();
  flushPending();
  renderComposer();
}

function regenerate() {
  if (busy()) return;
  const msgs = state.conv.messages;
  const last = msgs[msgs.length - 1];
  if (!last || last.role !== 'assistant') return;
  const snapshot = msgs.slice();
  state.conv.messages = msgs.slice(0, -1);
  state.pending = { kind: 'regenerate', msg: null, text: '', base: confirmed().length - 1 - (state.conv.offset || 0),
    localIndex: msgs.length - 1, sent: false, snapshot, t0: performance.now() };
  state.notices = [];
  rerenderThread();
  renderNotices();
  flushPending();
  renderComposer();
}

/** Send the pending turn if we can; each pending turn is sent at most once per connection. */
function flushPending() {
  const p = state.pending;
  if (!p || p.sent || state.streaming) return;
  if (state.transport === 'ws') {
    if (!state.conn || !state.conn.ready || state.restoring) {
      renderComposer();
      return;
    }
    const extra = {};
    if (state.conv.model) extra.model = state.conv.model;
    extra.params = paramsForServer();
    let cmd;
    if (p.kind === 'chat') cmd = { type: 'chat', message: p.text, ...extra };
    else if (p.kind === 'edit') cmd = { type: 'edit', index: p.index, message: p.text, ...extra };
    else cmd = { type: 'regenerate', ...extra };
    p.sent = sendCommand(cmd);
  } else {
    if (state.sseBusy || !state.conn || !state.conn.ready) {
      renderComposer();
      return;
    }
    p.sent = true;
    sseTurn(p);
  }
  renderComposer();
  rerenderPendingBadge();
}

function stopReply() {
  if (state.pending && !state.pending.sent) {
    cancelQueued();
    return;
  }
  if (!state.streaming && !(state.pending && state.pending.sent)) return;
  // Over the WebSocket, commands run in order: a stop right after a chat stops its reply.
  if (state.transport === 'ws' && sendCommand({ type: 'stop' })) return;
  if (state.conv.session) SseConnection.stop(state.conv.session);
}

function cancelQueued() {
  const p = state.pending;
  if (!p || p.sent) return;
  state.pending = null;
  if (p.snapshot) state.conv.messages = p.snapshot;
  else state.conv.messages = state.conv.messages.filter((m) => m !== p.msg);
  if (p.text && !ui.input.value.trim()) ui.input.value = p.text;
  autosize();
  rerenderThread();
  renderComposer();
}

// ------------------------------------------------------------------ SSE mode

async function sseTurn(p) {
  const conn = state.conn;
  const conv = state.conv;
  state.sseBusy = true;
  try {
    // If the server forgot the session, seed a new one from our copy first.
    if (conv.session) await sseCheckSession();
    if (state.conv !== conv || state.pending !== p) return;
    if (p.kind !== 'chat') {
      // /sse has no edit or regenerate: seed a new session with the history before the
      // message, then ask it again. (Regenerate = resend the last question.)
      const base = p.snapshot || conv.messages;
      let upto = p.localIndex;
      if (p.kind === 'regenerate') {
        upto = base.map((m) => m.role).lastIndexOf('user');
        if (upto < 0) throw new Error('nothing to regenerate');
        p.text = base[upto].content;
        p.msg = { role: 'user', content: p.text, pending: true };
      }
      const seed = restorableHistory(base.slice(0, upto));
      conv.messages = base.slice(0, upto).concat([p.msg]);
      rerenderThread();
      const old = conv.session;
      const sid = seed.length ? await restoreSession(seed, { model: conv.model, params: paramsForServer() }) : null;
      if (state.conv !== conv || state.pending !== p) return;
      if (old) fetch(`api/sessions/${encodeURIComponent(old)}`, { method: 'DELETE', credentials: 'same-origin' }).catch(() => {});
      conv.session = sid;
      conv.lastSeq = 0;
      conv.offset = Math.max(0, upto - seed.length);
      p.kind = 'chat';
      p.base = seed.length;
    }
    const body = { message: p.text, params: paramsForServer() };
    if (conv.session) body.session = conv.session;
    if (conv.model) body.model = conv.model;
    let outcome = await conn.turn(body);
    while (outcome === 'dropped' && state.conv === conv && state.conn === conn && conv.session) {
      outcome = await sseResume(conn, conv);
    }
    if (outcome === 'network' && state.pending === p) {
      // Nothing came back: whether it reached the server is told by the session's history
      // when we are back online (onSseOnline -> onSession); until then it waits, unsent.
      p.sent = false;
      p.unsure = true;
    }
  } catch (err) {
    if (state.pending === p) {
      onError({ type: 'error', code: 'restore_failed', message: t('errRestoreFailed', { message: err.message || t('errNetwork') }) });
    }
  } finally {
    state.sseBusy = false;
    if (state.conv === conv) {
      renderComposer();
      rerenderPendingBadge();
    }
  }
}

async function sseResume(conn, conv) {
  for (let attempt = 0; state.conn === conn && state.conv === conv; attempt += 1) {
    const outcome = await conn.resume(conv.session, conv.lastSeq || 0);
    if (outcome !== 'network') {
      if (outcome === 'none' && state.streaming) {
        // Nothing left to resume: the session's history has the end of it.
        await sseCheckSession();
        return 'done';
      }
      return outcome;
    }
    await new Promise((r) => { window.setTimeout(r, Math.min(15000, 500 * 2 ** attempt)); });
  }
  return 'aborted';
}

/** SSE: fetch the session; if the server lost it, re-seed a new one from the local copy. */
async function sseCheckSession() {
  const conv = state.conv;
  if (!conv.session) return;
  let r;
  try {
    r = await fetch(`api/sessions/${encodeURIComponent(conv.session)}`, { cache: 'no-store', credentials: 'same-origin' });
  } catch {
    return;
  }
  if (state.conv !== conv) return;
  if (r.status === 401) {
    window.location.href = 'login';
    return;
  }
  if (r.ok) {
    const data = await r.json();
    if (state.conv === conv) onSession({ type: 'session', ...data });
    return;
  }
  if (r.status !== 404) return;
  for (const m of conv.messages) if (m.streaming) finishLocally(m, 'interrupted');
  const seed = restorableHistory();
  conv.session = null;
  conv.lastSeq = 0;
  conv.offset = confirmed().length;
  if (!seed.length) return;
  try {
    const sid = await restoreSession(seed, { model: conv.model, params: paramsForServer() });
    if (state.conv !== conv) return;
    conv.session = sid;
    conv.offset = Math.max(0, confirmed().length - seed.length);
    addNotice({ code: 'restored', message: t('errRestore'), info: true });
    save();
  } catch (err) {
    addNotice({ code: 'restore', message: t('errRestoreFailed', { message: err.message || t('errNetwork') }) });
  }
}

async function onSseOnline() {
  const conv = state.conv;
  if (!conv || state.sseBusy) return;
  state.sseBusy = true;
  try {
    if (conv.session) {
      const p = state.pending;
      await sseCheckSession();
      if (state.conv !== conv) return;
      // A turn whose request failed may still have reached the server: the history says.
      if (p && p.unsure && state.pending === p) {
        p.unsure = false;
        const idx = p.base + (conv.offset || 0);
        const m = conv.messages[idx];
        if (m && m !== p.msg && m.role === 'user' && m.content === p.text) {
          state.pending = null;
          conv.messages = conv.messages.filter((x) => x !== p.msg);
          rerenderThread();
        }
      }
      if (state.streaming && state.conv === conv) await sseResume(state.conn, conv);
    }
  } finally {
    state.sseBusy = false;
  }
  flushPending();
}

// ------------------------------------------------------------------ rendering: thread

const views = new WeakMap(); // message -> its view {root, body, ...}

function rerenderThread() {
  const conv = state.conv;
  const nodes = conv.messages.map((m, i) => {
    let v = views.get(m);
    if (!v || v.lang !== getLang()) {
      v = buildView(m);
      views.set(m, v);
    }
    v.root.dataset.index = String(i);
    return v.root;
  });
  syncChildren(ui.thread, nodes);
  if (state.streaming) {
    state.streaming.view = views.get(state.streaming.msg);
    attachRenderers(state.streaming);
  }
  updateLastFlags();
  ui.empty.hidden = conv.messages.length > 0;
  ui.thread.hidden = conv.messages.length === 0;
  renderNotices();
  renderHeader();
}

/** Make `parent`'s children exactly `nodes`, moving as few as possible (a long thread is
 * expensive to detach and attach again: every message would be styled and laid out anew). */
function syncChildren(parent, nodes) {
  let cur = parent.firstChild;
  for (const n of nodes) {
    if (cur === n) {
      cur = cur.nextSibling;
    } else {
      parent.insertBefore(n, cur);
    }
  }
  while (cur) {
    const next = cur.nextSibling;
    cur.remove();
    cur = next;
  }
}

function replaceView(m) {
  const old = views.get(m);
  const v = buildView(m);
  views.set(m, v);
  if (old && old.root.parentNode) {
    v.root.dataset.index = old.root.dataset.index;
    old.root.replaceWith(v.root);
  }
  updateLastFlags();
}

function updateLastFlags() {
  const msgs = state.conv.messages;
  msgs.forEach((m, i) => {
    const v = views.get(m);
    if (v) v.root.classList.toggle('is-last', i === msgs.length - 1);
  });
  ui.thread.classList.toggle('busy', busy());
}

function attachRenderers(s) {
  const v = s.view;
  if (!v) return;
  if (!s.renderer || s.renderer.el !== v.body) {
    s.renderer = new StreamRenderer(v.body);
    if (s.msg.content) s.renderer.update(s.msg.content);
  }
  if (s.msg.reasoning) {
    ensureThinking(s.msg, v);
    if (!s.thinkRenderer || s.thinkRenderer.el !== v.thinkBody) {
      s.thinkRenderer = new StreamRenderer(v.thinkBody);
      s.thinkRenderer.update(s.msg.reasoning);
    }
  }
}

function buildView(m) {
  const v = { lang: getLang() };
  const root = el('article', `msg ${m.role}`);
  v.root = root;
  if (m.role === 'user') {
    root.setAttribute('aria-label', t('you'));
    const main = el('div', 'msg-main');
    const bubble = el('div', 'bubble');
    const body = el('div', 'user-text', m.content);
    bubble.appendChild(body);
    main.appendChild(bubble);
    v.body = body;
    v.bubble = bubble;
    const foot = el('div', 'msg-foot');
    if (m.pending) {
      const badge = el('span', 'badge pending-badge');
      v.pendingBadge = badge;
      foot.appendChild(badge);
      updatePendingBadge(m, v);
    }
    const actions = el('div', 'msg-actions');
    actions.appendChild(iconButton('copy', t('copyMessage'), 'copy-msg'));
    actions.appendChild(iconButton('edit', t('editMessage'), 'edit'));
    foot.appendChild(actions);
    main.appendChild(foot);
    root.appendChild(main);
    if (m.pending) root.classList.add('pending');
    return v;
  }
  root.setAttribute('aria-label', t('assistant'));
  const avatar = el('div', 'avatar');
  avatar.setAttribute('aria-hidden', 'true');
  avatar.textContent = 'N';
  root.appendChild(avatar);
  const main = el('div', 'msg-main');
  root.appendChild(main);
  const head = el('div', 'msg-head');
  head.appendChild(el('span', 'who', t('assistant')));
  if (m.model) head.appendChild(el('span', 'model-tag', m.model));
  main.appendChild(head);
  v.main = main;
  v.head = head;
  const body = el('div', 'md msg-body');
  v.body = body;
  if (m.reasoning) ensureThinking(m, v, main);
  main.appendChild(body);
  if (m.streaming) {
    root.classList.add('streaming');
    root.setAttribute('aria-live', 'polite');
    root.setAttribute('aria-busy', 'true');
    if (!m.content && !m.reasoning) {
      body.classList.add('waiting');
      body.setAttribute('data-waiting', t('waiting'));
      if (m.queuedAhead) showQueued(body, m.queuedAhead);
    }
  }
  if (!m.streaming || !(state.streaming && state.streaming.msg === m)) {
    // finished, or streaming but not (yet) followed: draw what we have
    renderMarkdown(body, m.content);
    if (m.reasoning && v.thinkBody) renderMarkdown(v.thinkBody, m.reasoning);
  }
  v.errorBox = el('div', 'msg-error');
  v.errorBox.setAttribute('role', 'alert');
  v.errorBox.hidden = true;
  main.appendChild(v.errorBox);
  if (m.error) renderError(m, v);
  const foot = el('div', 'msg-foot');
  const meta = el('div', 'msg-meta');
  v.meta = meta;
  foot.appendChild(meta);
  const actions = el('div', 'msg-actions');
  actions.appendChild(iconButton('copy', t('copyMessage'), 'copy-msg'));
  actions.appendChild(iconButton('regen', t('regenerateReply'), 'regenerate', 'icon-btn small regen-btn'));
  foot.appendChild(actions);
  main.appendChild(foot);
  renderMeta(m, v);
  return v;
}

function ensureThinking(m, v, parent) {
  if (v.think) return;
  const d = el('details', 'thinking');
  const summary = el('summary', 'thinking-summary');
  summary.appendChild(icon('bulb'));
  v.thinkLabel = el('span', 'thinking-label');
  summary.appendChild(v.thinkLabel);
  summary.appendChild(icon('chevron'));
  d.appendChild(summary);
  v.thinkBody = el('div', 'md thinking-body');
  d.appendChild(v.thinkBody);
  v.think = d;
  if (m.streaming && !m.content) d.open = true;
  d.addEventListener('toggle', () => { v.thinkTouched = true; });
  const where = parent || v.main;
  where.insertBefore(d, v.body && v.body.parentNode === where ? v.body : null);
  updateThinking(m, v);
}

function updateThinking(m, v) {
  if (!v || !v.think) return;
  const s = state.streaming && state.streaming.msg === m ? state.streaming : null;
  const ms = s ? (s.thinkEnd !== null ? s.thinkEnd - s.thinkStart : null) : (m.stats && m.stats.think_ms);
  const thinkingNow = s && s.thinkEnd === null;
  v.think.classList.toggle('active', Boolean(thinkingNow));
  v.thinkLabel.textContent = thinkingNow ? t('thinking') : (Number.isFinite(ms) ? t('thoughtFor', { s: fmt(ms / 1000) }) : t('thoughts'));
  if (s && !thinkingNow && !v.thinkTouched) v.think.open = false;
}

function renderError(m, v) {
  v.errorBox.replaceChildren();
  if (!m.error) {
    v.errorBox.hidden = true;
    return;
  }
  v.errorBox.hidden = false;
  v.errorBox.appendChild(icon('alert'));
  const text = el('div', 'error-text');
  text.appendChild(el('strong', null, humanCode(m.error.code)));
  text.appendChild(el('span', null, m.error.message || t('errUnknown')));
  v.errorBox.appendChild(text);
}

function humanCode(code) {
  if (!code) return t('errorTitle');
  const key = `code.${code}`;
  const known = t(key);
  return known !== key ? known : code.replace(/_/g, ' ').replace(/^./, (c) => c.toUpperCase());
}

function renderMeta(m, v) {
  const meta = v.meta;
  meta.replaceChildren();
  if (m.streaming) return;
  const badges = { stopped: ['stopped', 'warn'], length: ['truncated', 'warn'], interrupted: ['interrupted', 'warn'], error: ['failed', 'bad'] };
  const b = badges[m.finish_reason];
  if (b) meta.appendChild(el('span', `badge ${b[1]}`, t(b[0])));
  const st = m.stats || {};
  const tokens = st.tokens ?? (m.usage && m.usage.completion_tokens);
  const parts = [];
  if (Number.isFinite(tokens)) parts.push(t('metaTokens', { n: tokens }));
  if (Number.isFinite(st.ttft_ms)) {
    parts.push(st.ttft_ms < 1000 ? t('metaTtftMs', { ms: Math.max(1, Math.round(st.ttft_ms)) }) : t('metaTtft', { s: fmt(st.ttft_ms / 1000, 2) }));
  }
  if (Number.isFinite(st.tps)) parts.push(t('metaTps', { n: fmt(st.tps) }));
  else if (Number.isFinite(st.total_ms)) parts.push(t('metaTime', { s: fmt(st.total_ms / 1000) }));
  for (const p of parts) meta.appendChild(el('span', 'meta-item', p));
  if (m.fallback && m.fallback.to) {
    const fb = el('span', 'badge', t('metaFallback', { from: m.fallback.from || '?', to: m.fallback.to }));
    if (m.fallback.reason) fb.title = m.fallback.reason;
    meta.appendChild(fb);
  }
}

function updatePendingBadge(m, v) {
  if (!v.pendingBadge) return;
  const p = state.pending;
  const queued = p && p.msg === m && !p.sent;
  v.pendingBadge.textContent = queued ? t('queued') : t('sending');
  v.pendingBadge.classList.toggle('queued', Boolean(queued));
}

function rerenderPendingBadge() {
  const p = state.pending;
  if (p && p.msg) {
    const v = views.get(p.msg);
    if (v) updatePendingBadge(p.msg, v);
  }
}

function addNotice(n) {
  state.notices.push(n);
  renderNotices();
  if (!n.info) announce(n.message);
  followBottom();
}

function renderNotices() {
  const frag = document.createDocumentFragment();
  for (const n of state.notices) {
    const box = el('div', `notice ${n.info ? 'info' : 'error'}`);
    box.setAttribute('role', n.info ? 'status' : 'alert');
    box.appendChild(icon('alert'));
    const text = el('div', 'error-text');
    if (!n.info) text.appendChild(el('strong', null, humanCode(n.code)));
    text.appendChild(el('span', null, n.message));
    box.appendChild(text);
    frag.appendChild(box);
  }
  ui.notices.replaceChildren(frag);
}

// ------------------------------------------------------------------ rendering: chrome

function renderHeader() {
  const conv = state.conv;
  if (!conv) return;
  ui.title.textContent = conv.title || t('untitled');
  document.title = conv.title ? `${conv.title} · NexLM` : 'NexLM';
  const p = conv.params || {};
  const chips = [];
  if (p.temperature !== undefined && p.temperature !== '') chips.push(`temp ${p.temperature}`);
  if (p.top_p !== undefined && p.top_p !== '') chips.push(`top_p ${p.top_p}`);
  if (p.max_tokens !== undefined && p.max_tokens !== '') chips.push(`max ${p.max_tokens}`);
  if (p.system) chips.push(t('paramSystem'));
  ui.chips.replaceChildren(...chips.map((c) => el('li', 'chip', c)));
  ui.chips.hidden = chips.length === 0;
}

function relTime(ts) {
  const d = new Date(ts);
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  return sameDay ? d.toLocaleTimeString(getLang() === 'zh' ? 'zh-CN' : 'en', { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleDateString(getLang() === 'zh' ? 'zh-CN' : 'en', { month: 'short', day: 'numeric' });
}

function renderSidebar() {
  if (EMBED) return;
  const list = store.listConversations();
  const current = state.conv && state.conv.id;
  const items = list.map((c) => {
    const li = el('li', 'conv-item');
    const open = el('button', 'conv-open');
    open.type = 'button';
    open.dataset.id = c.id;
    if (c.id === current) {
      li.classList.add('active');
      open.setAttribute('aria-current', 'page');
    }
    open.appendChild(el('span', 'conv-name', c.title || t('untitled')));
    open.appendChild(el('span', 'conv-time', relTime(c.updated || Date.now())));
    li.appendChild(open);
    const del = iconButton('trash', t('deleteConversation'), 'delete-conv', 'icon-btn small conv-del');
    del.dataset.id = c.id;
    li.appendChild(del);
    return li;
  });
  ui.convList.replaceChildren(...items);
  ui.convEmpty.hidden = items.length > 0;
}

function renderModels() {
  const sel = ui.model;
  const conv = state.conv;
  if (!state.models.length) return;
  const chosen = (conv && conv.model) || state.serverModel || state.defaultModel;
  const groups = new Map();
  for (const m of state.models) {
    const g = m.provider || '';
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(m);
  }
  const frag = document.createDocumentFragment();
  for (const [name, models] of groups) {
    const parent = groups.size > 1 && name ? document.createElement('optgroup') : frag;
    if (parent !== frag) parent.label = name;
    for (const m of models) {
      const o = document.createElement('option');
      o.value = m.id;
      const label = m.label || m.id;
      o.textContent = m.available === false ? t('modelUnavailable', { label, reason: m.reason || '' }) : label;
      o.disabled = m.available === false;
      if (m.label && m.label !== m.id) o.title = m.id;
      parent.appendChild(o);
    }
    if (parent !== frag) frag.appendChild(parent);
  }
  if (chosen && !state.models.some((m) => m.id === chosen)) {
    const o = document.createElement('option');
    o.value = chosen;
    o.textContent = chosen;
    frag.appendChild(o);
  }
  sel.replaceChildren(frag);
  if (chosen) sel.value = chosen;
}

async function loadModels() {
  try {
    const r = await fetch('api/models', { cache: 'no-store', credentials: 'same-origin' });
    if (r.status === 401) {
      window.location.href = 'login';
      return;
    }
    const data = await r.json();
    state.models = Array.isArray(data.models) ? data.models : [];
    state.defaultModel = data.default || null;
    renderModels();
  } catch {
    ui.model.replaceChildren(new Option(t('modelsFailed'), ''));
    window.setTimeout(loadModels, 5000);
  }
}

function renderComposer() {
  const streaming = Boolean(state.streaming);
  const p = state.pending;
  ui.stop.hidden = !streaming && !(p && p.sent);
  ui.send.hidden = !ui.stop.hidden;
  ui.send.disabled = Boolean(p);
  ui.thread.classList.toggle('busy', busy());
  if (p && !p.sent) {
    ui.note.replaceChildren(el('span', null, t('queuedNote') + ' '));
    const cancel = el('button', 'link-btn', t('cancelQueued'));
    cancel.type = 'button';
    cancel.dataset.action = 'cancel-queued';
    ui.note.appendChild(cancel);
  } else {
    ui.note.textContent = '';
  }
  rerenderPendingBadge();
}

// ------------------------------------------------------------------ scrolling

function nearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom(force) {
  if (force) state.stickToBottom = true;
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  ui.jump.hidden = true;
}

let followFrame = 0;
function followBottom() {
  if (followFrame) return;
  followFrame = requestAnimationFrame(() => {
    followFrame = 0;
    if (state.stickToBottom) scrollToBottom(false);
    else ui.jump.hidden = false;
  });
}

ui.scroller.addEventListener('scroll', () => {
  state.stickToBottom = nearBottom();
  if (state.stickToBottom) ui.jump.hidden = true;
}, { passive: true });
ui.jump.addEventListener('click', () => scrollToBottom(true));

// ------------------------------------------------------------------ editing in place

function startEdit(localIndex) {
  const m = state.conv.messages[localIndex];
  const v = views.get(m);
  if (!v || busy() || v.editing) return;
  v.editing = true;
  v.root.classList.add('editing');
  const box = el('div', 'edit-box');
  const ta = el('textarea', 'edit-input');
  ta.value = m.content;
  ta.rows = Math.min(12, Math.max(2, m.content.split('\n').length));
  ta.setAttribute('aria-label', t('editMessage'));
  const row = el('div', 'edit-actions');
  const cancel = el('button', 'btn', t('cancel'));
  cancel.type = 'button';
  const go = el('button', 'btn btn-primary', t('saveAndSend'));
  go.type = 'button';
  row.append(cancel, go);
  box.append(ta, row);
  v.bubble.replaceWith(box);
  const done = () => {
    v.editing = false;
    views.delete(m);
    rerenderThread();
  };
  cancel.addEventListener('click', done);
  go.addEventListener('click', () => {
    const text = ta.value.trim();
    if (!text) return;
    v.editing = false;
    editAndResend(localIndex, text);
  });
  ta.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      go.click();
    } else if (e.key === 'Escape') {
      e.preventDefault();
      e.stopPropagation();
      done();
    }
  });
  ta.focus();
  ta.setSelectionRange(ta.value.length, ta.value.length);
}

// ------------------------------------------------------------------ export

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  window.setTimeout(() => URL.revokeObjectURL(url), 5000);
}

function exportName(ext) {
  const conv = state.conv;
  const slug = (conv.title || 'chat').replace(/[^\p{L}\p{N}]+/gu, '-').replace(/^-|-$/g, '').slice(0, 40) || 'chat';
  const d = new Date(conv.updated || Date.now());
  const stamp = `${d.getFullYear()}${String(d.getMonth() + 1).padStart(2, '0')}${String(d.getDate()).padStart(2, '0')}`;
  return `nexlm-${slug}-${stamp}.${ext}`;
}

function exportConversation(kind) {
  const conv = state.conv;
  const msgs = conv.messages.filter((m) => !m.pending);
  if (!msgs.length) {
    addNotice({ code: 'export', message: t('exportEmpty'), info: true });
    return;
  }
  if (kind === 'json') {
    const data = {
      title: conv.title || '', session: conv.session, model: conv.model || state.serverModel,
      params: conv.params, exported_at: new Date().toISOString(),
      messages: msgs.map((m) => {
        const out = { role: m.role, content: m.content };
        for (const k of ['reasoning', 'finish_reason', 'model', 'usage', 'stats', 'error']) if (m[k] !== undefined && m[k] !== null && m[k] !== '') out[k] = m[k];
        return out;
      }),
    };
    download(exportName('json'), 'application/json', `${JSON.stringify(data, null, 2)}\n`);
    return;
  }
  const lines = [`# ${conv.title || t('untitled')}`, ''];
  const model = conv.model || state.serverModel;
  if (model) lines.push(`*${t('model')}: ${model}*`, '');
  if (conv.params && conv.params.system) lines.push(`> **${t('systemPrompt')}:** ${conv.params.system.replace(/\n/g, '\n> ')}`, '');
  for (const m of msgs) {
    if (m.role === 'user') {
      lines.push(`## ${t('you')}`, '', m.content, '');
    } else {
      lines.push(`## ${t('assistant')}${m.model ? ` (${m.model})` : ''}`, '');
      if (m.reasoning) lines.push('<details><summary>' + t('thoughts') + '</summary>', '', m.reasoning, '', '</details>', '');
      lines.push(m.content || '', '');
      if (m.finish_reason && m.finish_reason !== 'stop') lines.push(`*(${m.finish_reason})*`, '');
      if (m.error) lines.push(`> **${humanCode(m.error.code)}:** ${m.error.message}`, '');
    }
  }
  download(exportName('md'), 'text/markdown', lines.join('\n'));
}

// ------------------------------------------------------------------ settings dialog

function openSettings() {
  const f = ui.form.elements;
  const p = state.conv.params || {};
  const eff = { ...state.serverParams, ...p };
  f.system.value = p.system ?? '';
  f.system.placeholder = state.serverParams.system || t('systemPromptPlaceholder');
  f.temperature.value = p.temperature ?? '';
  f.top_p.value = p.top_p ?? '';
  f.max_tokens.value = p.max_tokens ?? '';
  f.temperature.placeholder = eff.temperature ?? t('serverDefault');
  f.top_p.placeholder = eff.top_p ?? t('serverDefault');
  f.max_tokens.placeholder = eff.max_tokens ?? t('serverDefault');
  f.transport.value = state.transport;
  f.lang.value = store.getPref('lang', 'auto');
  f.theme.value = store.getPref('theme', 'system');
  if (typeof ui.dialog.showModal === 'function') ui.dialog.showModal();
  else ui.dialog.setAttribute('open', '');
  f.system.focus();
}

function closeSettings() {
  if (typeof ui.dialog.close === 'function') ui.dialog.close();
  else ui.dialog.removeAttribute('open');
  ui.settingsBtn.focus();
}

function readNumber(input, integer) {
  const raw = input.value.trim();
  if (raw === '') return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n)) return undefined;
  return integer ? Math.round(n) : n;
}

function saveSettings() {
  const f = ui.form.elements;
  for (const input of [f.temperature, f.top_p, f.max_tokens]) {
    if (!input.checkValidity()) {
      input.reportValidity();
      return false;
    }
  }
  const params = {};
  const sys = f.system.value.trim();
  if (sys) params.system = f.system.value;
  const temp = readNumber(f.temperature);
  const topP = readNumber(f.top_p);
  const maxT = readNumber(f.max_tokens, true);
  if (temp !== undefined) params.temperature = temp;
  if (topP !== undefined) params.top_p = topP;
  if (maxT !== undefined) params.max_tokens = maxT;
  state.conv.params = params;
  save();
  renderHeader();
  applySettingsToServer(true);
  store.setPref('lang', f.lang.value);
  store.setPref('theme', f.theme.value);
  applyTheme();
  applyLang();
  switchTransport(f.transport.value === 'sse' ? 'sse' : 'ws');
  return true;
}

// ------------------------------------------------------------------ composer

function autosize() {
  const ta = ui.input;
  ta.style.height = 'auto';
  ta.style.height = `${Math.min(ta.scrollHeight, Math.round(window.innerHeight * 0.4))}px`;
}

ui.input.addEventListener('input', autosize);
ui.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    submit(ui.input.value);
  }
});
ui.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  submit(ui.input.value);
});
ui.stop.addEventListener('click', () => { stopReply(); ui.input.focus(); });

document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape' || e.defaultPrevented) return;
  if (ui.dialog.open) return;
  if (!ui.exportMenu.hidden) {
    toggleExportMenu(false);
    ui.exportBtn.focus();
    return;
  }
  if (ui.app.classList.contains('sidebar-visible')) {
    closeSidebarOnNarrow();
    return;
  }
  if (state.streaming || (state.pending && !state.pending.sent)) {
    e.preventDefault();
    stopReply();
  }
});

// ------------------------------------------------------------------ clicks

ui.thread.addEventListener('click', async (e) => {
  const b = e.target.closest('button[data-action]');
  if (!b || !ui.thread.contains(b)) return;
  const article = b.closest('article.msg');
  const index = article ? Number(article.dataset.index) : -1;
  const m = index >= 0 ? state.conv.messages[index] : null;
  switch (b.dataset.action) {
    case 'copy-code': {
      const code = b.closest('.code-block')?.querySelector('pre code');
      if (code && (await copyText(code.textContent))) flashCopied(b);
      break;
    }
    case 'copy-msg':
      if (m && (await copyText(m.content))) flashCopied(b);
      break;
    case 'edit':
      if (m) startEdit(index);
      break;
    case 'regenerate':
      regenerate();
      break;
    default:
      break;
  }
});

ui.note.addEventListener('click', (e) => {
  if (e.target.closest('[data-action="cancel-queued"]')) cancelQueued();
});

ui.empty.addEventListener('click', (e) => {
  const b = e.target.closest('.suggestion');
  if (!b) return;
  ui.input.value = b.textContent;
  autosize();
  ui.input.focus();
});

ui.convList.addEventListener('click', (e) => {
  const del = e.target.closest('.conv-del');
  if (del) {
    if (del.dataset.armed !== '1') {
      del.dataset.armed = '1';
      del.classList.add('armed');
      del.setAttribute('aria-label', t('confirmDelete'));
      del.title = t('confirmDelete');
      window.setTimeout(() => {
        if (!del.isConnected) return;
        del.dataset.armed = '';
        del.classList.remove('armed');
        del.setAttribute('aria-label', t('deleteConversation'));
        del.title = t('deleteConversation');
      }, 3000);
      return;
    }
    deleteConversation(del.dataset.id);
    return;
  }
  const open = e.target.closest('.conv-open');
  if (open && open.dataset.id !== state.conv.id) {
    const conv = store.loadConversation(open.dataset.id);
    if (conv) openConversation(conv);
  }
});

function deleteConversation(id) {
  const conv = id === state.conv.id ? state.conv : store.loadConversation(id);
  if (conv && conv.session) {
    fetch(`api/sessions/${encodeURIComponent(conv.session)}`, { method: 'DELETE', credentials: 'same-origin' }).catch(() => {});
  }
  store.deleteConversation(id);
  if (id === state.conv.id) {
    const next = store.listConversations()[0];
    openConversation((next && store.loadConversation(next.id)) || store.newConversation());
  } else {
    renderSidebar();
  }
}

ui.newChat.addEventListener('click', newChat);
ui.newChatEmbed.addEventListener('click', newChat);

ui.model.addEventListener('change', () => {
  const value = ui.model.value;
  if (!value) return;
  state.conv.model = value;
  if (state.conv.messages.length) save();
  if (state.transport === 'ws') sendCommand({ type: 'set', model: value });
});

ui.conn.addEventListener('click', () => state.conn && state.conn.retryNow());

ui.themeToggle.addEventListener('click', () => {
  const dark = document.documentElement.dataset.theme === 'dark';
  store.setPref('theme', dark ? 'light' : 'dark');
  applyTheme();
});

ui.langToggle.addEventListener('click', () => {
  store.setPref('lang', getLang() === 'zh' ? 'en' : 'zh');
  applyLang();
});

function toggleExportMenu(show) {
  const open = show ?? ui.exportMenu.hidden;
  ui.exportMenu.hidden = !open;
  ui.exportBtn.setAttribute('aria-expanded', String(open));
  if (open) ui.exportMenu.querySelector('button').focus();
}
ui.exportBtn.addEventListener('click', () => toggleExportMenu());
ui.exportMenu.addEventListener('click', (e) => {
  const b = e.target.closest('[data-export]');
  if (!b) return;
  toggleExportMenu(false);
  exportConversation(b.dataset.export);
});
ui.exportMenu.addEventListener('keydown', (e) => {
  const items = [...ui.exportMenu.querySelectorAll('button')];
  const i = items.indexOf(document.activeElement);
  if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
    e.preventDefault();
    items[(i + (e.key === 'ArrowDown' ? 1 : items.length - 1)) % items.length].focus();
  } else if (e.key === 'Tab') {
    toggleExportMenu(false);
  }
});
document.addEventListener('click', (e) => {
  if (!ui.exportMenu.hidden && !e.target.closest('.menu-wrap')) toggleExportMenu(false);
});

ui.settingsBtn.addEventListener('click', openSettings);
$('settings-close').addEventListener('click', closeSettings);
$('settings-cancel').addEventListener('click', closeSettings);
$('settings-reset').addEventListener('click', () => {
  const f = ui.form.elements;
  f.system.value = '';
  f.temperature.value = '';
  f.top_p.value = '';
  f.max_tokens.value = '';
});
ui.form.addEventListener('submit', (e) => {
  e.preventDefault();
  if (saveSettings()) closeSettings();
});

// sidebar on narrow screens
function openSidebar() {
  ui.app.classList.add('sidebar-visible');
  ui.scrim.hidden = false;
  ui.openSidebar.setAttribute('aria-expanded', 'true');
  const first = ui.sidebar.querySelector('[aria-current="page"]') || ui.newChat;
  first.focus();
}
function closeSidebarOnNarrow() {
  if (!ui.app.classList.contains('sidebar-visible')) return;
  ui.app.classList.remove('sidebar-visible');
  ui.scrim.hidden = true;
  ui.openSidebar.setAttribute('aria-expanded', 'false');
}
ui.openSidebar.addEventListener('click', () => {
  if (window.matchMedia('(max-width: 860px)').matches) {
    if (ui.app.classList.contains('sidebar-visible')) closeSidebarOnNarrow();
    else openSidebar();
  } else {
    const hidden = ui.app.classList.toggle('sidebar-collapsed');
    store.setPref('sidebar', hidden ? 'hidden' : 'shown');
    ui.openSidebar.setAttribute('aria-expanded', String(!hidden));
  }
});
ui.closeSidebar.addEventListener('click', () => { closeSidebarOnNarrow(); ui.openSidebar.focus(); });
ui.scrim.addEventListener('click', closeSidebarOnNarrow);

// ------------------------------------------------------------------ start

function pickInitialConversation() {
  const wanted = query.get('conversation') || store.getPref(EMBED ? 'current-embed' : 'current', null);
  const conv = (wanted && store.loadConversation(wanted))
    || (!EMBED && store.listConversations()[0] && store.loadConversation(store.listConversations()[0].id));
  return conv || store.newConversation();
}

function boot() {
  applyTheme();
  applyLang();
  applyI18n(document);
  if (store.getPref('sidebar', 'shown') === 'hidden' && !EMBED) ui.app.classList.add('sidebar-collapsed');
  ui.openSidebar.setAttribute('aria-expanded', String(!ui.app.classList.contains('sidebar-collapsed')));
  loadModels();
  openConversation(pickInitialConversation());
  autosize();
  if (!window.matchMedia('(pointer: coarse)').matches) ui.input.focus();
  scrollToBottom(true);
}

// for tests and debugging
window.nexlm = { state, t };

boot();
