// NexLM chat page. Plain ES modules, no build step; every URL is relative to the page.
//
// conversation.js  the conversation model (pure: history merge, pending turns, seq)
// transport.js     one interface over the WebSocket and SSE (transport-ws.js, transport-sse.js)
// controller.js    server events into the model, the user's turns out, views told what to draw
// views/           thread, chrome (top bar), composer, sidebar, settings
// store.js         conversations and preferences in localStorage
// This file only wires the page's controls to the controller and starts it.

import { t, getLang, onLangChange, applyI18n } from './i18n.js';
import { createController } from './controller.js';
import { $, copyText, flashCopied } from './dom.js';
import { createThread } from './views/thread.js';
import { createChrome } from './views/chrome.js';
import { createComposer } from './views/composer.js';
import { createSidebar } from './views/sidebar.js';
import { applyLang, applyTheme, createSettings, toggleLang, toggleTheme } from './views/settings.js';
import * as store from './store.js';

const query = new URLSearchParams(window.location.search);
const EMBED = document.body.classList.contains('embed') || query.get('embed') === '1';
if (EMBED) document.body.classList.add('embed');

let ctl = null;
const views = {};
ctl = createController((app) => {
  views.thread = createThread(app.chat);
  views.chrome = createChrome(app, { onExport: (kind) => ctl.exportAs(kind) });
  views.composer = createComposer(app, views.thread);
  views.sidebar = createSidebar(app, { embed: EMBED });
  views.settings = createSettings(app, { onSave: (params, kind) => ctl.setParams(params, kind) });
  return views;
});
const { app, chat } = ctl;
const { thread, chrome, composer, sidebar, settings } = views;

composer.bind({ submit: ctl.submit, stop: ctl.stop, cancelQueued: ctl.cancelQueued });
sidebar.bind({ open: ctl.openById, remove: ctl.remove, rename: ctl.rename });

onLangChange(() => {
  if (!chat.conv) return;
  $('lang-toggle').setAttribute('lang', getLang() === 'zh' ? 'en' : 'zh');
  ctl.drawAll();
});

$('thread').addEventListener('click', async (e) => {
  const b = e.target.closest('button[data-action]');
  if (!b) return;
  const article = b.closest('article.msg');
  const index = article ? Number(article.dataset.index) : -1;
  const m = index >= 0 ? chat.conv.messages[index] : null;
  const action = b.dataset.action;
  if (action === 'copy-code') {
    const code = b.closest('.code-block')?.querySelector('pre code');
    if (code && (await copyText(code.textContent))) flashCopied(b);
  } else if (action === 'copy-msg') {
    if (m && (await copyText(m.content))) flashCopied(b);
  } else if (action === 'edit') {
    if (m) thread.startEdit(index, ctl.edit);
  } else if (action === 'regenerate') {
    ctl.regenerate();
  }
});

$('empty').addEventListener('click', (e) => {
  const b = e.target.closest('.suggestion');
  if (!b) return;
  composer.setText(b.textContent);
  composer.focus();
});

document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape' || e.defaultPrevented || settings.isOpen()) return;
  if (chrome.menuOpen()) {
    chrome.closeMenu();
  } else if (sidebar.visible()) {
    sidebar.closeOnNarrow();
  } else if (chat.streaming || (chat.pending && !chat.pending.sent)) {
    e.preventDefault();
    ctl.stop();
  }
});

$('new-chat').addEventListener('click', ctl.newChat);
$('new-chat-embed').addEventListener('click', ctl.newChat);
$('model').addEventListener('change', (e) => ctl.setModel(e.target.value));
$('conn').addEventListener('click', ctl.retryNow);
$('theme-toggle').addEventListener('click', toggleTheme);
$('lang-toggle').addEventListener('click', toggleLang);

function firstConversation() {
  const wanted = query.get('conversation') || store.getPref(EMBED ? 'current-embed' : 'current', null);
  const newest = !EMBED && store.listConversations()[0];
  return (wanted && store.loadConversation(wanted)) || (newest && store.loadConversation(newest.id))
    || store.newConversation();
}

// for tests and debugging: a read-only look at the state
window.nexlm = {
  state: {
    get conv() { return chat.conv; },
    get pending() { return chat.pending; },
    get streaming() { return chat.streaming; },
    get conn() { return app.transport; },
  },
  t,
};

applyTheme();
applyLang();
applyI18n(document);
ctl.loadModels();
ctl.open(firstConversation());
if (!EMBED) ctl.refreshList();
composer.autosize();
if (!window.matchMedia('(pointer: coarse)').matches) composer.focus();
thread.toBottom(true);
