// Conversations and preferences kept in the browser (localStorage).
//
// nexlm.index          [{id, title, updated, session}] newest first
// nexlm.conv.<id>      one conversation: {id, title, session, lastSeq, model, params,
//                      messages:[{role, content, reasoning?, finish_reason?, model?, stats?, error?}],
//                      created, updated}
// nexlm.pref.<name>    a preference (theme, lang, transport, current, sidebar)

const P = 'nexlm.';
const MAX_CONVERSATIONS = 200;

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(P + key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(P + key, JSON.stringify(value));
    return true;
  } catch (err) {
    // Quota: drop the oldest conversations and try once more.
    const index = read('index', []);
    if (index.length > 1) {
      for (const old of index.splice(Math.ceil(index.length / 2))) localStorage.removeItem(`${P}conv.${old.id}`);
      localStorage.setItem(`${P}index`, JSON.stringify(index));
      try {
        localStorage.setItem(P + key, JSON.stringify(value));
        return true;
      } catch { /* give up quietly: the server still has the session */ }
    }
    console.warn('nexlm: could not save to localStorage', err);
    return false;
  }
}

export const newId = () => (crypto.randomUUID ? crypto.randomUUID()
  : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);

export function listConversations() {
  const index = read('index', []);
  return Array.isArray(index) ? index.filter((c) => c && typeof c.id === 'string') : [];
}

export function loadConversation(id) {
  const conv = read(`conv.${id}`, null);
  if (!conv || typeof conv !== 'object') return null;
  conv.messages = Array.isArray(conv.messages) ? conv.messages : [];
  conv.params = conv.params && typeof conv.params === 'object' ? conv.params : {};
  conv.lastSeq = Number.isFinite(conv.lastSeq) ? conv.lastSeq : 0;
  return conv;
}

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: '', session: null, lastSeq: 0, model: null, params: {},
    messages: [], created: now, updated: now };
}

/** The local copy of a server session, if this browser has one (the index, then old entries). */
export function findBySession(session) {
  for (const c of listConversations()) {
    if (c.session === session) return loadConversation(c.id);
  }
  for (const c of listConversations()) {
    if (c.session === undefined) {
      const conv = loadConversation(c.id);
      if (conv && conv.session === session) return conv;
    }
  }
  return null;
}

/** Save a conversation (only once it has something in it); the index is newest first. */
export function saveConversation(conv) {
  if (!conv.messages.length) return;
  const stored = { ...conv, messages: conv.messages.filter((m) => !m.pending) };
  write(`conv.${conv.id}`, stored);
  const index = listConversations().filter((c) => c.id !== conv.id);
  index.push({ id: conv.id, title: conv.title, updated: conv.updated, session: conv.session || null });
  index.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  for (const old of index.splice(MAX_CONVERSATIONS)) localStorage.removeItem(`${P}conv.${old.id}`);
  write('index', index);
}

export function deleteConversation(id) {
  localStorage.removeItem(`${P}conv.${id}`);
  write('index', listConversations().filter((c) => c.id !== id));
}

export const getPref = (name, fallback) => read(`pref.${name}`, fallback);
export const setPref = (name, value) => write(`pref.${name}`, value);
