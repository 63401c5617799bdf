// The message box under the thread: Send or Stop, the note about a queued turn, autosize.

import { t } from '../i18n.js';
import { $, el } from '../dom.js';

export function createComposer(app, thread) {
  const ui = { form: $('composer'), input: $('input'), send: $('send'), stop: $('stop'), note: $('composer-note'), thread: $('thread') };
  const { chat } = app;

  function autosize() {
    const ta = ui.input;
    ta.style.height = 'auto';
    ta.style.height = `${Math.min(ta.scrollHeight, Math.round(window.innerHeight * 0.4))}px`;
  }

  function render() {
    const p = chat.pending;
    ui.stop.hidden = !chat.streaming && !(p && p.sent);
    ui.send.hidden = !ui.stop.hidden;
    ui.send.disabled = Boolean(p);
    ui.thread.classList.toggle('busy', chat.busy);
    if (p && !p.sent) {
      ui.note.replaceChildren(el('span', null, `${t('queuedNote')} `));
      const cancel = el('button', 'link-btn', t('cancelQueued'));
      cancel.type = 'button';
      cancel.dataset.action = 'cancel-queued';
      ui.note.appendChild(cancel);
    } else {
      ui.note.textContent = '';
    }
    thread.pendingBadge();
  }

  /** Put a turn's text back in the box (when it was taken back), unless the user typed another. */
  function restoreText(text) {
    if (ui.input.value.trim()) return;
    ui.input.value = text;
    autosize();
  }

  function setText(text) {
    ui.input.value = text;
    autosize();
  }

  /** Wire the box to `actions` = {submit(text) -> bool, stop(), cancelQueued()}. */
  function bind(actions) {
    const send = () => {
      if (actions.submit(ui.input.value)) setText('');
    };
    ui.input.addEventListener('input', autosize);
    ui.input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        send();
      }
    });
    ui.form.addEventListener('submit', (e) => {
      e.preventDefault();
      send();
    });
    ui.stop.addEventListener('click', () => {
      actions.stop();
      ui.input.focus();
    });
    ui.note.addEventListener('click', (e) => {
      if (e.target.closest('[data-action="cancel-queued"]')) actions.cancelQueued();
    });
  }

  return { render, restoreText, setText, bind, autosize, note: (text) => { ui.note.textContent = text; },
    focus: () => ui.input.focus() };
}
