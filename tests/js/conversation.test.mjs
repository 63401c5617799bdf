// The conversation model (static/conversation.js), with Node's own test runner:
//   node --test tests/js
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { Chat } from '../../static/conversation.js';
import { exportJson, exportMarkdown } from '../../static/export.js';
import { paramsForServer, restorableHistory, revision } from '../../static/history.js';

const u = (content, extra = {}) => ({ role: 'user', content, ...extra });
const a = (content, extra = {}) => ({ role: 'assistant', content, finish_reason: 'stop', ...extra });

function chatWith(messages = [], { session = 's1', lastSeq = 0, offset = 0 } = {}) {
  const chat = new Chat();
  chat.open({ id: 'c1', title: '', session, lastSeq, offset, model: null, params: {}, messages, created: 0, updated: 0 });
  return chat;
}

/** A connection's first frame, as the WebSocket (or SSE's check) hands it over. */
function handshake(chat, frame) {
  chat.connecting();
  const seed = chat.sessionFrame({ type: 'session', history: [], params: {}, ...frame }, chat.conv.session);
  if (seed) return { seed };
  return chat.applySession({ type: 'session', history: [], params: {}, ...frame });
}

const contents = (chat) => chat.conv.messages.map((m) => `${m.role}:${m.content}`);

test('reply events are applied once each, by seq', () => {
  const chat = chatWith();
  assert.equal(chat.fresh({ seq: 1 }), true);
  assert.equal(chat.fresh({ seq: 2 }), true);
  assert.equal(chat.fresh({ seq: 2 }), false);
  assert.equal(chat.fresh({ seq: 1 }), false);
  assert.equal(chat.fresh({}), true); // not a reply event
  assert.equal(chat.conv.lastSeq, 2);
  assert.deepEqual(chat.position(), { session: 's1', after: 2 });
});

test('a replayed stream adds each delta once', () => {
  const chat = chatWith([u('q')]);
  const events = [
    { type: 'start', reply: 'r1', seq: 1, model: 'm' },
    { type: 'delta', reply: 'r1', content: 'Hel', seq: 2 },
    { type: 'delta', reply: 'r1', content: 'lo', seq: 3 },
  ];
  const apply = (f) => {
    if (!chat.fresh(f)) return;
    if (f.type === 'start') chat.start(f, 0);
    else chat.delta(f, 10);
  };
  events.forEach(apply);
  events.forEach(apply); // the server replayed too much
  apply({ type: 'delta', reply: 'r1', content: ' there, merged', seq: 5 }); // two deltas merged: last seq
  assert.equal(chat.streaming.msg.content, 'Hello there, merged');
  assert.equal(chat.conv.messages.length, 2);
  assert.equal(chat.conv.lastSeq, 5);
});

test('the server history is merged as a suffix of the local copy', () => {
  const older = [u('old q'), a('old a')];
  const chat = chatWith([...older, u('q1'), a('a1', { finish_reason: undefined })]);
  const before = revision(chat.conv.messages[3]);
  chat.applySession({ session: 's1', history: [{ role: 'user', content: 'q1' },
    { role: 'assistant', content: 'a1', finish_reason: 'length', model: 'm' }] });
  assert.deepEqual(contents(chat), ['user:old q', 'assistant:old a', 'user:q1', 'assistant:a1']);
  assert.equal(chat.conv.offset, 2); // the server keeps only the last two
  assert.equal(chat.serverIndex(2), 0);
  assert.equal(chat.conv.messages[3].finish_reason, 'length');
  assert.ok(revision(chat.conv.messages[3]) > before, 'a changed message is drawn again');
});

test('a different server history wins, keeping local stats where turns match', () => {
  const chat = chatWith([u('q1'), a('a1', { stats: { tokens: 3 } }), u('local only'), a('x')]);
  chat.applySession({ session: 's1', history: [{ role: 'user', content: 'q1' }, { role: 'assistant', content: 'a1' },
    { role: 'user', content: 'other tab' }, { role: 'assistant', content: 'y' }] });
  assert.deepEqual(contents(chat), ['user:q1', 'assistant:a1', 'user:other tab', 'assistant:y']);
  assert.deepEqual(chat.conv.messages[1].stats, { tokens: 3 });
  assert.equal(chat.conv.offset, 0);
});

test('a pending turn is sent once, and again once only when the connection lost it', () => {
  const chat = chatWith([u('q1'), a('a1')]);
  assert.equal(chat.submit('q2', 0), true);
  assert.equal(chat.submit('q3', 0), false, 'one turn at a time');
  const cmd = chat.command();
  assert.deepEqual(cmd, { type: 'chat', message: 'q2', params: paramsForServer({}) });
  chat.sending(true);
  assert.equal(chat.command(), null, 'never twice on one connection');
  // a `session` frame on the same connection (the answer to a `set`) changes nothing
  chat.applySession({ type: 'session', session: 's1', history: [u('q1'), a('a1')] });
  assert.equal(chat.command(), null, 'still not twice');
  // the socket died; the new connection's history does not have it: send it again, once
  handshake(chat, { session: 's1', history: [{ role: 'user', content: 'q1' }, a('a1')] });
  assert.deepEqual(chat.command(), cmd);
  assert.deepEqual(contents(chat), ['user:q1', 'assistant:a1', 'user:q2']);
  chat.sending(true);
  // this time it arrived: the history has it, so it is not sent a third time
  handshake(chat, { session: 's1', history: [u('q1'), a('a1'), u('q2')] });
  assert.equal(chat.pending, null);
  assert.equal(chat.command(), null);
  assert.equal(chat.conv.messages.at(-1).pending, false);
});

test('a turn whose request failed is not resent when the history shows it arrived', () => {
  const chat = chatWith([]);
  chat.submit('hello', 0);
  chat.sending(true);
  chat.turnLost();
  assert.equal(chat.pending.sent, false);
  assert.equal(chat.pending.unsure, true);
  handshake(chat, { session: 's1', history: [u('hello'), a('Echo: hello')] });
  assert.equal(chat.pending, null);
  assert.deepEqual(contents(chat), ['user:hello', 'assistant:Echo: hello']);
});

test('a forgotten session asks for a restore of the finished turns, then continues there', () => {
  const chat = chatWith([u('q1'), a('a1'), u('unanswered'), { role: 'assistant', content: 'partial', streaming: true, reply: 'r9' }], { lastSeq: 40 });
  chat.streaming = { msg: chat.conv.messages[3], reply: 'r9' };
  chat.connecting();
  const seed = chat.sessionFrame({ type: 'session', session: 's2', history: [] }, 's1');
  assert.deepEqual(seed, [{ role: 'user', content: 'q1' }, { role: 'assistant', content: 'a1', finish_reason: 'stop' },
    { role: 'user', content: 'unanswered' }, { role: 'assistant', content: 'partial', finish_reason: 'interrupted' }]);
  assert.equal(chat.streaming, null, 'the lost reply is finished locally');
  assert.equal(chat.conv.session, 's2');
  assert.equal(chat.conv.lastSeq, 0, 'seq starts again in a new session');
  chat.restoreSent();
  const { restored } = chat.applySession({ type: 'session', session: 's2', history: seed, seq: 0 });
  assert.equal(restored, true);
  assert.equal(chat.restoring, false);
  assert.equal(chat.conv.offset, 0);
});

test('restorable history alternates, drops a question without an answer, and keeps the newest within the limit', () => {
  const msgs = [u('q1'), u('q2'), a('a2'), a('stray'), u('q3', { pending: true }), u('q4'), a('a4', { model: 'm' }), u('q5')];
  assert.deepEqual(restorableHistory(msgs), [u('q2'), a('a2'), u('q4'), { role: 'assistant', content: 'a4', finish_reason: 'stop', model: 'm' }]);
  const big = [u('x'.repeat(100)), a('y'.repeat(100)), u('new'), a('newer')];
  assert.deepEqual(restorableHistory(big, 150).map((m) => m.content), ['new', 'newer']);
});

test('edit replaces the message and everything after it, at its server index', () => {
  const chat = chatWith([u('old'), a('old a'), u('q1'), a('a1'), u('q2'), a('a2')], { offset: 2 });
  assert.equal(chat.edit(0, 'too old', 0), 'old', 'the server never had it');
  assert.equal(chat.edit(2, 'q1 edited', 0), 'ok');
  assert.deepEqual(contents(chat), ['user:old', 'assistant:old a', 'user:q1 edited']);
  assert.deepEqual(chat.command(), { type: 'edit', index: 0, message: 'q1 edited', params: paramsForServer({}) });
  chat.sending(true);
  chat.fresh({ seq: 7 });
  chat.start({ type: 'start', reply: 'r2', model: 'm', seq: 7 }, 5);
  assert.deepEqual(contents(chat), ['user:old', 'assistant:old a', 'user:q1 edited', 'assistant:']);
  assert.equal(chat.pending, null);
  assert.equal(chat.streaming.resumed, false);
});

test('an edit is accepted by the session frame that opens its own stream (SSE)', () => {
  const chat = chatWith([u('q1'), a('a1'), u('q2'), a('a2')]);
  chat.edit(0, 'edited', 0);
  chat.sending(true);
  chat.applySession({ type: 'session', session: 's1', history: [u('edited')], running: { reply: 'r3', model: 'm' } });
  assert.equal(chat.pending, null);
  assert.deepEqual(contents(chat), ['user:edited', 'assistant:']);
  assert.equal(chat.streaming.reply, 'r3');
});

test('a refused edit puts everything back and gives its text back', () => {
  const chat = chatWith([u('q1'), a('a1')]);
  chat.edit(0, 'changed', 0);
  chat.sending(true);
  assert.deepEqual(chat.error({ type: 'error', code: 'busy', message: 'no' }), { kind: 'refused', revertedText: 'changed' });
  assert.deepEqual(contents(chat), ['user:q1', 'assistant:a1']);
  assert.equal(chat.pending, null);
});

test('regenerate drops the last reply; its own stream (SSE) settles it', () => {
  const chat = chatWith([u('q1'), a('a1')]);
  assert.equal(chat.regenerate(0), true);
  assert.deepEqual(contents(chat), ['user:q1']);
  assert.deepEqual(chat.command(), { type: 'regenerate', params: paramsForServer({}) });
  chat.sending(true);
  chat.applySession({ type: 'session', session: 's1', history: [u('q1')], running: { reply: 'r2', model: 'm' } });
  assert.equal(chat.pending, null);
  assert.equal(chat.streaming.reply, 'r2');
  assert.equal(chat.start({ type: 'start', reply: 'r2' }, 0), null, 'the same reply, not a second one');
  assert.deepEqual(contents(chat), ['user:q1', 'assistant:']);
  assert.equal(chatWith([u('q')]).regenerate(0), false, 'nothing to regenerate');
});

test('done finishes the reply with server timing and usage', () => {
  const chat = chatWith([]);
  chat.submit('q', 100);
  chat.sending(true);
  chat.start({ reply: 'r1', model: 'm' }, 150);
  chat.reasoning({ reply: 'r1', content: 'hmm' }, 200);
  const { thinkEnded } = chat.delta({ reply: 'r1', content: 'A' }, 400);
  assert.equal(thinkEnded, true);
  const s = chat.done({ reply: 'r1', finish_reason: 'stop', usage: { completion_tokens: 10 }, timing: { ttft_ms: 100, total_ms: 1100 } }, 1300);
  const m = s.msg;
  assert.equal(m.streaming, undefined);
  assert.equal(m.finish_reason, 'stop');
  assert.deepEqual(m.stats, { tokens: 10, ttft_ms: 100, total_ms: 1100, tps: 10, think_ms: 200 });
  assert.equal(chat.busy, false);
  assert.equal(chat.conv.title, 'q');
});

test('settings are sent only when they differ from the session', () => {
  const chat = chatWith([]);
  chat.serverParams = paramsForServer({});
  assert.equal(chat.settingsCommand(), null);
  chat.conv.params = { temperature: 0.3 };
  assert.deepEqual(chat.settingsCommand(), { type: 'set', params: { temperature: 0.3, top_p: null, max_tokens: null, system: null, cache: null } });
  chat.conv.params = {};
  chat.conv.model = 'p/m';
  assert.equal(chat.settingsCommand().model, 'p/m');
});

test('a session frame within a connection takes the server settings; a connection\'s first keeps the page\'s', () => {
  const chat = chatWith([]);
  chat.conv.params = { temperature: 0.9 };
  chat.conv.model = 'p/mine';
  handshake(chat, { session: 's1', model: 'p/theirs', params: { temperature: 0.3 } });
  assert.equal(chat.conv.model, 'p/mine'); // (possibly changed offline: the page sends them)
  assert.equal(chat.settingsCommand().params.temperature, 0.9);
  // another tab or device set these (through any instance): the server broadcasts the session frame
  chat.sessionFrame({ type: 'session', session: 's1', history: [], model: 'p/theirs', params: { temperature: 0.3, top_p: null } }, 's1');
  chat.applySession({ type: 'session', session: 's1', history: [], model: 'p/theirs', params: { temperature: 0.3, top_p: null } });
  assert.equal(chat.conv.model, 'p/theirs');
  assert.deepEqual(chat.conv.params, { temperature: 0.3 });
  assert.equal(chat.settingsCommand(), null); // nothing sent back over them
});

test('exports: JSON keeps what the server and we know, Markdown reads as a transcript', () => {
  const chat = chatWith([u('q1'), a('a1', { reasoning: 'think', model: 'p/m', stats: { tokens: 2 }, reasoning2: 'x' }),
    u('q2'), a('part', { finish_reason: 'stopped', error: { code: 'upstream_error', message: 'boom' } }), u('typed', { pending: true })]);
  chat.conv.title = 'T';
  chat.conv.params = { system: 'Be terse.\nAlways.' };
  const data = exportJson(chat.conv, { model: 'p/m', exportedAt: 'now' });
  assert.deepEqual(Object.keys(data), ['title', 'session', 'model', 'params', 'exported_at', 'messages']);
  assert.deepEqual(data.messages.map((m) => m.content), ['q1', 'a1', 'q2', 'part']);
  assert.deepEqual(data.messages[1], { role: 'assistant', content: 'a1', reasoning: 'think', finish_reason: 'stop', model: 'p/m', stats: { tokens: 2 } });
  const md = exportMarkdown(chat.conv, { model: 'p/m', label: (k) => k.toUpperCase(), codeName: (c) => `<${c}>` }).split('\n');
  assert.equal(md[0], '# T');
  assert.ok(md.includes('*MODEL: p/m*'));
  assert.ok(md.includes('> **SYSTEMPROMPT:** Be terse.'));
  assert.ok(md.includes('## ASSISTANT (p/m)'));
  assert.ok(md.includes('*(stopped)*'));
  assert.ok(md.includes('> **<upstream_error>:** boom'));
  assert.ok(!md.includes('typed'), 'a turn not yet sent is not exported');
});
