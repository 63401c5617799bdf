// Pure helpers around a conversation's messages and the server's history (no DOM, no
// network): what a server history entry becomes locally, what a restore sends, the numbers
// under a finished reply. Used by conversation.js; loaded by Node in tests/js.

export const PARAM_KEYS = ['temperature', 'top_p', 'max_tokens', 'system', 'cache'];  // cache: false bypasses [cache]
export const SERVER_KEYS = ['finish_reason', 'model', 'reasoning', 'usage'];
export const RESTORE_MAX_CHARS = 300000;

const revisions = new WeakMap();
/** How many times a message changed in a way its drawing must show (views redraw on change). */
export const revision = (m) => revisions.get(m) || 0;
export const bump = (m) => { revisions.set(m, revision(m) + 1); };

export const sameTurn = (a, b) => Boolean(a && b && a.role === b.role && a.content === b.content);
export const given = (v) => v !== undefined && v !== null;

/** A server history entry as a local message. */
export function historyEntry(h) {
  const m = { role: h.role, content: typeof h.content === 'string' ? h.content : '' };
  for (const k of SERVER_KEYS) if (given(h[k])) m[k] = h[k];
  return m;
}

/** The conversation as alternating user/assistant turns for `restore` (newest kept first). */
export function restorableHistory(messages, maxChars = RESTORE_MAX_CHARS) {
  const out = [];
  for (const m of messages) {
    if (m.pending || m.streaming) continue;
    if (m.role !== 'user' && m.role !== 'assistant') continue;
    const want = !out.length || out[out.length - 1].role === 'assistant' ? 'user' : 'assistant';
    if (m.role !== want) {
      if (m.role === 'user') out.pop(); // a question without an answer: drop it
      else continue;
    }
    const entry = { role: m.role, content: m.content || '' };
    if (m.role === 'assistant') {
      entry.finish_reason = m.finish_reason || 'stop';
      if (m.model) entry.model = m.model;
    }
    out.push(entry);
  }
  if (out.length && out[out.length - 1].role === 'user') out.pop();
  // A restore travels in one frame (the server's limit is 1 MiB by default): keep the newest turns.
  while (out.length > 2 && JSON.stringify(out).length > maxChars) out.splice(0, 2);
  return out;
}

/** Every parameter the server knows, `null` for "the default". */
export function paramsForServer(params = {}) {
  const out = {};
  for (const k of PARAM_KEYS) out[k] = params[k] === undefined || params[k] === '' ? null : params[k];
  return out;
}

/** Numbers under a finished reply: the server's timing when it has them, else our clock's. */
export function replyStats(s, f, now, before = {}) {
  const timing = f.timing || {};
  const usage = f.usage || null;
  const tokens = usage && Number.isFinite(usage.completion_tokens) ? usage.completion_tokens : null;
  const ttft = Number.isFinite(timing.ttft_ms) ? timing.ttft_ms : (!s.resumed && s.firstAt !== null ? s.firstAt - s.t0 : null);
  const total = Number.isFinite(timing.total_ms) ? timing.total_ms : (!s.resumed ? now - s.t0 : null);
  const genMs = total !== null && ttft !== null ? total - ttft : null;
  return {
    tokens,
    ttft_ms: ttft,
    total_ms: total,
    tps: tokens !== null && genMs > 0 ? tokens / (genMs / 1000) : null,
    think_ms: s.thinkStart !== null ? (s.thinkEnd || now) - s.thinkStart : before.think_ms || null,
  };
}

/**
 * The sidebar's list: the server's conversations for this user (`GET /api/sessions`: the same in
 * every browser, its titles win) and those only this browser knows (not on the server yet, older
 * than the server's first page, or kept from before a server restart), newest first. `server` is
 * null when the server keeps no list for us (no identity, offline): then the local list as it is.
 * Each item: {id (the local copy, or null), session, title, updated (ms), running, remote}.
 */
export function sidebarList(server, local) {
  const mine = local.map((c) => ({ id: c.id, session: c.session || null, title: c.title || '',
    updated: c.updated || 0, running: false, remote: false }));
  if (!Array.isArray(server)) return mine;
  const here = new Map(mine.filter((c) => c.session).map((c) => [c.session, c]));
  const listed = new Set();
  const out = [];
  for (const e of server) {
    if (!e || typeof e.session !== 'string' || listed.has(e.session)) continue;
    listed.add(e.session);
    const copy = here.get(e.session);
    out.push({
      id: copy ? copy.id : null,
      session: e.session,
      title: typeof e.title === 'string' && e.title ? e.title : (copy ? copy.title : ''),
      updated: Number.isFinite(e.updated) ? e.updated * 1000 : (copy ? copy.updated : 0),
      running: e.running === true,
      remote: true,
    });
  }
  for (const c of mine) if (!c.session || !listed.has(c.session)) out.push(c);
  return out.sort((a, b) => b.updated - a.updated);
}
