// The thread: one <article> per message, drawn from the conversation model (read only),
// the streaming reply rendered block by block, the notices under it, and scrolling.

import { t, getLang } from '../i18n.js';
import { StreamRenderer, renderMarkdown } from '../markdown.js';
import { revision } from '../history.js';
import { $, el, fmt, humanCode, icon, iconButton } from '../dom.js';

const BADGES = { stopped: ['stopped', 'warn'], length: ['truncated', 'warn'], interrupted: ['interrupted', 'warn'], error: ['failed', 'bad'] };
const LONG_REPLY = 20000; // characters: past this a finished reply keeps the blocks drawn while it streamed

export function createThread(chat) {
  const ui = { scroller: $('scroller'), empty: $('empty'), thread: $('thread'), notices: $('notices'), jump: $('jump') };
  const views = new WeakMap(); // message -> {root, body, ..., renderer?, thinkRenderer?}
  let stickToBottom = true;
  let followFrame = 0;

  const following = (m) => Boolean(chat.streaming && chat.streaming.msg === m);

  function rerender() {
    const msgs = chat.conv.messages;
    const nodes = msgs.map((m, i) => {
      let v = views.get(m);
      if (!v || v.lang !== getLang() || v.rev !== revision(m)) {
        v = build(m);
        views.set(m, v);
      }
      v.root.dataset.index = String(i);
      return v.root;
    });
    syncChildren(ui.thread, nodes);
    if (chat.streaming) attach(chat.streaming);
    updateLastFlags();
    ui.empty.hidden = msgs.length > 0;
    ui.thread.hidden = msgs.length === 0;
    renderNotices();
  }

  /** Make `parent`'s children exactly `nodes`, moving as few as possible (a long thread is
   * expensive to detach and attach again: every message would be styled and laid out anew). */
  function syncChildren(parent, nodes) {
    let cur = parent.firstChild;
    for (const n of nodes) {
      if (cur === n) cur = cur.nextSibling;
      else parent.insertBefore(n, cur);
    }
    while (cur) {
      const next = cur.nextSibling;
      cur.remove();
      cur = next;
    }
  }

  function replace(m) {
    const old = views.get(m);
    const v = build(m);
    views.set(m, v);
    if (old && old.root.parentNode) {
      v.root.dataset.index = old.root.dataset.index;
      old.root.replaceWith(v.root);
    }
    updateLastFlags();
  }

  function updateLastFlags() {
    const msgs = chat.conv.messages;
    msgs.forEach((m, i) => {
      const v = views.get(m);
      if (v) v.root.classList.toggle('is-last', i === msgs.length - 1);
    });
    ui.thread.classList.toggle('busy', chat.busy);
  }

  /** Give the streaming reply's view its renderers (drawn anew: fill them with what we have). */
  function attach(s) {
    const v = views.get(s.msg);
    if (!v) return;
    if (!v.renderer) {
      v.renderer = new StreamRenderer(v.body);
      if (s.msg.content) v.renderer.update(s.msg.content);
    }
    if (s.msg.reasoning) {
      ensureThinking(s.msg, v);
      if (!v.thinkRenderer) {
        v.thinkRenderer = new StreamRenderer(v.thinkBody);
        v.thinkRenderer.update(s.msg.reasoning);
      }
    }
  }

  function build(m) {
    const v = { lang: getLang(), rev: revision(m) };
    const root = el('article', `msg ${m.role}`);
    v.root = root;
    const main = el('div', 'msg-main');
    v.main = main;
    const foot = el('div', 'msg-foot');
    const actions = el('div', 'msg-actions');
    actions.appendChild(iconButton('copy', t('copyMessage'), 'copy-msg'));
    if (m.role === 'user') {
      root.setAttribute('aria-label', t('you'));
      v.bubble = el('div', 'bubble');
      v.body = el('div', 'user-text', m.content);
      v.bubble.appendChild(v.body);
      main.appendChild(v.bubble);
      if (m.pending) {
        v.pendingBadge = el('span', 'badge pending-badge');
        foot.appendChild(v.pendingBadge);
        updatePendingBadge(m, v);
        root.classList.add('pending');
      }
      actions.appendChild(iconButton('edit', t('editMessage'), 'edit'));
      foot.appendChild(actions);
      main.appendChild(foot);
      root.appendChild(main);
      return v;
    }
    root.setAttribute('aria-label', t('assistant'));
    const avatar = el('div', 'avatar', 'N');
    avatar.setAttribute('aria-hidden', 'true');
    root.append(avatar, main);
    v.head = el('div', 'msg-head');
    v.head.appendChild(el('span', 'who', t('assistant')));
    if (m.model) v.head.appendChild(el('span', 'model-tag', m.model));
    main.appendChild(v.head);
    v.body = el('div', 'md msg-body');
    if (m.reasoning) ensureThinking(m, v);
    main.appendChild(v.body);
    if (m.streaming) {
      root.classList.add('streaming');
      root.setAttribute('aria-live', 'polite');
      root.setAttribute('aria-busy', 'true');
      if (!m.content && !m.reasoning) {
        v.body.classList.add('waiting');
        v.body.setAttribute('data-waiting', t('waiting'));
        if (m.queuedAhead) showQueued(v.body, m.queuedAhead);
      }
    }
    if (!following(m)) {
      // finished, or streaming but not (yet) followed: draw what we have
      renderMarkdown(v.body, m.content);
      if (m.reasoning && v.thinkBody) renderMarkdown(v.thinkBody, m.reasoning);
    }
    v.errorBox = el('div', 'msg-error');
    v.errorBox.setAttribute('role', 'alert');
    v.errorBox.hidden = true;
    main.appendChild(v.errorBox);
    if (m.error) renderError(m, v);
    v.meta = el('div', 'msg-meta');
    foot.appendChild(v.meta);
    actions.appendChild(iconButton('regen', t('regenerateReply'), 'regenerate', 'icon-btn small regen-btn'));
    foot.appendChild(actions);
    main.appendChild(foot);
    renderMeta(m, v);
    return v;
  }

  function ensureThinking(m, v) {
    if (v.think) return;
    const d = el('details', 'thinking');
    const summary = el('summary', 'thinking-summary');
    v.thinkLabel = el('span', 'thinking-label');
    summary.append(icon('bulb'), v.thinkLabel, icon('chevron'));
    v.thinkBody = el('div', 'md thinking-body');
    d.append(summary, v.thinkBody);
    v.think = d;
    if (m.streaming && !m.content) d.open = true;
    d.addEventListener('toggle', () => { v.thinkTouched = true; });
    v.main.insertBefore(d, v.body && v.body.parentNode === v.main ? v.body : null);
    updateThinking(m, v);
  }

  function updateThinking(m, v) {
    if (!v || !v.think) return;
    const s = following(m) ? chat.streaming : null;
    const ms = s ? (s.thinkEnd !== null ? s.thinkEnd - s.thinkStart : null) : (m.stats && m.stats.think_ms);
    const thinkingNow = s && s.thinkEnd === null;
    v.think.classList.toggle('active', Boolean(thinkingNow));
    v.thinkLabel.textContent = thinkingNow ? t('thinking') : (Number.isFinite(ms) ? t('thoughtFor', { s: fmt(ms / 1000) }) : t('thoughts'));
    if (s && !thinkingNow && !v.thinkTouched) v.think.open = false;
  }

  function showQueued(body, ahead) {
    body.classList.add('waiting', 'queued');
    body.setAttribute('data-waiting', t('waitingAhead', { n: ahead }));
  }

  function renderError(m, v) {
    v.errorBox.replaceChildren();
    v.errorBox.hidden = !m.error;
    if (!m.error) return;
    const text = el('div', 'error-text');
    text.append(el('strong', null, humanCode(m.error.code)), el('span', null, m.error.message || t('errUnknown')));
    v.errorBox.append(icon('alert'), text);
  }

  function renderMeta(m, v) {
    const meta = v.meta;
    meta.replaceChildren();
    if (m.streaming) return;
    const b = BADGES[m.finish_reason];
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
    const p = chat.pending;
    const queued = p && p.msg === m && !p.sent;
    v.pendingBadge.textContent = queued ? t('queued') : t('sending');
    v.pendingBadge.classList.toggle('queued', Boolean(queued));
  }

  function pendingBadge() {
    const p = chat.pending;
    const v = p && p.msg ? views.get(p.msg) : null;
    if (v) updatePendingBadge(p.msg, v);
  }

  // -- the streaming reply -------------------------------------------------------------

  function queued(s) {
    const v = views.get(s.msg);
    if (v && !s.msg.content && !s.msg.reasoning) showQueued(v.body, s.msg.queuedAhead);
  }

  function delta(s, thinkEnded) {
    const v = views.get(s.msg);
    if (v) {
      if (thinkEnded) updateThinking(s.msg, v);
      v.body.classList.remove('waiting', 'queued');
      if (v.renderer) v.renderer.update(s.msg.content);
    }
    follow();
  }

  function reasoning(s) {
    const v = views.get(s.msg);
    if (v) {
      if (!v.thinkRenderer) attach(s);
      else v.thinkRenderer.update(s.msg.reasoning);
      v.body.classList.remove('waiting', 'queued');
    }
    follow();
  }

  function errorInReply(msg) {
    const v = views.get(msg);
    if (v) renderError(msg, v);
  }

  /** The reply is over: draw it finished. */
  function finish(msg) {
    const v = views.get(msg);
    if (v && v.renderer && msg.content.length > LONG_REPLY) {
      // Drawing a long reply again would stall the page: only its last block and the footer are finished.
      v.renderer.finish(msg.content);
      if (v.thinkRenderer) v.thinkRenderer.finish(msg.reasoning);
      v.root.classList.remove('streaming');
      v.root.setAttribute('aria-busy', 'false');
      v.body.classList.remove('waiting', 'queued');
      updateThinking(msg, v);
      const tag = v.head.querySelector('.model-tag');
      if (tag && msg.model) tag.textContent = msg.model;
      if (msg.error) renderError(msg, v);
      renderMeta(msg, v);
    } else {
      replace(msg);
    }
    follow();
  }

  // -- editing in place ----------------------------------------------------------------

  /** Swap user message `index`'s bubble for a text box; `send(index, text)` on "Save & send". */
  function startEdit(index, send) {
    const m = chat.conv.messages[index];
    const v = views.get(m);
    if (!v || chat.busy || v.editing) return;
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
      views.delete(m);
      rerender();
    };
    cancel.addEventListener('click', done);
    go.addEventListener('click', () => {
      const text = ta.value.trim();
      if (!text) return;
      v.editing = false;
      send(index, text);
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

  // -- notices -------------------------------------------------------------------------

  function renderNotices() {
    const frag = document.createDocumentFragment();
    for (const n of chat.notices) {
      const box = el('div', `notice ${n.info ? 'info' : 'error'}`);
      box.setAttribute('role', n.info ? 'status' : 'alert');
      const text = el('div', 'error-text');
      if (!n.info) text.appendChild(el('strong', null, humanCode(n.code)));
      text.appendChild(el('span', null, n.message));
      box.append(icon('alert'), text);
      frag.appendChild(box);
    }
    ui.notices.replaceChildren(frag);
  }

  // -- scrolling -----------------------------------------------------------------------

  function toBottom(force) {
    if (force) stickToBottom = true;
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    ui.jump.hidden = true;
  }

  function follow() {
    if (followFrame) return;
    followFrame = requestAnimationFrame(() => {
      followFrame = 0;
      if (stickToBottom) toBottom(false);
      else ui.jump.hidden = false;
    });
  }

  ui.scroller.addEventListener('scroll', () => {
    const s = ui.scroller;
    stickToBottom = s.scrollHeight - s.scrollTop - s.clientHeight < 80;
    if (stickToBottom) ui.jump.hidden = true;
  }, { passive: true });
  ui.jump.addEventListener('click', () => toBottom(true));

  return { rerender, pendingBadge, queued, delta, reasoning, errorInReply, finish,
    renderNotices, toBottom, follow, startEdit };
}
