// Small DOM helpers shared by the views: elements, icons, the screen reader announcer,
// the clipboard, and the words for an error code.

import { t } from './i18n.js';

export const $ = (id) => document.getElementById(id);

export function el(tag, cls, text) {
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

export function icon(name) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const p = document.createElementNS(SVG_NS, 'path');
  p.setAttribute('d', ICONS[name]);
  svg.appendChild(p);
  return svg;
}

export function iconButton(name, label, action, cls = 'icon-btn small') {
  const b = el('button', cls);
  b.type = 'button';
  b.dataset.action = action;
  b.setAttribute('aria-label', label);
  b.title = label;
  b.appendChild(icon(name));
  return b;
}

/** Say `text` through the page's polite live region. */
export function announce(text) {
  const box = $('announcer');
  box.textContent = '';
  window.setTimeout(() => { box.textContent = text; }, 30);
}

export const fmt = (n, digits = 1) => (Number.isFinite(n) ? n.toFixed(digits) : '—');

/** An error code in words: the interface's own where it has them. */
export function humanCode(code) {
  if (!code) return t('errorTitle');
  const key = `code.${code}`;
  const known = t(key);
  return known !== key ? known : code.replace(/_/g, ' ').replace(/^./, (c) => c.toUpperCase());
}

export async function copyText(text) {
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

export function flashCopied(button) {
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

export function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  window.setTimeout(() => URL.revokeObjectURL(url), 5000);
}
