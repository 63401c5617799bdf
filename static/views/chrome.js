// The top bar: the conversation's title and parameter chips, the model picker, the
// connection indicator and the export menu.

import { t } from '../i18n.js';
import { $, el } from '../dom.js';

export function createChrome(app, { onExport }) {
  const ui = { title: $('conv-title'), chips: $('param-chips'), model: $('model'), conn: $('conn'), connText: $('conn-text'),
    exportBtn: $('export-btn'), exportMenu: $('export-menu') };
  const { chat } = app;

  function header() {
    const conv = chat.conv;
    if (!conv) return;
    ui.title.textContent = conv.title || t('untitled');
    document.title = conv.title ? `${conv.title} · NexLM` : 'NexLM';
    const p = conv.params || {};
    const chips = [];
    const set = (k) => p[k] !== undefined && p[k] !== '';
    if (set('temperature')) chips.push(`temp ${p.temperature}`);
    if (set('top_p')) chips.push(`top_p ${p.top_p}`);
    if (set('max_tokens')) chips.push(`max ${p.max_tokens}`);
    if (p.system) chips.push(t('paramSystem'));
    if (p.cache === false) chips.push(t('paramNoCache'));
    ui.chips.replaceChildren(...chips.map((c) => el('li', 'chip', c)));
    ui.chips.hidden = chips.length === 0;
  }

  function option(value, label) {
    const o = document.createElement('option');
    o.value = value;
    o.textContent = label;
    return o;
  }

  function models() {
    if (!app.models.length) return;
    const chosen = (chat.conv && chat.conv.model) || chat.serverModel || app.defaultModel;
    const groups = new Map();
    for (const m of app.models) {
      const g = m.provider || '';
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(m);
    }
    const frag = document.createDocumentFragment();
    for (const [name, list] of groups) {
      const parent = groups.size > 1 && name ? document.createElement('optgroup') : frag;
      if (parent !== frag) parent.label = name;
      for (const m of list) {
        const label = m.label || m.id;
        const o = option(m.id, m.available === false ? t('modelUnavailable', { label, reason: m.reason || '' }) : label);
        o.disabled = m.available === false;
        if (m.label && m.label !== m.id) o.title = m.id;
        parent.appendChild(o);
      }
      if (parent !== frag) frag.appendChild(parent);
    }
    if (chosen && !app.models.some((m) => m.id === chosen)) frag.appendChild(option(chosen, chosen));
    ui.model.replaceChildren(frag);
    if (chosen) ui.model.value = chosen;
  }

  function modelsFailed() {
    ui.model.replaceChildren(option('', t('modelsFailed')));
  }

  function conn() {
    const s = app.connState;
    ui.conn.dataset.state = s;
    let text;
    if (s === 'online') text = `${t('connOnline')} · ${app.transport ? app.transport.label : ''}`;
    else if (s === 'connecting') text = t('connConnecting');
    else if (s === 'reconnecting') text = t('connReconnecting');
    else {
      const until = app.connDetail.until;
      const left = until ? Math.max(0, Math.ceil((until - Date.now()) / 1000)) : 0;
      text = left ? t('connOfflineRetry', { s: left }) : t('connOffline');
    }
    ui.connText.textContent = text;
  }

  // -- the export menu -----------------------------------------------------------------

  const menuOpen = () => !ui.exportMenu.hidden;

  function toggleExportMenu(show) {
    const open = show ?? ui.exportMenu.hidden;
    ui.exportMenu.hidden = !open;
    ui.exportBtn.setAttribute('aria-expanded', String(open));
    if (open) ui.exportMenu.querySelector('button').focus();
  }

  function closeMenu() {
    toggleExportMenu(false);
    ui.exportBtn.focus();
  }

  ui.exportBtn.addEventListener('click', () => toggleExportMenu());
  ui.exportMenu.addEventListener('click', (e) => {
    const b = e.target.closest('[data-export]');
    if (!b) return;
    toggleExportMenu(false);
    onExport(b.dataset.export);
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
    if (menuOpen() && !e.target.closest('.menu-wrap')) toggleExportMenu(false);
  });

  return { header, models, modelsFailed, conn, menuOpen, closeMenu };
}
