// Preferences (theme, language) and the settings dialog: this conversation's parameters,
// the connection, the language and the theme.

import { t, setLang, getLang } from '../i18n.js';
import { $ } from '../dom.js';
import * as store from '../store.js';
import { fetchUsage, renderUsage } from '../usage.js';

const media = window.matchMedia('(prefers-color-scheme: dark)');

export function applyTheme() {
  const pref = store.getPref('theme', 'system');
  const dark = pref === 'dark' || (pref === 'system' && media.matches);
  document.documentElement.dataset.theme = dark ? 'dark' : 'light';
  $('hljs-light').media = dark ? 'not all' : 'all';
  $('hljs-dark').media = dark ? 'all' : 'not all';
}
media.addEventListener('change', applyTheme);

export const applyLang = () => setLang(store.getPref('lang', 'auto'));

export function toggleTheme() {
  store.setPref('theme', document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark');
  applyTheme();
}

export function toggleLang() {
  store.setPref('lang', getLang() === 'zh' ? 'en' : 'zh');
  applyLang();
}

function readNumber(input, integer) {
  const raw = input.value.trim();
  if (raw === '') return undefined;
  const n = Number(raw);
  if (!Number.isFinite(n)) return undefined;
  return integer ? Math.round(n) : n;
}

/** The dialog; `onSave(params, transportKind)` when saved. */
export function createSettings(app, { onSave }) {
  const ui = { dialog: $('settings'), form: $('settings-form'), button: $('settings-btn') };
  const f = ui.form.elements;
  const numbers = [f.temperature, f.top_p, f.max_tokens];

  function open() {
    const p = app.chat.conv.params || {};
    const server = app.chat.serverParams;
    const eff = { ...server, ...p };
    f.system.value = p.system ?? '';
    f.system.placeholder = server.system || t('systemPromptPlaceholder');
    for (const input of numbers) {
      input.value = p[input.name] ?? '';
      input.placeholder = eff[input.name] ?? t('serverDefault');
    }
    f.cache.checked = p.cache !== false;
    f.transport.value = app.kind;
    f.lang.value = store.getPref('lang', 'auto');
    f.theme.value = store.getPref('theme', 'system');
    if (typeof ui.dialog.showModal === 'function') ui.dialog.showModal();
    else ui.dialog.setAttribute('open', '');
    f.system.focus();
    showUsage();
  }

  async function showUsage() {
    const panel = $('usage-panel');
    panel.setAttribute('aria-busy', 'true');
    const summary = await fetchUsage();
    renderUsage(panel, summary, t);
    panel.removeAttribute('aria-busy');
  }

  function close() {
    if (typeof ui.dialog.close === 'function') ui.dialog.close();
    else ui.dialog.removeAttribute('open');
    ui.button.focus();
  }

  function save() {
    const bad = numbers.find((input) => !input.checkValidity());
    if (bad) {
      bad.reportValidity();
      return false;
    }
    const params = {};
    if (f.system.value.trim()) params.system = f.system.value;
    const values = { temperature: readNumber(f.temperature), top_p: readNumber(f.top_p), max_tokens: readNumber(f.max_tokens, true) };
    for (const [k, v] of Object.entries(values)) if (v !== undefined) params[k] = v;
    if (!f.cache.checked) params.cache = false;  // unset: the server's [cache] applies
    store.setPref('lang', f.lang.value);
    store.setPref('theme', f.theme.value);
    onSave(params, f.transport.value === 'sse' ? 'sse' : 'ws');
    applyTheme();
    applyLang();
    return true;
  }

  ui.button.addEventListener('click', open);
  $('settings-close').addEventListener('click', close);
  $('settings-cancel').addEventListener('click', close);
  $('settings-reset').addEventListener('click', () => {
    for (const input of [f.system, ...numbers]) input.value = '';
    f.cache.checked = true;
  });
  ui.form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (save()) close();
  });

  return { isOpen: () => ui.dialog.open };
}
