// What both transports share: backoff, URLs, and the few HTTP calls around a session.

export const BACKOFF_BASE = 500; // ms
export const BACKOFF_MAX = 15000;
export const HTTP = { cache: 'no-store', credentials: 'same-origin' };
export const JSON_HEADERS = { 'Content-Type': 'application/json' };
export const sessionUrl = (session, tail = '') => `api/sessions/${encodeURIComponent(session)}${tail}`;

/** Exponential backoff with jitter: a random delay in [d/2, d], d = base * 2^attempt. */
export function backoff(attempt, base = BACKOFF_BASE, max = BACKOFF_MAX) {
  const d = Math.min(max, base * 2 ** Math.min(attempt, 16));
  return Math.round(d / 2 + Math.random() * (d / 2));
}

export function wsUrl(params) {
  const u = new URL('ws', window.location.href);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') u.searchParams.set(k, String(v));
  return u.href;
}

/** Ask the server whether we need to log in (after repeated connection failures). */
export async function needsLogin() {
  try {
    const r = await fetch('api/models', HTTP);
    return r.status === 401;
  } catch {
    return false;
  }
}

/** Stop the session's running reply over HTTP (how SSE does it; the WebSocket's fallback). */
export async function httpStop(session) {
  if (!session) return false;
  try {
    const r = await fetch(sessionUrl(session, '/stop'), { method: 'POST', credentials: 'same-origin' });
    return r.ok;
  } catch {
    return false;
  }
}
