// The user's own usage in the settings dialog: today, this month, and this month by model
// (GET api/usage; an admin's view of everyone is the API's, not the page's).

import { HTTP } from './net.js';

const COLUMNS = ['replies', 'input_tokens', 'output_tokens'];
const zero = () => ({ replies: 0, input_tokens: 0, output_tokens: 0 });
const pick = (row) => Object.fromEntries(COLUMNS.map((k) => [k, Number(row?.[k]) || 0]));

/** `byDay`, `byModel`: the API's answers for this month (group_by day and model); `today`: YYYY-MM-DD (UTC). */
export function summarizeUsage(byDay, byModel, today) {
  const day = (byDay?.rows || []).find((r) => r.day === today);
  const models = (byModel?.rows || []).map((r) => ({ model: String(r.model), ...pick(r) }));
  models.sort((a, b) => b.input_tokens + b.output_tokens - (a.input_tokens + a.output_tokens) || a.model.localeCompare(b.model));
  return { today: day ? pick(day) : zero(), month: pick(byDay?.totals), models };
}

/** Both queries, or null when the server will not say (no identity, an old server, offline). */
export async function fetchUsage(now = new Date()) {
  const today = now.toISOString().slice(0, 10);
  try {
    const [d, m] = await Promise.all(['day', 'model'].map((g) => fetch(`api/usage?group_by=${g}`, HTTP)));
    if (!d.ok || !m.ok) return null;
    return summarizeUsage(await d.json(), await m.json(), today);
  } catch {
    return null;
  }
}

function table(doc, caption, rows, t, fmt) {
  const el = doc.createElement('table');
  el.className = 'usage-table';
  const cap = doc.createElement('caption');
  cap.textContent = caption;
  el.append(cap);
  const head = el.createTHead().insertRow();
  for (const key of ['', 'usageReplies', 'usageInput', 'usageOutput']) {
    const th = doc.createElement(key ? 'th' : 'td');
    if (key) {
      th.scope = 'col';
      th.textContent = t(key);
    }
    head.append(th);
  }
  const body = el.createTBody();
  for (const [label, counts] of rows) {
    const tr = body.insertRow();
    const th = doc.createElement('th');
    th.scope = 'row';
    th.textContent = label;
    tr.append(th);
    for (const k of COLUMNS) tr.insertCell().textContent = fmt(counts[k]);
  }
  return el;
}

/** Replace `container`'s content with the summary (or a short note when there is none). */
export function renderUsage(container, summary, t, fmt = (n) => n.toLocaleString()) {
  const doc = container.ownerDocument;
  container.replaceChildren();
  if (!summary) {
    const p = doc.createElement('p');
    p.className = 'usage-note';
    p.textContent = t('usageUnavailable');
    container.append(p);
    return;
  }
  container.append(table(doc, t('usagePeriod'), [[t('usageToday'), summary.today], [t('usageMonth'), summary.month]], t, fmt));
  if (summary.models.length) {
    container.append(table(doc, t('usageByModel'), summary.models.map((m) => [m.model, m]), t, fmt));
  }
}
