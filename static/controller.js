// The page's one controller: server events into the conversation model, the user's turns
// out through the transport, then the views are told what to draw. It never asks which
// transport it has (transport.js gives both the same interface).

import { t } from './i18n.js';
import { Chat } from './conversation.js';
import { exportJson, exportMarkdown } from './export.js';
import { paramsForServer } from './history.js';
import { createTransport } from './transport.js';
import { announce, download, humanCode } from './dom.js';
import { HTTP, JSON_HEADERS, sessionUrl } from './net.js';
import * as store from './store.js';

/** `makeViews(app)` returns {thread, chrome, sidebar, composer} drawn from `app` (see views/). */
export function createController(makeViews) {
  const chat = new Chat();
  const app = {
    chat,
    transport: null,
    kind: store.getPref('transport', 'ws') === 'sse' ? 'sse' : 'ws',
    connState: 'connecting',
    connDetail: {},
    models: [],
    defaultModel: null,
    serverList: null, // this user's conversations on the server (GET /api/sessions), null: none for us
  };
  const { thread, chrome, sidebar, composer } = makeViews(app);
  const now = () => performance.now();
  const toLogin = () => { window.location.href = 'login'; };

  let saveTimer = 0;
  /** Save the open conversation now, or (soon=true, while streaming) at most every 800 ms. */
  function save(soon = false) {
    const conv = chat.conv;
    if (!conv) return;
    if (soon) {
      if (!saveTimer) {
        saveTimer = window.setTimeout(() => {
          saveTimer = 0;
          if (chat.conv === conv) store.saveConversation(conv);
        }, 800);
      }
      return;
    }
    clearTimeout(saveTimer);
    saveTimer = 0;
    store.saveConversation(conv);
    sidebar.render();
    refreshList();
  }

  // -- the server's list of this user's conversations (history across devices) ---------------

  let listing = null;
  let listAgain = false;
  let listRefused = false;
  /** Ask for the server's list (one request at a time; a change meanwhile asks once more). Without
   * an identity the server keeps none for us (403): then the page stops asking. */
  function refreshList() {
    if (listRefused || document.body.classList.contains('embed')) return Promise.resolve();
    if (listing) {
      listAgain = true;
      return listing;
    }
    listing = (async () => {
      try {
        const r = await fetch('api/sessions?limit=100', HTTP);
        if (r.status === 403) listRefused = true;
        const data = r.ok ? await r.json() : null;
        app.serverList = data && Array.isArray(data.sessions) ? data.sessions : null;
      } catch { /* offline: keep the list we had */ }
      const conv = chat.conv;
      const mine = conv && app.serverList && app.serverList.find((e) => e.session === conv.session);
      if (mine && mine.title && mine.title !== conv.title) { // renamed elsewhere
        conv.title = mine.title;
        if (conv.messages.length) store.saveConversation(conv);
        chrome.header();
      }
      sidebar.render();
    })().finally(() => {
      listing = null;
      if (listAgain) {
        listAgain = false;
        refreshList();
      }
    });
    return listing;
  }

  function drawAll() {
    thread.rerender();
    chrome.header();
    chrome.models();
    chrome.conn();
    composer.render();
    sidebar.render();
  }

  function drawTurn() {
    thread.rerender();
    chrome.header();
    composer.render();
  }

  function open(conv, { connect = true } = {}) {
    if (app.transport) app.transport.close();
    if (chat.conv && chat.conv !== conv) save();
    chat.open(conv);
    store.setPref('current', conv.id);
    sidebar.closeOnNarrow();
    drawAll();
    if (connect) connectTransport();
  }

  function newChat() {
    if (!(chat.conv && !chat.conv.messages.length && !chat.pending)) {
      const conv = store.newConversation();
      if (chat.conv) conv.model = chat.conv.model; // keep the model choice; parameters start from the defaults
      open(conv);
    }
    composer.focus();
  }

  // -- the transport -------------------------------------------------------------------

  function connectTransport() {
    app.transport = createTransport(app.kind, {
      onFrame,
      onStatus: setConn,
      onAuth: toLogin,
      onConnect: () => {
        chat.connecting();
        return chat.position();
      },
      position: () => chat.position(),
      onTurnLost: () => {
        chat.turnLost();
        composer.render();
      },
    });
    app.transport.open();
  }

  function switchTransport(kind) {
    if (kind === app.kind) return;
    app.kind = kind;
    chat.leaving();
    store.setPref('transport', kind);
    if (app.transport) app.transport.close();
    connectTransport();
  }

  let retryTick = 0;
  function setConn(s, detail = {}) {
    const before = app.connState;
    app.connState = s;
    // Tell screen readers about real changes only (the countdown is not announced).
    if (s === 'online' && before !== 'online' && before !== 'connecting') announce(t('connOnline'));
    if (s === 'offline' && before === 'online') announce(t('connOffline'));
    app.connDetail = { ...detail };
    clearInterval(retryTick);
    if (s === 'offline' && detail.retryIn) {
      app.connDetail.until = Date.now() + detail.retryIn;
      retryTick = window.setInterval(chrome.conn, 1000);
    }
    chrome.conn();
  }

  const retryNow = () => app.transport && app.transport.retryNow();

  // -- server events -------------------------------------------------------------------

  function onFrame(f, from) {
    if (from !== app.transport) return; // a connection we have left
    if (f.type === 'session') onSession(f);
    else if (f.type === 'error') { if (f.seq === undefined || chat.fresh(f)) onError(f); }
    else if (REPLY_EVENTS[f.type] && chat.fresh(f)) REPLY_EVENTS[f.type](f);
  }

  function onSession(f) {
    const seed = chat.sessionFrame(f, app.transport.requested);
    if (seed && app.transport.restore(seed, { model: chat.conv.model, params: paramsForServer(chat.conv.params) })) {
      chat.restoreSent();
      return; // the server answers with a new `session` frame: continue there
    }
    const { restored } = chat.applySession(f);
    if (restored) addNotice({ code: 'restored', message: t('errRestore'), info: true });
    drawTurn();
    chrome.models();
    const set = chat.settingsCommand(false);
    if (set) app.transport.set(set);
    flush();
    save();
  }

  const REPLY_EVENTS = {
    start(f) {
      const s = chat.start(f, now());
      if (!s) return;
      drawTurn();
      save(true);
      refreshList(); // the server lists it now, as running
      thread.toBottom(true);
    },
    status(f) {
      const s = chat.status(f);
      if (s) thread.queued(s);
    },
    delta(f) {
      const r = chat.delta(f, now());
      if (!r) return;
      thread.delta(r.s, r.thinkEnded);
      save(true);
    },
    reasoning(f) {
      const s = chat.reasoning(f, now());
      if (!s) return;
      thread.reasoning(s);
      save(true);
    },
    done(f) {
      const s = chat.done(f, now());
      if (!s) return;
      save();
      thread.finish(s.msg);
      composer.render();
      announce(s.msg.finish_reason === 'stopped' ? t('replyStopped') : t('replyDone'));
      flush();
      // A reply this page did not start (another tab, or picked up after a reload) may come
      // after turns we have not seen: ask the server for the whole history once it is over.
      if (s.resumed) syncFromServer();
    },
  };

  async function syncFromServer() {
    const conv = chat.conv;
    if (!conv.session) return;
    try {
      const r = await fetch(sessionUrl(conv.session), HTTP);
      if (!r.ok) return;
      const data = await r.json();
      if (chat.conv === conv && !chat.busy && data.session === conv.session && !data.running) {
        onSession({ type: 'session', ...data });
      }
    } catch { /* offline: the next connection brings the history anyway */ }
  }

  function onError(f) {
    const what = chat.error(f);
    if (what.kind === 'reply') {
      thread.errorInReply(what.msg);
      save(true);
    } else if (what.kind === 'expired') {
      addNotice({ code: f.code, message: t('errSessionExpired'), info: true });
    } else if (what.kind === 'restore') {
      // The server refused our copy: carry on with a fresh session, keeping the local view.
      addNotice({ code: f.code, message: t('errRestoreFailed', { message: f.message || f.code }) });
      flush();
    } else {
      // A refused command: the turn we sent was taken back; its text goes back in the box.
      if (what.revertedText) composer.restoreText(what.revertedText);
      drawTurn();
      addNotice({ code: f.code, message: f.message || t('errUnknown') });
    }
  }

  function addNotice(n) {
    chat.addNotice(n);
    thread.renderNotices();
    if (!n.info) announce(n.message);
    thread.follow();
  }

  // -- the user's turns ----------------------------------------------------------------

  /** Send the pending turn if we can; each pending turn is sent at most once per connection. */
  function flush() {
    const cmd = chat.command();
    if (cmd && app.transport && app.transport.ready && !chat.restoring) chat.sending(app.transport.turn(cmd));
    composer.render();
  }

  function started() {
    drawTurn();
    flush();
  }

  function submit(text) {
    text = text.replace(/\s+$/, '');
    if (!text.trim()) return false;
    if (!chat.submit(text, now())) {
      composer.note(t('busyNote'));
      return false;
    }
    started();
    thread.toBottom(true);
    return true;
  }

  function edit(localIndex, text) {
    if (!text.trim()) return;
    const r = chat.edit(localIndex, text, now());
    if (r === 'old') addNotice({ code: 'edit', message: t('errEditOld') });
    if (r === 'ok') started();
  }

  function regenerate() {
    if (chat.regenerate(now())) started();
  }

  function stop() {
    const p = chat.pending;
    if (p && !p.sent) {
      cancelQueued();
      return;
    }
    if (chat.streaming || (p && p.sent)) app.transport.stop(chat.conv.session);
  }

  function cancelQueued() {
    const p = chat.pending;
    if (!p || p.sent) return;
    const text = chat.takeBack();
    if (text) composer.restoreText(text);
    drawTurn();
  }

  // -- conversations, model, settings, export --------------------------------------------

  /** Delete a conversation: its local copy (`id`, may be "") and its server session. */
  function remove(id, session = '') {
    if (!id && session && session === chat.conv.session) id = chat.conv.id;
    const conv = id ? (id === chat.conv.id ? chat.conv : store.loadConversation(id)) : null;
    session = (conv && conv.session) || session;
    if (app.serverList) app.serverList = app.serverList.filter((e) => e.session !== session);
    const gone = session ? fetch(sessionUrl(session), { method: 'DELETE', credentials: 'same-origin' }).catch(() => {})
      : Promise.resolve();
    if (id) store.deleteConversation(id);
    gone.then(refreshList);
    if (!id || id !== chat.conv.id) {
      sidebar.render();
      return;
    }
    const next = store.listConversations()[0];
    open((next && store.loadConversation(next.id)) || store.newConversation());
  }

  /** Name a conversation: on the server when it is there (every browser lists the new name),
   * and in the local copy. A refused title (too long, control characters) is said in a notice. */
  async function rename(id, session, title) {
    title = title.trim();
    const conv = id ? (id === chat.conv.id ? chat.conv : store.loadConversation(id)) : store.findBySession(session);
    session = (conv && conv.session) || session;
    if (session && app.serverList) {
      try {
        const r = await fetch(sessionUrl(session), { method: 'PATCH', credentials: 'same-origin',
          headers: JSON_HEADERS, body: JSON.stringify({ title }) });
        const data = await r.json();
        if (!r.ok) {
          addNotice({ code: data.code || 'rename', message: data.message || t('errUnknown') });
          sidebar.render();
          return;
        }
        title = data.title;
        app.serverList = app.serverList.map((e) => (e.session === session ? data : e));
      } catch {
        addNotice({ code: 'rename', message: t('errUnknown') });
        sidebar.render();
        return;
      }
    }
    if (conv) {
      conv.title = title;
      if (conv.messages.length) store.saveConversation(conv);
      if (conv === chat.conv) chrome.header();
    }
    sidebar.render();
  }

  /** Open a conversation from the list: its local copy, or (made in another browser) a new
   * local copy of the server session, which the `session` frame then fills in. */
  function openById(id, session = '') {
    if ((id && id === chat.conv.id) || (session && session === chat.conv.session)) return;
    let conv = id ? store.loadConversation(id) : null;
    if (!conv && session) {
      conv = store.findBySession(session) || store.newConversation();
      const entry = (app.serverList || []).find((e) => e.session === session);
      conv.session = session;
      if (entry) {
        conv.title = entry.title || conv.title;
        if (Number.isFinite(entry.updated)) conv.updated = entry.updated * 1000;
      }
    }
    if (conv) open(conv);
  }

  function setModel(value) {
    if (!value) return;
    chat.choose({ model: value });
    if (chat.conv.messages.length) save();
    app.transport.set({ type: 'set', model: value });
  }

  /** New parameters for this conversation (from the settings dialog) and the transport chosen. */
  function setParams(params, kind) {
    chat.choose({ params });
    save();
    chrome.header();
    app.transport.set(chat.settingsCommand(true));
    switchTransport(kind);
  }

  async function loadModels() {
    try {
      const r = await fetch('api/models', HTTP);
      if (r.status === 401) {
        toLogin();
        return;
      }
      const data = await r.json();
      app.models = Array.isArray(data.models) ? data.models : [];
      app.defaultModel = data.default || null;
      chrome.models();
    } catch {
      chrome.modelsFailed();
      window.setTimeout(loadModels, 5000);
    }
  }

  function exportAs(kind) {
    const conv = chat.conv;
    if (!conv.messages.some((m) => !m.pending)) {
      addNotice({ code: 'export', message: t('exportEmpty'), info: true });
      return;
    }
    const slug = (conv.title || 'chat').replace(/[^\p{L}\p{N}]+/gu, '-').replace(/^-|-$/g, '').slice(0, 40) || 'chat';
    const d = new Date(conv.updated || Date.now());
    const stamp = `${d.getFullYear()}${String(d.getMonth() + 1).padStart(2, '0')}${String(d.getDate()).padStart(2, '0')}`;
    const name = `nexlm-${slug}-${stamp}.${kind === 'json' ? 'json' : 'md'}`;
    if (kind === 'json') {
      const data = exportJson(conv, { model: chat.serverModel, exportedAt: new Date().toISOString() });
      download(name, 'application/json', `${JSON.stringify(data, null, 2)}\n`);
    } else {
      download(name, 'text/markdown', exportMarkdown(conv, { model: chat.serverModel, label: t, codeName: humanCode }));
    }
  }

  // leaving the page (reload, close, navigate): keep what arrived so far
  window.addEventListener('pagehide', () => { if (chat.conv) store.saveConversation(chat.conv); });
  window.addEventListener('online', retryNow);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState !== 'visible') return;
    retryNow();
    refreshList(); // renamed or deleted in another browser meanwhile
  });

  return { app, chat, open, newChat, openById, remove, rename, submit, edit, regenerate, stop, cancelQueued,
    setModel, setParams, loadModels, exportAs, retryNow, drawAll, refreshList };
}
