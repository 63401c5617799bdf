// A conversation as a file: the JSON export's object and the Markdown transcript (pure).

import { given } from './history.js';

const EXPORT_KEYS = ['reasoning', 'finish_reason', 'model', 'usage', 'stats', 'error'];

/** The conversation as the JSON export's object. */
export function exportJson(conv, { model, exportedAt }) {
  return {
    title: conv.title || '', session: conv.session, model: conv.model || model || null,
    params: conv.params, exported_at: exportedAt,
    messages: conv.messages.filter((m) => !m.pending).map((m) => {
      const out = { role: m.role, content: m.content };
      for (const k of EXPORT_KEYS) if (given(m[k]) && m[k] !== '') out[k] = m[k];
      return out;
    }),
  };
}

/** The conversation as Markdown; `label(key)` gives the interface's words, `codeName(code)` an error's. */
export function exportMarkdown(conv, { model, label, codeName }) {
  const lines = [`# ${conv.title || label('untitled')}`, ''];
  const shown = conv.model || model;
  if (shown) lines.push(`*${label('model')}: ${shown}*`, '');
  if (conv.params && conv.params.system) lines.push(`> **${label('systemPrompt')}:** ${conv.params.system.replace(/\n/g, '\n> ')}`, '');
  for (const m of conv.messages.filter((x) => !x.pending)) {
    if (m.role === 'user') {
      lines.push(`## ${label('you')}`, '', m.content, '');
      continue;
    }
    lines.push(`## ${label('assistant')}${m.model ? ` (${m.model})` : ''}`, '');
    if (m.reasoning) lines.push(`<details><summary>${label('thoughts')}</summary>`, '', m.reasoning, '', '</details>', '');
    lines.push(m.content || '', '');
    if (m.finish_reason && m.finish_reason !== 'stop') lines.push(`*(${m.finish_reason})*`, '');
    if (m.error) lines.push(`> **${codeName(m.error.code)}:** ${m.error.message}`, '');
  }
  return lines.join('\n');
}
