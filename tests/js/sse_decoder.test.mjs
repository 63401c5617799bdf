// The incremental text/event-stream decoder of the SSE transport: every split of a stream
// into pieces decodes to the same events.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { SseDecoder } from '../../static/transport-sse.js';

const STREAM = 'event: session\r\ndata: {"a":1}\r\nid: 3\r\n\r\n: keep-alive\n\nevent: delta\ndata: line1\ndata: line2\n\ndata:x\rid: 4\r\r\n';
const EXPECTED = [
  { event: 'session', data: '{"a":1}', id: '3' },
  { event: 'delta', data: 'line1\nline2', id: null },
  { event: 'message', data: 'x', id: '4' },
];

test('one piece', () => {
  assert.deepEqual(new SseDecoder().push(STREAM), EXPECTED);
});

test('a lone CR at the end waits: it may be the first half of CRLF', () => {
  const d = new SseDecoder();
  assert.deepEqual(d.push('data: a\r'), []);
  assert.deepEqual(d.push('\n\r\n'), [{ event: 'message', data: 'a', id: null }]);
});

test('split at every boundary, twice', () => {
  for (let i = 0; i <= STREAM.length; i += 1) {
    for (let j = i; j <= STREAM.length; j += 7) {
      const d = new SseDecoder();
      const out = [...d.push(STREAM.slice(0, i)), ...d.push(STREAM.slice(i, j)), ...d.push(STREAM.slice(j))];
      assert.deepEqual(out, EXPECTED, `split at ${i} and ${j}`);
    }
  }
});
