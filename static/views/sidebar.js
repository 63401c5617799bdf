// The conversation list and the sidebar's open/closed state. The list is the server's for this
// user when it keeps one (`app.serverList`, the same in every browser) merged with what only this
// browser knows (history.js `sidebarList`); the browser's own list otherwise.

import { t, getLang } from '../i18n.js';
import { $, el, iconButton } from '../dom.js';
import { sidebarList } from '../history.js';
import * as store from '../store.js';

const NARROW = '(max-width: 860px)';

function relTime(ts) {
  const d = new Date(ts);
  const locale = getLang() === 'zh' ? 'zh-CN' : 'en';
  return d.toDateString() === new Date().toDateString()
    ? d.toLocaleTimeString(locale, { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleDateString(locale, { month: 'short', day: 'numeric' });
}

function setArmed(del, armed) {
  del.dataset.armed = armed ? '1' : '';
  del.classList.toggle('armed', armed);
  const label = t(armed ? 'confirmDelete' : 'deleteConversation');
  del.setAttribute('aria-label', label);
  del.title = label;
}

export function createSidebar(app, { embed }) {
  const ui = { app: $('app'), sidebar: $('sidebar'), scrim: $('scrim'), list: $('conv-list'), empty: $('conv-empty'),
    newChat: $('new-chat'), open: $('open-sidebar'), close: $('close-sidebar') };

  function render() {
    if (embed) return;
    const conv = app.chat.conv;
    let local = store.listConversations();
    if (app.serverList) { // entries saved before the index had sessions: read them once
      local = local.map((c) => (c.session !== undefined ? c
        : { ...c, session: (store.loadConversation(c.id) || {}).session || null }));
    }
    const items = sidebarList(app.serverList, local).map((c) => {
      const li = el('li', 'conv-item');
      const open = el('button', 'conv-open');
      open.type = 'button';
      open.dataset.id = c.id || '';
      open.dataset.session = c.session || '';
      if (conv && (c.id === conv.id || (c.session && c.session === conv.session))) {
        li.classList.add('active');
        open.setAttribute('aria-current', 'page');
      }
      open.append(el('span', 'conv-name', c.title || t('untitled')));
      if (c.running) open.append(el('span', 'conv-running', t('convRunning')));
      open.append(el('span', 'conv-time', relTime(c.updated || Date.now())));
      const ren = iconButton('edit', t('renameConversation'), 'rename-conv', 'icon-btn small conv-ren');
      const del = iconButton('trash', t('deleteConversation'), 'delete-conv', 'icon-btn small conv-del');
      for (const b of [ren, del]) Object.assign(b.dataset, { id: c.id || '', session: c.session || '', title: c.title });
      li.append(open, ren, del);
      return li;
    });
    ui.list.replaceChildren(...items);
    ui.empty.hidden = items.length > 0;
  }

  const visible = () => ui.app.classList.contains('sidebar-visible');

  function openNarrow() {
    ui.app.classList.add('sidebar-visible');
    ui.scrim.hidden = false;
    ui.open.setAttribute('aria-expanded', 'true');
    (ui.sidebar.querySelector('[aria-current="page"]') || ui.newChat).focus();
  }

  function closeOnNarrow() {
    if (!visible()) return;
    ui.app.classList.remove('sidebar-visible');
    ui.scrim.hidden = true;
    ui.open.setAttribute('aria-expanded', 'false');
  }

  /** Edit a title in place: Enter keeps it (actions.rename), Escape or leaving the field does not. */
  function startRename(ren, actions) {
    const li = ren.closest('.conv-item');
    const input = el('input', 'conv-rename');
    input.type = 'text';
    input.maxLength = 200;
    input.value = ren.dataset.title || '';
    input.setAttribute('aria-label', t('renameConversation'));
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep) actions.rename(ren.dataset.id, ren.dataset.session, input.value);
      else render();
    };
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); finish(true); }
      if (e.key === 'Escape') { e.preventDefault(); e.stopPropagation(); finish(false); }
    });
    input.addEventListener('blur', () => finish(false));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  /** Wire the list to `actions` = {open(id, session), remove(id, session), rename(id, session, title)}:
   * `id` is the local copy's ("" when this browser has none), `session` the server's ("" when not there yet). */
  function bind(actions) {
    ui.list.addEventListener('click', (e) => {
      const ren = e.target.closest('.conv-ren');
      if (ren) {
        startRename(ren, actions);
        return;
      }
      const del = e.target.closest('.conv-del');
      if (del) {
        if (del.dataset.armed === '1') {
          actions.remove(del.dataset.id, del.dataset.session);
          return;
        }
        setArmed(del, true); // the first click only arms it
        window.setTimeout(() => { if (del.isConnected) setArmed(del, false); }, 3000);
        return;
      }
      const open = e.target.closest('.conv-open');
      if (open) actions.open(open.dataset.id, open.dataset.session);
    });
    ui.open.addEventListener('click', () => {
      if (window.matchMedia(NARROW).matches) {
        if (visible()) closeOnNarrow();
        else openNarrow();
        return;
      }
      const hidden = ui.app.classList.toggle('sidebar-collapsed');
      store.setPref('sidebar', hidden ? 'hidden' : 'shown');
      ui.open.setAttribute('aria-expanded', String(!hidden));
    });
    ui.close.addEventListener('click', () => {
      closeOnNarrow();
      ui.open.focus();
    });
    ui.scrim.addEventListener('click', closeOnNarrow);
    if (store.getPref('sidebar', 'shown') === 'hidden' && !embed) ui.app.classList.add('sidebar-collapsed');
    ui.open.setAttribute('aria-expanded', String(!ui.app.classList.contains('sidebar-collapsed')));
  }

  return { render, bind, visible, closeOnNarrow };
}
